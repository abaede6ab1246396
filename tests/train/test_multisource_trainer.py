"""The Trainer on several source domains: per-domain batches and logs, MLDG, resume, clear errors."""

import json
import shutil

import pytest
import torch

from peftadapt.align import Term
from peftadapt.train import TextData, Trainer
from peftadapt.train.checkpoint import list_checkpoints, trainable_state

from .conftest import text_data, tiny_classifier

FAST = dict(disable_tqdm=True, plot=False, learning_rate=0.02, per_device_train_batch_size=4, max_length=12)


def _domains():
    return {"books": text_data(12, 0), "dvd": text_data(8, 1), "kitchen": text_data(10, 3)}


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_per_source_alignment_logs_each_domain(tok, tmp_path):
    tr = Trainer(
        tiny_classifier(dropout=0.0),
        tok,
        _domains(),
        target=text_data(10, 5, labeled=False),
        eval={"test": text_data(8, 2)},
        regularizers=[Term("mmd", weight=0.3)],
        output_dir=str(tmp_path),
        max_steps=3,
        align_sources="per_source",
        **FAST,
    )
    tr.train()
    assert tr.da is None  # hooks off after training
    first = next(r for r in _records(tmp_path) if r["split"] == "train")
    for d in ("books", "dvd", "kitchen"):
        assert f"task_loss/{d}" in first and f"reg/mmd/{d}" in first
    per = [first[f"task_loss/{d}"] for d in ("books", "dvd", "kitchen")]
    assert first["task_loss"] == pytest.approx(sum(per) / 3, rel=1e-5)
    assert tr.state.total == 3


def _mldg(tok, out, resume=False):
    tr = Trainer(
        tiny_classifier(dropout=0.1),
        tok,
        _domains(),
        eval={"test": text_data(8, 2)},
        output_dir=str(out),
        procedure="mldg",
        meta_learning_rate=0.05,
        save_steps=2,
        eval_steps=2,
        lr_scheduler_type="constant",
        max_steps=4,
        **FAST,
    )
    tr.train(resume=resume)
    return tr


def test_mldg_trains_logs_and_resumes_bit_equal(tok, tmp_path):
    ref = _mldg(tok, tmp_path / "ref")
    train = [r for r in _records(tmp_path / "ref") if r["split"] == "train"]
    assert len(train) == 4 and all("meta_test_loss" in r for r in train)
    assert train[0]["loss"] == pytest.approx(train[0]["task_loss"] + train[0]["meta_test_loss"], rel=1e-5)
    assert sum(f"meta_test/{d}" in r for r in train for d in ("books", "dvd", "kitchen")) == 4  # one held out
    # a copy of the run as it stood at step 2, resumed: the same weights at the end
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", cut)
    for step, path in list_checkpoints(cut):
        if step > 2:
            shutil.rmtree(path)
    shutil.rmtree(cut / "final", ignore_errors=True)
    resumed = _mldg(tok, cut, resume=True)
    wa, wb = trainable_state(ref.model), trainable_state(resumed.model)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_clear_errors(tok, tmp_path):
    kw = dict(output_dir=str(tmp_path), max_steps=1, **FAST)
    with pytest.raises(ValueError, match="needs more source domains than that; got 1"):
        Trainer(tiny_classifier(), tok, text_data(8, 0), procedure="mldg", **kw)
    with pytest.raises(ValueError, match="'books' and 'dvd' have different label sets"):
        odd = TextData(["bad day", "fine day", "so so"], [0, 1, 2], name="dvd")
        m = tiny_classifier()
        m.base_model.model.config.num_labels = 3  # the head is checked elsewhere: the label sets come first here
        Trainer(m, tok, {"books": text_data(8, 0), "dvd": odd}, **kw)
    with pytest.raises(ValueError, match="empty mapping of source domains"):
        Trainer(tiny_classifier(), tok, {}, **kw)
