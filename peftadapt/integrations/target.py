"""Unlabeled target batches for a transformers ``Trainer``: tokenized once, drawn by index.

:class:`TargetBatches` turns the user's target data (a list of strings or a
``datasets.Dataset``) into tokenized examples with the trainer's own tokenization
(TRL's ``_prepare_dataset`` for an ``SFTTrainer``: text, messages, chat template;
the trainer's ``processing_class`` for a plain ``Trainer``) and collates a batch
with the trainer's own ``data_collator``.

The order is a function of the seed and the micro-step alone (:func:`target_indices`):
micro-step k of a run with N processes and per-process batch b takes positions
``k*N*b .. (k+1)*N*b - 1`` of an endless sequence of seeded permutations (one per
epoch of the target data), and process r the r-th slice of b. Nothing is consumed,
so a run resumed from a checkpoint at step s draws exactly the batches an
uninterrupted run draws from step s on, and N processes together draw the batch one
process with N*b draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..train.data import epoch_order
from ..train.sft import encode_sft

__all__ = ["TargetBatches", "target_indices"]

# columns of a tokenized example the model reads; everything else (labels above all) is dropped
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABEL_COLUMNS = ("label", "labels")


def target_indices(n: int, batch_size: int, micro_step: int, *, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Rows of the target data in micro-step ``micro_step`` on process ``rank`` of ``world``.

    Position j of the endless sequence is row ``perm_e[j % n]`` with ``e = j // n`` and
    ``perm_e`` the permutation of ``range(n)`` seeded by ``(seed, e)``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"target_indices needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    start = (micro_step * world + rank) * batch_size
    perms: dict[int, list[int]] = {}
    out = []
    for j in range(start, start + batch_size):
        epoch = j // n
        if epoch not in perms:
            perms[epoch] = epoch_order(n, seed, epoch)  # the permutation peftadapt's own Trainer draws
        out.append(perms[epoch][j % n])
    return out


class TargetBatches:
    """Tokenized target examples and the collator that batches them.

    Args:
        examples: tokenized examples (dicts with ``input_ids`` and maybe
            ``attention_mask`` / ``token_type_ids``), at least one.
        collate: the trainer's data collator (list of examples -> batch of tensors).
        batch_size: examples per process and micro-step.
        seed: the trainer's seed (``TrainingArguments.seed``).
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        collate: Callable[[list[dict[str, Any]]], Any],
        batch_size: int,
        seed: int,
    ) -> None:
        if len(examples) == 0:
            raise ValueError("the target data is empty: add_alignment needs at least one unlabeled target example")
        self.examples = examples
        self.collate = collate
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def indices(self, micro_step: int, rank: int = 0, world: int = 1) -> list[int]:
        return target_indices(len(self.examples), self.batch_size, micro_step, seed=self.seed, rank=rank, world=world)

    def batch(self, micro_step: int, device: torch.device | str, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """The collated batch of ``micro_step`` on this process, on ``device``, without labels."""
        rows = [dict(self.examples[i]) for i in self.indices(micro_step, rank, world)]
        out = self.collate(rows)
        return {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in dict(out).items()
            if k not in LABEL_COLUMNS
        }


def _texts_or_dataset(target: Any) -> tuple[list[str] | None, Any]:
    """(texts, None) for a list of strings, (None, dataset) for a ``datasets.Dataset``."""
    if target is None:
        raise ValueError(
            "add_alignment needs unlabeled target data: target=None; pass target=[...texts...] or a "
            "datasets.Dataset with a 'text' (or 'messages', for TRL) column"
        )
    if isinstance(target, str):
        raise TypeError("target is one string; pass a list of target texts (e.g. target=[text]) or a datasets.Dataset")
    if isinstance(target, (list, tuple)):
        if not all(isinstance(t, str) for t in target):
            bad = next(type(t).__name__ for t in target if not isinstance(t, str))
            raise ValueError(
                f"target as a list must hold strings (the unlabeled target texts); found a {bad}. "
                "For tokenized or chat data pass a datasets.Dataset"
            )
        if len(target) == 0:
            raise ValueError(
                "the target data is empty (target=[]); add_alignment needs at least one unlabeled target text"
            )
        return list(target), None
    if hasattr(target, "column_names") and hasattr(target, "map"):
        if hasattr(target, "__len__") and len(target) == 0:
            raise ValueError(
                "the target dataset is empty (0 rows); add_alignment needs at least one unlabeled target example"
            )
        if not hasattr(target, "__len__"):
            raise ValueError(
                "target is an IterableDataset; add_alignment draws target rows by index and needs a "
                "datasets.Dataset (materialise it with Dataset.from_list(list(target.take(n)))) or a "
                "list of strings"
            )
        return None, target
    raise ValueError(f"target must be a list of strings or a datasets.Dataset, got {type(target).__name__}")


def _keep_inputs(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k: example[k] for k in MODEL_INPUTS if k in example}


def _warn_labels(columns: Sequence[str]) -> None:
    found = [c for c in columns if c in LABEL_COLUMNS]
    if found:
        warnings.warn(
            f"the target data has label column(s) {found}: alignment uses target data unlabeled, so they are ignored",
            stacklevel=3,
        )


def prepare_for_trainer(target: Any, trainer: Any, *, sft: bool, max_length: int | None) -> list[dict[str, Any]]:
    """Tokenize ``target`` the way ``trainer`` tokenizes its training data; return model-input examples."""
    texts, dataset = _texts_or_dataset(target)
    if sft:
        return _prepare_sft(texts, dataset, trainer)
    tok = getattr(trainer, "processing_class", None)
    if dataset is not None:
        cols = list(dataset.column_names)
        _warn_labels(cols)
        if "input_ids" in cols:  # tokenized by the user already
            return [_keep_inputs(row) for row in dataset]
        if "text" not in cols:
            raise ValueError(
                f"the target dataset has columns {cols}: add_alignment needs a 'text' column (raw "
                "text, tokenized with the trainer's processing_class) or an 'input_ids' column "
                "(tokenized); chat 'messages' are prepared by TRL's SFTTrainer only"
            )
        texts = list(dataset["text"])
    if tok is None or not callable(tok):
        raise ValueError(
            "the trainer has no tokenizer (processing_class=None) to tokenize the target texts; "
            "pass processing_class=tokenizer to the Trainer, or a target dataset with an 'input_ids' "
            "column"
        )
    assert texts is not None
    limit = max_length
    if limit is None:
        model_max = getattr(tok, "model_max_length", None)
        limit = int(model_max) if isinstance(model_max, int) and model_max < 1_000_000 else None
    enc = tok(texts, truncation=limit is not None, max_length=limit)
    keys = [k for k in MODEL_INPUTS if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def _prepare_sft(texts: list[str] | None, dataset: Any, trainer: Any) -> list[dict[str, Any]]:
    """TRL's own preparation (text / messages / chat template / EOS / truncation to ``max_length``)."""
    # lazy: datasets costs ~1 s to import and is only needed for a TRL target given as strings
    import datasets

    args = trainer.args
    if dataset is None:
        field = getattr(args, "dataset_text_field", None) or "text"
        dataset = datasets.Dataset.from_dict({field: texts})
    _warn_labels(list(dataset.column_names))
    dataset = dataset.remove_columns([c for c in dataset.column_names if c in LABEL_COLUMNS])
    field = getattr(args, "dataset_text_field", None) or "text"
    if "messages" in dataset.column_names and field not in dataset.column_names:
        # a chat target is a prompt: its turns before any answer plus the generation prompt, as peftadapt's
        # own Trainer reads it (TRL renders a user-only chat without the generation prompt)
        limit = getattr(args, "max_length", None) or 1_000_000
        enc = encode_sft(
            dataset, trainer.processing_class, format="messages", prompts=True, max_length=limit, name="target"
        )
        prepared: Any = [{"input_ids": ids} for ids in enc.input_ids]
    else:
        prepared = trainer._prepare_dataset(dataset, trainer.processing_class, args, False, None, "target")
    completion = bool(getattr(trainer.data_collator, "completion_only_loss", False))
    out = []
    for row in prepared:
        ex = _keep_inputs(row)
        if completion:  # the collator reads a completion mask; the target has no prompt part
            ex["completion_mask"] = [1] * len(ex["input_ids"])
        out.append(ex)
    return out
