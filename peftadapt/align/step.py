"""The domain-adaptation step, once: :class:`DomainAdaptation` (feature tap + terms + schedule).

Every loop that trains with alignment calls this one object: peftadapt's
``Trainer``, an ``add_alignment`` plugin for transformers' ``Trainer`` / TRL,
and a user's plain PyTorch loop. The step it computes is

    loss(p) = L_task(source) + sum_k lambda_k(p) * D_k(f_s, f_t[, g_s, g_t])

where ``p`` in [0, 1] is the training progress (step / total steps), ``f_s``,
``f_t`` the features a :class:`~peftadapt.FeatureTap` reads off one layer
during the model's own forward, ``g_s``, ``g_t`` the class logits (passed only
to a term that reads them: CDAN, entropy) and ``lambda_k(p)`` term k's
scheduled weight (:class:`~peftadapt.align.Term`).

With several labeled source domains (``source_batch`` a mapping domain name ->
batch) the task loss is the mean of the per-domain task losses, and each term
sees either every source pooled against the target (``sources="pooled"``) or
each source against the target, averaged over the domains (``"per_source"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn as nn

from ..core.hf import is_causal_lm
from ..features import FeatureTap, Pooling
from .numerics import check_progress
from .regularizer import Regularizer
from .terms import Alignment, Term

__all__ = ["SOURCES", "DomainAdaptation", "Sources", "as_alignment", "check_alignment", "source_domains"]

# How the terms see several source domains: all of them concatenated vs the target ("pooled"), or
# the mean over domains of D(f_s^d, f_t) ("per_source"). One source: both are the same.
Sources = Literal["pooled", "per_source"]
SOURCES: tuple[str, ...] = get_args(Sources)


def as_alignment(regularizers: Any) -> Alignment | None:
    """None / an empty list -> None; an :class:`Alignment` as is; a :class:`Term`,
    :class:`Regularizer`, registered name, or a list of those -> an :class:`Alignment`."""
    if regularizers is None or (isinstance(regularizers, (list, tuple)) and not regularizers):
        return None
    if isinstance(regularizers, Alignment):
        return regularizers
    return Alignment(regularizers if isinstance(regularizers, (list, tuple)) else [regularizers])


def check_alignment(alignment: Alignment, model: nn.Module, causal_lm: bool | None = None) -> None:
    """Reject terms that read class logits (CDAN, CDAN+E, entropy) on a causal LM: its
    logits are per token over the vocabulary, not per example over classes.
    ``causal_lm=None`` infers it from the model's class name."""
    if causal_lm is None:
        causal_lm = is_causal_lm(model)
    if causal_lm and alignment.needs_logits:
        names = [t.name for t in alignment.terms if getattr(t.regularizer, "needs_logits", False)]
        raise ValueError(
            f"regularizers {names} read class logits (cdan, cdan+e, entropy) and need a sequence "
            "classifier (task='classification'); for a causal LM use mmd, coral or dann"
        )


def _check_batch(batch: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"{what} must be a mapping of model inputs (the tokenizer's output), got {type(batch).__name__}"
        )
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = (
            f"keys {sorted(batch)}"
            if mask is None
            else f"attention_mask of {type(mask).__name__}"
            + (f" shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else "")
        )
        raise ValueError(
            f"{what} needs an attention_mask (batch, seq) so pooling skips the padding; got {got}. "
            "Pass the tokenizer's output (return_attention_mask=True)"
        )
    return batch


def source_domains(source_batch: Any, what: str = "source_batch") -> dict[str, Mapping[str, Any]] | None:
    """``{domain: batch}`` when ``source_batch`` maps domain names to batches (several source
    domains), None when it is one batch of model inputs. A mix of the two is an error."""
    if not isinstance(source_batch, Mapping):
        raise ValueError(
            f"{what} must be a mapping of model inputs (the tokenizer's output) or a mapping domain name -> "
            f"such a batch, got {type(source_batch).__name__}"
        )
    nested = [k for k, v in source_batch.items() if isinstance(v, Mapping)]
    if not nested:
        return None
    if len(nested) != len(source_batch):
        flat = sorted(str(k) for k, v in source_batch.items() if not isinstance(v, Mapping))
        raise ValueError(
            f"{what} mixes domain batches ({sorted(map(str, nested))}) with model inputs ({flat}); pass either "
            "one batch (keys input_ids, attention_mask, labels) or {domain name: batch} for several source domains"
        )
    for name in source_batch:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: domain names must be non-empty strings, got {name!r}")
    return dict(source_batch)


class DomainAdaptation:
    """The alignment half of a training step: tap features, run the target forward, sum the terms.

    It owns a :class:`~peftadapt.FeatureTap` on ``model`` (forward hooks, removed
    by :meth:`remove` or on leaving a ``with`` block), the terms (an
    :class:`~peftadapt.align.Alignment`) and their schedules. It computes

        loss = L_task(source) + sum_k lambda_k(p) * D_k(f_s, f_t[, g_s, g_t])

    and runs the target forward only while some term's weight is > 0 at ``p``,
    so a source-only warm-up (``Term(..., start=0.5)``) costs what plain
    fine-tuning costs.

    Args:
        model: the (wrapped) model to train; the tap is registered on it.
        regularizers: an :class:`Alignment`, or a :class:`Term` / regularizer /
            registered name, or a list of those (at least one).
        layer, pooling: where and how the tap reads features (see FeatureTap;
            default: the task head's input, masked mean).
        causal_lm: whether ``model`` is a causal LM (its logits are per token,
            so terms that read class logits are rejected); None: from its class name.
        sources: with several source domains (``loss`` given ``{domain: batch}``):
            ``"pooled"``, each term sees the features of every source domain
            concatenated against the target's; ``"per_source"``, each term is the mean
            over domains d of ``D(f_s^d, f_t)`` (logged per domain too). One source
            batch: the two are the same.

    Plain PyTorch loop::

        da = DomainAdaptation(model, [Term("mmd", weight=0.3, start=0.5)])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + da.parameters(), lr=1e-3)
        with da:                                   # hooks off at the end, even on an error
            for step in range(total):
                loss, logs = da.loss(next(source), next(target), progress=step / total)
                loss.backward(); opt.step(); opt.zero_grad()
                if step % 10 == 0:                 # logs hold tensors: sync only when printing
                    print(step, {k: float(v) for k, v in logs.items()})

    Batches are dicts of tensors on the model's device with an ``attention_mask``;
    the source batch has ``labels`` (the task loss is ``outputs.loss``); labels in
    the target batch are dropped (target data is unlabeled).
    """

    def __init__(
        self,
        model: nn.Module,
        regularizers: Alignment | Term | Regularizer | str | Iterable[Any],
        *,
        layer: str | nn.Module | None = None,
        pooling: Pooling = "mean",
        causal_lm: bool | None = None,
        sources: Sources = "pooled",
    ):
        if sources not in SOURCES:
            raise ValueError(f"sources={sources!r} is not a choice; valid: {list(SOURCES)}")
        alignment = as_alignment(regularizers)
        if alignment is None:
            raise ValueError(
                f"DomainAdaptation needs at least one term, got regularizers={regularizers!r}; "
                "e.g. regularizers=[Term('mmd', weight=0.3)] (without terms, train on the task "
                "loss alone: no DomainAdaptation needed)"
            )
        check_alignment(alignment, model, causal_lm)
        self.model = model
        self.alignment = alignment
        self.sources: Sources = sources
        self.tap = FeatureTap(model, layer=layer, pooling=pooling)  # last: nothing to undo if it raises
        self._removed = False

    # -- the schedule ------------------------------------------------------------------
    @property
    def terms(self) -> nn.ModuleList:
        return self.alignment.terms

    def weights(self, progress: float) -> dict[str, float]:
        """{term name: lambda_k(progress)} (host floats: a schedule, no device sync)."""
        return self.alignment.weights(check_progress(progress))

    def active(self, progress: float) -> bool:
        """Whether some term is on at ``progress`` (only then is a target batch needed)."""
        return any(w > 0 for w in self.weights(progress).values())

    # -- the step ----------------------------------------------------------------------
    def loss(
        self,
        source_batch: Mapping[str, Any],
        target_batch: Mapping[str, Any] | None,
        progress: float,
        *,
        model: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Source forward, target forward (if a term is on), and the total loss.

        Returns ``(loss, logs)``: ``loss`` with its graph, ready for ``backward``;
        ``logs`` = ``task_loss``, ``reg_loss`` and ``reg/<term>`` (raw, unweighted) as
        detached tensors, and ``weight/<term>`` as floats. Tensors, so the caller
        decides when to sync with the host. ``target_batch`` may be None while every
        term is off (the caller can skip loading it: see :meth:`active`). ``model``:
        the module to call for the forward when it is a wrapper of the tapped model
        (Accelerate / DDP); default the tapped model.

        Several source domains: ``source_batch`` = ``{domain name: batch}``, one forward
        per domain; the task loss is the mean over domains of each domain's loss (each
        domain counts the same, whatever its batch size), logged as ``task_loss/<domain>``
        too; the terms see the sources as ``sources`` says (``"per_source"`` also logs
        ``reg/<term>/<domain>``).
        """
        p = check_progress(progress)
        self._check_open()
        domains = source_domains(source_batch)
        if domains is not None:
            return self._multi_source_loss(domains, target_batch, p, model)
        source_batch = _check_batch(source_batch, "source_batch")
        out = (model or self.model)(**source_batch)
        task_loss = getattr(out, "loss", None)
        if task_loss is None:
            raise ValueError(
                f"the source forward returned no loss: source_batch needs labels (keys: "
                f"{sorted(source_batch)}); class ids for a classifier, token ids for a causal LM"
            )
        on = self.active(p)
        reg_loss, logs = self.alignment_loss(out, source_batch["attention_mask"], target_batch, p, model=model)
        loss = task_loss + reg_loss if on else task_loss
        return loss, {"task_loss": task_loss.detach(), **logs}

    def alignment_loss(
        self,
        source_outputs: Any,
        source_attention_mask: torch.Tensor,
        target_batch: Mapping[str, Any] | None,
        progress: float,
        *,
        model: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``sum_k lambda_k(p) D_k`` for a caller that already ran the source forward
        through the tapped model (e.g. transformers' ``Trainer.compute_loss``), right
        before this call: the tap still holds that forward's features.

        Runs the target forward only if a term is on; returns ``(reg_loss, logs)``
        with ``reg_loss`` a 0-dim tensor (zero and graph-free while every term is off)
        and ``logs`` as in :meth:`loss` without ``task_loss``.
        """
        p = check_progress(progress)
        self._check_open()
        weights = self.alignment.weights(p)
        logs: dict[str, Any] = {}
        if not any(w > 0 for w in weights.values()):
            self.tap.clear()
            zero = torch.zeros((), dtype=torch.float32, device=source_attention_mask.device)
            logs["reg_loss"] = zero
            logs.update({f"weight/{k}": w for k, w in weights.items()})
            return zero, logs
        fs = self._pooled(source_attention_mask, "source")  # before the target forward overwrites the tap
        target_batch = _check_batch(target_batch, "target_batch (a term is on at this progress)")
        target_batch = {k: v for k, v in target_batch.items() if k != "labels"}
        out_t = (model or self.model)(**target_batch)
        ft = self._pooled(target_batch["attention_mask"], "target")
        self.tap.clear()  # the features live on in the graph; the tap need not hold them
        total, raw = None, {}
        for term in self.alignment.members:
            logits = getattr(term.regularizer, "needs_logits", False)
            weighted, value = term(
                fs, ft, source_outputs.logits if logits else None, out_t.logits if logits else None, progress=p
            )
            if weighted is None:  # off at this progress
                continue
            raw[term.name] = value.detach()
            total = weighted if total is None else total + weighted
        assert total is not None  # a term is on at this progress (checked above), so one added its loss
        logs["reg_loss"] = total.detach()
        logs.update({f"reg/{k}": v for k, v in raw.items()})
        logs.update({f"weight/{k}": w for k, w in weights.items()})
        return total, logs

    def _multi_source_loss(
        self,
        domains: Mapping[str, Mapping[str, Any]],
        target_batch: Mapping[str, Any] | None,
        p: float,
        model: nn.Module | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`loss` for ``{domain: batch}``: a forward per domain (its pooled features
        and logits kept while a term is on), then the target forward and the terms."""
        weights = self.alignment.weights(p)
        on = any(w > 0 for w in weights.values())
        logits = self.alignment.needs_logits
        task: dict[str, torch.Tensor] = {}
        feats: dict[str, torch.Tensor] = {}
        src_logits: dict[str, torch.Tensor] = {}
        for name, batch in domains.items():
            batch = _check_batch(batch, f"source_batch[{name!r}]")
            out = (model or self.model)(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError(
                    f"the forward of source domain {name!r} returned no loss: its batch needs labels "
                    f"(keys: {sorted(batch)})"
                )
            task[name] = out.loss
            if on:
                feats[name] = self._pooled(batch["attention_mask"], f"source domain {name!r}")
                if logits:
                    src_logits[name] = out.logits
        self.tap.clear()
        task_loss = torch.stack(list(task.values())).mean()
        logs: dict[str, Any] = {"task_loss": task_loss.detach()}
        logs.update({f"task_loss/{k}": v.detach() for k, v in task.items()})
        if not on:
            logs["reg_loss"] = torch.zeros((), dtype=torch.float32, device=task_loss.device)
            logs.update({f"weight/{k}": w for k, w in weights.items()})
            return task_loss, logs
        target_batch = _check_batch(target_batch, "target_batch (a term is on at this progress)")
        target_batch = {k: v for k, v in target_batch.items() if k != "labels"}
        out_t = (model or self.model)(**target_batch)
        ft = self._pooled(target_batch["attention_mask"], "target")
        self.tap.clear()
        lt = out_t.logits if logits else None
        if self.sources == "pooled":
            groups = {"": (torch.cat(list(feats.values())), torch.cat(list(src_logits.values())) if logits else None)}
        else:
            groups = {name: (f, src_logits.get(name)) for name, f in feats.items()}
        total = None
        for term in self.alignment.members:
            per: dict[str, torch.Tensor] = {}
            weighted_sum = None
            for name, (fs, ls) in groups.items():
                weighted, value = term(fs, ft, ls if logits else None, lt, progress=p)
                if weighted is None:  # off at this progress
                    break
                per[name] = value
                weighted_sum = weighted if weighted_sum is None else weighted_sum + weighted
            if weighted_sum is None:
                continue
            weighted_mean = weighted_sum / len(per)
            logs[f"reg/{term.name}"] = torch.stack(list(per.values())).mean().detach()
            if self.sources == "per_source":
                logs.update({f"reg/{term.name}/{k}": v.detach() for k, v in per.items()})
            total = weighted_mean if total is None else total + weighted_mean
        assert total is not None  # a term is on at this progress (checked above)
        logs["reg_loss"] = total.detach()
        logs.update({f"weight/{k}": w for k, w in weights.items()})
        return task_loss + total, logs

    def _pooled(self, mask: torch.Tensor, domain: str) -> torch.Tensor:
        captured = self.tap.features
        if captured.shape[0] != mask.shape[0]:
            raise ValueError(
                f"the tap holds features of {captured.shape[0]} examples but the {domain} "
                f"attention_mask has {mask.shape[0]} rows: run the {domain} forward through the "
                "tapped model right before this call"
            )
        return self.tap.pooled(mask)

    def _check_open(self) -> None:
        if self._removed:
            raise RuntimeError("this DomainAdaptation was removed (its hooks are off); build a new one")

    # -- what an optimizer, a checkpoint and a device need ----------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the terms (DANN / CDAN discriminators; [] for MMD,
        CORAL, entropy): give them to the optimizer next to the adapter's."""
        return [p for p in self.alignment.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The terms' state (discriminator weights), for a checkpoint."""
        return self.alignment.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.alignment.load_state_dict(state)

    def to(self, device: torch.device | str) -> DomainAdaptation:
        """Move the terms (discriminators) to ``device``; the model is the caller's."""
        self.alignment.to(device)
        return self

    def train(self, mode: bool = True) -> DomainAdaptation:
        """Train / eval mode of the terms (discriminator dropout); the model is the caller's."""
        self.alignment.train(mode)
        return self

    def eval(self) -> DomainAdaptation:
        return self.train(False)

    # -- hooks ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the tap's hooks: the model behaves as before. Safe to call twice."""
        self.tap.remove()
        self._removed = True

    def __enter__(self) -> DomainAdaptation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        terms = ", ".join(t.name for t in self.alignment.members)
        return (
            f"DomainAdaptation(terms=[{terms}], layer={self.tap.layer_name!r}, pooling={self.tap.pooling!r}, "
            f"sources={self.sources!r})"
        )
