"""Class logits of a causal LM from answer tokens (a "verbalizer"), so the terms that read class
predictions (entropy / information maximisation, CDAN, CDAN+E) work on a generative classifier.

A chat model that answers "positive" or "negative" is a classifier whose class logits are its
next-token logits at the last prompt position, restricted to the answers' first tokens::

    ids = class_token_ids(tokenizer, ["positive", "negative"])
    g = class_logits(outputs.logits, ids, batch["attention_mask"], batch.get("labels"))   # (B, 2)

The last prompt position is found per row (:func:`prompt_positions`): in a batch with
answer-only ``labels`` (the source: prompt tokens are -100) it is the position right before
the first label; in a batch without labels (the target: the prompt ends with the chat
template's generation prompt) it is the last attended position, left or right padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "check_answers",
    "check_class_tokens",
    "class_logits",
    "class_token_ids",
    "prompt_mask",
    "prompt_positions",
]

IGNORE_INDEX = -100  # a label the loss skips (transformers' ignore_index)


def check_class_tokens(class_tokens: Any, vocab_size: int | None = None) -> list[int]:
    """``class_tokens`` as a list of at least two distinct token ids (in ``0..vocab_size-1`` when known)."""
    if isinstance(class_tokens, (str, bytes)) or not isinstance(class_tokens, Sequence) or len(class_tokens) < 2:
        raise ValueError(
            f"class_tokens must be a list of at least two answer token ids (one per class, in class order), "
            f"got {class_tokens!r}; turn answer strings into ids with class_token_ids(tokenizer, answers)"
        )
    bad = [t for t in class_tokens if isinstance(t, bool) or not isinstance(t, int) or t < 0]
    if bad:
        raise ValueError(
            f"class_tokens must be token ids (ints >= 0), got {bad[0]!r} in {list(class_tokens)}; "
            "turn answer strings into ids with class_token_ids(tokenizer, answers)"
        )
    if vocab_size is not None and max(class_tokens) >= vocab_size:
        raise ValueError(f"class_tokens {list(class_tokens)}: ids must be below the vocabulary size {vocab_size}")
    if len(set(class_tokens)) != len(class_tokens):
        raise ValueError(f"class_tokens {list(class_tokens)} repeat an id; each class needs its own answer token")
    return [int(t) for t in class_tokens]


def class_token_ids(tokenizer: Any, answers: Sequence[str | int]) -> list[int]:
    """The token id each answer starts with (class order); ids pass through.

    A string answer is tokenized without special tokens and its first token is the class's:
    the class logit is the LM logit of that token at the last prompt position. Two answers
    starting with the same token cannot be told apart that way: a ``ValueError`` names them.
    """
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or len(answers) < 2:
        raise ValueError(
            f"class_tokens must be a list of at least two answers (strings or token ids, in class order), "
            f"got {answers!r}"
        )
    ids: list[int] = []
    for a in answers:
        if isinstance(a, str):
            if tokenizer is None:
                raise ValueError(f"class_tokens: the answer {a!r} is a string; give a tokenizer, or token ids")
            toks = tokenizer(a, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ValueError(f"class_tokens: the answer {a!r} tokenizes to no token; give a non-empty answer")
            ids.append(int(toks[0]))
        elif isinstance(a, int) and not isinstance(a, bool):
            ids.append(a)
        else:
            raise ValueError(f"class_tokens: each answer must be a string or a token id, got {a!r} in {list(answers)}")
    for i, t in enumerate(ids):
        j = ids.index(t)
        if j != i:
            shown = tokenizer.decode([t]) if tokenizer is not None else str(t)
            raise ValueError(
                f"class_tokens: the answers {answers[j]!r} and {answers[i]!r} both start with the token {shown!r} "
                f"(id {t}); the class logit reads an answer's first token, so each must start with a distinct one "
                "(reword them, e.g. 'yes' / 'no', or give the token ids)"
            )
    return check_class_tokens(ids, getattr(tokenizer, "vocab_size", None) and len(tokenizer))


def prompt_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's last prompt position, (B,) long: the position whose next-token logits are the answer's.

    With ``labels`` (answer-only targets, prompt tokens -100): the position right before the
    row's first label. Without: the last attended position (``attention_mask`` 1), for left
    and right padding alike. One host sync (rows without a prompt position are an error).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (batch, seq) tensor, got {attention_mask!r:.80}")
    mask = attention_mask != 0
    t = mask.shape[1]
    if labels is None:
        empty = ~mask.any(1)
        if bool(empty.any()):
            raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} have no tokens")
        return t - 1 - mask.flip(1).int().argmax(1)
    if not isinstance(labels, torch.Tensor) or labels.shape != attention_mask.shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the attention_mask's shape {tuple(attention_mask.shape)}, got {got}")
    target = (labels != IGNORE_INDEX) & mask
    pos = target.int().argmax(1) - 1
    bad = ~target.any(1) | (pos < 0)
    if bool(bad.any()):
        raise ValueError(
            f"rows {bad.nonzero().flatten().tolist()} of the labeled batch have no prompt before their first "
            "label: class logits are read right before the answer, so the labels must cover the answer only "
            "(answer-only loss: data.train_on_inputs false, prompt tokens -100)"
        )
    return pos


def prompt_mask(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` restricted to each row's prompt: the positions before its first label.

    With answer-only labels (prompt tokens -100) a causal LM's features there have not seen the
    answer, so a source row pools the same thing a target prompt does. A row without a prompt
    (its labels start at its first token: every token a target) or without a label keeps its
    whole mask. No host sync."""
    mask = attention_mask != 0
    t = mask.shape[1]
    target = (labels.to(mask.device) != IGNORE_INDEX) & mask
    first = torch.where(target.any(1), target.int().argmax(1), torch.full_like(target[:, 0], t, dtype=torch.long))
    prompt = mask & (torch.arange(t, device=mask.device)[None, :] < first[:, None])
    return torch.where(prompt.any(1, keepdim=True), prompt, mask).to(attention_mask.dtype)


def class_logits(
    lm_logits: torch.Tensor,
    class_tokens: Sequence[int],
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C) class logits: ``lm_logits[row, prompt_positions(...)]`` at the ``class_tokens`` ids."""
    if not isinstance(lm_logits, torch.Tensor) or lm_logits.dim() != 3:
        got = tuple(lm_logits.shape) if isinstance(lm_logits, torch.Tensor) else type(lm_logits).__name__
        raise ValueError(f"class logits need a causal LM's per-token logits (batch, seq, vocab), got {got}")
    if lm_logits.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"the LM logits cover {tuple(lm_logits.shape[:2])} (batch, positions) but the batch is "
            f"{tuple(attention_mask.shape)}: class logits need every position's logits (no logits_to_keep)"
        )
    pos = prompt_positions(attention_mask.to(lm_logits.device), None if labels is None else labels.to(lm_logits.device))
    rows = torch.arange(lm_logits.shape[0], device=lm_logits.device)
    ids = torch.as_tensor(list(class_tokens), dtype=torch.long, device=lm_logits.device)
    return lm_logits[rows, pos][:, ids]


def check_answers(labels: Sequence[Sequence[int]], class_tokens: Sequence[int], name: str, decode: Any = None) -> None:
    """Every labeled row's answer starts with one of ``class_tokens`` (else the class logits read the
    wrong tokens: the verbalizer does not match the data). ``labels``: per-token rows, -100 = prompt."""
    allowed = set(class_tokens)
    for i, row in enumerate(labels):
        first = next((int(t) for t in row if t != IGNORE_INDEX), None)
        if first is not None and first not in allowed:
            shown = f"{decode([first])!r} (id {first})" if decode is not None else f"id {first}"
            wanted = [decode([t]) for t in class_tokens] if decode is not None else list(class_tokens)
            raise ValueError(
                f"{name}: row {i}'s answer starts with the token {shown}, not one of the class tokens {wanted}; "
                "class_tokens must be the answers' first tokens (as the data spells them), in class order"
            )
