"""QLoRA: bitsandbytes 4-bit / 8-bit base models trained through adapters.

bitsandbytes is imported lazily, inside the functions that need it, so
``import peftadapt`` works without it.

- :func:`load_quantized` loads a saved model with NF4/FP4 (double-quantized)
  or 8-bit linear layers and prepares it for training.
- :func:`build_quantized` builds any architecture from a config directly in
  quantized form (random weights), for 7B/70B measurements without downloads.
- :func:`prepare_for_kbit_training` freezes the base, keeps only trainable
  parameters in fp32, turns on gradient checkpointing.
- :func:`merge_quantized` merges LoRA into the *dequantized* base and exports
  a dense bf16/fp16/fp32 model.
- :func:`make_optimizer` builds AdamW / 8-bit AdamW / paged 8-bit AdamW.
"""

from ._bnb import guard_4bit_cpu, is_quantized, quant_bits, tensor_bytes
from .build import build_quantized
from .load import bnb_config, load_quantized
from .merge import merge_quantized
from .optim import OPTIMIZERS, make_optimizer
from .prepare import (
    cast_trainable_to_fp32,
    check_prefix_compat,
    prepare_for_kbit_training,
)

__all__ = [
    "OPTIMIZERS",
    "bnb_config",
    "build_quantized",
    "cast_trainable_to_fp32",
    "check_prefix_compat",
    "guard_4bit_cpu",
    "is_quantized",
    "load_quantized",
    "make_optimizer",
    "merge_quantized",
    "prepare_for_kbit_training",
    "quant_bits",
    "tensor_bytes",
]
