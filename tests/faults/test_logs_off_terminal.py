"""Issue 18, logs: where stderr is not a terminal (CI, nohup, a job scheduler), no progress bar
redraws; the Trainer writes plain lines at logging steps (throttled) and one per evaluation."""

from __future__ import annotations

import pytest

from peftadapt.train import Trainer, progress

from ..train.conftest import text_data, tiny_classifier


def _train(tmp_path, tok, **kw) -> None:
    tr = Trainer(
        tiny_classifier(dropout=0.0),
        tok,
        text_data(16, 0),
        eval={"test": text_data(8, 1)},
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        eval_steps=2,
        max_length=12,
        **{"plot": False, "disable_tqdm": False, **kw},
    )
    tr.train()


@pytest.mark.parametrize("every_s", [0.0, 1e9])
def test_plain_lines_instead_of_bars_off_a_terminal(tmp_path, minilm_tokenizer, capsys, monkeypatch, every_s):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", every_s)
    _train(tmp_path, minilm_tokenizer)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "batch/s" not in err  # no bar, not even the eval bars
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    steps = [line.split()[2] for line in lines if line.startswith("train: step")]
    # every logging step when unthrottled; else the first and the last
    assert steps == (["1/4", "2/4", "3/4", "4/4"] if every_s == 0 else ["1/4", "4/4"])
    assert [line.split()[4] for line in lines if " eval at step " in line] == ["2:", "4:"]
    assert "test/accuracy" in lines[-1] and "loss" in lines[0]


def test_bars_on_a_terminal_and_none_when_disabled(tmp_path, minilm_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr("peftadapt.train.loop.on_terminal", lambda: True)
    monkeypatch.setattr("peftadapt.train.evaluate.on_terminal", lambda: True)
    _train(tmp_path / "a", minilm_tokenizer)
    err = capsys.readouterr().err
    assert "\r" in err and "train: step" not in err  # the bar, and no plain lines beside it
    _train(tmp_path / "b", minilm_tokenizer, disable_tqdm=True)
    assert capsys.readouterr().err.strip() == ""
