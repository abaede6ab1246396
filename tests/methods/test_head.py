"""Head-only training (linear probe) and task-head detection."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from peftadapt import AdaptedModel, Adapter, Head, find_task_head
from peftadapt.methods.base import build_config
from tests.conftest import make_tiny, token_batch


@pytest.mark.parametrize(
    "kind, head, expected",
    [
        ("bert", "seqcls", ["classifier"]),
        ("bert", "tokcls", ["classifier"]),
        ("bert", "base", []),
        ("llama", "seqcls", ["score"]),
        ("llama", "causal", ["lm_head"]),
        ("gpt2", "seqcls", ["score"]),
        ("gpt2", "causal", ["lm_head"]),
        ("qwen2", "base", []),
    ],
)
def test_find_task_head(kind, head, expected):
    assert find_task_head(make_tiny(kind, head)) == expected


def test_find_task_head_distilbert_qa_and_wrapped_models():
    cfg = tf.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    assert find_task_head(tf.AutoModelForSequenceClassification.from_config(cfg)) == ["pre_classifier", "classifier"]
    assert find_task_head(tf.AutoModelForQuestionAnswering.from_config(cfg)) == ["qa_outputs"]
    wrapped = Adapter().apply(make_tiny("bert", "seqcls"))
    assert find_task_head(wrapped) == ["classifier"]  # names relative to the transformers model
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(make_tiny("llama", "seqcls"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_task_head(pm) == ["score"]


def test_head_only_trains_only_the_head():
    torch.manual_seed(0)
    model = make_tiny("bert", "seqcls")
    batch = token_batch()
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = model(**batch).logits
    wrapped = build_config("head").apply(model)
    assert isinstance(wrapped, AdaptedModel)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, ref)  # the copy starts equal to the head
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"model.classifier.heads.default.weight", "model.classifier.heads.default.bias"}
    assert wrapped.get_nb_trainable_parameters()[0] == 32 * 2 + 2
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        wrapped(**batch, labels=labels).loss.backward()
        opt.step()
    for n, p in wrapped.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    with torch.no_grad():
        assert not torch.allclose(wrapped(**batch).logits, ref)
        with wrapped.disable_adapter():  # the original head is untouched
            assert torch.equal(wrapped(**batch).logits, ref)


def test_head_on_causal_lm_unties_lm_head_copy_and_keeps_embeddings():
    model = make_tiny("llama", "causal", tie_word_embeddings=True)
    model.tie_weights()
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    wrapped = Head().apply(model)
    copy = wrapped.model.lm_head.heads["default"].weight
    assert copy is not emb and torch.equal(copy, emb) and copy.requires_grad and not emb.requires_grad
    assert wrapped.get_nb_trainable_parameters()[0] == 128 * 32


def test_head_modules_option_and_errors():
    wrapped = Head(modules=["classifier"]).apply(make_tiny("bert", "seqcls"))
    assert wrapped.get_nb_trainable_parameters()[0] == 66
    with pytest.raises(ValueError, match=r"head module\(s\) \['pooler'\] not found.*top-level modules"):
        Head(modules=["pooler"]).apply(make_tiny("bert", "seqcls"))
    with pytest.raises(ValueError, match="modules must be None or a non-empty list"):
        build_config("head", modules=[])
    with pytest.raises(ValueError, match=r"unknown option.*'train_head'.*valid options: \['modules'\]"):
        build_config("head", train_head=True)


def test_model_without_head_suggests_a_classification_model():
    model = make_tiny("bert", "base")
    with pytest.raises(ValueError, match=r"has no task head.*ForSequenceClassification"):
        Head().apply(model)
    assert not any(getattr(m, "_peftadapt_injected", False) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_head_and_adapter_on_one_model_keep_separate_heads():
    wrapped = Head().apply(make_tiny("bert", "seqcls"))
    wrapped.add_adapter("bottleneck", Adapter(reduction_factor=8))
    assert wrapped.adapter_names == ["default", "bottleneck"]
    heads = wrapped.model.classifier.heads
    assert set(heads) == {"default", "bottleneck"} and heads["default"].weight is not heads["bottleneck"].weight
    wrapped.set_adapter("bottleneck")
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "model.classifier.heads.bottleneck.weight" in trainable
    assert not any("heads.default" in n for n in trainable)
    assert wrapped.get_nb_trainable_parameters()[0] == 4 * (2 * 32 * 4 + 4 + 32) + 66
