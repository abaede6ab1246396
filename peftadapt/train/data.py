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

import csv
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .config import Task

Format = Literal["csv", "tsv", "jsonl", "hf"]
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


# -- reading files -----------------------------------------------------------


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; valid formats: {list(FORMATS)}")
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    for f, sfx in (("csv", (".csv",)), ("tsv", (".tsv", ".tab")), ("jsonl", (".jsonl", ".json", ".ndjson"))):
        if suffix in sfx:
            return f
    raise ValueError(
        f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; give `format:` one of {list(FORMATS)}"
    )


# Python's csv module refuses fields over 131,072 characters by default; a long document is
# a legal CSV field (and the same text in JSONL reads fine), so the limit is lifted.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> ValueError:
    """Which line of ``path`` is not UTF-8 (the decoder knows only a byte offset in a chunk)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = line[bad.start : bad.start + 1].hex()
                return ValueError(
                    f"{path}: line {n} is not UTF-8 (byte 0x{byte} at column {bad.start + 1}); "
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
    return ValueError(f"{path}: not UTF-8 ({e.reason}); save the file as UTF-8")


def _read_rows(path: Path, fmt: str, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        return _read_file_rows(path, fmt, split)
    except UnicodeDecodeError as e:
        if fmt == "hf":
            raise
        raise _not_utf8(path, e) from None


def _read_file_rows(path: Path, fmt: str, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    if fmt in ("csv", "tsv"):
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            try:
                rows = list(reader)
            except csv.Error as e:
                raise ValueError(f"{path}: line {reader.line_num} is not valid {fmt.upper()} ({e})") from None
            return rows, list(reader.fieldnames or [])
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        columns = list(rows[0]) if rows else []
        return rows, columns
    # a dataset saved with `datasets.Dataset.save_to_disk`
    try:
        import datasets  # lazy: an optional dependency
    except ImportError:
        raise ImportError(
            f"{path} is a folder, read as a saved Hugging Face dataset, which needs the "
            "`datasets` package: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path} holds splits {list(ds)}; choose one with `split:`")
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r}; available splits: {list(ds)}")
        ds = ds[split]
    return ds.to_list(), list(ds.column_names)


def _match(value: Any, allowed: Any) -> bool:
    allowed = allowed if isinstance(allowed, (list, tuple, set)) else [allowed]
    return str(value) in {str(a) for a in allowed}


def load_rows(
    path: str | os.PathLike,
    *,
    format: Format | None = None,
    split: str | None = None,
    where: dict[str, Any] | None = None,
    where_not: dict[str, Any] | None = None,
    name: str = "data",
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a data file as dicts, filtered: keep rows whose ``where`` columns
    hold one of the given values and whose ``where_not`` columns hold none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name}: data file not found: {str(p)!r}")
    fmt = _detect_format(p, format)
    rows, columns = _read_rows(p, fmt, split)
    for flt in (where or {}), (where_not or {}):
        for col in flt:
            if col not in columns:
                raise ValueError(f"{name}: filter column {col!r} not in {str(p)!r}; columns: {columns}")
    rows = [
        r
        for r in rows
        if all(_match(r.get(c), v) for c, v in (where or {}).items())
        and not any(_match(r.get(c), v) for c, v in (where_not or {}).items())
    ]
    return rows, columns


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
    where: dict[str, Any] | None = None,
    where_not: dict[str, Any] | None = None,
    labels: Sequence[str | int] | None = None,
    num_labels: int | None = None,
    name: str = "data",
) -> TextData:
    """Read a text dataset (CSV / TSV / JSONL file, or a saved HF dataset folder)."""
    rows, columns = load_rows(path, format=format, split=split, where=where, where_not=where_not, name=name)
    for col, what in ((text, "text"), (label, "label")):
        if col is not None and col not in columns:
            raise ValueError(f"{name}: {what} column {col!r} not found in {str(path)!r}; columns: {columns}")
    if not rows:
        raise ValueError(f"{name}: the dataset {str(path)!r} is empty (0 rows after filtering)")
    texts = ["" if r.get(text) is None else str(r[text]) for r in rows]
    ys = None
    if label is not None:
        ys = encode_labels([r.get(label) for r in rows], labels=labels, num_labels=num_labels, name=name)
    return TextData(texts, ys, name=name)


def check_labels(data: TextData, num_labels: int) -> None:
    """Raise if ``data`` has no labels or any label falls outside ``0..num_labels-1``."""
    if data.labels is None:
        raise ValueError(f"{data.name}: labels are needed for training/evaluating a classifier")
    encode_labels(data.labels, num_labels=num_labels, name=data.name)


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


def collate(
    ids: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[int] | None = None,
    task: Task | Literal["target"] = "classification",
) -> dict[str, torch.Tensor]:
    """Right-pad ``ids`` into a batch. For ``causal_lm`` the labels are the
    inputs with padded positions set to -100 (the model shifts them)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if task == "causal_lm":
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
        labels: list[int] | None,
        batch_size: int,
        *,
        seed: int,
        pad_id: int,
        task: Task | Literal["target"],  # "target": unlabeled target texts, inputs only
        rank: int = 0,
        world: int = 1,
    ):
        self.ids, self.labels = ids, labels
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
        labels = None if self.labels is None else [self.labels[i] for i in mine]
        return collate([self.ids[i] for i in mine], self.pad_id, labels, self.task)


def warn_unused_target_labels(target: TextData | None) -> None:
    if target is not None and target.labels is not None:
        warnings.warn(
            f"{target.name}: the target training data has labels, but alignment uses target data "
            "unlabeled and ignores them; to measure target accuracy pass them as an eval set",
            stacklevel=3,
        )
