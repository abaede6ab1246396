"""Validators at each evaluation: unlabeled eval sets, ``<set>/<validator>`` metrics, selection by them."""

from __future__ import annotations

import json
import warnings

import pytest

from peftadapt.train import Trainer, load_run_config

from .conftest import run_config, text_data, tiny_classifier

FAST = dict(disable_tqdm=True, plot=False, learning_rate=0.02, per_device_train_batch_size=8, max_length=12)


def _da(tok, tmp, **kw):
    return Trainer(
        tiny_classifier(),
        tok,
        text_data(32, 0),
        target=text_data(32, 1, labeled=False).texts,
        regularizers=["mmd"],
        output_dir=str(tmp),
        **{**FAST, **kw},
    )


def test_validators_on_an_unlabeled_target_pick_the_best_checkpoint(tok, tmp_path):
    tr = _da(
        tok,
        tmp_path,
        eval={"target": text_data(16, 3, labeled=False, name="target"), "src_val": text_data(16, 2, name="src_val")},
        validators={"target": ["snd", "im", "dev", "reverse_validation"]},
        source_validation="src_val",
        metric_for_best_model="target/snd",
        max_steps=6,
        eval_steps=2,
    )
    assert "target/dev" in tr.metric_names() and "target/accuracy" not in tr.metric_names()
    tr.train()
    evals = [r for r in tr.history if r["split"] == "eval"]
    assert len(evals) == 3
    for r in evals:
        assert {"target/snd", "target/im", "target/dev", "target/reverse_validation", "src_val/accuracy"} <= set(r)
        assert 0.0 <= r["target/reverse_validation"] <= 1.0
    best = max(evals, key=lambda r: r["target/snd"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metric_for_best"] == "target/snd" and summary["best_step"] == best["step"]
    assert summary["final_metrics"]["target/snd"] == best["target/snd"]


def test_da_default_selection_never_reads_target_labels(tok, tmp_path):
    evals = {"target": text_data(16, 3, name="target"), "src_val": text_data(16, 2, name="src_val")}
    # with a source validation set: its accuracy, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tr = _da(tok, tmp_path / "a", eval=evals, source_validation="src_val")
    assert tr.best_metric_name == "src_val/accuracy"
    # with the default validator named on the target set: that validator
    tr = _da(tok, tmp_path / "b", eval=evals, source_validation="src_val", validators={"target": ["snd", "im"]})
    assert tr.best_metric_name == "target/im"
    # nothing label-free: no selection (the last weights), said in a warning
    with pytest.warns(UserWarning, match="keeps its last weights"):
        tr = _da(tok, tmp_path / "c", eval={"target": evals["target"]})
    assert tr.best_metric_name is None
    # asking for target labels explicitly works, with a warning that says so
    with pytest.warns(UserWarning, match="reads the labels of eval set 'target'"):
        tr = _da(tok, tmp_path / "d", eval=evals, metric_for_best_model="target/accuracy")
    assert tr.best_metric_name == "target/accuracy"
    # a plain (non-DA) run keeps the old default: the first eval set's accuracy
    plain = Trainer(tiny_classifier(), tok, text_data(32, 0), eval=evals, output_dir=str(tmp_path / "e"), **FAST)
    assert plain.best_metric_name == "target/accuracy"


def test_bad_validator_declarations_fail_with_one_line(tok, tmp_path):
    evals = {"target": text_data(16, 3, labeled=False, name="target")}
    with pytest.raises(ValueError, match=r"unknown validator 'snf'.*'snd'"):
        _da(tok, tmp_path, eval=evals, validators={"target": ["snf"]})
    with pytest.raises(ValueError, match=r"'dev' needs labeled source validation data.*source_validation"):
        _da(tok, tmp_path, eval=evals, validators={"target": ["dev"]})
    with pytest.raises(ValueError, match=r"validators: 'tgt' is not an eval set"):
        _da(tok, tmp_path, eval=evals, validators={"tgt": ["snd"]})
    with pytest.raises(ValueError, match="labels are needed"):  # unlabeled and not scored: nothing to compute
        _da(tok, tmp_path, eval=evals)


def test_run_file_validators_and_metric_for_best(tiny_model_dir, run_files, tmp_path):
    from peftadapt.train.runner import build_trainer

    raw = run_config(tiny_model_dir, run_files, tmp_path / "out", metric_for_best_model="target/im")
    raw["data"]["eval"] = {
        "target": {"path": str(run_files / "target.csv"), "validators": ["im", "dev"]},
        "source_val": {"path": str(run_files / "test.csv"), "label": "label"},
    }
    raw["data"]["source_validation"] = "source_val"
    run = load_run_config(raw)
    assert run.data.eval["target"].validators == ["im", "dev"]
    tr = build_trainer(run)
    assert tr.best_metric_name == "target/im" and tr.validators == {"target": ["im", "dev"]}
    final = tr.train()
    assert {"target/im", "target/dev", "source_val/accuracy"} <= set(final)
    bad = json.loads(json.dumps(raw))
    bad["data"]["eval"]["target"]["validators"] = ["snf"]
    with pytest.raises(ValueError, match="snf"):
        load_run_config(bad)
    bad = json.loads(json.dumps(raw))
    bad["data"]["source"]["validators"] = ["im"]
    with pytest.raises(ValueError, match=r"data.source.validators: only eval sets"):
        load_run_config(bad)
