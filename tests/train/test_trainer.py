import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peftadapt.align import Term, build
from peftadapt.train import Trainer
from peftadapt.train.checkpoint import list_checkpoints, trainable_state
from peftadapt.train.loop import _lr_lambda, macro_f1

from ..conftest import make_tiny
from .conftest import VOCAB, text_data, tiny_classifier

FAST = dict(disable_tqdm=True, plot=False, learning_rate=0.02)


def _train(tok, tmp, seed=0, model_seed=0, **kw):
    model = tiny_classifier(seed=model_seed, dropout=kw.pop("dropout", 0.1))
    kw = {**FAST, "per_device_train_batch_size": 8, "max_steps": 6, **kw}
    tr = Trainer(
        model,
        tok,
        text_data(40, 0),
        eval={"test": text_data(16, 2)},
        output_dir=str(tmp),
        seed=seed,
        max_length=12,
        **kw,
    )
    return tr, tr.train()


def test_training_learns_and_same_seed_gives_same_weights(tok, tmp_path):
    tr1, m1 = _train(tok, tmp_path / "a", max_steps=30, learning_rate=0.05)
    tr2, m2 = _train(tok, tmp_path / "b", max_steps=30, learning_rate=0.05)
    w1, w2 = trainable_state(tr1.model), trainable_state(tr2.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1 == m2
    assert m1["test/accuracy"] >= 0.8  # the toy task is learnable; chance is ~0.5
    # a different seed changes batch order and dropout, hence the weights
    tr3, _ = _train(tok, tmp_path / "c", seed=1, max_steps=30, learning_rate=0.05)
    w3 = trainable_state(tr3.model)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
    # per-step metrics went to the JSONL file, eval records included
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 31))
    assert lines[-1]["split"] == "eval" and lines[-1]["test/accuracy"] == m1["test/accuracy"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["final_metrics"]["test/accuracy"] == m1["test/accuracy"]


def test_gradient_accumulation_matches_the_big_batch(tok, tmp_path):
    # no dropout: the two runs see the same examples per optimizer step
    big, _ = _train(
        tok, tmp_path / "big", dropout=0.0, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=4
    )
    acc, _ = _train(
        tok, tmp_path / "acc", dropout=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4
    )
    lb = [r["loss"] for r in big.history if r["split"] == "train"]
    la = [r["loss"] for r in acc.history if r["split"] == "train"]
    assert la == pytest.approx(lb, abs=1e-5)
    wb, wa = trainable_state(big.model), trainable_state(acc.model)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    # and a run without accumulation at batch 4 is a different run
    small, _ = _train(
        tok, tmp_path / "small", dropout=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4
    )
    assert [r["loss"] for r in small.history if r["split"] == "train"][1] != pytest.approx(lb[1], abs=1e-4)


def test_checkpoint_rotation_keeps_last_and_best(tok, tmp_path):
    # "best" = highest eval loss: early, while the last checkpoint is the newest
    tr, _ = _train(
        tok,
        tmp_path,
        max_steps=8,
        eval_steps=2,
        save_total_limit=1,
        metric_for_best_model="test/loss",
        greater_is_better=True,
        load_best_model_at_end=False,
    )
    evals = [r for r in tr.history if r["split"] == "eval"]
    best_step = max(evals, key=lambda r: r["test/loss"])["step"]
    assert best_step < 8
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == sorted({best_step, 8})
    ck = tmp_path / "checkpoint-8"
    for f in (
        "adapter",
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng.safetensors",
        "trainer_state.json",
    ):
        assert (ck / f).exists(), f
    assert not list(tmp_path.glob(".tmp-*"))
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["best_step"] == best_step


def test_early_stopping_restores_the_best_weights(tok, tmp_path):
    tr, final = _train(
        tok,
        tmp_path,
        max_steps=30,
        eval_steps=2,
        early_stopping_patience=2,
        metric_for_best_model="test/loss",
        greater_is_better=True,
        save_total_limit=1,
    )
    evals = [r for r in tr.history if r["split"] == "eval"]
    best = max(evals, key=lambda r: r["test/loss"])
    # stopped 2 evaluations after the best one, long before max_steps
    assert tr.summary["stopped_early"] and tr.summary["step"] == best["step"] + 4 < 30
    assert final["test/loss"] == best["test/loss"]
    saved = load_file(str(tmp_path / f"checkpoint-{best['step']}" / "trainable.safetensors"))
    now = trainable_state(tr.model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert tr.evaluate()["test/loss"] == pytest.approx(best["test/loss"], abs=1e-6)
    # a fresh run into a folder holding checkpoints would mix two runs: refused unless overwrite
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _train(tok, tmp_path, max_steps=1)
    _train(tok, tmp_path, max_steps=1, overwrite_output_dir=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_alignment_terms_schedules_and_discriminator_lr(tok, tmp_path):
    model = tiny_classifier(dropout=0.0)
    dann = build("dann", in_features=32, hidden_size=16)
    before = [p.detach().clone() for p in dann.parameters()]
    terms = [Term(dann, weight=0.5, start=0.5), Term(build("mmd"), weight=0.2, schedule="linear")]
    tr = Trainer(
        model,
        tok,
        text_data(32, 0),
        target=text_data(32, 1, labeled=False),
        regularizers=terms,
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        discriminator_learning_rate=0.05,
        **FAST,
    )
    tr.train()
    disc_group = next(g for g in tr.optimizer.param_groups if abs(g["initial_lr"] - 0.05) < 1e-12)
    assert {id(p) for p in disc_group["params"]} == {id(p) for p in dann.parameters()}
    train = [r for r in tr.history if r["split"] == "train"]
    # DANN is off before half of training, MMD ramps linearly from 0
    assert [("reg/dann" in r) for r in train] == [False, False, True, True]
    assert [r["weight/mmd"] for r in train] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert all(r["loss"] == pytest.approx(r["task_loss"] + r["reg_loss"], abs=1e-6) for r in train)
    assert any(not torch.equal(a, b) for a, b in zip(before, dann.parameters(), strict=True))


def test_logit_regularizers_rejected_for_causal_lm(tok, tmp_path):
    import peftadapt

    lm = peftadapt.wrap(make_tiny("llama", "causal", vocab_size=VOCAB), "lora", r=4)
    with pytest.raises(ValueError, match="task='classification'"):
        Trainer(lm, tok, ["a b c"], target=["d e f"], regularizers=["entropy"], task="causal_lm", **FAST)


def test_causal_lm_perplexity(tok, tmp_path):
    import peftadapt

    # the head trains fully so a few steps move the perplexity a lot
    lm = peftadapt.wrap(make_tiny("llama", "causal", vocab_size=VOCAB), "lora", r=8, modules_to_save=["lm_head"])
    text = ["the cat sat on the mat and the dog sat on the log"] * 16
    tr = Trainer(
        lm,
        tok,
        text,
        eval={"held": text[:4]},
        task="causal_lm",
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        max_length=24,
        **{**FAST, "learning_rate": 0.03},
    )
    before = tr.evaluate()
    # perplexity is exp(mean next-token NLL); for one text that mean is the model's own loss
    one = tok(text[:1], return_tensors="pt")
    with torch.no_grad():
        ref = lm(**one, labels=one["input_ids"]).loss.item()
    assert before["held/loss"] == pytest.approx(ref, rel=1e-5)
    assert before["held/perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert before["held/perplexity"] > 1000  # random init: near the vocab size (30522)
    after = tr.train()
    assert after["held/perplexity"] < before["held/perplexity"] / 10
    assert tr.best_metric_name == "held/loss" and not tr.greater_is_better


def test_lr_schedules_and_macro_f1():
    lin = _lr_lambda("linear", warmup=2, total=10)
    assert [round(lin(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cos = _lr_lambda("cosine", warmup=0, total=10)
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert _lr_lambda("constant", warmup=0, total=10)(7) == 1.0
    # class 0: tp 1, fp 1, fn 1 -> F1 0.5; class 1: tp 2, fp 1, fn 1 -> F1 2/3
    assert macro_f1([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 2 / 3) / 2)
    assert macro_f1([1, 1, 1, 1], [1, 1, 1, 0]) == pytest.approx((0 + 6 / 7) / 2)


def test_metric_for_best_must_exist(tok):
    with pytest.raises(ValueError, match=r"metric_for_best_model.*'test/acc'.*test/accuracy"):
        Trainer(
            tiny_classifier(),
            tok,
            text_data(8, 0),
            eval={"test": text_data(4, 1)},
            metric_for_best_model="test/acc",
            **FAST,
        )
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(make_tiny("bert", "seqcls", vocab_size=VOCAB).requires_grad_(False), tok, text_data(8, 0), **FAST)


def test_missing_tracker_package_is_a_clear_error(tok, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    tr = Trainer(
        tiny_classifier(),
        tok,
        text_data(8, 0),
        output_dir=str(tmp_path),
        report_to=["tensorboard"],
        max_steps=1,
        **FAST,
    )
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tr.train()
