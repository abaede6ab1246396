"""Merging LoRA into the dequantized base and exporting a dense model.

QLoRA trains ``y = x dq(W_q)^T + s * x A^T B^T`` where ``dq(W_q)`` is the
dequantized 4-bit (or 8-bit) weight. The model the adapter was trained with
is therefore ``W' = dq(W_q) + s * B A``, not ``W_16 + s * B A`` with a
separately loaded 16-bit copy ``W_16`` of the base: that one differs from
``W'`` by the quantization error ``W_16 - dq(W_q)``, which is as large as the
LoRA update itself. peft's ``merge_and_unload`` on a 4-bit model computes
``W'`` but re-quantizes it to 4 bits, which adds a new rounding error. Here
``W'`` is computed in fp32 and stored dense in the export dtype, one layer at
a time (peak extra memory: one layer in fp32).

DoRA and other peft LoRA variants are merged with the variant's own
``merge_safe`` rule applied to ``dq(W_q)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ._bnb import dequantize_weight, is_bnb_layer, resolve_dtype


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


@torch.no_grad()
def _merge_lora_layer(module, adapter_names) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 weight and bias of a peft LoRA layer over a bitsandbytes layer, adapters merged."""
    base = module.get_base_layer()
    w = dequantize_weight(base)
    bias = None if base.bias is None else base.bias.detach().to(torch.float32)
    names = module.active_adapters if adapter_names is None else adapter_names
    for name in names:
        if name not in module.lora_A:
            continue
        variants = getattr(module, "lora_variant", {})
        if name in variants:  # DoRA & co.: the variant's own merge rule on the dequantized weight
            w = variants[name].merge_safe(module, name, w).to(torch.float32)
        else:
            w = w + module.get_delta_weight(name).to(torch.float32)
        if getattr(module, "lora_bias", {}).get(name, False):
            b = module.lora_B[name].bias.detach().to(torch.float32)
            bias = b if bias is None else bias + b
    return w, bias


def _unmark(model: nn.Module, dtype: torch.dtype) -> None:
    """Remove what says 'bitsandbytes-quantized' so the model saves/loads/moves as a dense one."""
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            setattr(model, attr, False)
    if "hf_quantizer" in vars(model) or getattr(model, "hf_quantizer", None) is not None:
        # torch types Module attributes as Tensor | Module
        model.hf_quantizer = None  # type: ignore[assignment]
    if "quantization_method" in vars(model):
        del model.quantization_method
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if hasattr(cfg, "quantization_config"):
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None
        cfg.dtype = dtype  # transformers >= 4.56 (older versions read torch_dtype, set from dtype on save)
        # transformers 4.x records the dtype before quantization here and drops it from the saved JSON
        # only while quantization_config is present: without it, save_pretrained fails (a torch.dtype)
        if "_pre_quantization_dtype" in vars(cfg):
            del cfg._pre_quantization_dtype
    for attr in ("_peftadapt_kbit_prepared",):
        if attr in vars(model):
            delattr(model, attr)


def merge_quantized(model: nn.Module, dtype: Any = "bf16", adapter_names: list[str] | None = None) -> nn.Module:
    """Merge LoRA adapters into the dequantized base; return a dense transformers model.

    ``W' = dq(W_q) + s * B A`` for every LoRA layer (the variant's merge rule
    for DoRA), ``dq(W_q)`` for quantized layers without an adapter, all
    stored as ``nn.Linear`` in ``dtype`` (``"bf16"`` default, ``"fp16"``,
    ``"fp32"``); every other parameter is cast to ``dtype`` too. The result
    has no quantization config and saves with ``save_pretrained`` as a plain
    model. Its outputs match the adapted quantized model: within fp32
    round-off (max |logit diff| < 1e-4 in the tests) for ``dtype="fp32"`` and
    a 4-bit base computed in fp32, within the rounding of ``dtype`` otherwise
    (bf16: relative ~2^-8).

    ``model`` is consumed (its layers are replaced in place, to avoid a
    second copy of a large model); reload it to keep training.

    A quantized model without adapters is simply dequantized. Bottleneck
    adapters and prefix tuning are not linear in the base weight and cannot
    be merged: a ValueError says so.
    """
    dtype = resolve_dtype(dtype, "dtype")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    peft_config = getattr(model, "peft_config", None)
    if peft_config is None and type(model).__name__ == "AdaptedModel":
        raise ValueError(
            "merge_quantized merges LoRA-family adapters (lora, dora, rslora); bottleneck adapters and heads are "
            "not linear in the base weight and cannot be merged"
        )
    if peft_config:
        bad = {
            n: str(c.peft_type)
            for n, c in peft_config.items()
            if str(getattr(c.peft_type, "value", c.peft_type)) != "LORA"
        }
        if bad:
            raise ValueError(
                f"merge_quantized merges LoRA-family adapters (lora, dora, rslora); adapters {bad} cannot be merged"
            )
        if adapter_names is not None:
            unknown = sorted(set(adapter_names) - set(peft_config))
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(peft_config)}")

    from peft.tuners.tuners_utils import BaseTunerLayer

    root = model
    # 1. LoRA layers over bitsandbytes layers -> dense nn.Linear with the merged weight.
    for name, module in list(root.named_modules()):
        if isinstance(module, BaseTunerLayer) and is_bnb_layer(module.get_base_layer()):
            w, b = _merge_lora_layer(module, adapter_names)
            _set_module(root, name, _dense(w, b, dtype))
            del w, b
    # 2. Quantized layers without an adapter -> dense nn.Linear.
    for name, module in list(root.named_modules()):
        if is_bnb_layer(module):
            b = None if module.bias is None else module.bias.detach()
            _set_module(root, name, _dense(dequantize_weight(module), b, dtype))
    # 3. LoRA on layers that were never quantized (lm_head, embeddings) and modules_to_save: peft's merge.
    if peft_config:
        # torch types Module attributes as Tensor | Module
        model = model.merge_and_unload(adapter_names=adapter_names)  # type: ignore[operator]
    # 4. Everything else in the export dtype.
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    _unmark(model, dtype)
    return model
