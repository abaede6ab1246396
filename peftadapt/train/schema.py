"""The YAML run file, typed: one dataclass per section, one load function.

A run file has six top-level sections::

    model:        where the base model is and what task it does      (ModelConfig)
    method:       the PEFT method and its options (peftadapt.wrap)  (MethodSection)
    regularizers: a list of alignment terms                          (list of TermConfig)
    features:     which layer / pooling the alignment reads          (FeaturesConfig)
    data:         source, optional target, optional eval sets        (DataConfig of DatasetSpec)
    training:     optimization, evaluation, checkpoints              (TrainConfig)

:func:`load_run_config` is the one way in, for ``peftadapt train`` and for
Python alike: it reads the YAML (``yaml.safe_load``), applies ``--set``-style
overrides, checks everything before anything heavy is loaded, and returns a
:class:`RunConfig`. The field annotations are the schema (see
:mod:`peftadapt.train._fields`); an unknown key is reported with the closest
valid name, a bad value with the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ..align.registry import REGULARIZERS, init_params, regularizer_names
from ..align.schedule import Schedule
from ..align.scope import Scope
from ..core.fields import field
from ..core.hf import AttnImplementation
from ..features import Pooling
from ..methods.base import ALIASES, METHODS, build_config, method_names
from ..quant.load import QuantStorage
from ..validators import ValidatorName
from ._fields import REQUIRED, as_dict, build, check_fields, check_keys, choices, describe, hints
from .config import Task, TrainConfig
from .data import Format, check_label_names
from .sft import SFTFormat

# Literal types over the tuples' one home (the lower layers own the lists).
Dtype = Literal["float32", "bfloat16", "float16"]  # torch dtype names for model.dtype
Truncation = Literal["right", "left"]  # which end of a long text is cut off
Balance = Literal["none", "oversample"]


def _section(cls: type, help: str):
    """A section field whose default is the section's defaults."""
    return field(REQUIRED, help, default_factory=cls)


def _check_options(section: Any, options: list[str], where: str) -> None:
    """A method's / regularizer's own options sit next to the section's fixed keys:
    a misspelling is matched against both."""
    own = [f.name for f in dataclasses.fields(section) if f.name != section._extra]
    check_keys(section.options, own + options, where)


@dataclasses.dataclass
class ModelConfig:
    """The base model: a local ``save_pretrained`` folder."""

    _where: ClassVar[str] = "model"

    path: str = field(REQUIRED, "a local model folder (save_pretrained output)")
    task: Task = field("classification", "sequence classification, or next-token training of a causal LM")
    tokenizer: str | None = field(None, "tokenizer folder; default: model.path")
    num_labels: int | None = field(None, "classes of a classifier; default: len(data.labels), else from the labels")
    quantize: Literal[4, 8] | None = field(None, "load the base in 4 (QLoRA, NF4) or 8 bits with bitsandbytes")
    dtype: Dtype | None = field(None, "dtype of the base weights; default: the checkpoint's")
    pad_token: str | None = field(
        None, "'eos' reuses the eos token (Llama tokenizers have no pad token), or a token string"
    )
    quant_storage: QuantStorage | None = field(
        None, "storage dtype of packed 4-bit weights (FSDP + QLoRA wants bf16); needs quantize: 4"
    )
    attn_implementation: AttnImplementation = field(
        "sdpa",
        "attention kernel (from_pretrained's attn_implementation): sdpa (torch's fused attention), eager, "
        "or flash_attention_2 (needs the flash-attn package and a CUDA GPU)",
    )

    def __post_init__(self):
        check_fields(self, self._where)

    def validate(self, where: str) -> None:
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"{where}.num_labels: must be a positive integer, got {self.num_labels!r}")
        if self.quant_storage is not None and self.quantize != 4:
            raise ValueError(
                f"{where}.quant_storage: the storage dtype of packed 4-bit weights; it needs {where}.quantize: 4"
            )


@dataclasses.dataclass
class MethodSection:
    """The PEFT method: ``name`` plus that method's own options (``peftadapt.wrap(model, name, **options)``)."""

    _where: ClassVar[str] = "method"
    _shorthand: ClassVar[str] = "name"
    _extra: ClassVar[str] = "options"

    name: str = field(
        "lora",
        "a registered method: lora, dora, rslora, adapter, houlsby, pfeiffer, prefix, head, full (every weight), "
        "or a peft method: ia3, vera, adalora, loha, lokr, oft, prompt_tuning",
    )
    options: dict[str, Any] = field({}, "the method's own options, written next to name (e.g. r: 8)")

    def __post_init__(self):
        check_fields(self, self._where)

    def validate(self, where: str) -> None:
        key = self.name.lower()
        if key not in method_names():
            close = difflib.get_close_matches(key, method_names(), n=1)
            raise ValueError(
                f"{where}.name: unknown method {self.name!r}"
                + (f"; did you mean {close[0]}?" if close else "")
                + f" (allowed values: {method_names()})"
            )
        base = ALIASES[key][0] if key in ALIASES else key
        _check_options(self, METHODS[base].option_names(key), where)
        options = dict(self.options)
        if key == "adalora":  # RunConfig fills total_step from training.max_steps: a stand-in for this check
            options.setdefault("total_step", 1)
        try:  # the method's own value checks (cheap: builds the config, not the model)
            build_config(self.name, **options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where} ({self.name}): {e}") from None


@dataclasses.dataclass
class TermConfig:
    """One alignment term: a registered regularizer, its weight schedule and its own options."""

    _shorthand: ClassVar[str] = "name"
    _extra: ClassVar[str] = "options"

    name: str = field(
        REQUIRED, "a registered regularizer: mmd, coral, dann, cdan, cdan+e, entropy, target_lm (causal_lm), or yours"
    )
    weight: float = field(1.0, "the term's maximum weight lambda, on the scale of the task loss")
    schedule: Schedule = field("constant", "how the weight ramps up: constant, linear warm-up, or the DANN ramp")
    warmup: float = field(0.0, "ramp length as a fraction of training (linear / dann)")
    start: float = field(0.0, "fraction of training before which the term is off")
    scope: Scope = field("auto", "with several processes: global, local or auto (see docs/distributed.md)")
    options: dict[str, Any] = field({}, "the regularizer's own options, written next to name (e.g. kernel_mul)")

    def validate(self, where: str) -> None:
        key = self.name.lower()
        if key not in REGULARIZERS:
            close = difflib.get_close_matches(key, regularizer_names(), n=1)
            raise ValueError(
                f"{where}.name: unknown regularizer {self.name!r}"
                + (f"; did you mean {close[0]}?" if close else "")
                + f" (allowed values: {regularizer_names()})"
            )
        _check_options(self, sorted(init_params(REGULARIZERS[key][0])), where)
        for k in ("warmup", "start"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{where}.{k}: a fraction of training in [0, 1], got {getattr(self, k)!r}")


@dataclasses.dataclass
class FeaturesConfig:
    """Where the regularizers read features (and, for a causal LM, which answer tokens are its classes)."""

    _where: ClassVar[str] = "features"

    layer: str | int | None = field(
        None,
        "module name whose output is aligned, or a block index of the layer stack (-1: the last block); "
        "null: the task head's input",
    )
    pooling: Pooling = field("mean", "how (batch, tokens, width) outputs become one vector per example")
    class_tokens: list[str | int] | None = field(
        None,
        "causal_lm: the answers (strings, tokenized; or token ids), one per class in class order; entropy / cdan / "
        "cdan+e read the LM logits of their first tokens at the last prompt position",
    )

    def __post_init__(self):
        check_fields(self, self._where)

    def validate(self, where: str) -> None:
        tokens = self.class_tokens
        if tokens is not None and (len(tokens) < 2 or len(set(tokens)) < len(tokens)):
            raise ValueError(
                f"{where}.class_tokens: one distinct answer per class, at least two (e.g. [positive, negative]), "
                f"got {tokens!r}"
            )


@dataclasses.dataclass
class DatasetSpec:
    """One dataset: a data file, a saved HF dataset folder or a Hub dataset name (a bare string is its path)."""

    _shorthand: ClassVar[str] = "path"

    path: str = field(REQUIRED, "a CSV / TSV / JSON(L) / Parquet file, a save_to_disk folder, or a Hub dataset name")
    text: str = field("text", "the text column")
    label: str | None = field(None, "the label column (required for a classifier's source and eval sets)")
    format: Format | None = field(None, "how the file is read; default: from the suffix (a folder: hf)")
    split: str | None = field(None, "a split of a DatasetDict or Hub dataset (files: train, or a slice: train[:90%])")
    subset: str | None = field(None, "the configuration of a Hub dataset (load_dataset's name)")
    where: dict[str, Any] | None = field(None, "keep rows whose column holds this value (or one of a list)")
    where_not: dict[str, Any] | None = field(None, "drop rows whose column holds this value (or one of a list)")
    sft_format: SFTFormat | None = field(
        None, "causal_lm rows: text, prompt_completion or messages; default: from the columns"
    )
    prompt: str = field("prompt", "the prompt column (sft_format prompt_completion)")
    completion: str = field("completion", "the completion column (sft_format prompt_completion)")
    messages: str = field("messages", "the chat column: a list of {role, content} (sft_format messages)")
    validators: list[ValidatorName] = field(
        [],
        "eval sets only: label-free scores logged as <name>/<validator> (docs/validators.md); the set may be unlabeled",
    )


@dataclasses.dataclass
class DataConfig:
    """Source (labeled), optional target (unlabeled) and named eval sets."""

    _where: ClassVar[str] = "data"

    source: DatasetSpec = field(REQUIRED, "the labeled training data")
    target: DatasetSpec | None = field(
        None,
        "unlabeled target-domain data (needed by regularizers); causal_lm: read as prompts (a chat row: its turns "
        "before any answer, plus the generation prompt)",
    )
    eval: dict[str, DatasetSpec] = field({}, "named eval sets; metrics are logged as <name>/<metric>")
    source_validation: str | None = field(
        None,
        "the eval set (a name in data.eval) of labeled source-domain data: read by dev, reverse_validation, "
        "source_accuracy and a DA run's default selection",
    )
    labels: list[str | int] | None = field(None, "label names in class order: string labels -> 0, 1, ...")
    max_length: int = field(128, "tokens per example; longer texts are truncated")
    truncation: Truncation = field("right", "which end of a long text is cut off (left keeps the end)")
    balance: Balance = field("none", "oversample: repeat minority-class source rows (classification)")
    train_on_inputs: bool = field(False, "causal_lm: the loss also covers prompts / user turns (default: answers only)")
    packing: bool = field(False, "causal_lm: pack source examples into rows of max_length (position ids restart)")
    chat_template: str | None = field(None, "a Jinja chat template (or a .jinja file) for messages data")

    def __post_init__(self):
        check_fields(self, self._where)

    def validate(self, where: str) -> None:
        if self.labels is not None and not self.labels:
            raise ValueError(f"{where}.labels: must be a non-empty list of label names, got {self.labels!r}")
        if self.labels:
            check_label_names(self.labels, f"{where}.labels")
        if self.max_length < 2:
            raise ValueError(f"{where}.max_length: must be an integer >= 2, got {self.max_length!r}")

    def specs(self) -> dict[str, DatasetSpec]:
        """Every dataset by its config key (data.source, data.target, data.eval.NAME)."""
        out = {"data.source": self.source}
        if self.target is not None:
            out["data.target"] = self.target
        out.update({f"data.eval.{n}": s for n, s in self.eval.items()})
        return out


@dataclasses.dataclass
class RunConfig:
    """A whole run file, checked. Build it with :func:`load_run_config`."""

    model: ModelConfig = field(REQUIRED, "the base model")
    data: DataConfig = field(REQUIRED, "the datasets")
    method: MethodSection = _section(MethodSection, "the PEFT method (default: lora)")
    regularizers: list[TermConfig] = field([], "alignment terms; each needs data.target")
    features: FeaturesConfig = _section(FeaturesConfig, "what the regularizers compare")
    training: TrainConfig = _section(TrainConfig, "optimization, evaluation, checkpoints, logging")

    def __post_init__(self):
        check_fields(self, "")  # top level: keys are the section names

    def validate(self, where: str) -> None:
        """The rules that span sections (and AdaLoRA's total_step, filled in from training.max_steps)."""
        task, nl, data = self.model.task, self.model.num_labels, self.data
        if self.method.name.lower() == "adalora" and "total_step" not in self.method.options:
            if self.training.max_steps is None:  # its rank schedule needs the run's number of optimizer steps
                raise ValueError(
                    "method.total_step: adalora needs the run's number of optimizer steps; "
                    "set method.total_step, or training.max_steps (then total_step follows it)"
                )
            self.method.options["total_step"] = self.training.max_steps
        if data.labels is not None and nl is not None and len(data.labels) != nl:
            raise ValueError(f"data.labels has {len(data.labels)} names but model.num_labels is {nl}")
        for key, spec in data.specs().items():
            if spec.validators and not key.startswith("data.eval."):
                raise ValueError(f"{key}.validators: only eval sets (data.eval.NAME) are scored by validators")
            if task == "classification" and key != "data.target" and not spec.label and not spec.validators:
                raise ValueError(f"{key}.label is required for a classifier: the name of the label column")
        tokens = self.features.class_tokens
        for i, t in enumerate(self.regularizers):
            reg = REGULARIZERS[t.name.lower()][0]
            if task != "classification" and getattr(reg, "needs_logits", False) and tokens is None:
                raise ValueError(
                    f"regularizers[{i}] ({t.name}): {t.name} reads class predictions: a classifier's (model.task: "
                    "classification), or a causal LM's read off its answer tokens: set features.class_tokens (e.g. "
                    "[positive, negative]), or use mmd, coral, dann or target_lm"
                )
            if task != "causal_lm" and getattr(reg, "needs_lm_loss", False):
                raise ValueError(
                    f"regularizers[{i}] ({t.name}): the model's own next-token loss on the target; it needs "
                    f"model.task: causal_lm (this model's task is {task})"
                )
        if tokens is not None and task != "causal_lm":
            raise ValueError(
                f"features.class_tokens: class logits read off a causal LM's answer tokens; a {task} model's "
                "logits are class logits already: remove it (or set model.task: causal_lm)"
            )
        if self.regularizers and data.target is None:
            raise ValueError("regularizers need unlabeled target data: add data.target (or remove the regularizers)")
        if self.method.name.lower() == "full" and self.model.quantize:
            raise ValueError(
                "method: full trains every weight, and quantized weights (model.quantize) cannot train; "
                "drop model.quantize or use method: lora (QLoRA)"
            )
        if data.packing and task != "causal_lm":
            raise ValueError("data.packing: packs token sequences of a causal LM; it needs model.task: causal_lm")
        if data.packing and self.regularizers:
            raise ValueError(
                "data.packing cannot be combined with regularizers: a packed row holds several examples, "
                "so its pooled features are no one example's; set data.packing: false"
            )
        for key, spec in data.specs().items():
            if spec.sft_format is not None and task != "causal_lm":
                raise ValueError(f"{key}.sft_format: a causal_lm data layout; this model's task is {task}")
        if data.balance != "none" and task != "classification":
            raise ValueError("data.balance: oversample balances class labels; it needs model.task: classification")

    @property
    def num_labels(self) -> int | None:
        """Classes of a classifier when the config says (model.num_labels, else data.labels); None otherwise."""
        if self.model.task != "classification":
            return None
        return self.model.num_labels or (len(self.data.labels) if self.data.labels else None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in run-file form (loads back to an equal RunConfig)."""
        return as_dict(self)


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``SECTION.KEY=VALUE`` strings (VALUE parsed as YAML) or ``{"SECTION.KEY": value}``;
    a list item is addressed by its index (``regularizers.0.weight=0.5``)."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.learning_rate=1.0e-3")
            key, value = item.split("=", 1)
            try:
                items.append((key, yaml.safe_load(value)))
            except yaml.YAMLError as e:
                what = getattr(e, "problem", None) or type(e).__name__
                raise ValueError(f"--set {item!r}: the value is not valid YAML ({what}); quote it") from None
    for key, value in items:
        *path, last = key.split(".")
        node: Any = raw
        for part in path:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:  # an absent or empty section
                    node[part] = {}
                node = node[part]
            else:
                raise ValueError(f"--set {key}: {part!r} is not a section")
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {path[-1]!r} is not a section")
        node[last] = value
    return raw


def _resolve_paths(run: RunConfig, base_dir: Path) -> None:
    """Relative model / data paths: the working directory first, else the YAML's folder."""

    def resolve(p: str) -> str:
        if not Path(p).exists() and (base_dir / p).exists():
            return str(base_dir / p)
        return p

    run.model.path = resolve(run.model.path)
    if run.model.tokenizer:
        run.model.tokenizer = resolve(run.model.tokenizer)
    for spec in run.data.specs().values():
        spec.path = resolve(spec.path)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {str(path)!r}")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:  # one line: where and what (its own text spans several)
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{at}: {what}") from None


def load_run_config(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    output_dir: str | None = None,
    base_dir: str | Path | None = None,
) -> RunConfig:
    """Read, override and check a run file; the one way from YAML to a :class:`RunConfig`.

    Args:
        source: a YAML path, or an already parsed mapping (as ``yaml.safe_load`` returns).
        overrides: ``["training.learning_rate=1.0e-3", ...]`` (``peftadapt train --set``) or
            ``{"training.learning_rate": 1e-3}``, applied before checking.
        output_dir: replaces ``training.output_dir`` (``--output-dir``).
        base_dir: where relative paths are looked up when they do not exist from the
            working directory; default: the YAML file's folder (none for a mapping).
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        raw = _read_yaml(Path(source))
        base_dir = Path(source).parent if base_dir is None else base_dir
    if not isinstance(raw, Mapping):
        raise ValueError(f"the config must be a YAML mapping with sections {SECTIONS}")
    raw = _apply_overrides(copy.deepcopy(dict(raw)), overrides)
    if output_dir:
        raw["training"] = dict(raw.get("training") or {}, output_dir=str(output_dir))
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), SECTIONS, n=1)
            raise ValueError(
                f"unknown section {key!r} in the config"
                + (f"; did you mean {close[0]}?" if close else "")
                + f" (valid sections: {SECTIONS})"
            )
    for sec in ("model", "data"):
        if sec not in raw:
            raise ValueError(f"the config has no `{sec}:` section; required sections: ['data', 'model']")
    if not isinstance(raw.get("regularizers") or [], list):
        raise ValueError("regularizers: must be a list of {name: ..., weight: ...} entries")
    run = build(RunConfig, {k: v for k, v in raw.items() if v is not None or k in ("model", "data")}, "config")
    if base_dir is not None:
        _resolve_paths(run, Path(base_dir))
    return run


# -- the schema as text ------------------------------------------------------------


def schema() -> dict[str, list[dict[str, Any]]]:
    """Every section's keys: ``{section: [{key, type, default, help, choices}]}``; data's
    dataset keys are listed as ``<spec>.KEY``."""
    out = {}
    for name, tp in hints(RunConfig).items():
        cls = tp.__args__[0] if name == "regularizers" else tp
        out[name] = schema_of(cls)
        if cls is DataConfig:
            out[name] += [dict(r, key=f"<spec>.{r['key']}") for r in schema_of(DatasetSpec)]
    return out


def schema_of(cls: type) -> list[dict[str, Any]]:
    """The keys of one section dataclass, for :func:`schema`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        required = f.default is REQUIRED and f.default_factory is REQUIRED
        default = "required" if required else f.default if f.default_factory is REQUIRED else f.default_factory()
        rows.append(
            {
                "key": f.name,
                "type": describe(tp),
                "default": as_dict(default),
                "help": f.metadata.get("help", ""),
                "choices": list(choices(tp) or []) or None,
            }
        )
    return rows


def _flow(value: Any) -> str:
    """A value as one line of YAML (null, [], 0.0005)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def format_schema() -> str:
    """The schema as readable text (``peftadapt config --schema``)."""
    lines = []
    for sec, rows in schema().items():
        lines.append(f"{sec}:" + ("  (a list; each entry:)" if sec == "regularizers" else ""))
        for r in rows:
            default = "required" if r["default"] == "required" else f"default {_flow(r['default'])}"
            lines.append(f"  {r['key']}: {r['type']}  ({default})")
            lines.append(f"      {r['help']}")
        if sec == "method":
            for name in sorted(METHODS):
                options = ", ".join(f.name for f in dataclasses.fields(METHODS[name])) or "(none)"
                lines.append(f"  options of {name}: {options}")
        if sec == "regularizers":
            for name in regularizer_names():
                lines.append(f"  options of {name}: {', '.join(init_params(REGULARIZERS[name][0])) or '(none)'}")
        lines.append("")
    return "\n".join(lines)
