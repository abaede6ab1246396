"""Building a quantized model of any size from a config, without its fp32 copy.

``from_config`` would allocate every weight in fp32 first: 28 GB for an 8B
model, 280 GB for a 70B one. Here the model is created on the meta device
(Accelerate's ``init_empty_weights``), then each ``nn.Linear`` is replaced by
a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` whose random weight is drawn
and quantized at once, one layer at a time; the other parameters
(embeddings, norms, the output head) are materialized in ``dtype``. The peak
memory is the quantized model plus the largest single linear weight in
``dtype``: what a 7B/70B architecture costs to *train* with QLoRA, without
downloading it.

The weights are random (normal, std ``config.initializer_range``; norms 1,
biases 0): use it to measure memory and speed, and in tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.hf import OUTPUT_HEADS, check_attn_implementation
from ._bnb import bnb, check_bits, default_compute_dtype, default_device, guard_4bit_cpu, resolve_dtype
from .load import auto_class, bnb_config
from .prepare import prepare_for_kbit_training


def _skip_names(model: nn.Module, skip_modules) -> set[str]:
    names = set(skip_modules) if skip_modules else set(OUTPUT_HEADS)
    # torch types Module attributes as Tensor | Module
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    for name, m in model.named_modules():
        if out is not None and m is out:
            names.add(name)
    return names


def _skipped(name: str, names: set[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in names)


@torch.no_grad()
def _quantized_linear(lin: nn.Linear, bits, quant_type, double_quant, compute_dtype, std, device, gen_dtype, threshold):
    b = bnb()
    has_bias = lin.bias is not None
    w = torch.empty(lin.out_features, lin.in_features, dtype=gen_dtype, device=device).normal_(0.0, std)
    if bits == 4:
        new = b.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        param = b.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type)
    else:
        new = b.nn.Linear8bitLt(
            lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=threshold, device="meta"
        )
        param = b.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    del w
    new.weight = param.to(device)  # .to() quantizes: the float weight is freed here
    del param
    if has_bias:
        new.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=compute_dtype, device=device), requires_grad=False)
    return new


def build_quantized(
    config: Any,
    bits: int = 4,
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    compute_dtype: Any = None,
    dtype: Any = None,
    task: Any = "causal",
    device: str | torch.device | None = None,
    skip_modules: list[str] | None = None,
    seed: int = 0,
    llm_int8_threshold: float = 6.0,
    prepare: bool = True,
    gradient_checkpointing: bool = True,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A model of ``config``'s architecture with random, already-quantized linear layers.

    Same options as :func:`load_quantized`; ``config`` is a
    ``transformers.PretrainedConfig``. Every ``nn.Linear`` except the output
    head (``skip_modules``, default ``lm_head``/``score``/``classifier`` and
    whatever ``get_output_embeddings()`` returns) becomes a bitsandbytes
    layer. The model is marked as bitsandbytes-quantized the way
    ``from_pretrained`` marks it (``is_loaded_in_4bit``, ``hf_quantizer``,
    ``config.quantization_config``), so peft puts its QLoRA layers on it.
    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``): as in
    ``from_pretrained``; default the config's, else transformers' choice.
    """
    from accelerate import init_empty_weights
    from transformers import PretrainedConfig

    bnb()
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a transformers PretrainedConfig, got {type(config).__name__}")
    quant_type, double_quant = check_bits(bits, quant_type, double_quant)
    device = torch.device(default_device() if device is None else device)
    compute_dtype = (
        default_compute_dtype(device) if compute_dtype is None else resolve_dtype(compute_dtype, "compute_dtype")
    )
    dtype = compute_dtype if dtype is None else resolve_dtype(dtype, "dtype")
    cls = auto_class(task)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)

    attn = {}
    if attn_implementation is not None:
        attn["attn_implementation"] = check_attn_implementation(attn_implementation, device)
    with init_empty_weights():
        model = cls.from_config(config, dtype=dtype, **attn)
    std = float(getattr(config, "initializer_range", 0.02))
    skip = _skip_names(model, skip_modules)
    # Draw on the target device; bf16/fp16 normal_ is fine on CUDA, the CPU draws fp32 (fast path).
    gen_dtype = dtype if device.type == "cuda" else torch.float32

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    for name, lin in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            _quantized_linear(
                lin, bits, quant_type, double_quant, compute_dtype, std, device, gen_dtype, llm_int8_threshold
            ),
        )

    with torch.no_grad():
        for _mname, module in model.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.device.type != "meta":
                    continue
                if p.dim() == 1:
                    data = (torch.ones if pname == "weight" else torch.zeros)(p.shape, dtype=dtype, device=device)
                else:
                    data = torch.empty(p.shape, dtype=gen_dtype, device=device).normal_(0.0, std).to(dtype)
                module._parameters[pname] = nn.Parameter(data, requires_grad=False)
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf.device != device:
                    module._buffers[bname] = (
                        buf.to(device)
                        if buf.device.type != "meta"
                        else torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                    )
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    pad = getattr(config, "pad_token_id", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if pad is not None and emb is not None and 0 <= pad < emb.weight.shape[0]:
        with torch.no_grad():
            emb.weight[pad].zero_()

    _mark_quantized(model, bits, quant_type, double_quant, compute_dtype, sorted(skip), llm_int8_threshold)
    guard_4bit_cpu(model)  # bitsandbytes' AVX512 CPU paths: see its docstring
    model.eval()
    if prepare:
        prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return model


def _mark_quantized(model, bits, quant_type, double_quant, compute_dtype, skip, threshold):
    """Set the attributes ``from_pretrained(quantization_config=...)`` sets, so peft and save_pretrained agree."""
    qconfig = bnb_config(
        bits, quant_type if bits == 4 else None, double_quant if bits == 4 else None, compute_dtype, skip, threshold
    )
    model.config.quantization_config = qconfig
    try:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=True)
        model.hf_quantizer = quantizer
    except Exception:  # noqa: BLE001 - older transformers: the flags below are what peft reads
        pass
    if bits == 4:
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True
    model.quantization_method = "bitsandbytes"
