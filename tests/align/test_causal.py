"""Domain adaptation for causal LMs: the target_lm term, class logits from answer tokens
(class_tokens), a feature layer by block index, and decoder pooling under left and right padding.
Every value is checked against a hand computation on unpadded examples of a tiny Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftadapt
from peftadapt import FeatureTap
from peftadapt.align import (
    Alignment,
    DomainAdaptation,
    Entropy,
    Term,
    class_logits,
    class_token_ids,
    prompt_positions,
)

from ..conftest import make_tiny
from ..train.sft_helpers import chat_tokenizer, chats, tiny_llama

PAD = 0


def _pad(rows: list[list[int]], side: str, fill: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``rows`` padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def _rows(seed: int, lengths=(7, 4, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def _lm(seed: int = 0) -> torch.nn.Module:
    m = peftadapt.wrap(make_tiny("llama", "causal", seed=seed), "lora", r=4, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapter takes part
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def _source(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids, mask = _pad(rows, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# -- target_lm -------------------------------------------------------------------------------------


def _hand_lm_loss(model: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """Mean next-token cross-entropy over every row's tokens, each row run alone (no padding)."""
    total, count = torch.zeros(()), 0
    for r in rows:
        logits = model(input_ids=torch.tensor([r])).logits[0]
        total = total + F.cross_entropy(logits[:-1], torch.tensor(r[1:]), reduction="sum")
        count += len(r) - 1
    return total / count


@pytest.mark.parametrize("side", ["right", "left"])
def test_target_lm_is_the_next_token_loss_on_the_target(side):
    model = _lm()
    src, tgt_rows = _source(_rows(0)), _rows(1)
    ids, mask = _pad(tgt_rows, side)
    # the target's own labels are dropped: these would change the loss if they were used
    target = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros_like(ids)}
    with torch.no_grad():
        want = _hand_lm_loss(model, tgt_rows)
        task = model(**src).loss
    with DomainAdaptation(model, [Term("target_lm", weight=0.5)]) as da, torch.no_grad():
        loss, logs = da.loss(src, target, progress=0.0)
    assert torch.allclose(logs["reg/target_lm"], want, atol=1e-5), (logs["reg/target_lm"], want)
    assert logs["weight/target_lm"] == 0.5
    assert torch.allclose(loss, task + 0.5 * want, atol=1e-5)


def test_target_lm_combines_with_mmd_respects_its_start_and_trains_the_adapter():
    model = _lm()
    src = _source(_rows(0))
    ids, mask = _pad(_rows(1), "right")
    target = {"input_ids": ids, "attention_mask": mask}
    terms = [Term("mmd", weight=0.3), Term("target_lm", weight=0.5, start=0.5)]
    with DomainAdaptation(model, terms, layer=-1, pooling="last") as da:
        _, early = da.loss(src, target, progress=0.25)
        assert "reg/target_lm" not in early and early["weight/target_lm"] == 0.0
        loss, logs = da.loss(src, target, progress=0.75)
        assert set(logs) >= {"reg/mmd", "reg/target_lm", "weight/mmd", "weight/target_lm"}
        assert torch.allclose(logs["reg_loss"], 0.3 * logs["reg/mmd"] + 0.5 * logs["reg/target_lm"])
        loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # only target_lm on: the target forward alone carries its gradient into the adapter
    model.zero_grad()
    with DomainAdaptation(model, [Term("target_lm", weight=1.0)]) as da:
        reg, _ = da.alignment_loss(model(**src), src["attention_mask"], target, 0.0)
        reg.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_target_lm_refusals():
    clf = peftadapt.wrap(make_tiny("llama", "seqcls"), "lora", r=4)
    with pytest.raises(ValueError, match=r"target_lm is a causal LM's own.*classifier"):
        DomainAdaptation(clf, ["target_lm"])
    fs = torch.randn(4, 8)
    with pytest.raises(ValueError, match="through DomainAdaptation"):
        Alignment([Term("target_lm")])(fs, fs, progress=0.0)
    model = _lm()
    with DomainAdaptation(model, ["target_lm"]) as da, pytest.raises(ValueError, match="input_ids"):
        src = _source(_rows(0))
        da.loss(src, {"inputs_embeds": torch.randn(3, 9, 32), "attention_mask": src["attention_mask"]}, 0.0)


# -- class logits from answer tokens -----------------------------------------------------------------


def _chat_batches():
    """Answer-only source rows (chat + answer) and prompt-only target rows (chat + generation prompt)."""
    from peftadapt.train.sft import SFTEncoder

    tok = chat_tokenizer()
    cols = {"messages": "messages"}
    src_enc = SFTEncoder(tok, "messages", columns=cols, max_length=64)
    tgt_enc = SFTEncoder(tok, "messages", columns=cols, max_length=64, prompts=True)
    rows = chats(3)
    rows[1]["messages"][1]["content"] = "review : the plot was awful ."  # lengths differ: padding matters
    source = [src_enc(r) for r in rows]
    target = [tgt_enc({"messages": r["messages"][:2]}) for r in reversed(rows)]
    return tok, source, target


def _hand_class_logits(model, prompts: list[list[int]], ids: list[int]) -> torch.Tensor:
    return torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1, ids] for p in prompts])


@pytest.mark.parametrize("side", ["right", "left"])
def test_class_logits_are_the_answer_logits_at_the_prompt_end(side):
    tok, source, target = _chat_batches()
    model = tiny_llama(len(tok))
    ids = class_token_ids(tok, ["positive", "negative"])
    assert ids == [tok.convert_tokens_to_ids("positive"), tok.convert_tokens_to_ids("negative")]
    src_ids, src_mask = _pad([r["input_ids"] for r in source], side, tok.pad_token_id)
    src_labels, _ = _pad([r["labels"] for r in source], side, -100)
    tgt_ids, tgt_mask = _pad([r["input_ids"] for r in target], side, tok.pad_token_id)
    # where the answers start: the first label of each source row; the whole row for the target
    src_prompts = [r["input_ids"][: next(i for i, y in enumerate(r["labels"]) if y != -100)] for r in source]
    assert all(tok.decode(p[-2:]).split()[-1] == "assistant" for p in src_prompts)
    assert all(r["input_ids"][-1] == tok.convert_tokens_to_ids("\n") for r in target)  # the generation prompt
    with torch.no_grad():
        got_s = class_logits(model(input_ids=src_ids, attention_mask=src_mask).logits, ids, src_mask, src_labels)
        got_t = class_logits(model(input_ids=tgt_ids, attention_mask=tgt_mask).logits, ids, tgt_mask)
        want_s = _hand_class_logits(model, src_prompts, ids)
        want_t = _hand_class_logits(model, [r["input_ids"] for r in target], ids)
    assert got_s.shape == got_t.shape == (3, 2)
    assert torch.allclose(got_s, want_s, atol=1e-5) and torch.allclose(got_t, want_t, atol=1e-5)

    # entropy through DomainAdaptation reads exactly these class logits of the target
    model = peftadapt.wrap(model, "lora", r=4)
    src = {"input_ids": src_ids, "attention_mask": src_mask, "labels": src_labels}
    tgt = {"input_ids": tgt_ids, "attention_mask": tgt_mask}
    with DomainAdaptation(model, [Term("entropy", weight=1.0)], class_tokens=ids) as da, torch.no_grad():
        assert da.needs_target_logits
        _, logs = da.loss(src, tgt, 0.0)
    assert torch.allclose(logs["reg/entropy"], Entropy()(target_logits=want_t), atol=1e-5)
    # CDAN+E reads both domains' class logits (2 classes) and the features
    terms = [Term(peftadapt.align.build("cdan+e", in_features=32, num_classes=2), weight=0.1)]
    with DomainAdaptation(model, terms, class_tokens=ids, pooling="last") as da:
        loss, logs = da.loss(src, tgt, 0.0)
        loss.backward()
    assert torch.isfinite(logs["reg/cdan+e"])


def test_prompt_positions_and_class_token_errors():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert prompt_positions(mask).tolist() == [2, 3]
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, -100, 7]])
    assert prompt_positions(mask, labels).tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"rows \[0\].*no prompt before their first label.*answer-only"):
        prompt_positions(mask, torch.tensor([[4, 5, 6, -100], [-100, -100, -100, 7]]))
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match=r"'positive' and 'positive kind' both start with the token 'positive'"):
        class_token_ids(tok, ["positive", "positive kind"])
    with pytest.raises(ValueError, match="at least two"):
        class_token_ids(tok, "positive")
    lm, clf = _lm(), peftadapt.wrap(make_tiny("llama", "seqcls"), "lora", r=4)
    with pytest.raises(ValueError, match=r"read class logits.*pass class_tokens"):
        DomainAdaptation(lm, ["entropy"])
    with pytest.raises(ValueError, match=r"class_tokens.*classifier.*drop class_tokens"):
        DomainAdaptation(clf, ["entropy"], class_tokens=[1, 2])
    with pytest.raises(ValueError, match="below the vocabulary size 128"):
        DomainAdaptation(lm, ["entropy"], class_tokens=[1, 500])
    with pytest.raises(ValueError, match="repeat an id"):
        DomainAdaptation(lm, ["entropy"], class_tokens=[3, 3])
    # a source batch without labels cannot place its class logits
    src = _source(_rows(0))
    ids, mask = _pad(_rows(1), "right")
    with DomainAdaptation(lm, ["entropy"], class_tokens=[3, 4]) as da, pytest.raises(ValueError, match="source_labels"):
        da.alignment_loss(lm(**src), src["attention_mask"], {"input_ids": ids, "attention_mask": mask}, 0.0)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.modules()) == 0


# -- feature layer by index; decoder pooling ----------------------------------------------------------


def test_layer_by_index_on_plain_and_wrapped_llamas():
    plain = make_tiny("llama", "causal", num_hidden_layers=3)
    names = {
        "plain": (plain, "model.layers"),
        "peft": (peftadapt.wrap(make_tiny("llama", "causal", num_hidden_layers=3), "lora", r=4), None),
        "native": (peftadapt.wrap(make_tiny("llama", "causal", num_hidden_layers=3), "adapter"), None),
    }
    for kind, (m, stack) in names.items():
        stack = stack or peftadapt.features.layer_stack(m)[0]
        assert stack.endswith("model.layers"), (kind, stack)
        for index, block in ((0, 0), (1, 1), (-1, 2), (-3, 0)):
            with FeatureTap(m, layer=index) as tap:
                assert tap.layer_name == f"{stack}.{block}", (kind, index)
        with FeatureTap(m, layer="model.layers.2") as by_name, FeatureTap(m, layer=-1) as by_index:
            assert by_name.module is by_index.module
        for bad in (3, -4):
            with pytest.raises(ValueError, match=rf"layer={bad} is out of range.*3 blocks.*-3\.\.2"):
                FeatureTap(m, layer=bad)
        with pytest.raises(TypeError, match="block index"):
            FeatureTap(m, layer=True)  # type: ignore[arg-type]
        assert sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()) == 0


@pytest.mark.parametrize("layer", [None, -1, 0])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_pooling_left_and_right_equals_the_unpadded_examples(layer, pooling):
    model = peftadapt.wrap(make_tiny("llama", "causal"), "lora", r=4)
    rows = _rows(3, lengths=(6, 2, 9, 4))
    with FeatureTap(model, layer=layer, pooling=pooling) as tap, torch.no_grad():
        want = []
        for r in rows:
            model(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long))
            want.append(tap.pooled()[0])
        for side in ("right", "left"):
            ids, mask = _pad(rows, side)
            model(input_ids=ids, attention_mask=mask)
            got = tap.pooled()
            assert torch.allclose(got, torch.stack(want), atol=1e-5), (side, (got - torch.stack(want)).abs().max())


class _Record(peftadapt.align.Regularizer):
    """Keeps the features it is given (a test probe; the loss is 0)."""

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        self.fs, self.ft = source_features.detach(), target_features.detach()
        return (source_features.sum() + target_features.sum()) * 0.0


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_source_features_are_pooled_over_the_prompt_like_the_target(pooling):
    """Source chats with answer-only labels and the same chats as target prompts: equal features."""
    tok, source, target = _chat_batches()
    target = list(reversed(target))  # the same chats, in the source's order
    model = peftadapt.wrap(tiny_llama(len(tok)), "lora", r=4)
    probe = _Record()
    for side in ("right", "left"):
        src_ids, src_mask = _pad([r["input_ids"] for r in source], side, tok.pad_token_id)
        src_labels, _ = _pad([r["labels"] for r in source], side, -100)
        tgt_ids, tgt_mask = _pad([r["input_ids"] for r in target], side, tok.pad_token_id)
        src = {"input_ids": src_ids, "attention_mask": src_mask, "labels": src_labels}
        with DomainAdaptation(model, [Term(probe)], layer=-1, pooling=pooling) as da, torch.no_grad():
            da.loss(src, {"input_ids": tgt_ids, "attention_mask": tgt_mask}, 0.0)
        assert torch.allclose(probe.fs, probe.ft, atol=1e-5), (side, (probe.fs - probe.ft).abs().max())
    # labels on every token (no prompt to find): the whole row is pooled, as before
    with DomainAdaptation(model, [Term(probe)], layer=-1, pooling=pooling) as da, torch.no_grad():
        src = _source([r["input_ids"] for r in source])
        da.loss(src, {"input_ids": tgt_ids, "attention_mask": tgt_mask}, 0.0)
        with FeatureTap(model, layer=-1, pooling=pooling) as tap:
            model(input_ids=src["input_ids"], attention_mask=src["attention_mask"])
            whole = tap.pooled()
    assert torch.allclose(probe.fs, whole, atol=1e-6)
