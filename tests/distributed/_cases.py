"""The alignment cases the multi-process tests compare with one process.

A small feature extractor + classifier (float64, seeded) turns fixed source /
target inputs into features and logits; each case is an alignment ``Term``.
The single-process reference runs the whole batch; each of N processes runs
its shard (:func:`shards`) and the data-parallel gradient average must give
the same parameter gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

IN, WIDTH, CLASSES = 6, 5, 3


class Net(nn.Module):
    """Linear features -> tanh -> linear classifier (float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Linear(IN, WIDTH).double()
        self.head = nn.Linear(WIDTH, CLASSES).double()

    def forward(self, x):
        f = torch.tanh(self.features(x))
        return f, self.head(f)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(8, IN, generator=g, dtype=torch.float64)
    xt = torch.randn(6, IN, generator=g, dtype=torch.float64) * 1.5 + 0.5
    return xs, xt


# rows of the source / target batch that each of 2 processes holds
SHARDS = {
    "equal": ([range(4), range(4, 8)], [range(3), range(3, 6)]),
    "unequal": ([range(5), range(5, 8)], [range(4), range(4, 6)]),
}


def make_term(case: str):
    """``case`` = "<regularizer>:<scope>"."""
    from peftadapt.align import CDAN, CORAL, DANN, MMD, Entropy, Term

    name, scope = case.split(":")
    torch.manual_seed(2)
    reg = {
        "mmd": lambda: MMD(),
        "coral": lambda: CORAL(scale=1.0),
        "cdan+e": lambda: CDAN(WIDTH, CLASSES, entropy=True, hidden_size=8, dropout=0.0, grl="constant", seed=0),
        "cdan": lambda: CDAN(WIDTH, CLASSES, hidden_size=8, dropout=0.0, grl="constant", seed=0),
        "dann": lambda: DANN(WIDTH, hidden_size=8, dropout=0.0, grl="constant"),
        "entropy": lambda: Entropy(),
        "entropy+div": lambda: Entropy(diversity=True),
    }[name]()
    return Term(reg.double(), weight=1.0, scope=scope)


CASES = [
    f"{r}:{s}"
    for r in ("mmd", "coral", "cdan+e", "cdan", "dann", "entropy", "entropy+div")
    for s in ("global", "local")
]


def run(case: str, shard: str | None, rank: int = 0, world: int = 1, fsdp: bool = False) -> dict:
    """Loss and parameter gradients of one case; ``shard=None``: the whole batch on one process.

    With several processes the network and the term (when it has parameters)
    are wrapped in DistributedDataParallel, which averages the gradients.
    """
    xs, xt = inputs()
    if shard is not None:
        src, tgt = SHARDS[shard]
        xs, xt = xs[list(src[rank])], xt[list(tgt[rank])]
    net, term = Net(), make_term(case)
    mods = {"net": net, "term": term}
    if world > 1 and fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(net, mesh=mesh)
        if any(p.requires_grad for p in term.parameters()):
            fully_shard(term, mesh=mesh)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # distance losses leave the classifier unused: DDP must not wait for its gradients
        net = DDP(net, find_unused_parameters=True)
        if any(p.requires_grad for p in term.parameters()):
            term = DDP(term)
    f, logits = net(torch.cat([xs, xt]))
    fs, ft = f[: len(xs)], f[len(xs) :]
    ls, lt = logits[: len(xs)], logits[len(xs) :]
    loss, _raw = term(fs, ft, ls, lt, progress=0.5)
    loss.backward()

    def full(g):  # an FSDP2 gradient is a sharded DTensor: gather the whole tensor
        return g.full_tensor() if hasattr(g, "full_tensor") else g

    grads = {
        f"{k}.{n}": (full(p.grad).flatten().tolist() if p.grad is not None else None)
        for k, m in mods.items()
        for n, p in m.named_parameters()
    }
    return {"loss": float(loss.detach()), "grads": grads}


def run_manual(case: str, shard: str | None, rank: int = 0, world: int = 1) -> dict:
    """As :func:`run`, with the term's parameters *not* DDP-wrapped: replicated, their
    gradients averaged by :func:`peftadapt.core.comm.average_gradients` (what the Trainer does)."""
    from peftadapt.core import comm as C

    xs, xt = inputs()
    if shard is not None:
        src, tgt = SHARDS[shard]
        xs, xt = xs[list(src[rank])], xt[list(tgt[rank])]
    net, term = Net(), make_term(case)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, find_unused_parameters=True)
    f, logits = net(torch.cat([xs, xt]))
    loss, _ = term(f[: len(xs)], f[len(xs) :], logits[: len(xs)], logits[len(xs) :], progress=0.5)
    loss.backward()
    C.average_gradients([p for p in term.parameters() if p.requires_grad])
    mods = {"net": net.module if world > 1 else net, "term": term}
    grads = {
        f"{k}.{n}": (p.grad.flatten().tolist() if p.grad is not None else None)
        for k, m in mods.items()
        for n, p in m.named_parameters()
    }
    return {"loss": float(loss.detach()), "grads": grads}


def two_discriminators():
    """DANN on from the start, CDAN from progress 0.75: at progress 0.5 only DANN runs."""
    from peftadapt.align import CDAN, DANN, Alignment, Term

    torch.manual_seed(3)
    return Alignment(
        [
            Term(DANN(WIDTH, hidden_size=8, dropout=0.0, grl="constant").double(), name="dann"),
            Term(
                CDAN(WIDTH, CLASSES, hidden_size=8, dropout=0.0, grl="constant", seed=0).double(),
                name="cdan",
                start=0.75,
            ),
        ]
    )


def run_two_discriminators(mode: str, rank: int = 0, world: int = 1, steps: int = 2) -> dict:
    """``steps`` SGD steps with DANN on and CDAN still off, equal shards.

    mode "one": one process, whole batch (the reference); "manual": net under DDP,
    alignment replicated + :func:`average_gradients`; "ddp": alignment wrapped in
    DDP without ``find_unused_parameters`` (what the Trainer did before: expected to fail).
    Returns the final parameters, or the error.
    """
    from peftadapt.core import comm as C

    xs, xt = inputs()
    if world > 1:
        src, tgt = SHARDS["equal"]
        xs, xt = xs[list(src[rank])], xt[list(tgt[rank])]
    net, align = Net(), two_discriminators()
    fwd_net, fwd_align = net, align
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_net = DDP(net, find_unused_parameters=True)
        if mode == "ddp":
            fwd_align = DDP(align)
    params = list(net.parameters()) + list(align.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    vals, cdan_grads = {}, []
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            f, logits = fwd_net(torch.cat([xs, xt]))
            loss, vals = fwd_align(f[: len(xs)], f[len(xs) :], logits[: len(xs)], logits[len(xs) :], progress=0.5)
            loss.backward()
            if mode == "manual":
                C.average_gradients([p for p in align.parameters() if p.requires_grad])
            cdan_grads = [p.grad for p in align.terms[1].parameters()]
            opt.step()
    except RuntimeError as e:
        return {"error": str(e)[:300]}
    return {
        "terms": sorted(vals),
        "cdan_grad_none": all(g is None for g in cdan_grads),
        "params": {
            n: p.detach().flatten().tolist()
            for n, p in list(net.named_parameters(prefix="net")) + list(align.named_parameters(prefix="align"))
        },
    }
