"""Bottleneck adapters: Houlsby et al. (2019) and Pfeiffer et al. (2021).

An adapter is a small residual bottleneck MLP inserted after a sublayer::

    adapter(x) = x + s * W_up( dropout( act( W_down x + b_down ) ) ) + s * b_up

with ``W_down: h -> b``, ``W_up: b -> h``, ``b = h // reduction_factor`` (or
``bottleneck_size``) and residual scale ``s``. ``W_up`` and ``b_up`` start at
zero, so the wrapped model computes exactly the base model at step 0. One
adapter has ``2*h*b + b + h`` parameters.

Placement, as in the papers:

* **Houlsby** ("Parameter-Efficient Transfer Learning for NLP", ICML 2019,
  Fig. 2): two adapters per layer, each applied to the output of the
  sublayer's final projection *before* the residual add (and, in post-norm
  BERT, before the LayerNorm): BERT ``attention.output.dense`` and
  ``output.dense``; pre-norm decoders ``self_attn.o_proj`` and
  ``mlp.down_proj`` (Llama/Qwen/Mistral), ``attn.c_proj`` and ``mlp.c_proj``
  (GPT-2), i.e. on the sublayer output before ``x + sublayer(norm(x))``.
* **Pfeiffer** ("AdapterFusion", EACL 2021): one adapter per layer, after the
  feed-forward block only (same point as Houlsby's second adapter).

``placement`` overrides where adapters go ("attention", "ffn" or both).

>>> model = peftadapt.wrap(model, "houlsby", reduction_factor=16)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.hf import LM_HEAD_NAMES, find_task_head, hf_config
from .adapted_model import AdaptedModel, check_unwrapped
from .base import MethodConfig, field, register_method
from .slots import AdapterSlot, Slot, add_head_copies, get_parent

STYLES = ("houlsby", "pfeiffer")
PLACEMENTS = ("attention", "ffn")
_STYLE_PLACEMENT = {"houlsby": ["attention", "ffn"], "pfeiffer": ["ffn"]}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}
ACTIVATIONS = tuple(_ACTIVATIONS)

# Where the adapters go, per model_type: regexes over module names (relative
# to any head class: BertModel, BertForSequenceClassification, ... all match).
# Each names the Linear that ends the sublayer; its output is the sublayer's
# output before dropout / residual add (/ LayerNorm in post-norm encoders).
_BERT = {"attention": r"encoder\.layer\.\d+\.attention\.output\.dense", "ffn": r"encoder\.layer\.\d+\.output\.dense"}
_LLAMA = {"attention": r"layers\.\d+\.self_attn\.o_proj", "ffn": r"layers\.\d+\.mlp\.down_proj"}
ARCHITECTURES: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": {
        "attention": r"transformer\.layer\.\d+\.attention\.out_lin",
        "ffn": r"transformer\.layer\.\d+\.ffn\.lin2",
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": {"attention": r"h\.\d+\.attn\.c_proj", "ffn": r"h\.\d+\.mlp\.c_proj"},
}


class BottleneckAdapter(nn.Module):
    """``x + scaling * up(dropout(act(down(x))))`` with ``up`` zero-initialized.

    Computes in its own dtype (float32 when the base runs in half precision)
    and returns the input's dtype.
    """

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        activation: str = "relu",
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)  # identity at init: the base model's outputs, exactly
        nn.init.zeros_(self.up.bias)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.to(self.down.weight.dtype)
        h = self.dropout(self.act(self.down(xin)))
        # x + s * (h W_up^T + b_up) as one GEMM with the residual as its addend, then the bias in
        # place: no separate up-projection output, scaled copy and sum (two fewer B x L x d passes)
        flat = torch.addmm(
            xin.reshape(-1, xin.shape[-1]), h.reshape(-1, h.shape[-1]), self.up.weight.t(), alpha=self.scaling
        )
        flat.add_(self.up.bias, alpha=self.scaling)
        return flat.view(x.shape).to(x.dtype)


def _out_features(module: nn.Module) -> int | None:
    for attr in ("out_features", "nf"):  # nn.Linear (and bitsandbytes) / GPT-2's Conv1D
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return None


def _float_dtype(*modules: nn.Module) -> torch.dtype:
    for m in modules:
        for p in m.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


@register_method("adapter", ("houlsby", {"style": "houlsby"}), ("pfeiffer", {"style": "pfeiffer"}))
@dataclass
class Adapter(MethodConfig):
    """Bottleneck adapters (Houlsby 2019 / Pfeiffer 2021); base model frozen."""

    style: str = field(
        "houlsby",
        f"where adapters go by default: {list(STYLES)} (houlsby: after attention and "
        "feed-forward; pfeiffer: after feed-forward only)",
    )
    reduction_factor: float = field(16, "bottleneck size = hidden_size // reduction_factor")
    bottleneck_size: int | None = field(None, "bottleneck size; overrides reduction_factor when set")
    activation: str = field("relu", f"nonlinearity in the bottleneck: {list(ACTIVATIONS)}")
    placement: list[str] | None = field(
        None, f"override of the style's injection points: a subset of {list(PLACEMENTS)} (or one of them as a string)"
    )
    dropout: float = field(0.0, "dropout on the bottleneck activations (training only)")
    scaling: float = field(1.0, "residual scale s in x + s * up(act(down(x)))")
    train_head: bool = field(
        True,
        "also train the task head (a copy of classifier/score/...); a language "
        "model's lm_head is never trained by adapters (vocabulary-sized, tied)",
    )

    def validate(self) -> None:
        if not isinstance(self.style, str) or self.style.lower() not in STYLES:
            raise ValueError(f"unknown adapter style {self.style!r}; valid styles: {list(STYLES)}")
        self.style = self.style.lower()
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool)
            or not isinstance(self.bottleneck_size, int)
            or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size must be a positive integer or None, got {self.bottleneck_size!r}")
        if (
            isinstance(self.reduction_factor, bool)
            or not isinstance(self.reduction_factor, (int, float))
            or not self.reduction_factor > 0
        ):
            raise ValueError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if not isinstance(self.activation, str) or self.activation.lower() not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid activations: {list(ACTIVATIONS)}")
        self.activation = self.activation.lower()
        if self.placement is not None:
            places = [self.placement] if isinstance(self.placement, str) else self.placement
            if not isinstance(places, (list, tuple)) or not places or any(p not in PLACEMENTS for p in places):
                raise ValueError(
                    f"placement must be None or a non-empty subset of {list(PLACEMENTS)}, got {self.placement!r}"
                )
            self.placement = [p for p in PLACEMENTS if p in places]  # canonical order, no duplicates
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a number, got {self.scaling!r}")
        if not isinstance(self.train_head, bool):
            raise ValueError(f"train_head must be True or False, got {self.train_head!r}")

    @property
    def places(self) -> list[str]:
        return list(self.placement) if self.placement is not None else list(_STYLE_PLACEMENT[self.style])

    # -- where ---------------------------------------------------------------
    def injection_points(self, model: nn.Module) -> list[str]:
        """Module names (in the transformers model) that get an adapter, layer by layer."""
        self.validate()
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"bottleneck adapters do not support model_type {model_type!r} ({type(model).__name__}); "
                f"supported model types: {sorted(ARCHITECTURES)}. LoRA (peftadapt.wrap(model, 'lora')) "
                "works on most architectures."
            )
        names = [n for n, _ in model.named_modules()]
        points = []
        n_layers = getattr(cfg, "num_hidden_layers", None)
        for place in self.places:
            rx = re.compile(r"(^|\.)" + ARCHITECTURES[model_type][place] + r"$")
            found = [n for n in names if rx.search(n)]
            if not found or (isinstance(n_layers, int) and len(found) != n_layers):
                raise ValueError(
                    f"found {len(found)} '{place}' injection points in this {model_type} model "
                    f"({type(model).__name__}), expected num_hidden_layers={n_layers}: its module names "
                    f"differ from what peftadapt expects (pattern {rx.pattern!r})"
                )
            points += found
        # layer order: attention before ffn inside each layer
        return sorted(points, key=lambda n: (int(re.findall(r"\.(\d+)\.", "." + n)[-1]), points.index(n)))

    def bottleneck(self, hidden: int) -> int:
        b = self.bottleneck_size if self.bottleneck_size is not None else int(hidden // self.reduction_factor)
        if b < 1:
            raise ValueError(
                f"reduction_factor={self.reduction_factor} leaves a bottleneck of {b} for hidden size {hidden}; "
                f"use reduction_factor <= {hidden} or set bottleneck_size"
            )
        return b

    # -- apply -----------------------------------------------------------------
    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        self.validate()
        check_unwrapped(model)
        self._plan(model)  # raises before anything is touched
        wrapped = AdaptedModel(model)
        try:
            self.add_to(wrapped, adapter_name)
        except BaseException:
            wrapped.unwrap()
            raise
        return wrapped

    def _plan(self, hf: nn.Module) -> list[tuple[str, nn.Module, int]]:
        """(name, base module, hidden size) per injection point; validates the bottleneck."""
        plan = []
        for name in self.injection_points(hf):
            module = hf.get_submodule(name)
            base = module.base_layer if isinstance(module, Slot) else module
            hidden: int = _out_features(base) or hf_config(hf).hidden_size
            self.bottleneck(hidden)
            plan.append((name, base, hidden))
        return plan

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        if not isinstance(wrapped, AdaptedModel):
            raise TypeError(f"Adapter.add_to needs a peftadapt AdaptedModel, got {type(wrapped).__name__}")
        self.validate()
        wrapped.check_new_name(adapter_name)
        hf = wrapped.model
        plan = self._plan(hf)
        default_dtype = _float_dtype(hf)
        for name, base, hidden in plan:
            module = hf.get_submodule(name)
            if not isinstance(module, AdapterSlot):
                module = AdapterSlot(base)
                parent, child = get_parent(hf, name)
                setattr(parent, child, module)
            dtype = _float_dtype(base) if any(p.is_floating_point() for p in base.parameters()) else default_dtype
            if dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32  # train adapters in fp32 over a half-precision base (as peft does)
            device = next(base.parameters(), torch.empty(0)).device
            adapter = BottleneckAdapter(
                hidden, self.bottleneck(hidden), self.activation, self.dropout, self.scaling, dtype=dtype, device=device
            )
            module.adapters[adapter_name] = adapter.train(base.training)  # a new module would be in train mode
        if self.train_head:
            heads = [h for h in find_task_head(hf) if h not in LM_HEAD_NAMES]
            add_head_copies(wrapped, adapter_name, heads)
        wrapped.register_adapter(adapter_name, self)
