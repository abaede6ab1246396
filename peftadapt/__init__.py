"""peftadapt: parameter-efficient domain adaptation for Hugging Face transformers.

The public API, re-exported; nothing else lives here.
"""

from . import align, bench
from .align import ADDA, CDAN, CORAL, DANN, MMD, Alignment, DomainAdaptation, Entropy, Term
from .align import register as register_regularizer
from .core.hf import find_task_head
from .core.version import __version__
from .features import FeatureTap
from .integrations import add_alignment
from .methods import METHODS, AdaptedModel, Adapter, Full, Head, LoRA, MethodConfig, PeftMethod, Prefix, register_method
from .quant import build_quantized, load_quantized, merge_quantized, prepare_for_kbit_training
from .train import MLDG, ADDATrainer, TextData, TrainConfig, Trainer
from .wrap import (
    adapter_names,
    add_adapter,
    after_optimizer_step,
    base_model,
    disabled,
    is_wrapped,
    load,
    merge,
    print_trainable_parameters,
    save,
    set_adapter,
    trainable_parameters,
    unmerge,
    wrap,
)

__all__ = [
    "ADDA",
    "CDAN",
    "CORAL",
    "DANN",
    "METHODS",
    "MLDG",
    "MMD",
    "ADDATrainer",
    "AdaptedModel",
    "Adapter",
    "Alignment",
    "DomainAdaptation",
    "Entropy",
    "FeatureTap",
    "Full",
    "Head",
    "LoRA",
    "MethodConfig",
    "PeftMethod",
    "Prefix",
    "Term",
    "TextData",
    "TrainConfig",
    "Trainer",
    "__version__",
    "adapter_names",
    "add_adapter",
    "add_alignment",
    "after_optimizer_step",
    "align",
    "base_model",
    "bench",
    "build_quantized",
    "disabled",
    "find_task_head",
    "is_wrapped",
    "load",
    "load_quantized",
    "merge",
    "merge_quantized",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "register_method",
    "register_regularizer",
    "save",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "wrap",
]
