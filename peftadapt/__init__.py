"""peftadapt: parameter-efficient domain adaptation for Hugging Face transformers.

The public API, re-exported; nothing else lives here.
"""

from . import align, bench
from .align import CDAN, CORAL, DANN, MMD, Alignment, DomainAdaptation, Entropy, Term
from .align import register as register_regularizer
from .core.hf import find_task_head
from .core.version import __version__
from .features import FeatureTap
from .integrations import add_alignment
from .methods import METHODS, AdaptedModel, Adapter, Head, LoRA, MethodConfig, Prefix, register_method
from .quant import build_quantized, load_quantized, merge_quantized, prepare_for_kbit_training
from .train import TextData, TrainConfig, Trainer
from .wrap import (
    adapter_names,
    add_adapter,
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
    "__version__", "wrap", "add_adapter", "set_adapter", "adapter_names", "load", "save", "merge", "unmerge",
    "disabled", "trainable_parameters", "print_trainable_parameters", "base_model", "is_wrapped",
    "LoRA", "Adapter", "Prefix", "Head", "MethodConfig", "METHODS", "register_method", "AdaptedModel",
    "find_task_head", "FeatureTap", "align", "Term", "Alignment", "DomainAdaptation", "MMD", "CORAL", "DANN", "CDAN", "Entropy",
    "register_regularizer", "Trainer", "TrainConfig", "TextData", "load_quantized", "build_quantized",
    "prepare_for_kbit_training", "merge_quantized", "bench", "add_alignment",
]
