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


@pytest.mark.parametrize("kind,head", [("llama", "causal"), ("qwen2", "causal"), ("qwen2", "seqcls")])
def test_prefix_roundtrip_on_gqa_models(kind, head, tmp_path):
    """Grouped-query attention (2 kv heads of 4): peft saves token_dim = head_dim * kv heads (16), not
    hidden_size (32); load used to refuse its own adapter."""
    model = peftadapt.wrap(make_tiny(kind, head), "prefix", num_virtual_tokens=3)
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].token_dim == 16
    assert torch.equal(_logits(peftadapt.load(make_tiny(kind, head), tmp_path), batch), want)
    assert torch.equal(_logits(PeftModel.from_pretrained(make_tiny(kind, head), str(tmp_path)), batch), want)
    with pytest.raises(ValueError, match="token_dim saved 16 vs this"):  # a different model still fails
        peftadapt.load(make_tiny(kind, head, num_key_value_heads=4), tmp_path)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind,head", [("bert", "seqcls"), ("llama", "causal")])
def test_prefix_loads_trainable_and_a_step_changes_it(kind, head, projection, tmp_path):
    """peft loads prompt learning for inference only ("Cannot set a prompt learning adapter to
    trainable"); peftadapt.load(..., is_trainable=True) continues training the saved prefix."""
    opts = {"prefix_projection": True, "projection_hidden_size": 8} if projection else {}
    model = peftadapt.wrap(make_tiny(kind, head), "prefix", num_virtual_tokens=3, **opts)
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path / "a")
    frozen = peftadapt.load(make_tiny(kind, head), tmp_path / "a")
    assert peftadapt.trainable_parameters(frozen)[0] == 0  # inference: the prompt is frozen too

    loaded = peftadapt.load(make_tiny(kind, head), tmp_path / "a", is_trainable=True)
    # same function, also when the MLP is gone (its output was computed per batch row: round-off)
    torch.testing.assert_close(_logits(loaded, batch), want, atol=1e-6, rtol=0)
    trainable = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in trainable)
    assert (head == "seqcls") == any("modules_to_save" in n for n in trainable)
    prefix = loaded.prompt_encoder["default"].embedding.weight.detach().clone()
    loaded.train()
    labels = torch.tensor([0, 1, 0]) if head == "seqcls" else batch["input_ids"]
    loaded(**batch, labels=labels).loss.backward()
    torch.optim.SGD(list(trainable.values()), lr=0.5).step()
    loaded.eval()
    assert not torch.equal(loaded.prompt_encoder["default"].embedding.weight, prefix)
    after = _logits(loaded, batch)
    assert not torch.allclose(after, want)
    loaded.save_pretrained(tmp_path / "b")  # and what it trained saves and reloads
    assert torch.equal(_logits(peftadapt.load(make_tiny(kind, head), tmp_path / "b"), batch), after)
