"""Text data for the trainer: loading, label checks, tokenization, batching.

A :class:`TextData` is a list of texts with optional integer labels. It comes
from a CSV / TSV / JSONL file or a saved Hugging Face ``datasets`` dataset
(:func:`load_text_data`), or is built directly in Python.

Batch order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), and
the trainer reads micro-batch ``m`` of an endless stream as batch
``m % batches_per_epoch`` of epoch ``m // batches_per_epoch``. A resumed run
therefore needs only the step number to continue at the exact next batch.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .config import Task

# how a data file is read: by suffix, else this key; "hf": a save_to_disk folder; "hub": a Hub dataset name
Format = Literal["csv", "tsv", "json", "jsonl", "parquet", "hf", "hub"]
FORMATS: tuple[str, ...] = get_args(Format)


@dataclasses.dataclass
class TextData:
    """Texts and (optionally) integer labels in ``0..num_labels-1``."""

    texts: list[str]
    labels: list[int] | None = None
    name: str = "data"

    def __post_init__(self):
        if isinstance(self.texts, str):
            raise TypeError(f"{self.name}: texts must be a list of strings, got one string")
        self.texts = list(self.texts)
        if not self.texts:
            raise ValueError(f"{self.name}: the dataset is empty (0 rows)")
        bad = [i for i, t in enumerate(self.texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{self.name}: text at row {bad[0]} is {type(self.texts[bad[0]]).__name__}, not str")
        if self.labels is not None:
            self.labels = [int(x) for x in self.labels]
            if len(self.labels) != len(self.texts):
                raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass
class Encoded:
    """Tokenized causal-LM examples, ready to batch: token ids, per-token targets
    (-100: no loss there) and, for packed rows, position ids that restart at 0 at
    every example inside a row (built by :func:`peftadapt.train.sft.encode_sft`
    and :func:`peftadapt.train.sft.pack`)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None = None
    name: str = "data"

    def __post_init__(self):
        if not self.input_ids:
            raise ValueError(f"{self.name}: the dataset is empty (0 rows)")
        rows = [self.labels] + ([self.position_ids] if self.position_ids is not None else [])
        for other in rows:
            if len(other) != len(self.input_ids) or any(
                len(a) != len(b) for a, b in zip(self.input_ids, other, strict=True)
            ):
                raise ValueError(f"{self.name}: input_ids, labels and position_ids must have the same shapes")

    def __len__(self) -> int:
        return len(self.input_ids)


# -- reading files (through `datasets`) ---------------------------------------


def _datasets():
    """The ``datasets`` package (imported on first use: ~0.6 s, which ``import peftadapt`` should not pay)."""
    import datasets  # lazy: heavy import, needed only when a file is read

    return datasets


# file suffix -> (Format, the `datasets` builder that reads it)
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; valid formats: {list(FORMATS)}")
        return fmt
    if path.is_dir():
        return "hf"
    if not path.exists():
        return "hub"
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    raise ValueError(
        f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; give `format:` one of {list(FORMATS)}"
    )


def _looks_like_hub_name(path: str) -> bool:
    """``imdb`` or ``owner/name``: no suffix, at most one slash, not absolute or relative-dotted."""
    return bool(path) and path.count("/") <= 1 and not path.startswith((".", "/", "~")) and not Path(path).suffix


_TEXT_FORMATS = ("csv", "tsv", "json", "jsonl")


def _not_utf8(path: Path, chunk_size: int = 1 << 20) -> str | None:
    """Which line of a text file is not UTF-8 (one line naming file and line), or None. Read in
    chunks, so a large file costs one pass and no more memory than a chunk (it runs at every load)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = len(decoder.getstate()[0])  # a multi-byte character's start, held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(0, e.start - pending)].count(b"\n")
                return f"{path}: line {line} is not UTF-8 text ({e.reason}); save the file as UTF-8"
            if not chunk:
                return None
            line += chunk.count(b"\n")


@contextlib.contextmanager
def _quiet(ds_lib: Any) -> Iterator[None]:
    """datasets' logger at ERROR level is silenced while a file loads (it logs what it then raises)."""
    logger = ds_lib.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _why_unreadable(path: Path, fmt: str) -> str | None:
    """A one-line reason a JSONL file failed to load (its first bad JSON line), naming file and line.
    (Not UTF-8 is checked before every text file loads: :func:`_not_utf8`.)"""
    if fmt != "jsonl":
        return None
    with open(path, encoding="utf-8") as f:
        for n, line_text in enumerate(f, 1):
            if line_text.strip():
                try:
                    json.loads(line_text)
                except json.JSONDecodeError as e:
                    return f"{path}: line {n} is not valid JSON ({e.msg})"
    return None


def _pick_split(ds: Any, split: str | None, where: str) -> Any:
    if isinstance(ds, _datasets().DatasetDict):
        if split is None:
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise ValueError(f"{where} holds splits {list(ds)}; choose one with `split:`")
        if split not in ds:
            raise ValueError(f"{where} has no split {split!r}; available splits: {list(ds)}")
        return ds[split]
    return ds


def load_dataset_spec(
    path: str | os.PathLike,
    *,
    format: Format | None = None,
    split: str | None = None,
    subset: str | None = None,
    where: dict[str, Any] | None = None,
    where_not: dict[str, Any] | None = None,
    name: str = "data",
) -> Any:
    """A ``datasets.Dataset`` from a CSV / TSV / JSON / JSONL / Parquet file, a
    ``save_to_disk`` folder or a Hub dataset name, filtered by ``where`` / ``where_not``.

    Files are converted to Arrow once, in the ``datasets`` cache (``HF_DATASETS_CACHE``);
    a rerun reads the cached copy. ``split`` picks a split of a saved ``DatasetDict`` or
    of a Hub dataset (files: ``train``, or a slice such as ``train[:90%]``).
    """
    ds_lib = _datasets()
    p = Path(path)
    fmt = _detect_format(p, format)
    if fmt == "hub" or (not p.exists() and format is None):
        if not _looks_like_hub_name(str(path)):
            raise FileNotFoundError(f"{name}: data file not found: {str(p)!r}")
        try:
            ds = ds_lib.load_dataset(str(path), subset, split=split or "train")
        except ConnectionError:
            raise ValueError(
                f"{name}: could not reach the Hub for dataset {str(path)!r} (offline, or no such dataset); "
                "give a local file or folder"
            ) from None
        except (OSError, ValueError) as e:  # DatasetNotFoundError, a bad subset / split: one line, the way out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{name}: could not load the Hub dataset {str(path)!r}: {first}") from None
    elif not p.exists():
        raise FileNotFoundError(f"{name}: data file not found: {str(p)!r}")
    elif fmt == "hf":
        try:
            ds = ds_lib.load_from_disk(str(p))
        except FileNotFoundError:
            raise ValueError(
                f"{name}: {str(p)!r} is a folder but not one written by datasets' save_to_disk; "
                "give a data file, or save the dataset with Dataset.save_to_disk"
            ) from None
        ds = _pick_split(ds, split, str(p))
    else:
        not_utf8 = _not_utf8(p) if fmt in _TEXT_FORMATS else None  # pyarrow's JSON reader lets some through
        if not_utf8 is not None:
            raise ValueError(f"{name}: {not_utf8}")
        kwargs: dict[str, Any] = {"delimiter": "\t"} if fmt == "tsv" else {}
        try:
            with _quiet(ds_lib):  # datasets logs the reader's error before raising it: ours is the one line
                ds = ds_lib.load_dataset(_BUILDERS[fmt], data_files=str(p), split=split or "train", **kwargs)
        except Exception as e:  # datasets wraps the reader's error (DatasetGenerationError)
            if "corresponds to no data" in str(e):  # datasets' words for a file without rows
                raise ValueError(f"{name}: the dataset {str(p)!r} is empty (0 rows)") from None
            why = _why_unreadable(p, fmt)
            if why is None:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                why = f"could not read {str(p)!r} as {fmt}: {first}"
            raise ValueError(f"{name}: {why}") from e
    columns = list(ds.column_names)
    for flt in (where or {}), (where_not or {}):
        for col in flt:
            if col not in columns:
                raise ValueError(f"{name}: filter column {col!r} not in {str(p)!r}; columns: {columns}")
    if where or where_not:
        keep = _RowFilter(dict(where or {}), dict(where_not or {}))
        fingerprint = ds_lib.fingerprint.Hasher.hash((ds._fingerprint, "filter", keep.where, keep.where_not))
        ds = ds.filter(keep, new_fingerprint=fingerprint, desc=f"{name}: filter")
    return ds


def _match(value: Any, allowed: Any) -> bool:
    allowed = allowed if isinstance(allowed, (list, tuple, set)) else [allowed]
    return str(value) in {str(a) for a in allowed}


class _RowFilter:
    """Keep rows whose ``where`` columns hold one of the given values and whose ``where_not`` columns hold none."""

    def __init__(self, where: dict[str, Any], where_not: dict[str, Any]):
        self.where, self.where_not = where, where_not

    def __call__(self, row: dict[str, Any]) -> bool:
        return all(_match(row.get(c), v) for c, v in self.where.items()) and not any(
            _match(row.get(c), v) for c, v in self.where_not.items()
        )


def check_label_names(labels: Sequence[str | int], where: str = "labels") -> None:
    """ValueError for a label list that names a class twice (as written, or as the same string:
    ``[0, "0"]``): the class count and every index after it would be wrong."""
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        key = str(lab).strip()
        if key in seen:
            raise ValueError(
                f"{where}: {lab!r} is listed twice (entries {seen[key]} and {i}); each class once, in class order"
            )
        seen[key] = i


def encode_labels(
    raw: Sequence[Any], *, labels: Sequence[str | int] | None = None, num_labels: int | None = None, name: str = "data"
) -> list[int]:
    """Map raw labels to ``0..num_labels-1``.

    With a ``labels`` list, each raw label must be one of its entries (or that
    entry's index); without one, labels must be integers (or integer strings).
    """
    if labels is not None:
        check_label_names(labels)
        index = {str(lab): i for i, lab in enumerate(labels)}
        out = []
        for i, r in enumerate(raw):
            key = str(r).strip()
            if key in index:
                out.append(index[key])
            elif key.lstrip("-").isdigit() and 0 <= int(key) < len(labels):
                out.append(int(key))
            else:
                raise ValueError(
                    f"{name}: label {r!r} at row {i} is not in the label list {list(labels)}; "
                    f"add it to data.labels or drop those rows with where_not"
                )
        return out
    out = []
    for i, r in enumerate(raw):
        if isinstance(r, bool) or not (isinstance(r, int) or (isinstance(r, str) and r.strip().lstrip("-").isdigit())):
            if isinstance(r, float) and r.is_integer():
                r = int(r)
            else:
                raise ValueError(
                    f"{name}: label {r!r} at row {i} is not an integer; for string labels give "
                    f"the label list in the config, e.g. data.labels: [negative, positive]"
                )
        out.append(int(r))
    if num_labels is not None:
        bad = [(i, v) for i, v in enumerate(out) if not 0 <= v < num_labels]
        if bad:
            i, v = bad[0]
            raise ValueError(
                f"{name}: label {v} at row {i} is outside 0..{num_labels - 1} "
                f"(num_labels={num_labels}); {len(bad)} row(s) are out of range"
            )
    return out


def load_text_data(
    path: str | os.PathLike,
    *,
    text: str = "text",
    label: str | None = None,
    format: Format | None = None,
    split: str | None = None,
    subset: str | None = None,
    where: dict[str, Any] | None = None,
    where_not: dict[str, Any] | None = None,
    labels: Sequence[str | int] | None = None,
    num_labels: int | None = None,
    name: str = "data",
) -> TextData:
    """Texts (and labels) of a data file, ``save_to_disk`` folder or Hub dataset (see :func:`load_dataset_spec`)."""
    ds = load_dataset_spec(path, format=format, split=split, subset=subset, where=where, where_not=where_not, name=name)
    columns = list(ds.column_names)
    for col, what in ((text, "text"), (label, "label")):
        if col is not None and col not in columns:
            raise ValueError(f"{name}: {what} column {col!r} not found in {str(path)!r}; columns: {columns}")
    if len(ds) == 0:
        raise ValueError(f"{name}: the dataset {str(path)!r} is empty (0 rows after filtering)")
    texts = ["" if t is None else str(t) for t in ds[text]]
    ys = None
    if label is not None:
        ys = encode_labels(ds[label], labels=labels, num_labels=num_labels, name=name)
    return TextData(texts, ys, name=name)


def check_labels(data: TextData, num_labels: int) -> None:
    """Raise if ``data`` has no labels or any label falls outside ``0..num_labels-1``."""
    if data.labels is None:
        raise ValueError(f"{data.name}: labels are needed for training/evaluating a classifier")
    encode_labels(data.labels, num_labels=num_labels, name=data.name)


def check_domain_labels(
    domains: Mapping[str, TextData], where: str, label_names: Sequence[str | int] | None = None
) -> None:
    """ValueError unless every source domain holds the same set of classes (a domain missing a class,
    or holding one the others lack, would train a head whose classes mean different things per domain).
    ``label_names``: the class names to print instead of the class ids."""

    def named(i: int) -> str | int:
        return label_names[i] if label_names is not None and 0 <= i < len(label_names) else i

    sets = {name: [named(i) for i in sorted(set(d.labels or []))] for name, d in domains.items()}
    first, want = next(iter(sets.items()))
    for name, got in sets.items():
        if got != want:
            raise ValueError(
                f"{where}: source domains {first!r} and {name!r} have different label sets: {first!r} has "
                f"{want}, {name!r} has {got}; every source domain needs the same classes (drop the odd rows "
                "with where / where_not, or leave that domain out)"
            )


def as_text_data(obj: Any, name: str) -> TextData:
    """Accept a TextData, a list of texts, or a (texts, labels) pair."""
    if isinstance(obj, TextData):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], str):
        return TextData(list(obj[0]), None if obj[1] is None else list(obj[1]), name=name)
    if isinstance(obj, (list, tuple)):
        return TextData(list(obj), None, name=name)
    raise TypeError(f"{name}: expected TextData, a list of texts or a (texts, labels) pair; got {type(obj).__name__}")


# -- tokenization and batching ---------------------------------------------------


def balance_classes(data: TextData) -> TextData:
    """Oversample every class to the largest class's count: each minority class is repeated
    whole as often as it fits, then topped up with its first rows. Deterministic; the
    batch streams shuffle the rows. Use it when the labels are skewed and the classifier
    would otherwise settle on the prior (YAML: ``data.balance: oversample``)."""
    if data.labels is None:
        raise ValueError(f"{data.name}: balancing classes needs labels")
    by: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by.setdefault(y, []).append(i)
    n = max(len(v) for v in by.values())
    order: list[int] = []
    for c in sorted(by):
        idx = by[c]
        order += idx * (n // len(idx)) + idx[: n % len(idx)]
    return TextData([data.texts[i] for i in order], [data.labels[i] for i in order], name=data.name)


def check_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no pad token, which batching needs. Fix: "
            "tokenizer.pad_token = tokenizer.eos_token (in YAML: model.pad_token: eos), "
            "or add one with tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the embeddings"
        )


def tokenize(texts: Iterable[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, unpadded."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def token_rows(
    data: TextData | Encoded, tokenizer, max_length: int, task: Task
) -> tuple[list[list[int]], list[int] | list[list[int]] | None, list[list[int]] | None]:
    """What a batch stream draws from: token ids, labels (class ids, per-token targets, or
    None: a causal LM's targets are its inputs) and the position ids of packed rows."""
    if isinstance(data, Encoded):
        return data.input_ids, data.labels, data.position_ids
    return tokenize(data.texts, tokenizer, max_length), data.labels if task == "classification" else None, None


def collate(
    ids: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[int] | Sequence[Sequence[int]] | None = None,
    task: Task | Literal["target"] = "classification",
    positions: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``ids`` into a batch. Causal LMs: per-token ``labels`` are padded with -100;
    without them the labels are the inputs with padded positions set to -100 (the model
    shifts them). Packed rows (``positions`` given) are flattened into one row with no
    padding and no attention mask, as transformers' ``DataCollatorWithFlattening`` does:
    the model reads the example boundaries from the position ids."""
    if positions is not None:
        if labels is None:
            raise ValueError("packed rows need their per-token labels")

        def flat(rows: Any) -> torch.Tensor:
            return torch.tensor([[t for r in rows for t in r]], dtype=torch.long)

        return {"input_ids": flat(ids), "labels": flat(labels), "position_ids": flat(positions)}
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if task == "causal_lm" and labels is not None:
        targets = torch.full((len(ids), width), -100, dtype=torch.long)
        for i, y in enumerate(labels):
            targets[i, : len(y)] = torch.tensor(y, dtype=torch.long)  # type: ignore[arg-type]  # per-token rows here
        batch["labels"] = targets
    elif task == "causal_lm":
        batch["labels"] = input_ids.masked_fill(mask == 0, -100)
    elif labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


class BatchStream:
    """An endless stream of shuffled batches whose ``m``-th batch is a pure
    function of ``(seed, m)``; with several processes, each takes its slice of
    every global batch."""

    def __init__(
        self,
        ids: list[list[int]],
        labels: list[int] | list[list[int]] | None,
        batch_size: int,
        *,
        seed: int,
        pad_id: int,
        task: Task | Literal["target"],  # "target": unlabeled target texts, inputs only
        rank: int = 0,
        world: int = 1,
        positions: list[list[int]] | None = None,  # packed rows: position ids restarting per example
    ):
        self.ids, self.labels, self.positions = ids, labels, positions
        self.global_batch = batch_size * world
        self.batch_size, self.seed, self.pad_id, self.task = batch_size, seed, pad_id, task
        self.rank, self.world = rank, world
        # the last, smaller batch of an epoch is kept so small datasets lose nothing
        self.batches_per_epoch = max(1, -(-len(ids) // self.global_batch))
        self._cache: tuple[int, list[int]] | None = None

    def batch(self, m: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(m, self.batches_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(len(self.ids), self.seed, epoch))
        order = self._cache[1]
        chunk = order[pos * self.global_batch : (pos + 1) * self.global_batch]
        mine = chunk[self.rank :: self.world] or chunk[:1]  # never hand a process an empty batch
        labels: Any = None if self.labels is None else [self.labels[i] for i in mine]  # class ids or token rows
        positions = None if self.positions is None else [self.positions[i] for i in mine]
        return collate([self.ids[i] for i in mine], self.pad_id, labels, self.task, positions)


def warn_unused_target_labels(target: TextData | None) -> None:
    if target is not None and target.labels is not None:
        warnings.warn(
            f"{target.name}: the target training data has labels, but alignment uses target data "
            "unlabeled and ignores them; to measure target accuracy pass them as an eval set",
            stacklevel=3,
        )
