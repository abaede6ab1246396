"""Checkpoints of sharded parameters: a tiny LoRA classifier trained under torch FSDP2
(``fully_shard`` over a CPU device mesh) and the same model unsharded in one process.

Every process trains on the *same* batch, so the FSDP-averaged gradient equals the
one-process gradient and the two runs must end at the same weights; the sharded
run's checkpoint must then load in one process (and the other way round).
"""

from __future__ import annotations

import torch

STEPS = 2


def build(mesh=None):
    """(model, optimizer, scheduler); with ``mesh``: every encoder layer and the root
    are ``fully_shard``-ed (parameters become DTensors, one shard per process)."""
    from tests.train.conftest import tiny_classifier

    model = tiny_classifier(seed=0, dropout=0.0)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        import peftadapt

        for layer in peftadapt.base_model(model).bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sch


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    from tests.train.conftest import VOCAB

    ids = torch.randint(5, VOCAB, (4, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def train(model, opt, sch, steps: int) -> None:
    model.train()
    for _ in range(steps):
        model(**batch()).loss.backward()
        opt.step()
        sch.step()
        opt.zero_grad(set_to_none=True)
