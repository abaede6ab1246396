"""bitsandbytes' AVX512 CPU paths: the packed eval layout and the misaligned dequantization kernel.

On a CPU with AVX512-BF16 these fail without ``guard_4bit_cpu``; ``avx512bf16="off"`` builds the
layers as on a CPU without it (``has_avx512bf16`` patched to False), so the checks hold on both kinds.
"""

from __future__ import annotations

import pytest
import torch

import peftadapt
from peftadapt.quant._bnb import dequantize_weight, guard_4bit_cpu, is_bnb_layer
from tests.conftest import token_batch

bnb = pytest.importorskip("bitsandbytes")
NF4 = torch.tensor(
    [
        -1.0,
        -0.6962,
        -0.5251,
        -0.3949,
        -0.2844,
        -0.1848,
        -0.0911,
        0.0,
        0.0796,
        0.1609,
        0.2461,
        0.3379,
        0.4407,
        0.5626,
        0.7230,
        1.0,
    ]
)
NF4_HALF_GAP = float((NF4[1:] - NF4[:-1]).max() / 2)  # 0.1519: no weight is further from its code


@pytest.fixture(params=["native", "off"])
def avx512bf16(request, monkeypatch):
    if request.param == "off":
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    return request.param


def _linear4bit(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f) * 0.02
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=True, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4", device="meta"
    )
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to(
        "cpu"
    )
    layer.bias = torch.nn.Parameter(torch.randn(out_f) * 0.01, requires_grad=False)
    return layer, w


@pytest.mark.parametrize("shape", [(32, 32), (64, 32), (16, 96), (32, 64), (64, 128)])
def test_4bit_layer_dequantizes_and_multiplies_what_it_stores(avx512bf16, shape):
    layer, w = _linear4bit(*shape)
    guard_4bit_cpu(layer).eval()
    assert layer.support_avx512bf16_for_cpu is False
    deq = dequantize_weight(layer)
    # NF4 with blocksize 64 over the flattened weight: each value within half a code gap of its block's absmax
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = ((deq - w).reshape(-1, 64).abs() / absmax).max()
    assert 1e-3 < err <= NF4_HALF_GAP + 1e-4
    # peft / transformers dequantize through bitsandbytes.functional: the same weight
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), deq)
    codes = layer.weight.data.clone()
    x = torch.randn(3, shape[1])
    want = x @ deq.T + layer.bias
    with torch.no_grad():  # eval + no grad: where bitsandbytes would pack the weight on an AVX512-BF16 CPU
        got_eval = layer(x)
    assert torch.equal(layer.weight.data, codes)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    layer.train()
    xg = x.clone().requires_grad_()
    got_train = layer(xg)
    got_train.sum().backward()
    assert torch.allclose(got_eval, want, atol=1e-5) and torch.allclose(got_train, want, atol=1e-5)
    assert torch.allclose(xg.grad, deq.sum(0).expand_as(x), atol=1e-5)


def test_an_evaluation_pass_leaves_a_wrapped_user_quantized_model_training_the_same(avx512bf16, saved_tiny):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hidden 64, heads of 16: every base layer can be packed for the AVX512-BF16 kernel
    folder, _ = saved_tiny("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    batch = token_batch()

    def model_and_grads(evaluate_first: bool):
        base = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qconfig, device_map="cpu", dtype=torch.float32
        )
        torch.manual_seed(0)
        model = peftadapt.wrap(base, "lora", r=4, target_modules=["q_proj", "v_proj"])
        with torch.no_grad():  # B != 0, so the A matrices get a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.1)
        layers = [m for m in model.modules() if is_bnb_layer(m)]
        assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in model.state_dict().items() if "lora" not in k}
        return grads, state

    grads_ref, state_ref = model_and_grads(False)
    grads, state = model_and_grads(True)
    assert grads.keys() == grads_ref.keys() and len(grads) == 8
    for n, g in grads_ref.items():  # layer 0's adapters get their gradient through layer 1's 4-bit layers
        assert grads[n] is not None and g.abs().sum() > 0 and torch.allclose(grads[n], g, atol=1e-6), n
    assert state.keys() == state_ref.keys()
    for k, v in state_ref.items():  # an evaluation pass does not change what a checkpoint stores
        assert torch.equal(state[k], v), k
