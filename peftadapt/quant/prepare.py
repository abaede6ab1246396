"""Preparing a k-bit model for training, without peft's fp32 memory trap.

peft's ``prepare_model_for_kbit_training`` casts every fp16/bf16 parameter
that is not 4-bit to fp32: embeddings, lm_head and norms. For Llama-3-8B
that is 2 x 128256 x 4096 = 1.05 B embedding/lm_head parameters going from
2 to 4 bytes, +2.1 GB; for Llama-3-70B +4.2 GB; none of it is trained.

What we keep in fp32, and why:

- **Trainable parameters** (adapters, a new task head): fp32. They receive
  optimizer updates of size ~lr * g; in bf16 (8 bits of mantissa) an update
  smaller than 2^-8 of the weight is rounded away, so training stalls.
  peft already creates LoRA weights in fp32 (``autocast_adapter_dtype``);
  :func:`cast_trainable_to_fp32` makes sure of it for any adapter.
- **Frozen non-quantized parameters** (embeddings, lm_head, norms, biases):
  left in the dtype they were loaded in. They receive no updates, so there is
  no rounding to lose; the models already do the sensitive arithmetic in
  fp32 (Llama/Qwen2/Mistral RMSNorm upcast the activations to fp32 for the
  variance; torch's LayerNorm kernels accumulate in fp32; transformers
  computes the LM loss on ``logits.float()``). Upcasting a norm's weight
  would even *hurt*: ``weight * x.to(input_dtype)`` then returns fp32, which
  either upcasts the activations after it (memory) or meets a bf16 lm_head
  with a dtype mismatch.
- **Quantized weights**: untouched (codes + quantization state).

Gradient checkpointing is on by default with ``use_reentrant=False``: the
non-reentrant torch checkpoint propagates gradients to the adapters inside a
checkpointed block even when the block's input does not require grad, so the
``enable_input_require_grads`` hook is not needed (we still install it when
the caller asks for the reentrant variant).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from ..core.hf import unwrap, wrapped_reason
from ._bnb import guard_4bit_cpu, is_quantized


def _to_fp32_pre_hook(module, args):
    module._peftadapt_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    return tuple(a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _back_to_input_dtype_hook(module, args, output):
    dtype = getattr(module, "_peftadapt_in_dtype", None)
    if dtype is not None and torch.is_tensor(output) and output.is_floating_point() and output.dtype != dtype:
        return output.to(dtype)
    return output


def cast_trainable_to_fp32(model: nn.Module) -> int:
    """Cast every trainable parameter to fp32 in place; return how many were cast.

    A module whose own weights were cast (typically a task head trained in
    full, e.g. peft's ``modules_to_save`` copy of ``score``, created in the
    base's bf16) then sits in a bf16 activation stream: it gets hooks that
    cast its floating inputs to fp32 and its output back to the input's dtype,
    i.e. it computes in fp32 and hands on what the stream carries (the same
    rule peft's LoRA layers and our bottleneck adapters follow). Frozen
    parameters are left alone. Call it (or :func:`prepare_for_kbit_training`)
    after adding adapters to a half-precision or quantized base.
    """
    n = 0
    for module in model.modules():
        cast = False
        for p in module.parameters(recurse=False):
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
                n += 1
                cast = True
        if cast and not getattr(module, "_peftadapt_fp32_hooks", False):
            module.register_forward_pre_hook(_to_fp32_pre_hook)
            module.register_forward_hook(_back_to_input_dtype_hook)
            # torch types Module attributes as Tensor | Module
            module._peftadapt_fp32_hooks = True  # type: ignore[assignment]
    return n


# the options of torch.utils.checkpoint.checkpoint that a run file can give (context_fn is code, not YAML)
CHECKPOINT_OPTIONS = {"use_reentrant": bool, "preserve_rng_state": bool, "determinism_check": str, "debug": bool}


def checkpoint_kwargs(kwargs: dict[str, Any] | None = None, where: str = "gradient_checkpointing_kwargs") -> dict:
    """The checked options of ``torch.utils.checkpoint.checkpoint``, ``use_reentrant=False`` unless given.

    torch's default checkpoint is the reentrant one, which gives no gradient to the adapters of a
    block whose input does not require grad (a frozen base) unless the input embeddings are hooked;
    the non-reentrant one needs no hook and also works with ``torch.compile`` and FSDP."""
    kw = dict(kwargs or {})
    for k, v in kw.items():
        if k not in CHECKPOINT_OPTIONS:
            raise ValueError(f"{where}: unknown option {k!r}; valid: {sorted(CHECKPOINT_OPTIONS)}")
        if not isinstance(v, CHECKPOINT_OPTIONS[k]):
            raise TypeError(f"{where}.{k}: expected {CHECKPOINT_OPTIONS[k].__name__}, got {v!r}")
    kw.setdefault("use_reentrant", False)
    return kw


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False, **options: Any) -> None:
    """Turn on activation (gradient) checkpointing on a transformers model (also inside a peft /
    peftadapt wrapper), any transformers version. ``options``: more of :data:`CHECKPOINT_OPTIONS`.

    With ``use_reentrant=True`` the input embeddings' output is made to require grad
    (``enable_input_require_grads``), without which the reentrant checkpoint gives a frozen base's
    adapters no gradient."""
    hf = unwrap(model)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(hf).__name__} does not support gradient checkpointing; pass gradient_checkpointing=False"
        )
    kwargs = checkpoint_kwargs({**options, "use_reentrant": bool(use_reentrant)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
            # torch types Module attributes as Tensor | Module
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
        else:  # transformers 4.x
            # torch types Module attributes as Tensor | Module
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    if use_reentrant and hasattr(hf, "enable_input_require_grads") and not _has_input_grad_hook(hf):
        # The reentrant checkpoint only back-propagates if a block's input requires grad.
        # torch types Module attributes as Tensor | Module
        hf.enable_input_require_grads()  # type: ignore[operator]


def _has_input_grad_hook(hf: nn.Module) -> bool:
    """Whether ``enable_input_require_grads`` already ran (transformers 5 names the handle list
    ``_require_grads_hooks``, 4.x ``_require_grads_hook``): a second call would add a second hook."""
    return bool(getattr(hf, "_require_grads_hooks", None)) or getattr(hf, "_require_grads_hook", None) is not None


def disable_checkpointing(model: nn.Module) -> None:
    hf = unwrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(hf, "activation_checkpointing_disable"):
            # torch types Module attributes as Tensor | Module
            hf.activation_checkpointing_disable()  # type: ignore[operator]
        else:
            # torch types Module attributes as Tensor | Module
            hf.gradient_checkpointing_disable()  # type: ignore[operator]


def is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    use_reentrant: bool = False,
) -> nn.Module:
    """Make a bitsandbytes-quantized model ready for adapter training; return it.

    - freezes the base model's parameters (on an already wrapped model the
      adapter parameters stay trainable);
    - casts trainable parameters to fp32 and leaves every frozen parameter in
      its loaded dtype (see the module docstring for why; this is the
      difference from peft's ``prepare_model_for_kbit_training``, which
      upcasts embeddings, lm_head and norms to fp32);
    - turns on gradient checkpointing (``use_reentrant=False`` by default);
    - keeps bitsandbytes' 4-bit layers off its broken AVX512 CPU paths
      (:func:`peftadapt.quant.guard_4bit_cpu`).

    Works on plain transformers models and on wrapped ones. A model that is
    not quantized is accepted too (a bf16 base trained with LoRA wants the
    same treatment).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
    wrapped = wrapped_reason(model) is not None
    guard_4bit_cpu(model)
    for p in model.parameters():
        if not wrapped:
            p.requires_grad_(False)
    cast_trainable_to_fp32(model)
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=use_reentrant)
    hf = unwrap(model)
    # torch types Module attributes as Tensor | Module
    hf._peftadapt_kbit_prepared = True  # type: ignore[assignment]
    if not is_quantized(model):
        # torch types Module attributes as Tensor | Module
        hf._peftadapt_kbit_prepared = "not-quantized"  # type: ignore[assignment]
    return model


def check_prefix_compat(model: nn.Module) -> nn.Module:
    """Make ``model`` acceptable to peft prefix tuning; return it.

    peft's prefix tuning feeds the prefix through the key/value cache, and a
    checkpointed block recomputes its forward, which would append to that
    cache twice; peft therefore refuses any model with gradient checkpointing
    on (``ValueError: PREFIX_TUNING does not work with gradient
    checkpointing``). ``load_quantized`` turns checkpointing on by default, so
    ``wrap(load_quantized(...), "prefix")`` would always fail.

    Our choice: turn checkpointing off for this model and say so with a
    UserWarning (the prefix method trains, with the full activation memory of
    an un-checkpointed forward). The alternative, raising, would make the
    user reload the model for no gain. The lead's ``wrap(model, "prefix")``
    calls this before ``get_peft_model``.
    """
    if is_checkpointing(model):
        disable_checkpointing(model)
        warnings.warn(
            "prefix tuning does not work with gradient checkpointing (peft feeds the prefix through the "
            "key/value cache, which a recomputed forward would extend twice): gradient checkpointing has been "
            "turned OFF for this model, so activations are stored in full. To keep checkpointing, use LoRA or "
            "an adapter instead of prefix tuning.",
            UserWarning,
            stacklevel=2,
        )
    return model
