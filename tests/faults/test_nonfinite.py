"""Numerical faults: a NaN / inf never passes silently.

A non-finite loss or gradient stops the run with one line naming the step (or is skipped and counted
under ``nan_policy: skip``), nothing non-finite is written as a checkpoint or ``final/``, a NaN metric
is never the best, every JSON file is strict JSON, non-finite settings are refused up front, and the
regularizers stay finite (with finite gradients) on degenerate but finite inputs.
"""

# ruff: noqa: F811  (the fixtures imported from tests/train/conftest.py are, by design, test arguments)
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from peftadapt.align import Term, build
from peftadapt.align.adversarial import CDAN, DANN
from peftadapt.align.coral import CORAL
from peftadapt.align.entropy import Entropy
from peftadapt.align.mmd import MMD
from peftadapt.cli import main
from peftadapt.core.io import json_safe, write_json
from peftadapt.train import NonFiniteError, TrainConfig, Trainer, load_run_config
from peftadapt.train.checkpoint import list_checkpoints

from ..train.conftest import run_config, run_files, text_data, tiny_classifier, tiny_model_dir, tok  # noqa: F401

FAST = dict(disable_tqdm=True, plot=False, per_device_train_batch_size=8, max_length=12, seed=0)


def strict_json(path):
    """Parse as strict JSON: NaN / Infinity (which json.dump writes by default) are an error."""

    def refuse(c):
        raise ValueError(f"{path} holds the non-JSON constant {c}")

    text = path.read_text()
    return (
        [json.loads(x, parse_constant=refuse) for x in text.splitlines()]
        if path.suffix == ".jsonl"
        else (json.loads(text, parse_constant=refuse))
    )


def trainer(tok, out, cls=Trainer, **kw):
    return cls(
        tiny_classifier(dropout=0.0),
        tok,
        text_data(32, 0),
        eval={"test": text_data(16, 2)},
        output_dir=str(out),
        **{**FAST, **kw},
    )


def train_lines(out):
    return [r for r in strict_json(out / "metrics.jsonl") if r["split"] == "train"]


# -- the CLI: lr 1e30 -----------------------------------------------------------------------------


def test_lr_1e30_stops_at_step_2_with_exit_1_and_writes_nothing_non_finite(tmp_path, tiny_model_dir, run_files, capsys):
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, run_files, out, learning_rate=1e30, metric_for_best_model="target/loss")
    cfg["regularizers"] = []
    del cfg["data"]["target"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peftadapt train: error:")]
    assert err == [
        (
            "peftadapt train: error: step 2: the loss is nan (task loss nan); lower training.learning_rate "
            "(now 1e+30), check the data and any regularizer weights for extreme values, or set "
            "training.nan_policy: skip"
        )
    ]
    # step 1 was finite and logged; step 2 was not applied, nothing was saved
    assert [r["step"] for r in train_lines(out)] == [1]
    assert list_checkpoints(out) == [] and not (out / "final").exists() and not (out / "summary.json").exists()


def test_a_term_on_from_step_0_names_itself_and_follows_nan_policy(tok, tmp_path):
    # the term's own input check (a ValueError) is off while the trainer runs: its NaN reaches the step check
    mmd = build("mmd")
    tr = trainer(
        tok, tmp_path, target=text_data(32, 1, labeled=False), regularizers=[Term(mmd, weight=0.1)], learning_rate=1e30
    )
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss is nan \(task loss nan, mmd nan\); ") as e:
        tr.train()
    assert e.value.step == 2 and mmd.check_finite  # restored after the run


# -- nan_policy: skip -----------------------------------------------------------------------------


class Poisoned(Trainer):
    """Steps (1-based) listed in ``bad`` get an inf in the classifier's output, so their loss is NaN."""

    bad: frozenset[int] = frozenset()

    def train_step(self):
        hook = None
        if self.state.step + 1 in self.bad:
            head = self.model.base_model.model.classifier
            hook = head.register_forward_hook(lambda m, i, o: o + torch.tensor([math.inf, 0.0]))
        try:
            return super().train_step()
        finally:
            if hook is not None:
                hook.remove()


def test_skip_drops_the_update_counts_it_and_resets_the_count_on_a_good_step(tok, tmp_path):
    tr = trainer(tok, tmp_path, cls=Poisoned, nan_policy="skip", max_skipped_steps_in_a_row=2, max_steps=6)
    tr.bad = frozenset({2, 3, 5})
    with pytest.warns(UserWarning, match=r"update skipped, the loss is nan") as rec:
        tr.train()
    assert [str(w.message).split(",")[0] for w in rec if "update skipped" in str(w.message)] == [
        "step 2: update skipped",
        "step 3: update skipped",
        "step 5: update skipped",
    ]
    lines = train_lines(tmp_path)
    assert [r["step"] for r in lines if r.get("skipped")] == [2, 3, 5]
    assert all(r["loss"] is None for r in lines if r.get("skipped"))  # null in metrics.jsonl, not NaN
    # three of six updates applied: AdamW counted three steps on every trainable tensor
    assert {int(s["step"]) for s in tr.optimizer.state_dict()["state"].values()} == {3}
    summary = strict_json(tmp_path / "summary.json")
    assert summary["skipped_steps"] == 3 and tr.summary["skipped_steps"] == 3


def test_skip_stops_after_max_skipped_steps_in_a_row(tok, tmp_path):
    tr = trainer(tok, tmp_path, cls=Poisoned, nan_policy="skip", max_skipped_steps_in_a_row=2, max_steps=8)
    tr.bad = frozenset({3, 4, 5, 6})
    with pytest.warns(UserWarning, match="update skipped"), pytest.raises(NonFiniteError) as e:
        tr.train()
    assert e.value.step == 5
    assert str(e.value).startswith(
        "step 5: 3 steps in a row were non-finite (nan_policy: skip, max_skipped_steps_in_a_row: 2); "
        "the last: the loss is nan (task loss nan); lower training.learning_rate"
    )


def test_a_model_with_inf_features_and_no_regularizer_stops_at_step_1(tok, tmp_path):
    tr = trainer(tok, tmp_path, cls=Poisoned, max_steps=3)
    tr.bad = frozenset({1, 2, 3})
    with pytest.raises(NonFiniteError, match=r"^step 1: the loss is nan \(task loss nan\)"):
        tr.train()
    assert train_lines(tmp_path) == [] and list_checkpoints(tmp_path) == []


# -- nothing non-finite is saved; NaN is never the best ----------------------------------------------


class BreaksWeights(Trainer):
    """After step ``at`` (a finite step) a trainable weight is NaN: what a bad custom step could leave."""

    at = 2

    def train_step(self):
        out = super().train_step()
        if self.state.step + 1 == self.at:
            with torch.no_grad():
                self._trainable[0].view(-1)[0] = math.nan
        return out


def test_non_finite_weights_are_never_written_as_a_checkpoint(tok, tmp_path):
    tr = trainer(tok, tmp_path, cls=BreaksWeights, max_steps=2, eval_steps=1)
    with pytest.raises(NonFiniteError, match=r"^step 2: 1 trainable weight values are NaN or inf \(in .*lora_A") as e:
        tr.train()
    assert "so checkpoint-2 was not written; lower training.learning_rate" in str(e.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # the finite one, before
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "final").exists()


class BreaksAtTheEnd(Trainer):
    def finalize(self, seconds, steps_done):
        with torch.no_grad():
            self._trainable[0].view(-1)[0] = math.inf
        return super().finalize(seconds, steps_done)


def test_non_finite_weights_are_never_written_as_final(tok, tmp_path):
    tr = trainer(tok, tmp_path, cls=BreaksAtTheEnd, max_steps=1, load_best_model_at_end=False)
    with pytest.raises(NonFiniteError, match=r"^step 1: .* so final/ was not written"):
        tr.train()
    assert not (tmp_path / "final").exists() and not (tmp_path / ".tmp-final").exists()


class FirstEvalIsNaN(Trainer):
    def evaluate(self, data=None):
        metrics = super().evaluate(data)
        if self.state.step == 2:
            metrics["test/loss"] = math.nan
        return metrics


def test_a_nan_metric_is_never_the_best_and_summary_json_is_strict(tok, tmp_path):
    tr = trainer(
        tok,
        tmp_path,
        cls=FirstEvalIsNaN,
        max_steps=4,
        eval_steps=2,
        metric_for_best_model="test/loss",
        save_total_limit=1,
    )
    final = tr.train()
    summary = strict_json(tmp_path / "summary.json")
    assert summary["best_step"] == 4 and math.isfinite(summary["best"]) and final["test/loss"] == summary["best"]
    evals = [r for r in strict_json(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["test/loss"] is None for r in evals] == [True, False]


def test_all_nan_metrics_give_no_best_and_valid_json(tok, tmp_path):
    # lr 1e30 under skip: every evaluation's loss is NaN; summary.json used to hold "best": NaN
    tr = trainer(
        tok,
        tmp_path,
        nan_policy="skip",
        learning_rate=1e30,
        max_steps=4,
        eval_steps=2,
        metric_for_best_model="test/loss",
    )
    with pytest.warns(UserWarning, match="update skipped"):
        tr.train()
    summary = strict_json(tmp_path / "summary.json")
    assert summary["best"] is None and summary["best_step"] is None and summary["skipped_steps"] == 3
    assert summary["final_metrics"]["test/loss"] is None
    for _, ck in list_checkpoints(tmp_path):
        state = strict_json(ck / "trainer_state.json")
        assert state["best"] is None


# -- JSON ------------------------------------------------------------------------------------------


def test_write_json_writes_non_finite_floats_as_null(tmp_path):
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": math.nan, "e": "nan"}, "f": None}
    write_json(tmp_path / "x.json", obj)
    want = {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": "nan"}, "f": None}
    assert strict_json(tmp_path / "x.json") == want
    assert json_safe(obj)["b"][0] == 1.5
    with pytest.raises(TypeError):  # not JSON at all: refused before any file is touched
        write_json(tmp_path / "y.json", {"t": torch.zeros(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.learning_rate=.inf", "training.learning_rate"),
        ("training.learning_rate=.nan", "training.learning_rate"),
        ("training.max_grad_norm=.inf", "training.max_grad_norm"),
        ("training.num_train_epochs=.inf", "training.num_train_epochs"),
        ("regularizers.0.weight=.inf", "regularizers[0].weight"),
    ],
)
def test_non_finite_settings_are_refused_with_one_line(tmp_path, override, key, capsys):
    cfg = run_config("model", tmp_path, tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="^" + re.escape(key) + ": expected a finite number"):
        load_run_config(path, [override])
    assert main(["config", str(path), "--set", override]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_non_finite_values_refused_in_python_too():
    with pytest.raises(ValueError, match=r"training.learning_rate: expected a finite number, got inf"):
        TrainConfig(learning_rate=math.inf)
    with pytest.raises(ValueError, match=r"Term weight must be a number >= 0 \(and finite\), got inf"):
        Term("mmd", weight=math.inf)
    with pytest.raises(ValueError, match="nan_policy: 'ignore' is not allowed; allowed values: \\['stop', 'skip'\\]"):
        TrainConfig(nan_policy="ignore")
    with pytest.raises(ValueError, match="max_skipped_steps_in_a_row: must be a positive integer"):
        TrainConfig(max_skipped_steps_in_a_row=0)
    for bad in (lambda: MMD(bandwidth=math.inf), lambda: MMD(kernel_multipliers=[1.0, math.inf])):
        with pytest.raises(ValueError, match="finite positive"):
            bad()
    with pytest.raises(ValueError, match="finite positive"):
        CORAL(scale=math.inf)
    with pytest.raises(ValueError, match="finite number"):
        Entropy(diversity_weight=math.inf)


# -- the regularizers on degenerate, finite inputs --------------------------------------------------


def _regularizers():
    return {
        "mmd": MMD(),
        "mmd-median": MMD(bandwidth="median"),
        "mmd-linear": MMD(estimator="linear"),
        "coral": CORAL(),
        "dann": DANN(in_features=8, hidden_size=16),
        "cdan": CDAN(in_features=8, num_classes=2, hidden_size=16),
        "cdan+e": CDAN(in_features=8, num_classes=2, entropy=True, hidden_size=16),
        "entropy": Entropy(diversity=True),
    }


@pytest.mark.parametrize("name", list(_regularizers()))
@pytest.mark.parametrize("rows", [2, 3])
@pytest.mark.parametrize("value", [0.3, 0.0, 1e3])
def test_identical_features_give_finite_loss_and_gradients(name, rows, value):
    torch.manual_seed(0)
    reg = _regularizers()[name]
    x = torch.full((rows, 8), value, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    logits = [torch.zeros(rows, 2, requires_grad=True) for _ in range(2)] if reg.needs_logits else []
    loss = reg(x, y, *logits)
    loss.backward()
    grads = [t.grad for t in (x, y, *logits) if t.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    if name.startswith("mmd"):  # one point: MMD is 0 and flat (the bandwidth used to be floored at finfo.tiny)
        assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads)


def test_the_issue_mmd_case():
    x = torch.full((2, 8), 0.3, requires_grad=True)
    MMD()(x, x.detach().clone()).backward()
    assert torch.equal(x.grad, torch.zeros(2, 8))


@pytest.mark.parametrize("diversity", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_logits_spanning_past_fp32_range(diversity, dtype):
    # row 0 puts all mass on class 1 (p = [0, 1, 0] exactly): its entropy is 0 and its gradient 0
    lt = torch.tensor([[-3e38, 3e38, 0.0], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    loss = Entropy(diversity=diversity)(target_logits=lt)
    loss.backward()
    ref_rows = torch.tensor([[-1e4, 1e4, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    ref = Entropy(diversity=diversity)(target_logits=ref_rows)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(lt.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(lt.grad.double(), ref_rows.grad, rtol=1e-5, atol=1e-7)
    assert lt.grad[0].abs().max() == 0


def test_a_learning_rate_past_float32_is_refused_before_the_optimizer_overflows():
    """1e300 is a finite Python float, but the optimizers keep the learning rate in float32."""
    expected = r"^training.learning_rate: must be > 0 and a float32 \(<= 3.4e38\) \(got 1e\+300\)"
    with pytest.raises(ValueError, match=expected):
        TrainConfig(learning_rate=1e300)
    with pytest.raises(ValueError, match=r"discriminator_learning_rate: must be > 0 and a float32"):
        TrainConfig(discriminator_learning_rate=1e39)
    TrainConfig(learning_rate=1e30)  # large, but a float32: the step check stops such a run instead


def test_bench_results_are_strict_json(tmp_path):
    from peftadapt.bench.report import write_json as bench_write_json

    path = tmp_path / "r.json"
    bench_write_json(str(path), {"peak": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "peak": None,
        "rows": [1.0, None],
    }
