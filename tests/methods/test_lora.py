"""LoRA / DoRA / rsLoRA through peftadapt.wrap, on peft."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

import peftadapt
from tests.conftest import make_tiny, token_batch


def _perturb_lora(model, seed=1):
    """LoRA starts as the identity (B = 0); give B values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_lora_is_identity_at_init_and_counts_exactly():
    base = make_tiny("llama", "causal")
    batch = token_batch()
    ref = _logits(base, batch)
    model = peftadapt.wrap(base, "lora", r=8)
    assert isinstance(model, PeftModel)
    assert torch.equal(_logits(model, batch), ref)
    # default targets for llama: q_proj (32->32) and v_proj (32->16, 2 kv heads x 8), 2 layers
    expected = 2 * (8 * (32 + 32) + 8 * (32 + 16))
    trainable, total = peftadapt.trainable_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("bert", {"query", "value"}),
        ("gpt2", {"c_attn"}),
        ("qwen2", {"q_proj", "v_proj"}),
        ("mistral", {"q_proj", "v_proj"}),
    ],
)
def test_default_targets_per_architecture(kind, expected):
    model = peftadapt.wrap(make_tiny(kind, "causal" if kind != "bert" else "base"), "lora")
    adapted = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")
    }
    assert adapted == expected


def test_all_linear_and_explicit_targets():
    m = peftadapt.wrap(make_tiny("llama", "causal"), "lora", target_modules="all-linear")
    adapted = {
        n.rsplit(".", 1)[-1]
        for n, mod in m.named_modules()
        if hasattr(mod, "lora_A") and not n.endswith(("lora_A", "lora_B"))
    }
    assert adapted == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }  # lm_head excluded by peft
    m = peftadapt.wrap(make_tiny("llama", "causal"), "lora", target_modules=["down_proj"])
    adapted = {
        n.rsplit(".", 1)[-1]
        for n, mod in m.named_modules()
        if hasattr(mod, "lora_A") and not n.endswith(("lora_A", "lora_B"))
    }
    assert adapted == {"down_proj"}


def test_rslora_and_dora():
    m = peftadapt.wrap(make_tiny("llama", "causal"), "rslora", r=4, alpha=8)
    q = m.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    m2 = peftadapt.wrap(make_tiny("llama", "causal"), "lora", r=4, alpha=8)
    assert m2.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)
    base = make_tiny("llama", "causal")
    batch = token_batch()
    ref = _logits(base, batch)
    d = peftadapt.wrap(base, "dora", r=4)
    assert any("lora_magnitude_vector" in n for n, p in d.named_parameters() if p.requires_grad)
    assert torch.allclose(_logits(d, batch), ref, atol=1e-5)  # DoRA is the identity at init too


def test_classifier_head_trains_unless_disabled():
    m = peftadapt.wrap(make_tiny("bert", "seqcls"), "lora")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    m = peftadapt.wrap(make_tiny("bert", "seqcls"), "lora", train_head=False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and not any("classifier" in n for n in trainable)


def test_merge_unload_and_unmerge_match_outputs():
    base = make_tiny("llama", "causal")
    batch = token_batch()
    ref = _logits(base, batch)
    model = peftadapt.wrap(base, "lora", r=4, target_modules="all-linear")
    _perturb_lora(model)
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, ref, atol=1e-3)
    # in-place merge keeps the wrapper and the outputs; unmerge restores the split weights
    peftadapt.merge(model, unload=False)
    assert torch.allclose(_logits(model, batch), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        peftadapt.merge(model, unload=False)
    peftadapt.unmerge(model)
    assert torch.allclose(_logits(model, batch), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        peftadapt.unmerge(model)
    with peftadapt.disabled(model):
        assert torch.allclose(_logits(model, batch), ref, atol=1e-6)
    merged = peftadapt.merge(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not peftadapt.is_wrapped(merged)
    assert torch.allclose(_logits(merged, batch), adapted, atol=1e-5)


def test_disabled_gives_base_outputs_and_named_adapters_switch():
    base = make_tiny("gpt2", "causal")
    batch = token_batch()
    ref = _logits(base, batch)
    model = peftadapt.wrap(base, "lora", r=4)
    _perturb_lora(model, seed=1)
    first = _logits(model, batch)
    with peftadapt.disabled(model):
        assert torch.equal(_logits(model, batch), ref)
    assert torch.equal(_logits(model, batch), first)
    peftadapt.add_adapter(model, "second", "lora", r=2)
    assert peftadapt.adapter_names(model) == ["default", "second"]
    peftadapt.set_adapter(model, "second")
    assert torch.equal(_logits(model, batch), ref)  # the new adapter is still the identity
    _perturb_lora(model, seed=2)  # perturbs both adapters' B
    second = _logits(model, batch)
    peftadapt.set_adapter(model, "default")
    assert not torch.allclose(_logits(model, batch), second, atol=1e-4)
    # only the active adapter is trainable
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        peftadapt.set_adapter(model, "third")
    with pytest.raises(ValueError, match="already exists"):
        peftadapt.add_adapter(model, "second", "lora")


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_bf16_base_trains_adapters_and_head_in_fp32(method):
    base = make_tiny("llama", "seqcls").to(torch.bfloat16)
    model = peftadapt.wrap(base, method)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    batch = token_batch()
    out = model(**batch, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
