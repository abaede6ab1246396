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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..core.hf import is_causal_lm
from ..features import FeatureTap, Pooling
from .numerics import check_progress
from .regularizer import Regularizer
from .terms import Alignment, Term
from .verbalizer import IGNORE_INDEX, check_class_tokens, class_logits, prompt_mask

__all__ = ["DomainAdaptation", "as_alignment", "check_alignment"]


def as_alignment(regularizers: Any) -> Alignment | None:
    """None / an empty list -> None; an :class:`Alignment` as is; a :class:`Term`,
    :class:`Regularizer`, registered name, or a list of those -> an :class:`Alignment`."""
    if regularizers is None or (isinstance(regularizers, (list, tuple)) and not regularizers):
        return None
    if isinstance(regularizers, Alignment):
        return regularizers
    return Alignment(regularizers if isinstance(regularizers, (list, tuple)) else [regularizers])


def check_alignment(
    alignment: Alignment, model: nn.Module, causal_lm: bool | None = None, class_tokens: Sequence[int] | None = None
) -> None:
    """The terms fit the model. On a causal LM, terms that read class logits (CDAN, CDAN+E,
    entropy) need ``class_tokens`` (its logits are per token over the vocabulary, not per example
    over classes); ``target_lm`` (the model's own LM loss) and ``class_tokens`` need a causal LM.
    ``causal_lm=None`` infers it from the model's class name."""
    if causal_lm is None:
        causal_lm = is_causal_lm(model)
    if causal_lm and alignment.needs_logits and class_tokens is None:
        names = [t.name for t in alignment.members if getattr(t.regularizer, "needs_logits", False)]
        raise ValueError(
            f"regularizers {names} read class logits (cdan, cdan+e, entropy): a sequence classifier's "
            "(task='classification'), or a causal LM's read off its answer tokens: pass class_tokens (run file: "
            "features.class_tokens, e.g. [positive, negative]), or use mmd, coral, dann or target_lm"
        )
    if not causal_lm and alignment.needs_lm_loss:
        raise ValueError(
            "target_lm is a causal LM's own next-token loss on the target batch, and this model is a "
            "classifier; use it with a causal LM (task='causal_lm'), or drop it"
        )
    if not causal_lm and class_tokens is not None:
        raise ValueError(
            "class_tokens reads class logits off a causal LM's answer tokens; this model is a classifier, "
            "whose logits are class logits already: drop class_tokens"
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
            default: the task head's input, masked mean). ``layer`` is a module name,
            a block index of the layer stack (``-1``: the last block) or a module.
        causal_lm: whether ``model`` is a causal LM (its logits are per token,
            so terms that read class logits need ``class_tokens``); None: from its class name.
        class_tokens: a causal LM's answer token ids, one per class in class order (e.g.
            ``class_token_ids(tokenizer, ["positive", "negative"])``): the class logits that
            entropy / CDAN / CDAN+E read are the LM logits at each row's last prompt position
            at these ids (see :mod:`peftadapt.align.verbalizer`). The source batch's
            answer-only ``labels`` locate its prompt end; a target row's is its last
            attended token (the prompt ends with the generation prompt).

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
    the target batch are dropped (target data is unlabeled). While a ``target_lm`` term
    is on, the target forward gets ``labels = input_ids`` with the padding (and each row's
    first token, which nothing precedes) set to -100, and the term's value is that forward's
    ``loss``: the model's mean next-token loss on the target, the same left or right padded.

    On a causal LM whose source labels cover the answer only (prompt tokens -100), the source
    features are pooled over each row's prompt (the positions before its first label), the
    part a target prompt has too: ``pooling="last"`` then reads the last prompt token of both
    domains, the position that produces the answer.
    """

    def __init__(
        self,
        model: nn.Module,
        regularizers: Alignment | Term | Regularizer | str | Iterable[Any],
        *,
        layer: str | int | nn.Module | None = None,
        pooling: Pooling = "mean",
        causal_lm: bool | None = None,
        class_tokens: Sequence[int] | None = None,
    ):
        alignment = as_alignment(regularizers)
        if alignment is None:
            raise ValueError(
                f"DomainAdaptation needs at least one term, got regularizers={regularizers!r}; "
                "e.g. regularizers=[Term('mmd', weight=0.3)] (without terms, train on the task "
                "loss alone: no DomainAdaptation needed)"
            )
        if class_tokens is not None:
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            class_tokens = check_class_tokens(class_tokens, vocab if isinstance(vocab, int) else None)
        self.causal_lm = is_causal_lm(model) if causal_lm is None else bool(causal_lm)
        check_alignment(alignment, model, self.causal_lm, class_tokens)
        self.class_tokens: list[int] | None = None if class_tokens is None else list(class_tokens)
        self.model = model
        self.alignment = alignment
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

    @property
    def needs_target_logits(self) -> bool:
        """Whether the target forward must return every position's logits (``target_lm``'s loss,
        class logits read through ``class_tokens``), so a caller must not pass ``logits_to_keep``."""
        return self.alignment.needs_lm_loss or (self.class_tokens is not None and self.alignment.needs_logits)

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
        """
        p = check_progress(progress)
        self._check_open()
        source_batch = _check_batch(source_batch, "source_batch")
        out = (model or self.model)(**source_batch)
        task_loss = getattr(out, "loss", None)
        if task_loss is None:
            raise ValueError(
                f"the source forward returned no loss: source_batch needs labels (keys: "
                f"{sorted(source_batch)}); class ids for a classifier, token ids for a causal LM"
            )
        on = self.active(p)
        reg_loss, logs = self.alignment_loss(
            out, source_batch["attention_mask"], target_batch, p, model=model, source_labels=source_batch.get("labels")
        )
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
        source_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``sum_k lambda_k(p) D_k`` for a caller that already ran the source forward
        through the tapped model (e.g. transformers' ``Trainer.compute_loss``), right
        before this call: the tap still holds that forward's features.

        Runs the target forward only if a term is on; returns ``(reg_loss, logs)``
        with ``reg_loss`` a 0-dim tensor (zero and graph-free while every term is off)
        and ``logs`` as in :meth:`loss` without ``task_loss``. ``source_labels``: the
        source batch's labels. On a causal LM with answer-only labels they locate each
        row's prompt: its features are pooled over the prompt alone (what a target prompt
        holds; a row whose every token is a target is pooled whole), and its class logits
        (``class_tokens``) are read right before the answer.
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
        source_mask = source_attention_mask
        if self.causal_lm and source_labels is not None:  # a causal LM's source: its prompt, as the target's
            source_mask = prompt_mask(source_attention_mask, source_labels)
        fs = self._pooled(source_mask, "source")  # before the target forward overwrites the tap
        target_batch = _check_batch(target_batch, "target_batch (a term is on at this progress)")
        target_batch = {k: v for k, v in target_batch.items() if k != "labels"}
        on = [t for t in self.alignment.members if weights[t.name] > 0]
        lm_on = any(getattr(t.regularizer, "needs_lm_loss", False) for t in on)
        if lm_on:  # target_lm: the model's own next-token loss on the target, padding ignored
            target_batch["labels"] = _lm_labels(target_batch)
        out_t = (model or self.model)(**target_batch)
        ft = self._pooled(target_batch["attention_mask"], "target")
        self.tap.clear()  # the features live on in the graph; the tap need not hold them
        lm_loss = _lm_loss(out_t) if lm_on else None
        ls = lt = None
        if any(getattr(t.regularizer, "needs_logits", False) for t in on):
            ls, lt = self._class_logits(source_outputs, source_attention_mask, source_labels, out_t, target_batch)
        total, raw = None, {}
        for term in self.alignment.members:
            logits = getattr(term.regularizer, "needs_logits", False)
            weighted, value = term(
                fs, ft, ls if logits else None, lt if logits else None, progress=p, target_lm_loss=lm_loss
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

    def _class_logits(
        self,
        source_outputs: Any,
        source_mask: torch.Tensor,
        source_labels: torch.Tensor | None,
        out_t: Any,
        target_batch: Mapping[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (source, target) logits a class-logits term reads: the model's own (a classifier), or
        read off a causal LM's answer tokens (``class_tokens``)."""
        ls, lt = getattr(source_outputs, "logits", None), getattr(out_t, "logits", None)
        if ls is None or lt is None:
            raise ValueError(
                "a term reads class logits but the model's outputs have no logits; call the model so that "
                "it returns them (return_outputs=True for a trainer's compute_loss)"
            )
        if self.class_tokens is None:
            return ls, lt
        if source_labels is None:
            raise ValueError(
                "class_tokens: the source's class logits sit right before its answer, found from its answer-only "
                "labels; pass source_labels=<the source batch's labels> to alignment_loss"
            )
        return (
            class_logits(ls, self.class_tokens, source_mask, source_labels),
            class_logits(lt, self.class_tokens, target_batch["attention_mask"]),
        )

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
        extra = "" if self.class_tokens is None else f", class_tokens={self.class_tokens}"
        return f"DomainAdaptation(terms=[{terms}], layer={self.tap.layer_name!r}, pooling={self.tap.pooling!r}{extra})"


def _lm_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """Next-token targets of an unlabeled batch: its input ids, with the padding (attention_mask 0) and
    each row's first token set to -100. Nothing precedes the first token: with left padding the model
    would otherwise be asked to predict it from a pad position. So the loss is the mean next-token
    cross-entropy of the unpadded rows, left or right padded."""
    ids, mask = batch.get("input_ids"), batch["attention_mask"]
    if not isinstance(ids, torch.Tensor) or ids.shape != mask.shape:
        raise ValueError(
            "target_lm needs the target batch's input_ids (batch, seq), the same shape as its attention_mask, "
            f"to use as its next-token targets; got keys {sorted(batch)}"
        )
    attended = mask != 0
    labels = ids.masked_fill(~attended, IGNORE_INDEX)
    labels[torch.arange(ids.shape[0], device=ids.device), attended.int().argmax(1)] = IGNORE_INDEX
    return labels


def _lm_loss(out_t: Any) -> torch.Tensor:
    loss = getattr(out_t, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            "target_lm: the target forward with labels returned no loss; the model must compute its "
            "language-modeling loss from labels (a transformers causal LM, *ForCausalLM)"
        )
    return loss
