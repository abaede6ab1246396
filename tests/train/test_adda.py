"""training.procedure: adda through the CLI: both phases, final/ (target adapter + head, the
source adapter beside it) read back by ``peftadapt eval``, resume after a kill in either phase,
and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from peftadapt.cli import main
from peftadapt.train import ADDATrainer, Trainer
from peftadapt.train import checkpoint as ck
from peftadapt.train.adda import check_adda_backend

from .conftest import run_config, text_data, tiny_classifier


def _adda_config(model_dir, files, out, **training) -> dict:
    options = dict(
        max_steps=4,
        eval_steps=2,
        save_steps=2,
        procedure="adda",
        adda_steps=4,
        adda_learning_rate=0.01,
        discriminator_learning_rate=0.001,
    )
    cfg = run_config(model_dir, files, out, **{**options, **training})
    del cfg["regularizers"]
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_adda_run_end_to_end_then_eval(tmp_path, tiny_model_dir, run_files, capsys):
    out = tmp_path / "out"
    path = _write(tmp_path, _adda_config(tiny_model_dir, run_files, out))
    assert main(["train", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 4
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"d_loss", "t_loss", "d_accuracy", "discriminator_lr"} <= r.keys() for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["procedure"] == "adda" and summary["source_metrics"]["train/loss"] > 0

    source = load_file(str(out / "source" / "final" / "trainable.safetensors"))
    target = load_file(str(out / "final" / "trainable.safetensors"))
    assert source.keys() == target.keys()
    heads = [k for k in source if "classifier" in k]
    adapter = [k for k in source if k not in heads]
    assert heads and all((source[k] == target[k]).all() for k in heads)  # the source head, unchanged
    assert any((source[k] != target[k]).any() for k in adapter)  # the target adapter moved
    # the discriminator and the source snapshot are in the checkpoints; the snapshot is the source phase's
    saved = load_file(str(out / "checkpoint-4" / "regularizers.safetensors"))
    assert any(k.startswith("discriminator.") for k in saved)
    assert all((saved["source." + k] == v).all() for k, v in source.items())
    src_adapter = out / "final" / "source_adapter"
    assert (src_adapter / "adapter_config.json").is_file()

    # peftadapt eval on final/ (target adapter + source head) reproduces the run's final metrics
    assert main(["eval", str(path), "--checkpoint", str(out / "final")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["target/accuracy"] == printed["final_metrics"]["target/accuracy"]
    assert metrics["target/loss"] == pytest.approx(printed["final_metrics"]["target/loss"], abs=1e-5)
    # and on the source adapter: the source phase's model
    assert main(["eval", str(path), "--checkpoint", str(src_adapter)]) == 0
    assert json.loads(capsys.readouterr().out)["target/loss"] != pytest.approx(metrics["target/loss"], abs=1e-7)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", ["source/checkpoint-4", "checkpoint-4"])
def test_resume_after_a_kill_in_either_phase_matches_an_uninterrupted_run(
    tmp_path, tiny_model_dir, run_files, monkeypatch, kill_at
):
    # dropout on (model and discriminator): the resume must restore RNGs, D, the snapshot and the optimizer
    training = dict(max_steps=6, adda_steps=6, save_total_limit=3)
    ref = _adda_config(tiny_model_dir, run_files, tmp_path / "ref", **training)
    assert main(["train", str(_write(tmp_path, ref, "ref.yaml"))]) == 0

    out = tmp_path / "killed"
    cfg = _write(tmp_path, _adda_config(tiny_model_dir, run_files, out, **training))
    real = ck.save_checkpoint

    def dying(folder, **kw):
        if Path(folder) == out / kill_at:
            raise _Killed(kill_at)
        return real(folder, **kw)

    monkeypatch.setattr(ck, "save_checkpoint", dying)
    with pytest.raises(_Killed):
        main(["train", str(cfg)])
    monkeypatch.setattr(ck, "save_checkpoint", real)
    assert main(["train", str(cfg), "--resume"]) == 0

    wa = load_file(str(out / "final" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "ref" / "final" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    ra = load_file(str(out / "checkpoint-6" / "regularizers.safetensors"))
    rb = load_file(str(tmp_path / "ref" / "checkpoint-6" / "regularizers.safetensors"))
    assert ra.keys() == rb.keys() and all((ra[k] == rb[k]).all() for k in ra)
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert a["final_metrics"] == b["final_metrics"]


def test_one_line_errors(tmp_path, tiny_model_dir, run_files, capsys, tok):
    cfg = _adda_config(tiny_model_dir, run_files, tmp_path / "out")
    no_target = dict(cfg, data={k: v for k, v in cfg["data"].items() if k != "target"})
    with_terms = dict(cfg, regularizers=[{"name": "mmd", "weight": 0.1}])
    for bad, says in ((no_target, "needs unlabeled target data"), (with_terms, "remove the regularizers")):
        assert main(["train", str(_write(tmp_path, bad))]) == 2
        err = capsys.readouterr().err
        assert "training.procedure: adda" in err and says in err
    wrong = dict(cfg, training=dict(cfg["training"], procedure="gan"))
    assert main(["train", str(_write(tmp_path, wrong))]) == 2
    assert "adda" in capsys.readouterr().err

    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"runs through peftadapt\.train\.ADDATrainer"):
        Trainer(model, tok, text_data(8, 0), procedure="adda", output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="needs unlabeled target data"):
        ADDATrainer(model, tok, text_data(8, 0), output_dir=str(tmp_path / "x"))  # procedure adda by default
    with pytest.raises(ValueError, match="trains only its head"):
        ADDATrainer(
            tiny_classifier(method="head"),
            tok,
            text_data(8, 0),
            target=["b"],
            procedure="adda",
            output_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="adapts a classifier"):
        ADDATrainer(
            model, tok, ["a text"], target=["b"], task="causal_lm", procedure="adda", output_dir=str(tmp_path / "x")
        )


def test_backend_check():
    for ok in ("DistributedType.NO", "DistributedType.MULTI_GPU", "DistributedType.MULTI_CPU", None):
        check_adda_backend(ok)
    for bad in ("DistributedType.FSDP", "DistributedType.DEEPSPEED"):
        with pytest.raises(ValueError, match=r"runs on one process or under DDP .* not under (FSDP|DEEPSPEED)"):
            check_adda_backend(bad)
