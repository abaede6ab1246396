"""Tap pooled features off any layer of a Hugging Face model, wrapped or not.

A forward hook captures one layer's tensor during the model's normal forward,
so the whole stack never has to return ``output_hidden_states=True`` (which
keeps every layer's activations alive). Usage::

    with FeatureTap(model, pooling="mean") as tap:
        out = model(**batch)
        feats = tap.pooled()          # (B, d); the attention mask is taken from the call

The gradient flows through ``feats`` into the model, so an alignment loss on
them trains the adapter.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn as nn

from .core.hf import FINAL_NORM_NAMES, OUTPUT_HEADS

__all__ = ["POOLINGS", "FeatureTap", "Pooling", "layer_stack", "pool"]

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
_WRAPPER_PREFIXES = ("base_model.model.", "base_model.", "model.")


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The hidden-states tensor in a module's output (tensor, tuple or ModelOutput)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state") and isinstance(x.last_hidden_state, torch.Tensor):
        return x.last_hidden_state
    return None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """Pool token features (B, T, d) to (B, d); a (B, d) input is returned as is.

    - ``"mean"``: mean over positions where the mask is 1.
    - ``"cls"``: the first non-padding token (token 0 with right padding).
    - ``"last"``: the last non-padding token (works for left and right padding).
    Without a mask every position counts.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {list(POOLINGS)}")
    if hidden.dim() == 2:
        return hidden  # already pooled (e.g. BERT's classifier input: pooled CLS after dropout)
    if hidden.dim() != 3:
        raise ValueError(f"cannot pool features of shape {tuple(hidden.shape)}; expected (B, T, d) or (B, d)")
    b, t, _ = hidden.shape
    if attention_mask is None:
        if pooling == "mean":
            return hidden.mean(1)
        return hidden[:, 0] if pooling == "cls" else hidden[:, -1]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (b, t):
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise ValueError(
            f"attention_mask must have shape (batch, seq) = {(b, t)} to match the tapped features, got {shape}"
        )
    mask = attention_mask.to(hidden.device) != 0
    empty = ~mask.any(1)
    if bool(empty.any()):
        raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} have no tokens; cannot pool them")
    rows = torch.arange(b, device=hidden.device)
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1)
    # cls: the first True; last: the last True
    idx = mask.int().argmax(1) if pooling == "cls" else t - 1 - mask.flip(1).int().argmax(1)
    return hidden[rows, idx]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of blocks: its largest non-empty ``nn.ModuleList`` (the shallowest on a tie),
    as ``(name, stack)``; None if it has none. ``layer=<int>`` indexes it."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        return None
    return max(stacks, key=lambda nm: (len(nm[1]), -nm[0].count(".")))


def last_hidden_layer(model: nn.Module) -> str:
    """Name of the module whose output is the backbone's last hidden state: the final norm
    (``norm`` / ``ln_f`` / ...) that is a sibling of the largest layer stack, else that stack's
    last block. The default tap of a model without a task head, and of a causal LM whose fused
    LM head (TRL) never calls ``lm_head``."""
    found = layer_stack(model)
    if found is not None:
        stack_name, stack = found
        named = dict(model.named_modules())
        prefix = stack_name.rsplit(".", 1)[0] + "." if "." in stack_name else ""
        # A final norm that is a sibling of the layer stack produces the last hidden state.
        for norm in FINAL_NORM_NAMES:
            if prefix + norm in named:
                return prefix + norm
        return f"{stack_name}.{len(stack) - 1}"
    raise ValueError(
        f"{type(model).__name__} has no task head ({list(OUTPUT_HEADS)}) and no layer stack; pass layer='<module name>'"
    )


def _block(model: nn.Module, index: int) -> str:
    """Name of block ``index`` of the layer stack (negative counts from the end, as in Python)."""
    found = layer_stack(model)
    if found is None:
        raise ValueError(
            f"layer={index}: {type(model).__name__} has no layer stack (nn.ModuleList of blocks) to index; "
            "pass layer='<module name>'"
        )
    name, stack = found
    n = len(stack)
    if not -n <= index < n:
        raise ValueError(
            f"layer={index} is out of range: {name!r} has {n} blocks, so valid indexes are {-n}..{n - 1} "
            "(negative counts from the end)"
        )
    return f"{name}.{index % n}"


class FeatureTap:
    """Capture features from one layer of ``model`` during its forward pass.

    Args:
        model: any ``nn.Module`` (a transformers model, a ``peft.PeftModel``, a
            peftadapt ``AdaptedModel``).
        layer: ``None`` (default): the *input* of the task head (the shallowest
            module named ``classifier``/``score``/``qa_outputs``/``lm_head``,
            i.e. the feature the classifier actually reads); if the model has no
            head, the output of its final norm (``norm``/``ln_f``/...) or else of
            the last block of its layer stack. A string names a module: the plain
            transformers name (``"bert.encoder.layer.5"``) works on a peft-wrapped
            model too (prefixes like ``base_model.model.`` are resolved). An
            ``nn.Module`` inside ``model`` is used directly. An ``int`` picks block ``i``
            of the model's layer stack (its largest ``nn.ModuleList``: ``model.layers`` of
            a Llama, ``encoder.layer`` of a BERT), negative counting from the end as in
            Python (``-1``: the last block's output, before the final norm).
        pooling: ``"mean"`` (masked mean), ``"cls"`` (first non-padding token) or
            ``"last"`` (last non-padding token; use it for decoders, left or right
            padded). (B, d) captures (BERT's pooled classifier input) are returned as is.
        capture: ``"input"`` or ``"output"`` of the module; default: input for the
            head (``layer=None`` resolving to a head), output otherwise.

    After ``out = model(**batch)``, :meth:`pooled` returns (B, d) features of that
    forward (fp32 at least). The attention mask passed to the model as a keyword
    is remembered; pass ``attention_mask`` to :meth:`pooled` otherwise.
    :meth:`remove` (or leaving the ``with`` block) removes the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | int | nn.Module | None = None,
        pooling: Pooling = "mean",
        capture: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureTap needs an nn.Module, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {list(POOLINGS)}")
        if capture not in (None, "input", "output"):
            raise ValueError(f"unknown capture {capture!r}; valid: 'input', 'output' (or None for the default)")
        self.model = model
        self.pooling = pooling
        self.layer_name, self.module, default_capture = self._resolve(model, layer)
        self.capture = capture or default_capture
        self._hidden: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._in_forward = False
        self._top_used = False
        self._handles = [
            model.register_forward_pre_hook(self._top_pre, with_kwargs=True),
            model.register_forward_hook(self._top_post),
        ]
        if self.capture == "input":
            self._handles.append(self.module.register_forward_pre_hook(self._grab_input, with_kwargs=True))
        else:
            self._handles.append(self.module.register_forward_hook(self._grab_output))

    # -- layer resolution ------------------------------------------------------
    @staticmethod
    def _resolve(model: nn.Module, layer: str | int | nn.Module | None) -> tuple[str, nn.Module, str]:
        named = dict(model.named_modules())
        if isinstance(layer, nn.Module):
            for n, m in named.items():
                if m is layer:
                    return n, m, "output"
            raise ValueError("the given layer module is not a submodule of the model")
        if layer is None:
            for head in OUTPUT_HEADS:  # first match wins, shallowest module
                hits = [n for n in named if n.split(".")[-1] == head]
                if hits:
                    n = min(hits, key=lambda s: s.count("."))
                    return n, named[n], "input"
            n = last_hidden_layer(model)
            return n, named[n], "output"
        if isinstance(layer, int) and not isinstance(layer, bool):
            n = _block(model, layer)
            return n, named[n], "output"
        if not isinstance(layer, str):
            raise TypeError(f"layer must be None, a module name, a block index (int) or an nn.Module, got {layer!r}")
        if layer in named and layer != "":
            return layer, named[layer], "output"
        wanted = [layer]
        for pre in _WRAPPER_PREFIXES:  # a wrapped name given for a plain model
            if layer.startswith(pre):
                wanted.append(layer[len(pre) :])
        for w in wanted:
            hits = [n for n in named if n == w or n.endswith("." + w)]
            if hits:
                shortest = min(n.count(".") for n in hits)
                top = [n for n in hits if n.count(".") == shortest]
                if len(top) > 1:
                    raise ValueError(f"layer {layer!r} is ambiguous; it matches {top[:8]}; give the full name")
                return top[0], named[top[0]], "output"
        sample = [n for n in named if n][:12]
        raise ValueError(f"no module named {layer!r} in {type(model).__name__}; module names look like {sample}")

    # -- hooks -------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        self._top_used = True
        self._in_forward = True
        self._hidden = None
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _top_post(self, module, args, output):
        self._in_forward = False

    def _capturing(self) -> bool:
        # Outside the top-level forward (e.g. activation-checkpoint recomputation during
        # backward) we keep what the real forward captured.
        return self._in_forward or not self._top_used

    def _grab_input(self, module, args, kwargs):
        if not self._capturing():
            return
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self._hidden = _first_tensor(x)

    def _grab_output(self, module, args, output):
        if self._capturing():
            self._hidden = _first_tensor(output)

    # -- results -------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        """The raw captured tensor of the last forward ((B, T, d) or (B, d))."""
        if self._hidden is None:
            raise RuntimeError(
                f"FeatureTap: nothing captured from {self.layer_name!r}; run a forward pass first "
                f"(or the tap was removed)"
            )
        return self._hidden

    def pooled(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) pooled features of the last forward (fp32 at least), with gradient."""
        h = self.features
        mask = attention_mask if attention_mask is not None else self._mask
        out = pool(h, mask, self.pooling)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def clear(self) -> None:
        """Drop the captured tensor (and the graph it holds)."""
        self._hidden = None
        self._mask = None

    def remove(self) -> None:
        """Remove the hooks; the model behaves as before the tap."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTap(layer={self.layer_name!r}, capture={self.capture!r}, pooling={self.pooling!r})"
