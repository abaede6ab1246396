"""Loading a transformers model with its linear layers quantized by bitsandbytes."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import torch
import torch.nn as nn

from ..core.hf import OUTPUT_HEADS, check_attn_implementation
from ._bnb import bnb, check_bits, default_compute_dtype, default_device, guard_4bit_cpu, resolve_dtype
from .prepare import prepare_for_kbit_training

TASKS = ("causal", "seqcls", "tokcls", "base")


def auto_class(task):
    import transformers as tf

    if isinstance(task, type):
        return task
    classes = {
        "causal": tf.AutoModelForCausalLM,
        "seqcls": tf.AutoModelForSequenceClassification,
        "tokcls": tf.AutoModelForTokenClassification,
        "base": tf.AutoModel,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)} or a transformers model class")
    return classes[task]


QuantStorage = Literal["uint8", "bf16", "fp16", "fp32"]
QUANT_STORAGES: tuple[str, ...] = get_args(QuantStorage)


def resolve_quant_storage(quant_storage: Any, bits: int) -> torch.dtype | None:
    """``None`` (bitsandbytes' default, uint8) or the dtype the packed 4-bit weights are stored in.

    A float storage dtype holds the same packed 4-bit codes, only viewed as
    bf16 / fp16 / fp32 elements; FSDP needs it (it flattens and shards tensors
    of one float dtype), everything else is indifferent to it.
    """
    if quant_storage is None:
        return None
    if bits != 4:
        raise ValueError(
            f"quant_storage applies to 4-bit only (bits=4); got bits={bits} with quant_storage={quant_storage!r}"
        )
    if quant_storage in ("uint8", torch.uint8):
        return torch.uint8
    try:
        return resolve_dtype(quant_storage, "quant_storage")
    except ValueError:
        raise ValueError(
            f"unknown quant_storage {quant_storage!r}; valid: {list(QUANT_STORAGES)} (or the torch "
            "dtype); use bf16 with FSDP (and the same dtype=)"
        ) from None


def bnb_config(
    bits: int = 4,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    compute_dtype=torch.float32,
    skip_modules: list[str] | None = None,
    llm_int8_threshold: float = 6.0,
    quant_storage: Any = None,
):
    """The ``transformers.BitsAndBytesConfig`` for these options (validated)."""
    from transformers import BitsAndBytesConfig

    quant_type, double_quant = check_bits(bits, quant_type, double_quant)
    storage = resolve_quant_storage(quant_storage, bits)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=storage if storage is not None else torch.uint8,
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=llm_int8_threshold, llm_int8_skip_modules=skip_modules
    )


def _device_map(device_map, device):
    if device_map is not None:
        return device_map
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    return {"": "cpu"} if dev.type == "cpu" else {"": str(dev)}


def load_quantized(
    path: str | os.PathLike,
    bits: int = 4,
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    compute_dtype: Any = None,
    dtype: Any = None,
    task: Any = "causal",
    device: str | torch.device | None = None,
    device_map: Any = None,
    skip_modules: list[str] | None = None,
    quant_storage: Any = None,
    prepare: bool = True,
    gradient_checkpointing: bool = True,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a transformers model with bitsandbytes 4-bit (NF4/FP4) or 8-bit linear layers.

    Args:
        path: a model folder (or hub id, where the machine can reach the hub).
        bits: 4 (QLoRA, Dettmers et al. 2023) or 8 (LLM.int8(), Dettmers et al. 2022).
        quant_type: 4-bit only, ``"nf4"`` (default; NormalFloat, optimal for
            normally distributed weights) or ``"fp4"``.
        double_quant: 4-bit only, quantize the per-block absmax constants too
            (default True; saves ~0.37 bit/parameter).
        compute_dtype: dtype the dequantized weights are multiplied in;
            default bf16 on CUDA, fp32 on CPU (CPU bf16 matmul is slow).
        dtype: dtype of the parameters that stay unquantized (embeddings,
            norms, lm_head / task head); default ``quant_storage`` when that is
            a float dtype, else ``compute_dtype``.
        task: ``"causal"`` (default), ``"seqcls"``, ``"tokcls"``, ``"base"`` or
            a transformers model class.
        device / device_map: where to put it; default the GPU if there is one,
            else the CPU. ``device_map`` is passed to Accelerate as is
            (e.g. ``"auto"``, ``{"": 0}``) and wins over ``device``.
        skip_modules: module names to keep unquantized; default the task and LM
            heads (``core.hf.OUTPUT_HEADS``: ``classifier``, ``score``, ``qa_outputs``,
            ``lm_head``), as :func:`build_quantized` does. A head stays a float
            ``nn.Linear`` so it can be trained (peft's ``modules_to_save``) and, when
            the checkpoint has none (a fresh classifier), initialized.
        quant_storage: 4-bit only, the dtype the packed 4-bit weights are stored
            in (``bnb_4bit_quant_storage``): ``None`` / ``"uint8"`` (default, two
            4-bit codes per byte), or ``"bf16"`` / ``"fp16"`` / ``"fp32"`` (the same
            codes, viewed as 2 / 2 / 4-byte elements: same memory). FSDP + QLoRA
            needs ``"bf16"`` with ``dtype="bf16"``: FSDP shards flat tensors of one
            float dtype (peft's "Use PEFT QLoRA and FSDP" recipe). A float
            ``quant_storage`` different from ``dtype`` is allowed but warned about.
        prepare: run :func:`prepare_for_kbit_training` (freeze, keep frozen
            params in their dtype, gradient checkpointing). Default True, so
            ``wrap(load_quantized(path), "lora")`` is ready to train.
        **from_pretrained_kwargs: passed on (``num_labels=3``, ``attn_implementation="sdpa"`` /
            ``"eager"`` / ``"flash_attention_2"``, checked first: flash-attn installed, a CUDA device).

    Returns the (optionally prepared) transformers model, in eval mode as
    ``from_pretrained`` leaves it; call ``.train()`` before training.
    """
    bnb()  # a clear ImportError before transformers' own
    quant_type, double_quant = check_bits(bits, quant_type, double_quant)
    device = default_device() if device is None else device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device; valid: 'cpu', 'cuda', 'cuda:0', ...") from e
    compute_dtype = (
        default_compute_dtype(dev) if compute_dtype is None else resolve_dtype(compute_dtype, "compute_dtype")
    )
    storage = resolve_quant_storage(quant_storage, bits)
    float_storage = storage if storage is not None and storage.is_floating_point else None
    if dtype is None:
        dtype = float_storage or compute_dtype
    else:
        dtype = resolve_dtype(dtype, "dtype")
        if float_storage is not None and float_storage != dtype:
            import warnings

            warnings.warn(
                f"quant_storage={float_storage} differs from dtype={dtype}: FSDP needs one float dtype "
                "for all the parameters it shards (use the same for both)",
                stacklevel=2,
            )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or PathLike), got {type(path).__name__}")
    looks_local = isinstance(path, os.PathLike) or str(path).startswith(("/", ".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(str(path))):
        raise ValueError(f"model folder {str(path)!r} does not exist")
    cls = auto_class(task)
    for k in ("quantization_config", "torch_dtype", "load_in_4bit", "load_in_8bit"):
        if k in from_pretrained_kwargs:
            raise ValueError(f"do not pass {k!r}: load_quantized sets it from bits/quant_type/double_quant/dtype")
    if from_pretrained_kwargs.get("attn_implementation") is not None:
        check_attn_implementation(from_pretrained_kwargs["attn_implementation"], dev)
    # transformers' own default skips only the output embeddings: a classifier head would be
    # quantized (peft cannot train it; a freshly initialized one crashes in bitsandbytes)
    skip = list(OUTPUT_HEADS) if skip_modules is None else list(skip_modules)
    qconfig = bnb_config(bits, quant_type, double_quant, compute_dtype, skip, quant_storage=storage)
    model = cls.from_pretrained(
        path,
        quantization_config=qconfig,
        device_map=_device_map(device_map, dev),
        dtype=dtype,
        **from_pretrained_kwargs,
    )
    guard_4bit_cpu(model)  # bitsandbytes' AVX512 CPU paths: see its docstring
    if prepare:
        prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return model
