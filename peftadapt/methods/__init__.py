"""The adaptation methods: one module per method (config dataclass, modules, injection).

``lora``, ``prefix`` and every other peft method (:mod:`.peft_method`: ``ia3``, ``vera``,
``adalora``, ``loha``, ``lokr``, ``oft``, ``prompt_tuning``, or any ``peft.PeftConfig``) sit
on peft (``backend = "peft"``); ``adapter`` (Houlsby / Pfeiffer)
and ``head`` are ours (``backend = "native"``), carried by :class:`AdaptedModel`
(:mod:`.adapted_model`, injected :mod:`.slots`, file format :mod:`.native_format`).
Importing this package imports every method module, so the registry
(:data:`.base.METHODS`) is complete whenever any method code runs, and loading a saved
native adapter can always rebuild its config by name.
"""

from .adapted_model import AdaptedModel
from .adapter import Adapter
from .base import METHODS, MethodConfig, build_config, method_names, register_method
from .head import Head
from .lora import LoRA
from .peft_method import PEFT_TYPES, PeftMethod
from .prefix import Prefix

__all__ = [
    "METHODS",
    "PEFT_TYPES",
    "AdaptedModel",
    "Adapter",
    "Head",
    "LoRA",
    "MethodConfig",
    "PeftMethod",
    "Prefix",
    "build_config",
    "method_names",
    "register_method",
]
