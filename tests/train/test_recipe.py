"""The Trainer as a recipe: hooks never outlive train(), the DA step skips the target while off,
the optimizer comes from the factory (transformers' optim names), logs sync on log steps only."""

import pytest
import torch

from peftadapt.align import Regularizer, Term
from peftadapt.train import Trainer

from .conftest import text_data, tiny_classifier

FAST = dict(disable_tqdm=True, plot=False, learning_rate=0.02)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Boom(Regularizer):
    """Fails the step it is first computed in."""

    def forward(self, fs, ft, source_logits=None, target_logits=None):
        raise RuntimeError("boom in step")


def _trainer(tok, tmp_path, model=None, regularizers=("mmd",), **kw):
    model = model or tiny_classifier(dropout=0.0)
    return Trainer(
        model,
        tok,
        text_data(24, 0),
        target=text_data(24, 1, labeled=False),
        regularizers=list(regularizers),
        output_dir=str(tmp_path),
        max_length=12,
        **{**FAST, "per_device_train_batch_size": 8, "max_steps": 4, **kw},
    )


def test_hooks_are_off_after_a_run_a_failing_step_and_a_failing_setup(tok, tmp_path):
    model = tiny_classifier(dropout=0.0)
    before = _hooks(model)
    _trainer(tok, tmp_path / "ok", model).train()
    assert _hooks(model) == before
    tr = _trainer(tok, tmp_path / "boom", model, regularizers=[Term(Boom(), start=0.5)])
    with pytest.raises(RuntimeError, match="boom in step"):
        tr.train()
    assert tr.state.step == 2  # it failed in the first step with the term on
    assert _hooks(model) == before
    # setup fails after the tap exists: a fresh run into a folder with another run's checkpoints
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _trainer(tok, tmp_path / "ok", model).train()
    assert _hooks(model) == before


def test_the_target_forward_runs_only_while_a_term_is_on(tok, tmp_path):
    model = tiny_classifier(dropout=0.0)
    sizes = []
    model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    tr = _trainer(
        tok,
        tmp_path,
        model,
        regularizers=[Term("mmd", weight=0.1, start=0.5)],
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        per_device_target_batch_size=3,
    )
    tr.train()
    # steps 0-1: 2 source micro-batches each; steps 2-3: source (4) and target (3) per micro-batch
    assert sizes == [4, 4, 4, 4] + [4, 3] * 4
    train = [r for r in tr.history if r["split"] == "train"]
    assert [("reg/mmd" in r) for r in train] == [False, False, True, True]
    assert [r["reg_loss"] == 0.0 for r in train] == [True, True, False, False]


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_8bit"])
def test_bitsandbytes_8bit_adamw_trains_on_the_cpu(tok, tmp_path, optim):
    pytest.importorskip("bitsandbytes")
    from peftadapt.train.checkpoint import trainable_state

    model = tiny_classifier(dropout=0.0)
    start = trainable_state(model)
    tr = _trainer(tok, tmp_path, model, optim=optim)
    if optim.startswith("paged_"):
        with pytest.warns(UserWarning, match="non-paged bitsandbytes AdamW8bit"):
            tr.train()
    else:
        tr.train()
    inner = tr.optimizer.optimizer  # Accelerate's wrapper around the factory's optimizer
    assert type(inner).__name__ == "AdamW8bit" and type(inner).__module__.startswith("bitsandbytes")
    assert [g["weight_decay"] for g in tr.optimizer.param_groups] == [0.0, 0.0]  # decay, no-decay groups
    end = trainable_state(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # it stepped
    assert tr.scheduler.optimizer is tr.optimizer  # the schedule drives the wrapper, not its insides
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay reached 0 at the end


def test_unknown_optim_lists_the_four_names(tok, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"training.optim: 'sgd' is not allowed; allowed values: \['adamw_torch', "
        r"'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw_32bit'\]",
    ):
        _trainer(tok, tmp_path, optim="sgd")


def test_discriminators_join_the_factory_optimizer_at_disc_lr(tok, tmp_path):
    from peftadapt.align import build

    torch.manual_seed(0)
    dann = build("dann", in_features=32, hidden_size=8)
    tr = _trainer(
        tok, tmp_path, regularizers=[Term(dann, weight=0.1)], discriminator_learning_rate=0.05, weight_decay=0.01
    )
    tr.train()
    groups = tr.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [0.02, 0.02, 0.05]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in dann.parameters()}
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])


def test_logged_steps_only_and_the_same_numbers(tok, tmp_path):
    every = _trainer(tok, tmp_path / "a", logging_steps=1)
    every.train()
    sparse = _trainer(tok, tmp_path / "b", logging_steps=3)
    sparse.train()
    ta = {r["step"]: r for r in every.history if r["split"] == "train"}
    tb = [r for r in sparse.history if r["split"] == "train"]
    assert [r["step"] for r in tb] == [3, 4]  # every 3rd step and the last
    for r in tb:
        assert r == ta[r["step"]]
