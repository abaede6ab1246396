"""Meta-learning across source domains: MLDG (Li et al., "Learning to Generalize: Meta-Learning for
Domain Generalization", AAAI 2018) over the trainable (adapter) weights.

Each step splits the source domains into meta-train and meta-test domains and minimises

    L_train(theta) + beta * L_test(theta - alpha * grad L_train(theta))

with ``alpha`` the inner learning rate and ``beta`` the meta weight: a step that lowers the loss on the
meta-train domains must also lower it on a held-out domain. Second order differentiates through the inner
gradient (``theta'`` swapped in for the trainable parameters: ``core.autograd.swapped_parameters``); first
order drops that term: the gradient is ``grad L_train(theta) + beta * grad L_test(theta')`` at
``theta' = theta - alpha * grad L_train(theta)``. With a :class:`~peftadapt.align.DomainAdaptation`,
``L_train`` also carries its alignment terms to the unlabeled target.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..align.step import DomainAdaptation, source_domains
from ..core.autograd import swapped_parameters

__all__ = ["MLDG"]


def _number(value: Any, name: str, low: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok or value != value or value == float("inf"):
        raise ValueError(f"MLDG {name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def _task_loss(model: nn.Module, batch: Mapping[str, Any], domain: str, params: dict[int, Any] | None = None):
    """``model(**batch).loss``; ``params``: {id(parameter): tensor} used in place of those parameters."""
    if params is None:
        out = model(**batch)
    else:
        with swapped_parameters(model, params):
            out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"the forward of source domain {domain!r} returned no loss: its batch needs labels (keys: {sorted(batch)})"
        )
    return loss


class MLDG:
    """One MLDG meta-step per :meth:`backward` call; the caller owns the optimizer.

    Args:
        model: any module called as ``model(**batch)`` that returns an output with ``.loss``
            (a wrapped transformers model, or a user's wrapper around one).
        inner_lr: ``alpha``, the step size of the virtual meta-train update (> 0).
        meta_weight: ``beta``, the weight of the meta-test loss (>= 0).
        first_order: drop the second-order term (no gradient through the inner gradient):
            cheaper, one extra forward + backward per meta-test domain.
        meta_test_domains: how many source domains are held out as meta-test each step
            (at least one domain must stay meta-train).
        seed: the meta-test domains of call ``i`` are a pure function of ``(seed, i)``; the
            call count is :attr:`step` (in :meth:`state_dict`, so a resumed run draws the same).
        params: the meta parameters as ``(name, parameter)`` pairs of ``model`` (names as
            ``model.named_parameters()`` gives them); default every parameter with ``requires_grad``.

    Plain PyTorch loop::

        ml = MLDG(model, inner_lr=1e-3, meta_weight=1.0, first_order=True, seed=0)
        for step in range(total):
            opt.zero_grad()
            logs = ml.backward({"books": next(b), "dvd": next(d), "kitchen": next(k)})
            opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        meta_weight: float = 1.0,
        first_order: bool = False,
        meta_test_domains: int = 1,
        seed: int = 0,
        params: Iterable[tuple[str, nn.Parameter]] | None = None,
    ):
        self.model = model
        self.inner_lr = _number(inner_lr, "inner_lr", 0.0, strict=True)
        self.meta_weight = _number(meta_weight, "meta_weight", 0.0, strict=False)
        if isinstance(meta_test_domains, bool) or not isinstance(meta_test_domains, int) or meta_test_domains < 1:
            raise ValueError(f"MLDG meta_test_domains must be an int >= 1, got {meta_test_domains!r}")
        self.first_order = bool(first_order)
        self.meta_test_domains = meta_test_domains
        self.seed = int(seed)
        self.step = 0
        named = list(params) if params is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("MLDG found no trainable parameters in the model; wrap it first (peftadapt.wrap)")
        self.params: dict[str, nn.Parameter] = dict(named)
        self.last_split: tuple[list[str], list[str]] = ([], [])

    def split(self, domains: Iterable[str], step: int | None = None) -> tuple[list[str], list[str]]:
        """``(meta-train, meta-test)`` domain names for call ``step`` (default: the next call)."""
        names = sorted(domains)
        if len(names) <= self.meta_test_domains:
            raise ValueError(
                f"MLDG needs more source domains than meta_test_domains={self.meta_test_domains} (one at least "
                f"stays meta-train); got {len(names)}: {names}"
            )
        rng = random.Random(f"mldg:{self.seed}:{self.step if step is None else step}")
        test = sorted(rng.sample(names, self.meta_test_domains))
        return [n for n in names if n not in test], test

    def backward(
        self,
        source_batches: Mapping[str, Mapping[str, Any]],
        target_batch: Mapping[str, Any] | None = None,
        progress: float = 0.0,
        *,
        da: DomainAdaptation | None = None,
        model: nn.Module | None = None,
        scale: float = 1.0,
    ) -> dict[str, Any]:
        """Compute the MLDG loss of one step and backpropagate it: adds its gradient to the ``.grad``
        of the meta parameters (and of ``da``'s discriminators). Returns logs (detached tensors):
        ``loss``, ``meta_train_loss``, ``meta_test_loss``, ``meta_test/<domain>`` and, with ``da``,
        its logs (``task_loss``, ``reg/<term>``, ...). ``model``: a wrapper to call instead of
        ``self.model`` (the same parameters, under any names); ``target_batch`` and ``progress``
        go to ``da``; ``scale`` multiplies the gradient (``1 / k`` to accumulate k calls), not the logs."""
        domains = source_domains(source_batches, "source_batches")
        if domains is None:
            raise ValueError(
                "MLDG needs several source domains: pass {domain name: batch}, got one batch "
                f"(keys {sorted(source_batches)})"
            )
        train, test = self.split(domains)
        self.step += 1
        self.last_split = (train, test)
        net = model or self.model
        logs: dict[str, Any] = {}
        if da is not None:
            l_train, logs = da.loss({d: domains[d] for d in train}, target_batch, progress, model=net)
        else:
            l_train = torch.stack([_task_loss(net, domains[d], d) for d in train]).mean()
            logs["task_loss"] = l_train.detach()
        tensors = list(self.params.values())
        # first order frees L_train's graph here, so the discriminators' gradients are taken now too
        extra = da.parameters() if da is not None and self.first_order else []
        grads = torch.autograd.grad(
            l_train, tensors + extra, create_graph=not self.first_order, allow_unused=True, materialize_grads=True
        )
        if self.first_order:
            # theta' = theta - alpha * g with g a constant: d theta' / d theta = I, so backward of L_test(theta')
            # adds grad L_test(theta') to theta's .grad; grad L_train is added here (its graph is freed)
            for p, g in zip(tensors + extra, grads, strict=True):
                p.grad = scale * g.detach() if p.grad is None else p.grad + scale * g.detach()
        name_in_net = {id(p): n for n, p in net.named_parameters()}
        missing = [n for n, p in self.params.items() if id(p) not in name_in_net]
        if missing:
            raise ValueError(f"MLDG: meta parameters {missing[:3]} are not parameters of the model called")
        step = [g.detach() if self.first_order else g for g in grads]
        moved = {id(p): p - self.inner_lr * g for p, g in zip(tensors, step, strict=False)}
        per = {d: _task_loss(net, domains[d], d, moved) for d in test}
        l_test = torch.stack(list(per.values())).mean()
        total = l_test * self.meta_weight if self.first_order else l_train + self.meta_weight * l_test
        if da is not None:
            da.tap.clear()  # the meta-test forwards went through the tap; nothing reads them
        if total.requires_grad:
            try:
                (total * scale).backward()
            except RuntimeError as e:
                if self.first_order or "derivative for" not in str(e):
                    raise
                raise RuntimeError(
                    f"second-order MLDG backpropagates through a gradient, and an op of this model has no double "
                    f"backward ({str(e).splitlines()[0]}); use first_order=True, or for a transformers model load "
                    "it with attn_implementation='eager'"
                ) from e
        logs.update(
            {
                "loss": (l_train + self.meta_weight * l_test).detach(),
                "meta_train_loss": l_train.detach(),
                "meta_test_loss": l_test.detach(),
            }
        )
        logs.update({f"meta_test/{d}": v.detach() for d, v in per.items()})
        return logs

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to draw the same meta-test domains: the call count."""
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"MLDG(inner_lr={self.inner_lr}, meta_weight={self.meta_weight}, first_order={self.first_order}, "
            f"meta_test_domains={self.meta_test_domains}, params={len(self.params)})"
        )
