"""Lazy access to bitsandbytes and small helpers shared by the quant modules.

bitsandbytes is an optional dependency (``pip install peftadapt[quant]``), so it
is imported only inside the functions that need it: ``import peftadapt`` must
work without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def bnb():
    """Import bitsandbytes or raise an ImportError that says how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - exercised only without bnb
        raise ImportError(
            "quantized models need bitsandbytes: pip install 'peftadapt[quant]' (or pip install bitsandbytes)"
        ) from e
    return bitsandbytes


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """``"bf16"`` / ``torch.bfloat16`` / ... -> torch.dtype, or a ValueError listing the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name}={dtype} is not a float dtype we support; valid: bf16, fp16, fp32")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown {name} {dtype!r}; valid: {sorted(set(_DTYPES))} or a torch float dtype")


def default_compute_dtype(device) -> torch.dtype:
    """bf16 on CUDA (the QLoRA recipe), fp32 elsewhere.

    On a CPU without native bf16 matmul (most x86 CPUs without AVX512-BF16/AMX)
    a bf16 matmul is 20-50x slower than fp32, and bitsandbytes' CPU kernels
    dequantize to the compute dtype anyway, so fp32 is the right CPU default.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_bits(bits, quant_type, double_quant):
    """Validate the quantization options; return (quant_type, double_quant) with defaults filled."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; valid: {list(BITS)}")
    if bits == 8:
        if quant_type is not None or double_quant is not None:
            raise ValueError(
                "quant_type and double_quant apply to 4-bit only (bits=4); 8-bit uses LLM.int8() "
                f"(got quant_type={quant_type!r}, double_quant={double_quant!r})"
            )
        return None, None
    quant_type = "nf4" if quant_type is None else quant_type
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; valid: {list(QUANT_TYPES)}")
    double_quant = True if double_quant is None else bool(double_quant)
    return quant_type, double_quant


def is_bnb_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit / Linear8bitLt (checked by class name: no import needed)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def is_quantized(model: nn.Module) -> bool:
    """True if any module of ``model`` is a bitsandbytes quantized linear layer."""
    return any(is_bnb_layer(m) for m in model.modules())


def quant_bits(model: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes-quantized model, else None."""
    for m in model.modules():
        if is_bnb_layer(m):
            return 4 if type(m).__name__ == "Linear4bit" else 8
    return None


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes layer actually multiplies with (out, in).

    4-bit: ``dequantize_4bit(codes, quant_state)`` (double quantization included);
    8-bit: int8 row-wise ``W_int8 * SCB / 127``.
    """
    b = bnb()
    w = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return b.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(layer.state, "SCB", None)
    if scb is None:  # still a float weight (has_fp16_weights=True)
        return w.data.to(torch.float32)
    return w.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) / 127.0


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by ``model``: quantized weights (codes + quantization state), other params, buffers."""
    seen: set[int] = set()
    out = {"quantized": 0, "float_params": 0, "buffers": 0}

    def add(key, t):
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[key] += t.untyped_storage().nbytes()

    for m in model.modules():
        if is_bnb_layer(m):
            w = m.weight
            add("quantized", w.data)
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                add("quantized", qs.absmax)
                add("quantized", getattr(qs, "code", None))
                if getattr(qs, "state2", None) is not None:
                    add("quantized", qs.state2.absmax)
                    add("quantized", qs.state2.code)
            add("quantized", getattr(w, "SCB", None))
            if m.bias is not None:
                add("float_params", m.bias)
            continue
        for p in m.parameters(recurse=False):
            add("float_params", p)
        for b in m.buffers(recurse=False):
            add("buffers", b)
    return out
