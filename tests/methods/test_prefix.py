"""Prefix tuning through peftadapt.wrap, on peft (classifiers, causal LMs, backbones)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import peftadapt
from tests.conftest import make_tiny, token_batch
from tests.methods.test_lora import _logits


@pytest.mark.parametrize(
    "kind,head",
    [("bert", "seqcls"), ("gpt2", "seqcls"), ("llama", "causal"), ("qwen2", "seqcls"), ("mistral", "causal")],
)
def test_prefix_changes_outputs_trains_prefix_and_head_only(kind, head):
    base = make_tiny(kind, head)
    batch = token_batch()
    ref = _logits(base, batch)
    model = peftadapt.wrap(base, "prefix", num_virtual_tokens=3)
    out = _logits(model, batch)
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref, atol=1e-4)  # the (random) prefix reaches the attention
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kv_heads = getattr(base.config, "num_key_value_heads", None) or 4
    expect_prefix = 3 * 2 * 2 * (32 // 4) * kv_heads  # tokens x layers x (k, v) x kv width (GQA: fewer kv heads)
    assert sum(p.numel() for n, p in model.named_parameters() if "prompt_encoder" in n) == expect_prefix
    if head == "seqcls":
        assert any(n.split(".")[-3] in ("classifier", "score") or "modules_to_save" in n for n in trainable)
    assert all("prompt_encoder" in n or "modules_to_save" in n for n in trainable)
    with peftadapt.disabled(model):  # base outputs, original head included
        assert torch.equal(_logits(model, batch), ref)
    assert torch.equal(_logits(model, batch), out)


def test_prefix_roundtrip_peftadapt_and_plain_peft(tmp_path):
    model = peftadapt.wrap(
        make_tiny("bert", "seqcls"), "prefix", num_virtual_tokens=4, prefix_projection=True, projection_hidden_size=16
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(peftadapt.load(make_tiny("bert", "seqcls"), tmp_path), batch), want)
    assert torch.equal(_logits(PeftModel.from_pretrained(make_tiny("bert", "seqcls"), str(tmp_path)), batch), want)


def test_prefix_for_other_depth_is_refused(tmp_path):
    peftadapt.wrap(make_tiny("llama", "causal"), "prefix", num_virtual_tokens=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers saved 2 vs this llama model's 3"):
        peftadapt.load(make_tiny("llama", "causal", num_hidden_layers=3), tmp_path)


def test_prefix_refusals():
    import transformers as tf

    distil = tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    with pytest.raises(ValueError, match="prefix tuning cannot be applied to a 'distilbert' model"):
        peftadapt.wrap(distil, "prefix")
    gc = make_tiny("llama", "causal")
    gc.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match="gradient checkpointing has been turned OFF"):
        wrapped = peftadapt.wrap(gc, "prefix")
    assert not wrapped.get_base_model().is_gradient_checkpointing
    batch = token_batch()
    wrapped.train()
    wrapped(**batch, labels=batch["input_ids"]).loss.backward()  # trains with checkpointing off
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftadapt.wrap(make_tiny(), "prefix", num_virtual_tokens=0)


def test_prefix_classifier_saved_under_other_transformers_route_loads(tmp_path):
    """transformers 4.x saves classifier prefixes as SEQ_CLS, 5.x (through us) as
    FEATURE_EXTRACTION + modules_to_save; peftadapt.load reads either here."""
    import json

    model = peftadapt.wrap(make_tiny("bert", "seqcls"), "prefix", num_virtual_tokens=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if cfg["task_type"] == "FEATURE_EXTRACTION":
        cfg.update(task_type="SEQ_CLS", modules_to_save=None)
    else:
        cfg.update(task_type="FEATURE_EXTRACTION", modules_to_save=["classifier"])
    cfg_file.write_text(json.dumps(cfg))
    assert torch.equal(_logits(peftadapt.load(make_tiny("bert", "seqcls"), tmp_path), batch), want)
