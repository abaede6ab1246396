"""Lazy access to bitsandbytes and small helpers shared by the quant modules.

bitsandbytes is an optional dependency (``pip install peftadapt[quant]``), so it
is imported only inside the functions that need it: ``import peftadapt`` must
work without it.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
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

    4-bit: ``dequantize_4bit(codes, quant_state)`` (double quantization
    included; in torch where bitsandbytes' AVX512 CPU kernel is wrong, see
    :func:`_install_exact_cpu_dequantize`); 8-bit: int8 row-wise
    ``W_int8 * SCB / 127``.
    """
    w = layer.weight
    assert isinstance(w, torch.Tensor)  # a bitsandbytes Params4bit / Int8Params (Parameter subclasses)
    if type(layer).__name__ == "Linear4bit":
        _unpack_cpu_layout(w)
        qs = w.quant_state  # type: ignore[attr-defined]  # Params4bit's attribute; w is typed as its base Tensor
        if _misaligned_on_cpu(w.data, qs):
            return _dequantize_4bit_torch(w.data, qs).to(torch.float32)
        return bnb().functional.dequantize_4bit(w.data, qs).to(torch.float32)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(layer.state, "SCB", None)
    if scb is None:  # still a float weight (has_fp16_weights=True)
        return w.data.to(torch.float32)
    return w.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) / 127.0


def _unpack_cpu_layout(weight) -> None:
    """Undo bitsandbytes' AVX512-BF16 packed CPU layout of a ``Params4bit``, in place (no-op otherwise)."""
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, qs)


def _misaligned_on_cpu(A: torch.Tensor, qs) -> bool:
    """True where bitsandbytes' AVX512 CPU dequantization kernel would read the wrong absmax."""
    return (
        A.device.type == "cpu"
        and qs is not None
        and not getattr(qs, "packing_format_for_cpu", False)
        and qs.shape[-1] % qs.blocksize != 0
    )


def _dequantize_4bit_torch(A: torch.Tensor, qs) -> torch.Tensor:
    """``code[q] * absmax[block]`` over the flattened weight, in torch; dtype ``qs.dtype``."""
    absmax = qs.absmax
    if qs.nested:
        absmax = bnb().functional.dequantize_blockwise(absmax, qs.state2) + qs.offset
    n = math.prod(qs.shape)
    packed = A.reshape(-1).view(torch.uint8)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.to(torch.float32).repeat_interleave(qs.blocksize)[:n]
    return (qs.code.to(device=A.device, dtype=torch.float32)[idx] * scale).reshape(qs.shape).to(qs.dtype)


def _exact_dequantize_4bit(original):
    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        if not _misaligned_on_cpu(A, quant_state):
            return original(A, quant_state, absmax, out, blocksize, quant_type)
        w = _dequantize_4bit_torch(A, quant_state)
        return w if out is None else out.copy_(w)

    dequantize_4bit.__doc__ = original.__doc__
    dequantize_4bit._peftadapt_original = original  # type: ignore[attr-defined]  # a marker on our own function
    return dequantize_4bit


def _exact_cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` for a misaligned weight: dequantize in torch on the CPU, bitsandbytes elsewhere."""
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
    w = _dequantize_4bit_torch(self.weight.data, self.weight.quant_state).to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)


def _install_exact_cpu_dequantize() -> None:
    """Route bitsandbytes' CPU 4-bit dequantization of misaligned weights through torch (idempotent).

    bitsandbytes 0.50's AVX512 CPU kernel (``dequantizeBlockwise4bitCpu``)
    indexes the absmax per *row*, ``absmax[row * (in // blocksize) + col //
    blocksize]``, while ``quantize_4bit`` numbers the blocks over the
    flattened weight. The two agree only when ``in_features`` is a multiple of
    the blocksize; otherwise (a 32x32 weight, blocksize 64: ``in // blocksize
    == 0``) every row is scaled by block 0's absmax: an NF4 weight comes back
    with a max error of 0.40 of its largest value instead of at most 0.152
    (half the widest NF4 gap, 1 - 0.6962). On CPUs without AVX512 the scalar
    kernel is right. Every reader goes through
    ``bitsandbytes.functional.dequantize_4bit`` looked up at call time
    (``Linear4bit``'s training forward and backward, peft's DoRA norm and
    merge, transformers' dequantize), so we wrap that one function:
    misaligned weights on the CPU are dequantized in torch, the rest goes to
    bitsandbytes unchanged. The no-grad forward calls the kernel op directly
    (``gemm_4bit``); :func:`guard_4bit_cpu` gives misaligned layers a forward
    that dequantizes in torch on the CPU (:func:`_exact_cpu_forward`; it keeps
    the dequantized weight for the backward, fine for such small layers).
    Aligned shapes (every real model: hidden sizes are multiples of 64) never
    take the torch paths.
    """
    F = bnb().functional
    if not hasattr(F.dequantize_4bit, "_peftadapt_original"):
        F.dequantize_4bit = _exact_dequantize_4bit(F.dequantize_4bit)


def guard_4bit_cpu(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` off bitsandbytes' broken CPU paths; return ``model``.

    Two things in bitsandbytes 0.50 go wrong on x86 CPUs with AVX512:

    1. **The packed inference layout** (CPUs with AVX512-BF16).
       ``Linear4bit.forward`` in eval mode with an input that does not
       require grad repacks ``weight.data`` and its quant state *in place*
       for a bf16 gemv kernel. We turn that off
       (``support_avx512bf16_for_cpu = False``) on every layer, and undo a
       packing already done, because:

       - it cannot pack ``out_features % 32 != 0`` or ``in_features %
         blocksize != 0`` (``RuntimeError: shape '[32, 0]' is invalid``);
       - the packed gemv has no autograd: after one evaluation pass (eval
         mode + ``no_grad``) the layer *stays* packed, and later training
         steps get no gradient through it to the layers below (silently);
       - the packing is lossy: the absmax goes to bf16 and, for double
         quantization, is re-quantized with a new offset when unpacked, so
         saving after an evaluation changes the stored weights;
       - it multiplies in bf16 whatever ``compute_dtype`` was asked for;
       - our readers (:func:`dequantize_weight`, merge) and peft's read the
         codes in bitsandbytes' ordinary layout.

       What is lost is that kernel's bf16 inference speed, on the CPU only.
    2. **The AVX512 dequantization kernel** is wrong when ``in_features`` is
       not a multiple of the blocksize: see :func:`_install_exact_cpu_dequantize`.

    Idempotent, and a no-op (no bitsandbytes import) on a model without
    4-bit layers. ``load_quantized``, ``build_quantized``,
    ``prepare_for_kbit_training`` and ``wrap`` call it, so a model quantized
    with ``from_pretrained(quantization_config=...)`` is covered once wrapped
    or prepared.
    """
    layers = [m for m in model.modules() if is_bnb_layer(m) and type(m).__name__ == "Linear4bit"]
    if not layers:
        return model
    _install_exact_cpu_dequantize()
    for m in layers:
        # torch types Module attributes as Tensor | Module
        m.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
        _unpack_cpu_layout(m.weight)
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and qs.shape[-1] % qs.blocksize != 0 and "forward" not in m.__dict__:
            m.forward = types.MethodType(_exact_cpu_forward, m)
    return model


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
