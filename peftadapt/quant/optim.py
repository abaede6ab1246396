"""The optimizer factory: torch AdamW, bitsandbytes 8-bit and paged AdamW, by transformers' ``optim`` names.

The names are those of transformers' ``TrainingArguments.optim`` (one tuple,
:data:`OPTIMIZERS`, that ``TrainConfig.optim`` validates against), so a run
file reads the same as a transformers / axolotl one:

- ``"adamw_torch"``: ``torch.optim.AdamW``; state = 2 fp32 moments (8 bytes/param).
- ``"adamw_8bit"``: bitsandbytes ``AdamW8bit`` (Dettmers et al. 2022, "8-bit
  Optimizers via Block-wise Quantization"): both moments stored block-wise
  quantized in 8 bits (2 bytes/param). Tensors under 4096 elements keep
  32-bit state (bitsandbytes' ``min_8bit_size``).
- ``"paged_adamw_8bit"`` / ``"paged_adamw_32bit"``: bitsandbytes ``PagedAdamW8bit``
  / ``PagedAdamW``, the state in CUDA unified memory that is paged out to CPU
  RAM when the GPU runs short (the QLoRA paper's answer to memory spikes on long
  sequences). Paging needs a CUDA GPU.

On the CPU, paging has nothing to page to. bitsandbytes 0.50 accepts a paged
optimizer for CPU parameters and silently falls back to the non-paged one
(with its own warning at the first step). We make that explicit: for CPU
parameters ``make_optimizer`` builds the non-paged optimizer (identical
update rule) and says so in one UserWarning; if the installed bitsandbytes
cannot run its optimizers on the CPU at all (before 0.45), it raises a
ValueError naming the optimizers that do work there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch

from ._bnb import bnb

Optim = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]  # transformers' optim names
OPTIMIZERS: tuple[str, ...] = get_args(Optim)
_BNB_CLASS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW"}
_UNPAGED = {"paged_adamw_8bit": "AdamW8bit", "paged_adamw_32bit": "AdamW32bit"}  # bitsandbytes classes


@functools.cache
def _bnb_cpu_optim_ok() -> bool:
    """Whether this bitsandbytes can step an 8-bit optimizer on CPU tensors (tried once)."""
    b = bnb()
    p = torch.nn.Parameter(torch.ones(4096))
    p.grad = torch.ones(4096)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception:  # noqa: BLE001 - any failure means "not on this CPU"
        return False
    return True


def make_optimizer(
    params: Iterable[Any],
    name: str = "adamw_torch",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``params``.

    ``params`` is what torch optimizers take (tensors or param-group dicts);
    only the trainable parameters should be passed. ``device``: where the
    parameters will train, when they are not there yet (a trainer builds its
    optimizer before Accelerate moves the model); default: where they are.
    It decides the CPU fallback of the paged optimizers (module docstring).
    """
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")
    name = name.lower()
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no parameters (is anything trainable?)")
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)

    b = bnb()
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    on_cpu = torch.device(device).type == "cpu" if device is not None else any(t.device.type == "cpu" for t in tensors)
    if on_cpu and not _bnb_cpu_optim_ok():
        raise ValueError(
            f"optimizer {name!r} needs a GPU with this bitsandbytes ({b.__version__}): its 8-bit/paged optimizers "
            "do not run on CPU tensors; use name='adamw_torch' on the CPU (or bitsandbytes >= 0.45)"
        )
    cls_name = _BNB_CLASS[name]
    if on_cpu and name.startswith("paged_"):
        warnings.warn(
            f"optimizer {name!r}: paging moves optimizer state between GPU and CPU memory and does nothing for CPU "
            f"parameters; using the non-paged bitsandbytes {_UNPAGED[name]} optimizer (same update rule)",
            UserWarning,
            stacklevel=2,
        )
        cls_name = _UNPAGED[name]
    return getattr(b.optim, cls_name)(params, **kwargs)
