"""Training: the Accelerate loop (:class:`Trainer`), its options (:class:`TrainConfig`),
data loading, checkpoints and plots."""

from .config import TrainConfig, load_run_config, validate_run_config  # noqa: F401
from .data import TextData, load_text_data  # noqa: F401
from .loop import Trainer  # noqa: F401
