"""peftadapt: parameter-efficient domain adaptation for Hugging Face transformers.

The public API, re-exported; nothing else lives here.
"""

__version__ = "0.1.0"

from .methods.base import MethodConfig, METHODS, register_method  # noqa: F401
from . import align  # noqa: F401
from .align import (  # noqa: F401
    MMD, CORAL, DANN, CDAN, Entropy, Alignment, Term, DomainAdaptation, register as register_regularizer,
)
from .features import FeatureTap  # noqa: F401
from .model import AdaptedModel  # noqa: F401
from .methods.adapter import Adapter  # noqa: F401
from .methods.head import Head, find_task_head  # noqa: F401
from .methods.lora import LoRA  # noqa: F401
from .methods.prefix import Prefix  # noqa: F401
from .wrap import (  # noqa: F401
    wrap, add_adapter, set_adapter, adapter_names, load, save, merge, unmerge, disabled,
    trainable_parameters, print_trainable_parameters, base_model, is_wrapped,
)
from .train import Trainer, TrainConfig, TextData  # noqa: F401
from .quant import load_quantized, build_quantized, prepare_for_kbit_training, merge_quantized  # noqa: F401
from . import bench  # noqa: F401  (memory model + `peftadapt bench`; light: no heavy imports)
