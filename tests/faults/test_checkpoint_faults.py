"""Checkpoint faults: a damaged newest checkpoint, a damaged best one, a full or read-only disk.

One uninterrupted reference run (8 steps, a checkpoint every 2, DANN + MMD, dropout on) is
trained once per module. Each fault copies its folder, damages it, and runs
``peftadapt train --resume``: a damaged checkpoint-8 makes the resume fall back to
checkpoint-6 and train steps 7-8 again, which must give the reference's weights bit for bit.
The reference ranks checkpoints by the *highest* eval loss (the earliest are best), so that
restoring the best weights at the end has a best checkpoint older than the last one to damage.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from peftadapt.cli import main
from peftadapt.core import io as core_io
from peftadapt.train import checkpoint as ckpt
from peftadapt.train.runner import build_trainer
from peftadapt.train.schema import load_run_config

from ..train.conftest import run_config, run_files, tiny_model_dir  # noqa: F401  (fixtures)

TRAINING = dict(
    max_steps=8,
    learning_rate=0.1,  # eval loss falls at every evaluation: the best by highest loss is the oldest
    eval_steps=2,
    save_steps=2,
    save_total_limit=5,
    metric_for_best_model="target/loss",
    greater_is_better=True,
)
REGULARIZERS = [{"name": "dann", "weight": 0.2, "hidden_size": 16, "start": 0.2}, {"name": "mmd", "weight": 0.1}]


def _write_config(folder: Path, cfg: dict, out: Path) -> Path:
    cfg = dict(cfg, training=dict(cfg["training"], output_dir=str(out)))
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, run_files):  # noqa: F811
    """(config dict, output folder) of the uninterrupted run: checkpoints 2, 4, 6, 8 and final/."""
    d = tmp_path_factory.mktemp("reference")
    cfg = run_config(tiny_model_dir, run_files, d / "ref", **TRAINING)
    cfg["regularizers"] = REGULARIZERS
    assert main(["train", str(_write_config(d, cfg, d / "ref"))]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(d / "ref")] == [2, 4, 6, 8]
    return cfg, d / "ref"


def _copy_run(reference, tmp_path: Path, drop: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """The reference folder as a run stopped after its last checkpoint (no final/ or summary);
    returns (run file, output folder)."""
    cfg, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("final", "summary.json"))
    for step in drop:
        shutil.rmtree(out / f"checkpoint-{step}")
    return _write_config(tmp_path, cfg, out), out


def _tensors_equal(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def _resume(cfg_path: Path) -> tuple[int, list[str]]:
    """``peftadapt train CONFIG --resume``: (exit code, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["train", str(cfg_path), "--resume"])
    return rc, [str(w.message) for w in caught]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:
    """Flip the last 64 bytes (tensor data, the header stays valid; the size is unchanged)."""
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncate": _truncate,
    "scramble": _scramble,
    "delete": lambda p: p.unlink(),
}


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("trainable.safetensors", "truncate"),
        ("rng.safetensors", "truncate"),
        ("regularizers.safetensors", "truncate"),
        ("optimizer.pt", "truncate"),
        ("trainer_state.json", "truncate"),
        ("adapter/adapter_model.safetensors", "truncate"),
        ("trainable.safetensors", "scramble"),
        ("optimizer.pt", "delete"),
        ("manifest.json", "truncate"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, name, how):
    cfg_path, out = _copy_run(reference, tmp_path)
    DAMAGE[how](out / "checkpoint-8" / name)
    rc, messages = _resume(cfg_path)
    assert rc == 0
    fallback = [m for m in messages if "resuming from checkpoint-6" in m]
    assert len(fallback) == 1 and f"checkpoint-8: {name}" in fallback[0], messages
    assert not any("FSDP1" in m for m in messages)  # a missing optimizer.pt is damage, not FSDP1
    # the damaged folder is kept aside, out of rotation and of later resumes; steps 5-6 ran again
    assert (out / "checkpoint-8.damaged").is_dir()
    ref = reference[1]
    for f in ("trainable.safetensors", "regularizers.safetensors"):
        assert _tensors_equal(out / "checkpoint-8" / f, ref / "checkpoint-8" / f), f
    assert _tensors_equal(out / "final" / "trainable.safetensors", ref / "final" / "trainable.safetensors")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert a["final_metrics"] == b["final_metrics"] and a["best_step"] == b["best_step"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [
        json.loads(x)["step"] for x in (ref / "metrics.jsonl").read_text().splitlines()
    ]


def test_no_checkpoint_verifies_is_one_clear_error(reference, tmp_path, capsys):
    cfg_path, out = _copy_run(reference, tmp_path)
    damage = ((2, "trainable.safetensors"), (4, "rng.safetensors"), (6, "scheduler.pt"), (8, "optimizer.pt"))
    for step, name in damage:
        _truncate(out / f"checkpoint-{step}" / name)
    rc, _ = _resume(cfg_path)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("peftadapt train: error:"))
    assert "no checkpoint in" in line and "overwrite_output_dir" in line
    for step, name in damage:
        assert f"checkpoint-{step}: {name}" in line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4, 6, 8]  # nothing set aside without a resume


class _Payload:
    """A pickle that would create a folder when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_without_manifest_is_read_with_a_warning_and_a_pickle_refused(reference, tmp_path):
    # a checkpoint written before manifests existed: read, with a warning it cannot be verified
    cfg_path, out = _copy_run(reference, tmp_path)
    (out / "checkpoint-8" / "manifest.json").unlink()
    rc, messages = _resume(cfg_path)
    assert rc == 0
    assert any("checkpoint-8 has no manifest.json" in m and "cannot be verified" in m for m in messages)
    assert _tensors_equal(out / "final" / "trainable.safetensors", reference[1] / "final" / "trainable.safetensors")

    # such a checkpoint holding a pickle in place of optimizer.pt: refused in one line, not run
    cfg_path, out = _copy_run(reference, tmp_path / "pickle")
    (out / "checkpoint-8" / "manifest.json").unlink()
    marker = tmp_path / "payload-ran"
    (out / "checkpoint-8" / "optimizer.pt").write_bytes(pickle.dumps(_Payload(marker)))
    rc, messages = _resume(cfg_path)
    assert rc == 0 and not marker.exists()
    fallback = [m for m in messages if "resuming from checkpoint-6" in m]
    assert (
        len(fallback) == 1
        and "checkpoint-8: optimizer.pt holds pickled objects other than tensors: refused without running them"
        in fallback[0]
    )
    assert "\n" not in fallback[0]
    assert _tensors_equal(
        out / "checkpoint-8" / "trainable.safetensors", reference[1] / "checkpoint-8" / "trainable.safetensors"
    )


def test_missing_optimizer_state_is_complete_only_when_the_manifest_says_why(reference, tmp_path):
    # without a manifest, a checkpoint missing optimizer.pt is damaged (this run is not FSDP1)
    cfg_path, out = _copy_run(reference, tmp_path / "old", drop=(8,))
    (out / "checkpoint-6" / "manifest.json").unlink()
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    rc, messages = _resume(cfg_path)
    assert rc == 0 and any(
        "resuming from checkpoint-4" in m and "checkpoint-6: optimizer.pt is missing" in m for m in messages
    )

    # written without it on purpose (the manifest gives the reason): resumed, with that reason
    cfg_path, out = _copy_run(reference, tmp_path / "fsdp1", drop=(8,))
    manifest_path = out / "checkpoint-6" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["optimizer.pt"]
    manifest["no_optimizer"] = ckpt.NO_OPTIMIZER_FSDP1
    manifest_path.write_text(json.dumps(manifest))
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    rc, messages = _resume(cfg_path)
    assert rc == 0
    assert not any("resuming from" in m for m in messages)
    assert any("checkpoint-6 holds no optimizer state (written under FSDP1" in m for m in messages)
    # Adam restarted at step 5: not the reference's weights
    ref = reference[1]
    assert not _tensors_equal(
        out / "checkpoint-8" / "trainable.safetensors", ref / "checkpoint-8" / "trainable.safetensors"
    )


def _eval_losses(out: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["target/loss"] for r in records if r["split"] == "eval"}


def test_damaged_best_checkpoint_restores_the_next_best_and_writes_final(reference, tmp_path):
    ref = reference[1]
    losses = _eval_losses(ref)
    # the reference restored its best (highest loss) checkpoint, an earlier one than the last
    best = json.loads((ref / "summary.json").read_text())["restored_step"]
    assert best == max(losses, key=losses.get) != 8
    assert _tensors_equal(ref / "final" / "trainable.safetensors", ref / f"checkpoint-{best}" / "trainable.safetensors")
    next_best = max((s for s in losses if s not in (best, 8)), key=losses.get)
    assert losses[next_best] > losses[8]  # a fallback better than the last weights exists

    # the run is resumed at its end (step 8 of 8), so only finalize runs: restore, final/, summary
    cfg_path, out = _copy_run(reference, tmp_path / "one")
    _truncate(out / f"checkpoint-{best}" / "trainable.safetensors")
    rc, messages = _resume(cfg_path)
    assert rc == 0
    assert any(
        f"restored the weights of checkpoint-{next_best}, not the damaged checkpoint-{best}" in m for m in messages
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restored_step"] == next_best and summary["best_step"] == best
    assert summary["final_metrics"]["target/loss"] == losses[next_best]
    final = out / "final" / "trainable.safetensors"
    assert _tensors_equal(final, out / f"checkpoint-{next_best}" / "trainable.safetensors")

    # every better checkpoint damaged: final/ keeps the last step's weights, still written
    cfg_path, out = _copy_run(reference, tmp_path / "all")
    for step in (2, 4, 6):
        _scramble(out / f"checkpoint-{step}" / "trainable.safetensors")
    rc, messages = _resume(cfg_path)
    assert rc == 0 and any("final/ keeps the last step's weights" in m for m in messages)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restored_step"] is None and summary["final_metrics"]["target/loss"] == losses[8]
    assert _tensors_equal(out / "final" / "trainable.safetensors", ref / "checkpoint-8" / "trainable.safetensors")


def _failing_writer(monkeypatch, fail_on: str, code: int) -> None:
    """Make the atomic writer fail with ``code`` on ``fail_on`` inside checkpoint-8's temp
    folder, after writing half of it (as a disk that fills up mid-file)."""
    real = core_io.write_atomic

    def write_atomic(path, write):
        p = Path(path)
        if p.parent.name == ".tmp-checkpoint-8" and p.name == fail_on:
            (p.parent / f".{p.name}.partial").write_bytes(b"\0" * 100)
            raise OSError(code, os.strerror(code), str(p))
        real(path, write)

    monkeypatch.setattr(core_io, "write_atomic", write_atomic)  # write_json's writer
    monkeypatch.setattr(ckpt, "write_atomic", write_atomic)


@pytest.mark.parametrize(
    ("code", "fail_on", "how"),
    [
        (errno.ENOSPC, "optimizer.pt", "cli"),  # a fresh run through the CLI
        (errno.ENOSPC, "manifest.json", "cli-resumed"),  # the others resume the reference at step 6 (cheaper)
        (errno.EROFS, "trainable.safetensors", "python-resumed"),
        (errno.EACCES, "trainer_state.json", "cli-resumed"),
    ],
)
def test_failed_checkpoint_write_loses_nothing_and_resumes(
    reference, tmp_path, monkeypatch, capsys, code, fail_on, how
):
    cfg, ref = reference
    if how == "cli":
        out = tmp_path / "run"
        cfg_path = _write_config(tmp_path, cfg, out)
    else:
        cfg_path, out = _copy_run(reference, tmp_path, drop=(8,))
    args = ["train", str(cfg_path)] + ([] if how == "cli" else ["--resume"])
    _failing_writer(monkeypatch, fail_on, code)
    if how.startswith("cli"):
        assert main(args) == 1  # a disk error: status 1 like every other
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = next(x for x in err.splitlines() if x.startswith("peftadapt train: error:"))
    else:
        with pytest.raises(OSError) as info:
            build_trainer(load_run_config(str(cfg_path))).train(resume=True)
        assert isinstance(info.value, ckpt.CheckpointError) and info.value.errno == code
        line = str(info.value)
    assert f"could not write checkpoint-8 in {str(out)!r}: {os.strerror(code)}" in line
    assert "checkpoint-6, is intact" in line and "--resume" in line
    # nothing half-written looks complete; the complete ones verify
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4, 6]
    assert not list(out.glob(".tmp-*")) and not (out / "final").exists()
    assert all(ckpt.verify_checkpoint(p) for _, p in ckpt.list_checkpoints(out))

    monkeypatch.undo()  # the disk has room again
    rc, messages = _resume(cfg_path)
    assert rc == 0 and not any("resuming from" in m for m in messages)
    assert _tensors_equal(
        out / "checkpoint-8" / "trainable.safetensors", ref / "checkpoint-8" / "trainable.safetensors"
    )
    assert _tensors_equal(out / "final" / "trainable.safetensors", ref / "final" / "trainable.safetensors")


def test_eval_of_a_damaged_checkpoint_is_one_line(reference, tmp_path, capsys):
    """``peftadapt eval --checkpoint`` verifies a training checkpoint's manifest before loading it."""
    cfg_path, out = _copy_run(reference, tmp_path)
    assert main(["eval", str(cfg_path), "--checkpoint", str(out / "checkpoint-6")]) == 0
    capsys.readouterr()
    adapter_files = sorted(p for p in (out / "checkpoint-8" / "adapter").iterdir() if p.suffix == ".safetensors")
    _scramble(adapter_files[0])
    assert main(["eval", str(cfg_path), "--checkpoint", str(out / "checkpoint-8")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "checkpoint-8" in lines[0] and adapter_files[0].name in lines[0] and "sha256" in lines[0]
