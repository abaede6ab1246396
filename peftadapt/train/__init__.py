"""Training: the Accelerate loop (:class:`Trainer`), its options (:class:`TrainConfig`),
the typed run file (:class:`RunConfig`, :func:`load_run_config`), data loading,
checkpoints and plots."""

from .adda import ADDATrainer  # noqa: F401
from .config import TrainConfig  # noqa: F401
from .data import TextData, load_text_data  # noqa: F401
from .loop import Trainer  # noqa: F401
from .meta import MLDG  # noqa: F401
from .nonfinite import NonFiniteError  # noqa: F401
from .schema import (  # noqa: F401
    DataConfig,
    DatasetSpec,
    FeaturesConfig,
    MethodSection,
    ModelConfig,
    RunConfig,
    TermConfig,
    load_run_config,
)
