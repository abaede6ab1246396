"""Supervised fine-tuning data for causal LMs: three formats, answer-only targets, packing.

A row of the data is one of (:data:`SFTFormat`, detected from the columns unless given):

``text``
    ``{"text": ...}``: every token is a target (an eos token is appended).
``prompt_completion``
    ``{"prompt": ..., "completion": ...}``: the prompt is read, the completion (and
    eos) is the target.
``messages``
    ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``:
    rendered with the tokenizer's chat template; the targets are the assistant turns'
    content and the template's end-of-turn token.

``train_on_inputs=True`` makes every token a target (axolotl's key of the same name).
``prompts=True`` reads unlabeled rows (the alignment's target data) as what the model reads
before it answers: a chat's turns up to its answer, rendered with the template's generation
prompt (a user-only row ends with ``<|im_start|>assistant\n``), a prompt_completion row's prompt,
a text row's text; answers present are dropped and no token is a target.
Assistant spans are found by rendering the conversation's prefixes, as TRL and
axolotl do: the tokens between "everything before turn i, plus the assistant
header" (``add_generation_prompt=True``) and "everything up to turn i" belong to
turn i; whitespace-only tokens after the end-of-turn token are left unlabeled.

:func:`encode_sft` tokenizes through ``Dataset.map`` with a fingerprint of the data,
the tokenizer and these options, so a rerun on the same file loads the tokenized
rows from the ``datasets`` cache. :func:`pack` puts several examples into one row of
at most ``max_length`` tokens, with position ids that restart at 0 for every example
(see ``docs/training.md`` for which attention kernels keep packed examples apart).
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from .data import Encoded

SFTFormat = Literal["text", "prompt_completion", "messages"]
SFT_FORMATS: tuple[str, ...] = get_args(SFTFormat)
IGNORE = -100  # label of a position that is not a target (the loss skips it)
_VERSION = 1  # bump when the encoding changes: old cache entries are then not reused


def detect_format(columns: Sequence[str], *, text: str, prompt: str, completion: str, messages: str, name: str) -> str:
    """The SFT format a dataset's columns say: messages, else prompt + completion, else text."""
    if messages in columns:
        return "messages"
    if prompt in columns and completion in columns:
        return "prompt_completion"
    if text in columns:
        return "text"
    raise ValueError(
        f"{name}: cannot tell the SFT format from the columns {list(columns)}: expected a {messages!r} column "
        f"(a chat), {prompt!r} + {completion!r}, or {text!r}; name yours with the keys messages / prompt / "
        "completion / text, or set sft_format"
    )


def _ids(out: Any) -> list[int]:
    """Token ids from a tokenizer / apply_chat_template result (a list or a BatchEncoding)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def _chat_ids(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
    if not messages:
        return []
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} mappings, got {messages!r}")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs a string role and content, got {m!r}")
    return [dict(m) for m in messages]


class SFTEncoder:
    """One row -> ``{"input_ids", "labels"}`` (the function ``Dataset.map`` runs)."""

    def __init__(
        self,
        tokenizer,
        format: str,
        *,
        columns: Mapping[str, str],
        max_length: int,
        truncation: str = "right",
        train_on_inputs: bool = False,
        prompts: bool = False,
        name: str = "data",
    ):
        self.tok, self.format, self.columns, self.prompts = tokenizer, format, dict(columns), prompts
        self.max_length, self.truncation, self.train_on_inputs, self.name = (
            max_length,
            truncation,
            train_on_inputs,
            name,
        )
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def _with_eos(self, ids: list[int]) -> list[int]:
        return [*ids, self.eos] if self.eos is not None and (not ids or ids[-1] != self.eos) else ids

    def text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self._with_eos(_ids(self.tok(text)))
        return ids, list(ids)

    def prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p = _ids(self.tok(prompt))
        c = self._with_eos(_ids(self.tok(completion, add_special_tokens=False)))
        return p + c, (list(p) if self.train_on_inputs else [IGNORE] * len(p)) + c

    def messages(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        full = _chat_ids(self.tok, messages)
        if self.train_on_inputs:
            return full, list(full)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = _chat_ids(self.tok, messages[:i], generation_prompt=True)
            upto = _chat_ids(self.tok, messages[: i + 1])
            start, end = len(head), len(upto)
            if full[:end] != upto or full[:start] != head or start > end:
                raise ValueError(
                    f"{self.name}: the chat template renders a conversation differently from its beginning "
                    "(it rewrites earlier turns), so the assistant tokens cannot be located; "
                    "set data.train_on_inputs: true, or give a data.chat_template that renders turns in place"
                )
            while end > start and not self.tok.decode([full[end - 1]]).strip():
                end -= 1  # the newline after the end-of-turn token is not the answer
            labels[start:end] = full[start:end]
        return full, labels

    def prompt(self, row: Mapping[str, Any]) -> tuple[list[int], bool]:
        """An unlabeled row's prompt ids, and whether an answer was dropped from it."""
        c = self.columns
        if self.format == "messages":
            messages = _check_messages(row[c["messages"]], self.name)
            turns = len(messages)
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            return _chat_ids(self.tok, messages, generation_prompt=True), len(messages) < turns
        if self.format == "prompt_completion":
            return _ids(self.tok(str(row[c["prompt"]] or ""))), bool(row[c["completion"]])
        return _ids(self.tok(str(row[c["text"]] or ""))), False

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        c = self.columns
        keep = slice(-self.max_length, None) if self.truncation == "left" else slice(0, self.max_length)
        if self.prompts:
            ids, answered = self.prompt(row)
            return {"input_ids": ids[keep], "labels": [IGNORE] * len(ids[keep]), "answered": answered}
        if self.format == "messages":
            ids, labels = self.messages(_check_messages(row[c["messages"]], self.name))
        elif self.format == "prompt_completion":
            ids, labels = self.prompt_completion(str(row[c["prompt"]] or ""), str(row[c["completion"]] or ""))
        else:
            ids, labels = self.text(str(row[c["text"]] or ""))
        return {"input_ids": ids[keep], "labels": labels[keep]}


def _tokenizer_digest(tokenizer) -> str:
    """What identifies a tokenizer's behaviour for the cache: its full definition where it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(getattr(tokenizer, "name_or_path", ""))
    specials = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    return repr((type(tokenizer).__name__, body, specials, getattr(tokenizer, "chat_template", None)))


def check_chat_template(tokenizer, where: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{where}: a messages dataset is rendered with the tokenizer's chat template, but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none; give one in the run file (data.chat_template: "
            "a Jinja template, or the path of a .jinja file), set tokenizer.chat_template, or use a chat "
            "model's tokenizer (model.tokenizer)"
        )


def encode_sft(
    ds: Any,
    tokenizer,
    *,
    format: SFTFormat | None = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 512,
    truncation: str = "right",
    train_on_inputs: bool = False,
    prompts: bool = False,
    name: str = "data",
) -> Encoded:
    """Tokenize a ``datasets.Dataset`` of SFT rows into input ids and per-token labels.

    Runs through ``Dataset.map`` (cached for file-backed datasets). Rows left with no
    target token (e.g. a conversation without an assistant turn, or one truncated
    before its answer) are dropped with a warning: they would add nothing but a
    batch without any target gives no loss. ``prompts=True``: unlabeled rows read as
    prompts (see the module doc; every label -100), for the alignment's target data.
    """
    from datasets.fingerprint import Hasher  # lazy: datasets costs ~0.6 s to import

    cols = {"text": "text", "prompt": "prompt", "completion": "completion", "messages": "messages", **(columns or {})}
    fmt = format or detect_format(ds.column_names, **cols, name=name)
    need = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}[fmt]
    for key in need:
        if cols[key] not in ds.column_names:
            raise ValueError(f"{name}: sft_format {fmt} needs a {cols[key]!r} column; columns: {list(ds.column_names)}")
    if fmt == "messages":
        check_chat_template(tokenizer, name)
    encoder = SFTEncoder(
        tokenizer,
        fmt,
        columns=cols,
        max_length=max_length,
        truncation=truncation,
        train_on_inputs=train_on_inputs,
        prompts=prompts,
        name=name,
    )
    options = (fmt, sorted(cols.items()), max_length, truncation, train_on_inputs) + (("prompts",) if prompts else ())
    fingerprint = Hasher.hash((ds._fingerprint, "sft", _VERSION, options, _tokenizer_digest(tokenizer)))
    out = ds.map(encoder, remove_columns=ds.column_names, new_fingerprint=fingerprint, desc=f"{name}: tokenize")
    if prompts:
        return _prompt_rows(out, name)
    ids, labels = out["input_ids"], out["labels"]
    keep = [i for i, y in enumerate(labels) if any(t != IGNORE for t in y[1:])]
    if len(keep) < len(ids):
        warnings.warn(
            f"{name}: {len(ids) - len(keep)} of {len(ids)} rows have no target token after truncation to "
            f"{max_length} tokens (no assistant turn / completion left); they are skipped",
            stacklevel=2,
        )
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    if not ids:
        raise ValueError(f"{name}: no row has a target token; check the data and data.max_length")
    return Encoded(ids, labels, name=name)


def _prompt_rows(out: Any, name: str) -> Encoded:
    """The encoded prompts, without empty rows; a warning when answers were dropped (the data is unlabeled)."""
    ids = [x for x in out["input_ids"] if x]
    answered = sum(bool(a) for a in out["answered"])
    if answered:
        warnings.warn(
            f"{name}: {answered} of {len(out['input_ids'])} rows carry an answer (an assistant turn / completion); "
            "alignment reads target data unlabeled, so only their prompts are used",
            stacklevel=3,
        )
    if len(ids) < len(out["input_ids"]):
        warnings.warn(f"{name}: {len(out['input_ids']) - len(ids)} rows have no token; they are skipped", stacklevel=3)
    if not ids:
        raise ValueError(f"{name}: no row has a token; check the data")
    return Encoded(ids, [[IGNORE] * len(x) for x in ids], name=name)


def pack(data: Encoded, max_length: int) -> Encoded:
    """Pack examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    In each row the position ids restart at 0 for every example, and the label of every
    example's first token is -100, so no example learns from the end of the one before it.
    """
    if data.position_ids is not None:
        return data
    lengths = [len(x) for x in data.input_ids]
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    ids, labels, positions = [], [], []
    for members in bins:
        ids.append([t for i in members for t in data.input_ids[i]])
        labels.append([t for i in members for t in [IGNORE, *data.labels[i][1:]]])
        positions.append([p for i in members for p in range(lengths[i])])
    return Encoded(ids, labels, positions, name=data.name)
