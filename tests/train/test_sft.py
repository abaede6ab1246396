"""SFT formats (which label positions are -100), packing (position ids, boundary labels,
packed logits equal to unpacked ones) and an end-to-end ``peftadapt train`` on a chat JSONL."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from peftadapt.train.data import Encoded, collate
from peftadapt.train.evaluate import evaluate_model
from peftadapt.train.sft import IGNORE, SFTEncoder, detect_format, encode_sft, pack

from .sft_helpers import CHATML, chat_tokenizer, chats, save_chat_model, tiny_llama

COLS = {"text": "text", "prompt": "prompt", "completion": "completion", "messages": "messages"}


def encoder(tok, fmt, train_on_inputs=False, max_length=64, truncation="right"):
    return SFTEncoder(
        tok, fmt, columns=COLS, max_length=max_length, truncation=truncation, train_on_inputs=train_on_inputs
    )


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def labeled(tok, out):
    return [t for t, y in zip(tokens(tok, out["input_ids"]), out["labels"], strict=True) if y != IGNORE]


def test_format_is_detected_from_the_columns():
    kw = dict(COLS, name="d")
    assert detect_format(["messages", "text"], **kw) == "messages"
    assert detect_format(["prompt", "completion", "text"], **kw) == "prompt_completion"
    assert detect_format(["text", "label"], **kw) == "text"
    with pytest.raises(ValueError, match=r"cannot tell the SFT format.*\['prompt', 'answer'\]"):
        detect_format(["prompt", "answer"], **kw)


def test_text_format_targets_every_token_and_ends_with_eos():
    tok = chat_tokenizer()
    out = encoder(tok, "text")({"text": "the food was good"})
    assert tokens(tok, out["input_ids"]) == ["<s>", "the", "food", "was", "good", "<|im_end|>"]
    assert out["labels"] == out["input_ids"]


def test_prompt_completion_targets_only_the_completion():
    tok = chat_tokenizer()
    row = {"prompt": "review : the food was good . is it positive ?", "completion": "positive"}
    out = encoder(tok, "prompt_completion")(row)
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert out["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert labeled(tok, out) == ["positive", "<|im_end|>"]
    everything = encoder(tok, "prompt_completion", train_on_inputs=True)(row)
    assert everything["labels"] == everything["input_ids"] == out["input_ids"]


def test_messages_target_only_assistant_content_and_end_of_turn():
    tok = chat_tokenizer()
    msgs = [
        {"role": "system", "content": "answer with one word"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "is it good ?"},
        {"role": "assistant", "content": "positive"},
    ]
    out = encoder(tok, "messages")({"messages": msgs})
    toks = tokens(tok, out["input_ids"])
    assert toks == tokens(tok, tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    # exactly: each assistant turn's content and its <|im_end|>; not the header, not the "\n" after it
    first = toks.index("hello")
    second = toks.index("positive", toks.index("assistant", first + 1))
    want = {first, first + 1, second, second + 1}
    assert [i for i, y in enumerate(out["labels"]) if y != IGNORE] == sorted(want)
    assert [toks[i] for i in sorted(want)] == ["hello", "<|im_end|>", "positive", "<|im_end|>"]
    assert toks[first - 3 : first] == ["<|im_start|>", "assistant", "\n"] and toks[second + 2] == "\n"
    everything = encoder(tok, "messages", train_on_inputs=True)({"messages": msgs})
    assert everything["labels"] == everything["input_ids"]


def test_messages_errors_name_the_way_out():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(chats(2))
    with pytest.raises(ValueError, match=r"has none; give one in the run file \(data.chat_template"):
        encode_sft(ds, chat_tokenizer(template=None), name="data.source")
    rewriting = "{% if messages | length > 2 %}hi {% endif %}" + CHATML  # the whole differs from its prefixes
    with pytest.raises(ValueError, match="train_on_inputs: true"):
        encode_sft(ds, chat_tokenizer(template=rewriting), name="data.source")
    with pytest.raises(ValueError, match="string role and content"):
        encoder(chat_tokenizer(), "messages")({"messages": [{"role": "user"}]})


def test_rows_without_a_target_after_truncation_are_skipped():
    datasets = pytest.importorskip("datasets")
    long_prompt = {"prompt": "the food was good " * 20, "completion": "positive"}
    ds = datasets.Dataset.from_list([long_prompt, {"prompt": "good ?", "completion": "positive"}])
    with pytest.warns(UserWarning, match="1 of 2 rows have no target token"):
        enc = encode_sft(ds, chat_tokenizer(), max_length=16)
    assert len(enc) == 1 and tokens(chat_tokenizer(), enc.input_ids[0])[-2:] == ["positive", "<|im_end|>"]
    left = encoder(chat_tokenizer(), "prompt_completion", max_length=4, truncation="left")(long_prompt)
    assert len(left["input_ids"]) == 4 and left["labels"][-2:] != [IGNORE, IGNORE]


def encoded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(2, 30, (n,), generator=g).tolist() for n in lengths]
    labels = [[IGNORE] * (n // 2) + x[n // 2 :] for n, x in zip(lengths, ids, strict=True)]
    return Encoded(ids, labels, name="d")


def test_pack_fills_rows_restarts_positions_and_masks_boundaries():
    data = encoded([7, 3, 5, 2, 6, 4])
    packed = pack(data, max_length=10)
    assert all(len(r) <= 10 for r in packed.input_ids)
    assert len(packed) == 3  # 27 tokens in rows of 10: best-fit decreasing needs 3
    seen = []
    for ids, labels, pos in zip(packed.input_ids, packed.labels, packed.position_ids, strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0]
        bounds = [*starts, len(pos)]
        for a, b in itertools.pairwise(bounds):
            assert pos[a:b] == list(range(b - a))
            k = data.input_ids.index(ids[a:b])
            seen.append(k)
            # the first token of every example is no target (it would learn from the previous example)
            assert labels[a] == IGNORE and labels[a + 1 : b] == data.labels[k][1:]
    assert sorted(seen) == list(range(len(data)))


def test_collate_flattens_packed_rows_without_padding_or_mask():
    packed = pack(encoded([4, 3, 5]), max_length=8)
    batch = collate(packed.input_ids, 0, packed.labels, "causal_lm", packed.position_ids)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (1, 12) and batch["position_ids"][0].tolist().count(0) == 3
    plain = collate(encoded([4, 2]).input_ids, 0, encoded([4, 2]).labels, "causal_lm")
    assert plain["labels"][1, 2:].tolist() == [IGNORE, IGNORE] and plain["attention_mask"][1].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(attn):
    """transformers masks across packed examples (from the position ids) only when there is no
    attention mask and no cache: the Trainer passes packed rows without a mask and turns
    use_cache off. With the cache on, the examples see each other: the limitation docs/training.md names."""
    model = tiny_llama(40, attn=attn).train()  # dropout is 0 in the tiny config
    data = encoded([5, 7, 4], seed=1)
    packed = pack(data, max_length=16)
    assert len(packed) == 1
    batch = collate(packed.input_ids, 0, packed.labels, "causal_lm", packed.position_ids)
    model.config.use_cache = False
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(logits[a:b], alone, atol=1e-5, rtol=1e-5)
        # the loss of the packed row is the token-weighted loss of the examples alone
        packed_loss = model(**batch).loss
        rows = collate(data.input_ids, 0, data.labels, "causal_lm")
        rows["labels"][:, 0] = IGNORE
        torch.testing.assert_close(packed_loss, model(**rows).loss, atol=1e-5, rtol=1e-5)
        model.config.use_cache = True  # the default: a cache turns the packed-sequence masking off
        crossed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    a, b = starts[1], starts[2]
    assert not torch.allclose(crossed[a:b], model(input_ids=batch["input_ids"][:, a:b]).logits[0], atol=1e-4)


def test_peftadapt_train_on_a_chat_jsonl_with_packing(tmp_path):
    """End to end through the run file: messages JSONL, answer-only loss, packing, a tiny Llama."""
    from peftadapt.train.runner import build_trainer
    from peftadapt.train.schema import load_run_config

    model_dir = save_chat_model(tmp_path / "model")
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in chats(24))
    with open(tmp_path / "val.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in chats(6))
    run = load_run_config(
        {
            "model": {"path": str(model_dir), "task": "causal_lm"},
            "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
            "data": {
                "max_length": 100,  # three chats of 33 tokens per row
                "packing": True,
                "source": str(tmp_path / "chat.jsonl"),
                "eval": {"val": str(tmp_path / "val.jsonl")},
            },
            "training": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 6,
                "per_device_train_batch_size": 2,
                "learning_rate": 0.05,
                "eval_steps": 6,
                "disable_tqdm": True,
                "plot": False,
            },
        }
    )
    trainer = build_trainer(run)
    src = trainer.train_data
    assert isinstance(src, Encoded) and src.position_ids is not None
    assert all(len(r) <= 100 for r in src.input_ids) and len(src) == 8  # 24 chats, 3 per row
    tok = trainer.tokenizer
    targets = {
        t for ids, y in zip(src.input_ids, src.labels, strict=True) for t, v in zip(ids, y, strict=True) if v != IGNORE
    }
    assert set(tok.convert_ids_to_tokens(sorted(targets))) == {"positive", "negative", "<|im_end|>"}
    before = evaluate_model(trainer.model, tok, trainer.eval_data, task="causal_lm")["val/loss"]
    metrics = trainer.train()
    assert trainer.base.config.use_cache is False  # packed rows: no cache, so the masking applies
    assert metrics["val/loss"] < 0.9 * before, (before, metrics)  # answer-only loss falls (3.62 -> 3.04)
    assert (tmp_path / "run" / "final").is_dir()


def test_run_file_checks_and_chat_template_key(tmp_path):
    from peftadapt.train.runner import load_tokenizer
    from peftadapt.train.schema import load_run_config

    base = {"model": {"path": "m", "task": "causal_lm"}, "data": {"source": "x.jsonl", "packing": True}}
    with pytest.raises(ValueError, match=r"data.packing: .* needs model.task: causal_lm"):
        cls_data = {"source": {"path": "x.csv", "label": "y"}, "packing": True}
        load_run_config({"model": {"path": "m", "task": "classification"}, "data": cls_data})
    with pytest.raises(ValueError, match=r"data.packing cannot be combined with regularizers"):
        load_run_config({**base, "regularizers": [{"name": "mmd"}], "data": {**base["data"], "target": "t.jsonl"}})
    with pytest.raises(ValueError, match=r"sft_format: 'chat' is not allowed.*'messages'"):
        load_run_config({**base, "data": {"source": {"path": "x.jsonl", "sft_format": "chat"}}})
    chat_tokenizer(template=None).save_pretrained(tmp_path / "tok")  # a tokenizer without a template
    (tmp_path / "t.jinja").write_text(CHATML, encoding="utf-8")
    run = load_run_config({**base, "model": {"path": "m", "tokenizer": str(tmp_path / "tok"), "task": "causal_lm"}})
    assert load_tokenizer(run.model).chat_template is None
    assert load_tokenizer(run.model, chat_template=str(tmp_path / "t.jinja")).chat_template == CHATML
    assert load_tokenizer(run.model, chat_template=CHATML).chat_template == CHATML
