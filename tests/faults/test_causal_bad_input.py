"""Bad input for causal-LM domain adaptation (issue 15) ends in one line naming the key, the value and
the way out: target_lm / class_tokens on a classifier, logits terms on a causal LM without class_tokens,
bad class_tokens, a feature layer that is not a block index or out of range."""

from __future__ import annotations

import json

import pytest
import yaml

from peftadapt.cli import main
from peftadapt.train.schema import load_run_config

from ..train.sft_helpers import chats, save_chat_model

CAUSAL = {"model": {"path": "m", "task": "causal_lm"}, "data": {"source": "s.jsonl", "target": "t.jsonl"}}
CLASSIFIER = {
    "model": {"path": "m"},
    "data": {"source": {"path": "s.csv", "label": "y"}, "target": "t.csv"},
}


def _with(base: dict, **sections) -> dict:
    return {**base, **sections}


CASES = [
    (
        "target_lm_on_a_classifier",
        _with(CLASSIFIER, regularizers=[{"name": "target_lm"}]),
        ["regularizers[0] (target_lm)", "model.task: causal_lm", "classification"],
    ),
    (
        "class_tokens_on_a_classifier",
        _with(CLASSIFIER, features={"class_tokens": ["positive", "negative"]}, regularizers=["entropy"]),
        ["features.class_tokens", "remove it"],
    ),
    (
        "entropy_on_a_causal_lm_without_class_tokens",
        _with(CAUSAL, regularizers=["entropy"]),
        ["regularizers[0] (entropy)", "features.class_tokens", "[positive, negative]", "target_lm"],
    ),
    ("one_class_token", _with(CAUSAL, features={"class_tokens": ["positive"]}), ["features.class_tokens", "two"]),
    (
        "repeated_class_token",
        _with(CAUSAL, features={"class_tokens": ["yes", "yes"]}),
        ["features.class_tokens", "distinct", "'yes'"],
    ),
    ("class_token_not_a_string_or_id", _with(CAUSAL, features={"class_tokens": [1.5, 2]}), ["class_tokens", "1.5"]),
    ("layer_bool", _with(CAUSAL, features={"layer": True}), ["features.layer", "True"]),
    ("target_lm_typo", _with(CAUSAL, regularizers=["target_llm"]), ["target_llm", "did you mean target_lm"]),
]


@pytest.mark.parametrize(("config", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_run_file_errors_are_one_line(config, named):
    with pytest.raises(ValueError) as info:
        load_run_config(config)
    message = str(info.value)
    assert "\n" not in message, message
    for value in named:
        assert value in message, (value, message)


@pytest.mark.parametrize(
    ("features", "named"),
    [
        ({"layer": 7}, ["features.layer", "layer=7 is out of range", "-2..1"]),
        ({"layer": "model.layers.9"}, ["features.layer", "no module named 'model.layers.9'"]),
        ({"class_tokens": ["positive", "positive kind"]}, ["features.class_tokens", "'positive kind'", "distinct"]),
    ],
)
def test_cli_model_dependent_errors_are_one_line(tmp_path, capsys, features, named):
    """Errors that need the model or tokenizer: `peftadapt train` prints one line, no traceback."""
    model_dir = save_chat_model(tmp_path / "model")
    for name, rows in (("s", chats(4)), ("t", [{"messages": r["messages"][:2]} for r in chats(4)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": str(model_dir), "task": "causal_lm"},
        "features": {"class_tokens": ["positive", "negative"], **features},
        "regularizers": ["mmd", "entropy"],
        "data": {"source": str(tmp_path / "s.jsonl"), "target": str(tmp_path / "t.jsonl")},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "disable_tqdm": True},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run.yaml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftadapt train: error: "), err
    for value in named:
        assert value in err[0], (value, err[0])
