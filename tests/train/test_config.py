import copy

import pytest
import yaml

from peftadapt.train import RunConfig, TrainConfig, load_run_config

BASE = {
    "model": {"path": "m"},
    "data": {"source": {"path": "s.csv", "label": "y"}},
}


def cfg(**sections):
    c = copy.deepcopy(BASE)
    for k, v in sections.items():
        c[k] = v
    return c


def test_defaults_filled_in():
    out = load_run_config(cfg(training={"learning_rate": 1e-3}))
    assert isinstance(out, RunConfig) and out.model.task == "classification"
    assert (out.method.name, out.method.options) == ("lora", {})
    assert out.regularizers == []
    assert out.data.source.text == "text"
    assert out.data.max_length == 128
    assert (out.data.truncation, out.data.balance) == ("right", "none")
    assert isinstance(out.training, TrainConfig) and out.training.learning_rate == 1e-3


@pytest.mark.parametrize(
    "bad, words",
    [
        (cfg(trainig={}), ["trainig", "did you mean training?"]),
        (cfg(training={"lr": 1}), ["training.lr", "learning_rate", "warmup_ratio"]),
        (cfg(model={"path": "m", "task": "regression"}), ["model.task", "'regression'", "causal_lm"]),
        (cfg(model={"path": "m", "quantize": 3}), ["model.quantize", "4", "8"]),
        (cfg(model={"task": "classification"}), ["model.path"]),
        (cfg(training={"lr_scheduler_type": "step"}), ["training.lr_scheduler_type", "cosine", "linear"]),
        (cfg(training={"mixed_precision": "fp8"}), ["training.mixed_precision", "bf16"]),
        (cfg(training={"per_device_train_batch_size": 0}), ["training.per_device_train_batch_size", "positive"]),
        (cfg(training={"report_to": ["tensorbord"]}), ["tensorbord", "tensorboard"]),
        (cfg(regularizers=[{"name": "mmd"}]), ["data.target"]),
        (
            cfg(
                regularizers=[{"name": "mmd", "schedule": "cosine"}],
                data={"source": {"path": "s", "label": "y"}, "target": "t"},
            ),
            ["regularizers[0].schedule", "dann"],
        ),
        (cfg(method={"name": "lorax"}), ["method.name", "lorax", "lora", "prefix"]),
        (cfg(data={"source": {"path": "s.csv"}}), ["data.source.label"]),
        (cfg(data={"source": {"path": "s", "label": "y", "colum": "x"}}), ["data.source.colum", "where"]),
        (
            cfg(
                data={"source": {"path": "s", "label": "y"}, "labels": ["a", "b", "c"]},
                model={"path": "m", "num_labels": 2},
            ),
            ["data.labels", "num_labels"],
        ),
        (cfg(features={"pooling": "max"}), ["features.pooling", "mean", "cls"]),
        (cfg(model={"path": "m", "quantize": 4, "quant_storage": "int4"}), ["model.quant_storage", "bf16", "uint8"]),
        (cfg(model={"path": "m", "quant_storage": "bf16"}), ["model.quant_storage", "quantize: 4"]),
        (
            cfg(data={"source": {"path": "s", "label": "y"}, "truncation": "middle"}),
            ["data.truncation", "left", "right"],
        ),
        (cfg(data={"source": {"path": "s", "label": "y"}, "balance": "undersample"}), ["data.balance", "oversample"]),
        (
            cfg(model={"path": "m", "task": "causal_lm"}, data={"source": "s.jsonl", "balance": "oversample"}),
            ["data.balance", "classification"],
        ),
    ],
)
def test_validation_names_key_and_allowed_values(bad, words):
    with pytest.raises(ValueError) as e:
        load_run_config(bad)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_causal_lm_source_needs_no_label():
    out = load_run_config(cfg(model={"path": "m", "task": "causal_lm"}, data={"source": "s.txt.jsonl"}))
    assert (out.data.source.path, out.data.source.text, out.data.source.label) == ("s.txt.jsonl", "text", None)


def test_yaml_file_paths_resolve_relative_to_the_config(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg(data={"source": {"path": "train.csv", "label": "label"}})))
    out = load_run_config(tmp_path / "run.yaml")
    assert out.data.source.path == str(tmp_path / "train.csv")
    with pytest.raises(FileNotFoundError, match=r"nope.yaml"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_trainconfig_direct_validation():
    with pytest.raises(ValueError, match=r"training.warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert set(TrainConfig.help()) == set(TrainConfig().to_dict())


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for p in examples:
        out = load_run_config(p)
        assert out.training.output_dir.startswith("runs/"), p


def test_truncation_and_balance_reach_the_trainer(tmp_path, minilm_tokenizer):
    """data.truncation: left keeps each text's end; data.balance: oversample equalizes the
    source classes; eval sets are not resampled."""
    from peftadapt.train.runner import build_trainer

    from .conftest import VOCAB, make_tiny, write_csv

    model_dir = tmp_path / "tiny"
    make_tiny("bert", "seqcls", vocab_size=VOCAB).save_pretrained(model_dir)
    minilm_tokenizer.save_pretrained(model_dir)
    texts = ["start " + "filler " * 30 + "verdict good"] * 6 + ["bad ending"] * 2
    labels = ["pos"] * 6 + ["neg"] * 2
    write_csv(tmp_path / "s.csv", texts, labels)
    raw = {
        "model": {"path": str(model_dir)},
        "method": {"name": "head"},
        "data": {
            "labels": ["neg", "pos"],
            "max_length": 8,
            "truncation": "left",
            "balance": "oversample",
            "source": {"path": str(tmp_path / "s.csv"), "label": "label"},
            "eval": {"src": {"path": str(tmp_path / "s.csv"), "label": "label"}},
        },
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True, "plot": False},
    }
    trainer = build_trainer(load_run_config(raw))
    assert trainer.train_data.labels.count(0) == trainer.train_data.labels.count(1) == 6
    assert len(trainer.eval_data["src"]) == 8
    ids = trainer.tokenizer(texts[0], truncation=True, max_length=8)["input_ids"]
    assert trainer.tokenizer.decode(ids, skip_special_tokens=True).endswith("verdict good")


def test_quant_storage_is_passed_to_load_quantized(monkeypatch, tmp_path):
    import peftadapt.quant as quant
    from peftadapt.train.runner import load_base_model

    seen = {}
    monkeypatch.setattr(quant, "load_quantized", lambda path, **kw: seen.update(kw) or "model")
    mcfg = load_run_config(
        cfg(
            model={
                "path": str(tmp_path),
                "task": "causal_lm",
                "quantize": 4,
                "quant_storage": "bf16",
                "dtype": "bfloat16",
            },
            data={"source": "s.jsonl"},
        )
    ).model
    assert load_base_model(mcfg, None) == "model"
    assert seen["bits"] == 4 and seen["quant_storage"] == "bf16" and str(seen["dtype"]) == "torch.bfloat16"
