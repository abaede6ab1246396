"""Domain adaptation of a chat LM through the run file: target rows read as prompts (the chat
template's generation prompt, no answer), and ``peftadapt train`` end to end on a tiny Llama with
mmd + target_lm + entropy on the answer tokens (features.class_tokens)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from peftadapt.cli import main
from peftadapt.train.sft import IGNORE, encode_sft

from .sft_helpers import chat_tokenizer, chats, save_chat_model


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _prompt(row: dict) -> dict:
    return {"messages": row["messages"][:2]}  # system + user: no answer


def test_target_rows_are_prompts_with_the_generation_prompt():
    tok = chat_tokenizer()
    rows = [_prompt(r) for r in chats(3)]
    out = encode_sft(_dataset(rows), tok, max_length=64, prompts=True, name="data.target")
    assert len(out) == 3 and all(set(y) == {IGNORE} for y in out.labels)
    words = tok.convert_ids_to_tokens(out.input_ids[0])
    assert words[-3:] == ["<|im_start|>", "assistant", "\n"] and "positive" not in words[-3:]
    assert words[:3] == ["<|im_start|>", "system", "\n"]
    # a row that carries its answer: the answer is dropped (warned), the prompt is the same
    with pytest.warns(UserWarning, match=r"data.target: 2 of 3 rows carry an answer.*only their prompts"):
        answered = encode_sft(
            _dataset([chats(3)[0], rows[1], chats(3)[2]]), tok, max_length=64, prompts=True, name="data.target"
        )
    assert answered.input_ids == out.input_ids
    # prompt_completion: the prompt; text: the text (as the tokenizer reads it)
    pc = encode_sft(_dataset([{"prompt": "is it good ?", "completion": ""}]), tok, prompts=True, name="t")
    assert tok.convert_ids_to_tokens(pc.input_ids[0]) == ["<s>", "is", "it", "good", "?"]
    text = encode_sft(
        _dataset([{"text": "the food was bad"}]), tok, prompts=True, name="t", truncation="left", max_length=3
    )
    assert tok.convert_ids_to_tokens(text.input_ids[0]) == ["food", "was", "bad"]


def _run_file(tmp_path, regularizers, class_tokens=("positive", "negative"), steps=4) -> dict:
    model_dir = save_chat_model(tmp_path / "model")
    for name, rows in (("train", chats(16)), ("val", chats(4)), ("target", [_prompt(r) for r in chats(12)])):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {
        "model": {"path": str(model_dir), "task": "causal_lm"},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "features": {"layer": -1, "pooling": "last", "class_tokens": list(class_tokens)},
        "regularizers": regularizers,
        "data": {
            "max_length": 64,
            "source": str(tmp_path / "train.jsonl"),
            "target": str(tmp_path / "target.jsonl"),
            "eval": {"val": str(tmp_path / "val.jsonl")},
            "source_validation": "val",
        },
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.05,
            "logging_steps": 1,
            "disable_tqdm": True,
            "plot": False,
        },
    }


def test_peftadapt_train_aligns_a_chat_lm_with_mmd_target_lm_and_entropy(tmp_path, capsys):
    regs = [
        {"name": "mmd", "weight": 0.3},
        {"name": "target_lm", "weight": 1.0},
        {"name": "entropy", "weight": 0.1, "diversity": True, "start": 0.5},
    ]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_file(tmp_path, regs)))
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == 4
    for r in train:
        assert math.isfinite(r["reg/mmd"]) and math.isfinite(r["reg/target_lm"])
        assert r["weight/target_lm"] == 1.0
    # entropy starts halfway: off for steps 1-2, on for 3-4 (two classes: -log 2 <= H - H(mean) <= log 2)
    assert [("reg/entropy" in r) for r in train] == [False, False, True, True]
    assert all(-math.log(2) - 1e-6 <= r["reg/entropy"] <= math.log(2) + 1e-6 for r in train[2:])
    # the adapter learns the target prompts' language (measured: 3.53, 3.51, 3.47, 3.46)
    assert train[-1]["reg/target_lm"] < train[0]["reg/target_lm"] - 0.03, [r["reg/target_lm"] for r in train]
    assert (tmp_path / "run" / "final").is_dir()


def test_class_tokens_must_be_the_answers_first_tokens(tmp_path):
    from peftadapt.train.runner import build_trainer
    from peftadapt.train.schema import load_run_config

    run = load_run_config(_run_file(tmp_path, [{"name": "entropy"}], class_tokens=("good", "bad")))
    with pytest.raises(ValueError, match=r"row 0's answer starts with the token 'positive'.*not one of.*'good'"):
        build_trainer(run)
    run = load_run_config(_run_file(tmp_path, [{"name": "entropy"}], class_tokens=("positive", "positive kind")))
    with pytest.raises(ValueError, match=r"^features.class_tokens: the answers 'positive' and 'positive kind'"):
        build_trainer(run)
    cfg = _run_file(tmp_path, [{"name": "mmd"}])
    cfg["features"]["layer"] = 2
    with pytest.raises(ValueError, match=r"^features.layer: layer=2 is out of range.*-2\.\.1"):
        build_trainer(load_run_config(cfg))
