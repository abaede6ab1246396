"""quant_storage (bnb_4bit_quant_storage): the packed 4-bit weights stored as bf16, as FSDP + QLoRA needs."""

from __future__ import annotations

import pytest
import torch

import peftadapt
from peftadapt.quant import load_quantized
from peftadapt.quant._bnb import dequantize_weight
from tests.conftest import token_batch


def test_bf16_storage_keeps_the_same_4bit_codes_and_trains(saved_tiny):
    folder, ref = saved_tiny("llama")
    plain = load_quantized(folder, bits=4, device="cpu", prepare=False, dtype="bf16")
    model = load_quantized(folder, bits=4, device="cpu", quant_storage="bf16")
    q, q0 = model.model.layers[0].self_attn.q_proj, plain.model.layers[0].self_attn.q_proj
    assert q0.weight.dtype == torch.uint8
    assert q.weight.dtype == torch.bfloat16 and type(q.weight).__name__ == "Params4bit"
    # the same packed bytes, viewed as 2-byte elements: half as many elements, same memory
    assert q.weight.numel() * 2 == q0.weight.numel()
    assert torch.equal(q.weight.data.view(torch.uint8).flatten(), q0.weight.data.flatten())
    assert torch.equal(dequantize_weight(q), dequantize_weight(q0))
    # dtype follows a float storage (one dtype for FSDP to shard): embeddings and norms in bf16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16

    batch = token_batch()
    with torch.no_grad():
        got, want = model(**batch).logits.float(), ref(**batch).logits
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.25 * want.abs().max()

    wrapped = peftadapt.wrap(model, "lora", r=4)
    wrapped.train()
    lora = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    labels = batch["input_ids"]
    losses = []
    for _ in range(3):
        loss = wrapped(**batch, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # it trains through the bf16-stored 4-bit layers
    assert q.weight.dtype == torch.bfloat16  # the stored weights are untouched by training


def test_quant_storage_options_are_checked(saved_tiny):
    folder, _ = saved_tiny("llama")
    with pytest.raises(ValueError, match=r"quant_storage applies to 4-bit only \(bits=4\); got bits=8"):
        load_quantized(folder, bits=8, quant_storage="bf16")
    with pytest.raises(ValueError, match=r"unknown quant_storage 'int4'; valid: \['uint8', 'bf16', 'fp16', 'fp32'\]"):
        load_quantized(folder, bits=4, quant_storage="int4")
    with pytest.warns(UserWarning, match=r"quant_storage=torch.bfloat16 differs from dtype=torch.float32"):
        m = load_quantized(folder, bits=4, quant_storage=torch.bfloat16, dtype="fp32", device="cpu", prepare=False)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight.dtype == torch.float32
    cfg = peftadapt.quant.bnb_config(4, quant_storage="fp16")
    assert cfg.bnb_4bit_quant_storage == torch.float16
