"""Training options (:class:`TrainConfig`) and the YAML run-file schema.

A run file has six top-level sections::

    model:        where the base model is and what task it does
    method:       the PEFT method and its options (passed to peftadapt.wrap)
    regularizers: a list of alignment terms (passed to peftadapt.align.build)
    features:     which layer / pooling the alignment reads
    data:         source, optional target, optional eval sets, label names
    training:     the TrainConfig fields below

:func:`validate_run_config` checks the whole file before anything is loaded;
every error names the bad key and lists the allowed keys or values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..quant.optim import OPTIMIZERS  # the factory's names: one list, no copy here

TASKS = ("classification", "causal_lm")
SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "dann")
POOLINGS = ("mean", "cls", "last")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


def _f(default: Any, help: str):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Optimization, evaluation, checkpoint and logging options of a run."""

    output_dir: str = _f("peftadapt-run", "folder for checkpoints, metrics.jsonl and the curves PNG")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds checkpoints (deletes them)")
    seed: int = _f(0, "seeds model init, dropout and the batch order; same seed, same run")
    epochs: float = _f(1.0, "passes over the source data (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run; overrides epochs")
    batch_size: int = _f(16, "source examples per micro-batch (per device)")
    target_batch_size: int | None = _f(None, "target examples per micro-batch; default batch_size")
    eval_batch_size: int | None = _f(None, "examples per evaluation batch; default 2 * batch_size")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(5e-4, "learning rate of adapter and head parameters")
    disc_lr: float | None = _f(None, "learning rate of regularizer (discriminator) parameters; default lr")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)")
    optim: str = _f("adamw_torch", f"one of {list(OPTIMIZERS)} (transformers' names); the paged ones page "
                    "optimizer state to CPU RAM on a CUDA GPU (on a CPU: the non-paged rule, with a warning)")
    scheduler: str = _f("linear", f"learning-rate schedule after warm-up: one of {list(SCHEDULERS)}")
    warmup_ratio: float = _f(0.0, "fraction of steps with a linear learning-rate warm-up")
    warmup_steps: int | None = _f(None, "warm-up steps; overrides warmup_ratio")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this; null to disable")
    mixed_precision: str = _f("auto", f"one of {list(MIXED_PRECISION)}; auto: bf16 (else fp16) on a GPU, no on CPU")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    eval_every: int | None = _f(None, "evaluate every N steps (and at the end); null: only at the end")
    save_every: int | None = _f(None, "checkpoint every N steps; null: at every evaluation")
    keep_last: int = _f(2, "checkpoints kept besides the best one")
    metric_for_best: str | None = _f(None, "e.g. target/accuracy; default: first eval set's accuracy (loss for LMs)")
    greater_is_better: bool | None = _f(None, "default: False for loss / perplexity, True otherwise")
    early_stopping_patience: int | None = _f(None, "stop after this many evaluations without improvement")
    restore_best: bool = _f(True, "at the end, load the best checkpoint's weights (when there were evaluations)")
    log_every: int = _f(1, "write training metrics every N steps")
    report_to: list = _f([], f"Accelerate trackers: any of {list(TRACKERS)}")
    plot: bool = _f(True, "write training_curves.png at the end")
    progress: bool = _f(True, "show a progress bar")
    global_batch_size: int | None = _f(None, "source examples per micro-batch summed over all processes; overrides "
                                      "batch_size and must be a multiple of the number of processes")
    align_scope: str = _f("auto", "with several processes: global (alignment loss over the whole batch), local "
                          "(each process on its shard) or auto (global for mmd/coral/cdan+e); see docs/distributed.md")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ValueError(f"training.{key}: {msg} (got {getattr(self, key)!r})")

        for key in ("batch_size", "grad_accum", "keep_last", "log_every"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 key, "must be a positive integer")
        for key in ("target_batch_size", "global_batch_size", "eval_batch_size", "max_steps", "eval_every", "save_every",
                    "early_stopping_patience", "warmup_steps"):
            v = getattr(self, key)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= (0 if key == "warmup_steps" else 1)),
                 key, "must be a positive integer or null")
        need(isinstance(self.epochs, (int, float)) and self.epochs > 0, "epochs", "must be > 0")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "must be > 0")
        need(self.disc_lr is None or (isinstance(self.disc_lr, (int, float)) and self.disc_lr > 0), "disc_lr", "must be > 0 or null")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0),
             "max_grad_norm", "must be > 0 or null")
        need(self.optim in OPTIMIZERS, "optim", f"allowed values: {list(OPTIMIZERS)}")
        need(self.scheduler in SCHEDULERS, "scheduler", f"allowed values: {list(SCHEDULERS)}")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"allowed values: {list(MIXED_PRECISION)}")
        need(self.align_scope in ("auto", "local", "global"), "align_scope", "allowed values: ['auto', 'local', 'global']")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        bad = [t for t in self.report_to if t not in TRACKERS]
        need(not bad, "report_to", f"unknown tracker(s) {bad}; allowed values: {list(TRACKERS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, "training")
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the YAML run file --------------------------------------------------------------

SECTIONS = {"model", "method", "regularizers", "features", "data", "training"}
MODEL_KEYS = {"path", "task", "tokenizer", "num_labels", "quantize", "dtype", "pad_token", "quant_storage"}
QUANT_STORAGES = ("uint8", "bf16", "fp16", "fp32")  # model.quant_storage (4-bit; FSDP + QLoRA wants bf16)
DTYPES = ("float32", "bfloat16", "float16")
DATA_KEYS = {"source", "target", "eval", "labels", "max_length", "truncation", "balance"}
TRUNCATIONS = ("right", "left")  # which end of a long text is cut off
BALANCES = ("none", "oversample")
SPEC_KEYS = {"path", "text", "label", "format", "split", "where", "where_not"}
TERM_KEYS = {"name", "weight", "schedule", "warmup", "start"}  # other keys are the regularizer's options
FEATURE_KEYS = {"layer", "pooling"}


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a mapping of keys to values, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}; allowed keys in {where}: {sorted(allowed)}")


def _choice(value: Any, choices, key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not allowed; allowed values: {list(choices)}")


def _check_spec(spec: Any, key: str, needs_label: bool) -> None:
    if isinstance(spec, str):
        spec = {"path": spec}
    _check_keys(spec, SPEC_KEYS, key)
    if "path" not in spec:
        raise ValueError(f"{key}.path is required (a CSV / TSV / JSONL file or a saved HF dataset folder)")
    if "format" in spec:
        from .data import FORMATS
        _choice(spec["format"], FORMATS, f"{key}.format")
    if needs_label and not spec.get("label"):
        raise ValueError(f"{key}.label is required for a classifier: the name of the label column")
    for flt in ("where", "where_not"):
        if flt in spec and not isinstance(spec[flt], dict):
            raise ValueError(f"{key}.{flt}: must map column names to a value or a list of values")


def normalize_spec(spec: Any) -> dict[str, Any]:
    spec = {"path": spec} if isinstance(spec, str) else dict(spec)
    spec.setdefault("text", "text")
    return spec


def validate_run_config(cfg: Any, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Check a parsed run file and return it with defaults filled in.

    Relative data / model paths are resolved against ``base_dir`` (the YAML's
    folder) when they do not exist relative to the working directory.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"the config must be a YAML mapping with sections {sorted(SECTIONS)}")
    _check_keys(cfg, SECTIONS, "config")
    for sec in ("model", "data"):
        if sec not in cfg:
            raise ValueError(f"the config has no `{sec}:` section; required sections: ['data', 'model']")

    model = dict(cfg["model"] or {})
    _check_keys(model, MODEL_KEYS, "model")
    if "path" not in model:
        raise ValueError("model.path is required: a local model folder (save_pretrained output)")
    model.setdefault("task", "classification")
    _choice(model["task"], TASKS, "model.task")
    _choice(model.get("quantize"), (None, 4, 8), "model.quantize")
    _choice(model.get("dtype"), (None,) + DTYPES, "model.dtype")
    if model.get("quant_storage") is not None:
        _choice(model["quant_storage"], QUANT_STORAGES, "model.quant_storage")
        if model.get("quantize") != 4:
            raise ValueError("model.quant_storage: the storage dtype of packed 4-bit weights; it needs model.quantize: 4")
    nl = model.get("num_labels")
    if nl is not None and (not isinstance(nl, int) or isinstance(nl, bool) or nl < 1):
        raise ValueError(f"model.num_labels: must be a positive integer, got {nl!r}")
    task = model["task"]

    method = cfg.get("method") or {"name": "lora"}
    if isinstance(method, str):
        method = {"name": method}
    method = dict(method)
    if not isinstance(method.get("name"), str):
        raise ValueError("method.name is required: e.g. lora, dora, adapter, prefix, head")
    try:  # names come from the method registry when it is importable
        from ..methods.base import method_names
        names = method_names()
    except Exception:  # pragma: no cover - registry not importable
        names = []
    if names and method["name"].lower() not in names:
        raise ValueError(f"method.name: unknown method {method['name']!r}; allowed values: {names}")

    regs = cfg.get("regularizers") or []
    if not isinstance(regs, list):
        raise ValueError("regularizers: must be a list of {name: ..., weight: ...} entries")
    out_regs = []
    for i, term in enumerate(regs):
        key = f"regularizers[{i}]"
        if isinstance(term, str):
            term = {"name": term}
        if not isinstance(term, dict) or not isinstance(term.get("name"), str):
            raise ValueError(f"{key}.name is required: one of mmd, coral, dann, cdan, cdan+e, entropy")
        term = dict(term)
        term.setdefault("weight", 1.0)
        term.setdefault("schedule", "constant")
        _choice(term["schedule"], SCHEDULES, f"{key}.schedule")
        for k in ("weight", "warmup", "start"):
            if k in term and not isinstance(term[k], (int, float)):
                raise ValueError(f"{key}.{k}: must be a number, got {term[k]!r}")
        for k in ("warmup", "start"):
            if k in term and not 0 <= term[k] <= 1:
                raise ValueError(f"{key}.{k}: a fraction of training in [0, 1], got {term[k]!r}")
        out_regs.append(term)

    features = dict(cfg.get("features") or {})
    _check_keys(features, FEATURE_KEYS, "features")
    if "pooling" in features:
        _choice(features["pooling"], POOLINGS, "features.pooling")

    data = dict(cfg["data"] or {})
    _check_keys(data, DATA_KEYS, "data")
    if "source" not in data:
        raise ValueError("data.source is required: the labeled training data")
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels):
        raise ValueError(f"data.labels: must be a non-empty list of label names, got {labels!r}")
    if labels is not None and nl is not None and len(labels) != nl:
        raise ValueError(f"data.labels has {len(labels)} names but model.num_labels is {nl}")
    _check_spec(data["source"], "data.source", task == "classification")
    if data.get("target") is not None:
        _check_spec(data["target"], "data.target", False)
    evals = data.get("eval") or {}
    if not isinstance(evals, dict):
        raise ValueError("data.eval: must map eval-set names to specs, e.g. {target: {path: ..., label: ...}}")
    for name, spec in evals.items():
        _check_spec(spec, f"data.eval.{name}", task == "classification")
    ml = data.get("max_length", 128)
    if not isinstance(ml, int) or isinstance(ml, bool) or ml < 2:
        raise ValueError(f"data.max_length: must be an integer >= 2, got {ml!r}")
    if out_regs and data.get("target") is None:
        raise ValueError("regularizers need unlabeled target data: add data.target (or remove the regularizers)")
    data.setdefault("truncation", "right")
    _choice(data["truncation"], TRUNCATIONS, "data.truncation")
    data.setdefault("balance", "none")
    _choice(data["balance"], BALANCES, "data.balance")
    if data["balance"] != "none" and task != "classification":
        raise ValueError("data.balance: oversample balances class labels; it needs model.task: classification")

    training = TrainConfig.from_dict(dict(cfg.get("training") or {}))

    def resolve(p: str) -> str:
        if base_dir is not None and not Path(p).exists() and (Path(base_dir) / p).exists():
            return str(Path(base_dir) / p)
        return p

    model["path"] = resolve(model["path"])
    if model.get("tokenizer"):
        model["tokenizer"] = resolve(model["tokenizer"])
    data["source"] = normalize_spec(data["source"])
    data["source"]["path"] = resolve(data["source"]["path"])
    if data.get("target") is not None:
        data["target"] = normalize_spec(data["target"])
        data["target"]["path"] = resolve(data["target"]["path"])
    data["eval"] = {n: normalize_spec(s) for n, s in evals.items()}
    for s in data["eval"].values():
        s["path"] = resolve(s["path"])
    data["max_length"] = ml
    return {"model": model, "method": method, "regularizers": out_regs, "features": features,
            "data": data, "training": training}


def load_run_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML run file (``yaml.safe_load``)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {str(p)!r}")
    with open(p, encoding="utf-8") as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from None
    return validate_run_config(cfg, base_dir=p.parent)
