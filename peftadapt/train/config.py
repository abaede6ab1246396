"""Training options: :class:`TrainConfig`, the ``training:`` section of a run file.

Keys are transformers' ``TrainingArguments`` names where one exists (users
already type ``learning_rate``, ``gradient_accumulation_steps``, ``optim``).
Where our meaning differs from transformers', the help text says so. The old
peftadapt names are listed in :data:`RENAMED` so that a run file using one is
told the new name instead of only "unknown key".
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, get_args

from ..align.scope import Scope
from ..align.step import Sources
from ..core.fields import field, help_of
from ..quant.optim import Optim  # the factory's names: one list
from ..quant.prepare import checkpoint_kwargs
from ._fields import check_fields, checked_keywords

FLOAT32_MAX = 3.4028234663852886e38  # the optimizers keep the learning rate in float32 tensors

Task = Literal["classification", "causal_lm"]
TASKS = get_args(Task)
LrSchedulerType = Literal["linear", "cosine", "constant"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]
NanPolicy = Literal["stop", "skip"]  # what a step with a NaN / inf loss or gradient norm does
# standard: one run (the task loss, plus the regularizers if any); mldg: meta-learning across the source
# domains (train.meta.MLDG); adda: source training, then ADDA's adversarial phase (train.adda)
Procedure = Literal["standard", "mldg", "adda"]
PROCEDURES = get_args(Procedure)

# Old peftadapt key -> TrainingArguments name (0.1 run files); only for the error message.
RENAMED = {
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "target_batch_size": "per_device_target_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "lr": "learning_rate",
    "disc_lr": "discriminator_learning_rate",
    "optimizer": "optim",
    "scheduler": "lr_scheduler_type",
    "eval_every": "eval_steps",
    "save_every": "save_steps",
    "keep_last": "save_total_limit",
    "metric_for_best": "metric_for_best_model",
    "restore_best": "load_best_model_at_end",
    "log_every": "logging_steps",
    "overwrite": "overwrite_output_dir",
    "progress": "disable_tqdm",
}


@checked_keywords
@dataclasses.dataclass
class TrainConfig:
    """Optimization, evaluation, checkpoint and logging options of a run."""

    _where: ClassVar[str] = "training"
    _renamed: ClassVar[dict[str, str]] = RENAMED

    output_dir: str = field("peftadapt-run", "folder for checkpoints, metrics.jsonl and the curves PNG")
    overwrite_output_dir: bool = field(False, "start afresh in an output_dir that holds checkpoints (deletes them)")
    seed: int = field(0, "seeds model init, dropout and the batch order; same seed, same run")
    num_train_epochs: float = field(1.0, "passes over the source data (ignored when max_steps is set)")
    max_steps: int | None = field(None, "optimizer steps to run; overrides num_train_epochs")
    per_device_train_batch_size: int = field(16, "source examples per micro-batch per process")
    per_device_target_batch_size: int | None = field(
        None, "target examples per micro-batch per process; default: the source batch per process"
    )
    per_device_eval_batch_size: int | None = field(
        None, "examples per evaluation batch; default 2 * per_device_train_batch_size"
    )
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step")
    learning_rate: float = field(5e-4, "learning rate of adapter and head parameters")
    discriminator_learning_rate: float | None = field(
        None, "learning rate of regularizer (discriminator) parameters; default learning_rate"
    )
    weight_decay: float = field(0.0, "AdamW weight decay (not applied to biases and norms)")
    optim: Optim = field(
        "adamw_torch", "optimizer: torch AdamW, or bitsandbytes 8-bit / paged AdamW (pip install bitsandbytes)"
    )
    lr_scheduler_type: LrSchedulerType = field("linear", "learning-rate schedule after the warm-up")
    warmup_ratio: float = field(0.0, "fraction of steps with a linear learning-rate warm-up")
    warmup_steps: int | None = field(None, "warm-up steps; overrides warmup_ratio (transformers: 0 = unset)")
    max_grad_norm: float | None = field(1.0, "clip the gradient norm to this; null to disable")
    mixed_precision: MixedPrecision = field("auto", "auto: bf16 (else fp16) on a GPU, no on CPU")
    gradient_checkpointing: bool = field(
        False, "recompute each layer's activations in the backward pass: memory for time (see docs/training.md)"
    )
    gradient_checkpointing_kwargs: dict[str, Any] = field(
        {"use_reentrant": False},
        "options of torch.utils.checkpoint.checkpoint, e.g. {use_reentrant: false} (the default here; "
        "transformers' is torch's)",
    )
    eval_steps: int | None = field(
        None,
        "evaluate every N steps (and at the end); null: only at the end "
        "(transformers needs eval_strategy as well; here the number alone does it)",
    )
    save_steps: int | None = field(None, "checkpoint every N steps; null: at every evaluation")
    save_total_limit: int = field(2, "checkpoints kept besides the best one (transformers counts the best among them)")
    metric_for_best_model: str | None = field(
        None,
        "e.g. target/accuracy or target/snd (the eval set's name, a slash, the metric or validator); default: "
        "the first eval set's accuracy (loss for causal LMs); a DA run never defaults to target labels "
        "(docs/validators.md)",
    )
    greater_is_better: bool | None = field(None, "default: False for loss / perplexity, True otherwise")
    early_stopping_patience: int | None = field(None, "stop after this many evaluations without improvement")
    load_best_model_at_end: bool = field(
        True,
        "at the end, load the best checkpoint's weights (when there were evaluations; transformers' default is False)",
    )
    logging_steps: int = field(1, "write training metrics every N steps")
    report_to: list[Tracker] = field([], "Accelerate trackers, e.g. [tensorboard]")
    plot: bool = field(True, "write training_curves.png at the end")
    disable_tqdm: bool = field(False, "hide the progress bars")
    global_batch_size: int | None = field(
        None,
        "source examples per micro-batch summed over all processes; overrides "
        "per_device_train_batch_size and must be a multiple of the number of processes",
    )
    nan_policy: NanPolicy = field(
        "stop",
        "a step whose loss or gradient norm is NaN / inf: stop the run with an error naming the step, or skip "
        "its update (counted in summary.json); see docs/training.md",
    )
    max_skipped_steps_in_a_row: int = field(
        10, "with nan_policy: skip, stop once more than this many steps in a row were skipped"
    )
    align_scope: Scope = field(
        "auto",
        "with several processes: global (alignment loss over the whole batch), local (each process "
        "on its shard) or auto (global for mmd/coral/cdan+e); see docs/distributed.md",
    )
    align_sources: Sources = field(
        "pooled",
        "several source domains: pooled (each term compares all sources together with the target) or "
        "per_source (the mean over domains of each source vs the target); see docs/regularizers.md",
    )
    procedure: Procedure = field(
        "standard",
        "standard: the task (+ alignment) loss; mldg: meta-learning across the source domains "
        "(needs two or more, data.source as a list or data.domain_column); adda: source training, then ADDA's "
        "adversarial phase (a target adapter against a domain discriminator; needs data.target); see docs/training.md",
    )
    meta_learning_rate: float | None = field(
        None, "procedure mldg: the step size of the virtual meta-train update (alpha); default: learning_rate"
    )
    meta_weight: float = field(1.0, "procedure mldg: the weight of the meta-test loss (beta)")
    meta_first_order: bool = field(
        True, "procedure mldg: drop the second-order term (no gradient through the inner gradient)"
    )
    meta_test_domains: int = field(1, "procedure mldg: source domains held out as meta-test at each step")
    adda_steps: int | None = field(
        None, "procedure adda: optimizer steps of the adversarial phase; default: as many as the source phase"
    )
    adda_learning_rate: float | None = field(
        None,
        "procedure adda: learning rate of the target adapter in the adversarial phase; default learning_rate "
        "(the discriminator's: discriminator_learning_rate)",
    )

    def __post_init__(self):
        check_fields(self, self._where)

    def validate(self, where: str = "training") -> None:
        """Ranges the types cannot say."""

        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ValueError(f"{where}.{key}: {msg} (got {getattr(self, key)!r})")

        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_total_limit", "logging_steps"):
            need(getattr(self, key) >= 1, key, "must be a positive integer")
        for key in (
            "per_device_target_batch_size",
            "global_batch_size",
            "per_device_eval_batch_size",
            "max_steps",
            "eval_steps",
            "save_steps",
            "early_stopping_patience",
            "warmup_steps",
            "adda_steps",
        ):
            v = getattr(self, key)
            need(v is None or v >= (0 if key == "warmup_steps" else 1), key, "must be a positive integer or null")
        need(self.num_train_epochs > 0, "num_train_epochs", "must be > 0")
        need(0 < self.learning_rate <= FLOAT32_MAX, "learning_rate", "must be > 0 and a float32 (<= 3.4e38)")
        need(
            self.discriminator_learning_rate is None or 0 < self.discriminator_learning_rate <= FLOAT32_MAX,
            "discriminator_learning_rate",
            "must be > 0 and a float32 (<= 3.4e38), or null",
        )
        need(
            self.adda_learning_rate is None or 0 < self.adda_learning_rate <= FLOAT32_MAX,
            "adda_learning_rate",
            "must be > 0 and a float32 (<= 3.4e38), or null",
        )
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        need(
            self.meta_learning_rate is None or 0 < self.meta_learning_rate <= FLOAT32_MAX,
            "meta_learning_rate",
            "must be > 0, or null",
        )
        need(self.meta_weight >= 0, "meta_weight", "must be >= 0")
        need(self.meta_test_domains >= 1, "meta_test_domains", "must be a positive integer")
        need(self.max_skipped_steps_in_a_row >= 1, "max_skipped_steps_in_a_row", "must be a positive integer")
        checkpoint_kwargs(self.gradient_checkpointing_kwargs, f"{where}.gradient_checkpointing_kwargs")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """``TrainConfig(**d)``: an unknown or renamed key names the valid one (as a keyword does)."""
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (checked like :meth:`from_dict`)."""
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def help(cls) -> dict[str, str]:
        return help_of(cls)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
