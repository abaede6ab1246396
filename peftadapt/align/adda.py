"""ADDA, the GAN-style family of domain adaptation, in its parameter-efficient form.

Adversarial Discriminative Domain Adaptation (Tzeng et al., CVPR 2017): after source
training, a *target encoder* M_t, initialised from the source encoder M_s, and a
domain discriminator D play a GAN game with inverted labels, in alternating updates:

    L_D   = 0.5 * [ mean_i BCE(D(M_s(x_s,i)), 1) + mean_j BCE(D(M_t(x_t,j)), 0) ]   (D only)
    L_M_t =       mean_j BCE(D(M_t(x_t,j)), 1)                                      (M_t only)

M_s and the classifier head C stay fixed; at test time target data goes through M_t
and C. (The paper's L_D sums the two means; the 0.5 is DANN's convention here, as
in :func:`peftadapt.align.adversarial._domain_bce`: it only rescales D's step.)

Parameter-efficient: the frozen base model is shared. "The encoder" is the model's
trainable tensors (LoRA, adapters, prefix, ...), so M_s is a snapshot of them
(:attr:`ADDA.source_params`, a few MB), swapped in for the live parameters during the
source forward (what ``torch.func.functional_call`` does; see ``_source_weights``), and M_t is the
live parameters (which start equal to the snapshot). The head's parameters are
never updated here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.autograd import swapped_parameters
from ..core.hf import HEAD_NAMES
from ..features import FeatureTap, Pooling
from .adversarial import DomainDiscriminator, _domain_bce
from .numerics import full_precision

__all__ = ["ADDA", "head_parameter_names"]

_SOURCE_PREFIX = "source."
_DISC_PREFIX = "discriminator."


class ADDA:
    """The adversarial phase of ADDA on a model whose trainable tensors are the adapter.

    Build it right after source training: it snapshots the model's trainable tensors
    as the frozen source adapter (+ head) and takes the live ones, minus the head,
    as the target adapter.

    Args:
        model: any module called as ``model(**batch)`` (a wrapped transformers model,
            or your own, e.g. a cached-trunk wrapper whose forward takes hidden states).
        discriminator: a module mapping features ``(B, d)`` to domain logits ``(B, 1)`` or
            ``(B,)``; None: a :class:`~peftadapt.align.DomainDiscriminator` of width
            ``in_features`` (``hidden_size``, ``depth``, ``dropout``), seeded with ``seed``.
        layer, pooling, capture: where a :class:`~peftadapt.FeatureTap` reads the features
            (default: the task head's input, masked mean: what the head classifies).
        features: instead of a tap, a function of the model's output returning the
            ``(B, d)`` features (e.g. ``lambda out: out[0]`` for a model returning
            ``(features, logits)``).
        head: names of the head modules (a name matches any dotted component of a
            parameter name); their parameters never change here. None: transformers'
            head names (``classifier``, ``score``, ... :data:`peftadapt.core.hf.HEAD_NAMES`).
        in_features: the feature width; None: the ``in_features`` of the linear layer
            the tap reads the input of (the default layer).
        seed: seeds the default discriminator's initialisation.

    Plain PyTorch loop::

        adda = ADDA(model)                       # after source training
        d_opt = torch.optim.Adam(adda.discriminator.parameters(), lr=1e-4)
        t_opt = torch.optim.Adam(adda.target_parameters(), lr=1e-5)
        with adda:                               # the tap's hooks off at the end
            for step in range(n):
                logs = adda.step(next(source), next(target), d_opt, t_opt)

    Batches are dicts of model inputs; ``labels`` are dropped (nothing here is supervised).
    """

    def __init__(
        self,
        model: nn.Module,
        discriminator: nn.Module | None = None,
        *,
        layer: str | int | nn.Module | None = None,
        pooling: Pooling = "mean",
        capture: str | None = None,
        features: Callable[[Any], torch.Tensor] | None = None,
        head: str | Iterable[str] | None = None,
        in_features: int | None = None,
        hidden_size: int = 1024,
        depth: int = 2,
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ADDA needs an nn.Module, got {type(model).__name__}")
        if features is not None and not callable(features):
            raise TypeError(f"features must be a function of the model's output, got {type(features).__name__}")
        self.model = model
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.head_names = head_parameter_names(model, head)
        self._target = [p for n, p in trainable.items() if n not in self.head_names]
        if not self._target:
            raise ValueError(
                f"ADDA: {type(model).__name__} has no trainable parameters besides the head "
                f"{self.head_names[:4]}: wrap it with an adapter first (peftadapt.wrap(model, 'lora'))"
            )
        self.source_params: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in trainable.items()}
        self._live = trainable
        self._features = features
        self.tap = None if features is not None else FeatureTap(model, layer=layer, pooling=pooling, capture=capture)
        try:
            if discriminator is None:
                width = in_features if in_features is not None else self._tap_width()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed))
                    discriminator = DomainDiscriminator(width, hidden_size, depth, dropout)
                p0 = next(iter(self._target))
                discriminator.to(p0.device)
            elif not isinstance(discriminator, nn.Module):
                raise TypeError(f"discriminator must be an nn.Module or None, got {type(discriminator).__name__}")
        except Exception:
            self.remove()
            raise
        self.discriminator = discriminator

    def _tap_width(self) -> int:
        linear = (
            None if self.tap is None else next((m for m in self.tap.module.modules() if isinstance(m, nn.Linear)), None)
        )
        if linear is None or self.tap is None or self.tap.capture != "input":
            where = "a features function" if self.tap is None else f"layer {self.tap.layer_name!r}"
            raise ValueError(f"ADDA cannot tell the feature width of {where}: pass in_features=<width>")
        return int(linear.in_features)

    # -- the two encoders --------------------------------------------------------------
    def target_parameters(self) -> list[nn.Parameter]:
        """The target adapter: the model's trainable parameters without the head. Give them
        to the target optimizer."""
        return list(self._target)

    def _read(self, out: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        if self._features is not None:
            f = self._features(out)
        else:
            assert self.tap is not None
            f = self.tap.pooled(batch.get("attention_mask"))
            self.tap.clear()
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"ADDA features must be a (batch, width) tensor, got {got}")
        return f

    def source_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``M_s(x)``: features of the frozen source adapter, without gradient, in eval
        mode (no dropout: the source encoder is a fixed feature extractor)."""
        batch = _inputs(batch, "source_batch")
        was = self.model.training
        self.model.train(False)
        try:
            with torch.no_grad(), self._source_weights():
                out = self.model(**batch)
                return self._read(out, batch).detach()
        finally:
            self.model.train(was)

    @contextlib.contextmanager
    def _source_weights(self) -> Iterator[None]:
        """The snapshot in place of the live trainable parameters, for the duration of the block.

        Like ``torch.func.functional_call(model, source_params)``, which we do not use: on a model
        that reaches one submodule by two paths (a wrapper keeping ``self.net = wrap(hf)`` and
        ``self.hf = base_model(self.net)``) torch 2.x leaves the snapshot in the model and computes
        with the wrong weights. Here every module is visited once, its parameter entries swapped
        and put back."""
        by_id = {id(p): nn.Parameter(self.source_params[n], requires_grad=False) for n, p in self._live.items()}
        with swapped_parameters(self.model, by_id):
            yield

    def target_features(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> torch.Tensor:
        """``M_t(x)``: features of the live (target) adapter, with gradient. ``model``: a
        wrapper of the same model to call (Accelerate / DDP); default the model."""
        batch = _inputs(batch, "target_batch")
        return self._read((model or self.model)(**batch), batch)

    # -- the two losses ------------------------------------------------------------------
    def _d(self, f: torch.Tensor) -> torch.Tensor:
        """D's logits (B,), in D's own dtype (fp32) with autocast off, as DANN's discriminator runs."""
        w = next(self.discriminator.parameters(), None)
        with full_precision(f):
            z = self.discriminator(f if w is None else f.to(w.dtype))
        return z.reshape(f.shape[0]).float()

    @torch.no_grad()
    def discriminator_accuracy(self, source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """The fraction of both batches D labels right (source: logit > 0); 0.5 is a fooled D."""
        return torch.cat([self._d(source_features) > 0, self._d(target_features) <= 0]).float().mean()

    def discriminator_loss(self, source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """``L_D = 0.5 [mean BCE(D(f_s), 1) + mean BCE(D(f_t), 0)]``; the features are
        detached (this loss trains D only)."""
        return _domain_bce(self._d(source_features.detach()), self._d(target_features.detach()))

    def target_loss(self, target_features: torch.Tensor) -> torch.Tensor:
        """``L_M = mean BCE(D(f_t), 1)``, the inverted-label GAN loss: its gradient reaches
        the target features only (D's parameters get none)."""
        flags = [p.requires_grad for p in self.discriminator.parameters()]
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        try:
            logit = self._d(target_features)
        finally:
            for p, f in zip(self.discriminator.parameters(), flags, strict=True):
                p.requires_grad_(f)
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))

    def step(
        self,
        source_batch: Mapping[str, Any],
        target_batch: Mapping[str, Any],
        d_optimizer: torch.optim.Optimizer,
        t_optimizer: torch.optim.Optimizer,
    ) -> dict[str, torch.Tensor]:
        """One alternating update: D on ``L_D`` (one ``d_optimizer`` step), then the target
        adapter on ``L_M`` against the updated D (one ``t_optimizer`` step); the target
        forward is run once. The two may be one optimizer holding both parameter sets (a
        parameter without a gradient is not stepped). Returns detached ``d_loss``,
        ``t_loss`` and ``d_accuracy`` (D's accuracy on this batch pair, before its step)."""
        fs = self.source_features(source_batch)
        ft = self.target_features(target_batch)
        d_optimizer.zero_grad(set_to_none=True)
        t_optimizer.zero_grad(set_to_none=True)
        d_loss = self.discriminator_loss(fs, ft)
        d_loss.backward()
        acc = self.discriminator_accuracy(fs, ft)
        d_optimizer.step()
        d_optimizer.zero_grad(set_to_none=True)
        t_loss = self.target_loss(ft)
        t_loss.backward()
        self.drop_head_grads()
        t_optimizer.step()
        t_optimizer.zero_grad(set_to_none=True)
        return {"d_loss": d_loss.detach(), "t_loss": t_loss.detach(), "d_accuracy": acc}

    def drop_head_grads(self) -> None:
        """Set the head's gradients to None, so no optimizer (weight decay included) moves it."""
        named = dict(self.model.named_parameters())
        for n in self.head_names:
            named[n].grad = None

    # -- checkpoint, device, mode ------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The discriminator (``discriminator.*``) and the source snapshot (``source.*``)."""
        out = {_DISC_PREFIX + k: v for k, v in self.discriminator.state_dict().items()}
        out.update({_SOURCE_PREFIX + k: v for k, v in self.source_params.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        disc = {k[len(_DISC_PREFIX) :]: v for k, v in state.items() if k.startswith(_DISC_PREFIX)}
        src = {k[len(_SOURCE_PREFIX) :]: v for k, v in state.items() if k.startswith(_SOURCE_PREFIX)}
        if set(src) != set(self.source_params):
            missing, unknown = sorted(set(self.source_params) - set(src)), sorted(set(src) - set(self.source_params))
            raise ValueError(
                f"ADDA state does not match the model: source tensors missing {missing[:4]}, unexpected "
                f"{unknown[:4]}; was it saved from the same model and method?"
            )
        self.discriminator.load_state_dict(disc)
        for k, v in src.items():
            self.source_params[k].copy_(v)

    def to(self, device: torch.device | str) -> ADDA:
        """Move the discriminator and the source snapshot to ``device``."""
        self.discriminator.to(device)
        self.source_params = {k: v.to(device) for k, v in self.source_params.items()}
        return self

    def train(self, mode: bool = True) -> ADDA:
        """Train / eval mode of the discriminator (its dropout); the model is the caller's."""
        self.discriminator.train(mode)
        return self

    def eval(self) -> ADDA:
        return self.train(False)

    def remove(self) -> None:
        """Remove the feature tap's hooks (safe to call twice)."""
        if self.tap is not None:
            self.tap.remove()

    def __enter__(self) -> ADDA:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        where = "features=<function>" if self.tap is None else f"layer={self.tap.layer_name!r}"
        return f"ADDA({where}, target tensors={len(self._target)}, head={self.head_names})"


def head_parameter_names(model: nn.Module, head: str | Iterable[str] | None = None) -> list[str]:
    """Names of ``model``'s trainable parameters that belong to the head: a dotted component of the
    name is one of ``head`` (default :data:`~peftadapt.core.hf.HEAD_NAMES`: classifier, score, ...)."""
    heads = set(HEAD_NAMES) if head is None else {head} if isinstance(head, str) else set(head)
    return [n for n, p in model.named_parameters() if p.requires_grad and heads & set(n.split("."))]


def _inputs(batch: Any, what: str) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise ValueError(f"ADDA {what} must be a mapping of model inputs, got {type(batch).__name__}")
    return {k: v for k, v in batch.items() if k != "labels"}
