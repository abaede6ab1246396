"""load_quantized and prepare_for_kbit_training on tiny Llama / Qwen2 models, on the CPU."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import peftadapt
from peftadapt.quant import load_quantized, prepare_for_kbit_training, quant_bits, tensor_bytes
from peftadapt.quant._bnb import dequantize_weight
from tests.conftest import token_batch


def test_import_peftadapt_does_not_import_bitsandbytes():
    code = "import sys, peftadapt, peftadapt.quant; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("bits,quant_type,double_quant", [(4, "nf4", True), (4, "fp4", False), (8, None, None)])
def test_load_quantizes_the_saved_weights(saved_tiny, bits, quant_type, double_quant):
    folder, ref = saved_tiny("llama")
    model = load_quantized(folder, bits=bits, quant_type=quant_type, double_quant=double_quant, device="cpu")
    assert quant_bits(model) == bits
    q = model.model.layers[0].self_attn.q_proj
    if bits == 4:
        assert q.weight.quant_state.quant_type == quant_type
        assert bool(q.weight.quant_state.nested) is double_quant
        assert q.compute_dtype == torch.float32  # the CPU default
    w_ref = ref.model.layers[0].self_attn.q_proj.weight
    err = (dequantize_weight(q) - w_ref).abs().max() / w_ref.abs().max()
    # a real quantization of *these* weights: close, but not exact
    assert 1e-4 < err < (0.2 if bits == 4 else 0.02)
    assert model.lm_head.weight.dtype == torch.float32 and type(model.lm_head).__name__ == "Linear"
    batch = token_batch()
    with torch.no_grad():
        got, want = model(**batch).logits, ref(**batch).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.2 * want.abs().max()


def test_load_options_are_checked(saved_tiny, tmp_path):
    folder, _ = saved_tiny("llama")
    with pytest.raises(ValueError, match=r"bits=3.*valid: \[4, 8\]"):
        load_quantized(folder, bits=3)
    with pytest.raises(ValueError, match=r"quant_type='int4'.*nf4"):
        load_quantized(folder, bits=4, quant_type="int4")
    with pytest.raises(ValueError, match="4-bit only"):
        load_quantized(folder, bits=8, quant_type="nf4")
    with pytest.raises(ValueError, match="does not exist"):
        load_quantized(tmp_path / "nope", bits=4)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        load_quantized(folder, task="regression")
    with pytest.raises(ValueError, match="unknown compute_dtype 'fp8'"):
        load_quantized(folder, compute_dtype="fp8")


def test_prepare_keeps_frozen_params_in_their_dtype_unlike_peft(saved_tiny):
    """Our preparation leaves embeddings / norms / lm_head in bf16; peft's upcasts them all to fp32."""
    from peft import prepare_model_for_kbit_training

    folder, _ = saved_tiny("qwen2")
    ours = load_quantized(folder, bits=4, dtype="bf16", device="cpu")  # prepare=True by default
    theirs = load_quantized(folder, bits=4, dtype="bf16", device="cpu", prepare=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_model_for_kbit_training(theirs)

    float_params = {n: p for n, p in ours.named_parameters() if p.is_floating_point()}
    assert "lm_head.weight" in float_params and "model.norm.weight" in float_params
    assert all(p.dtype == torch.bfloat16 for p in float_params.values())
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_activation_checkpointing if hasattr(ours, "is_activation_checkpointing") else True
    assert {p.dtype for n, p in theirs.named_parameters() if n in float_params} == {torch.float32}

    n_float = sum(p.numel() for p in float_params.values())
    saved = tensor_bytes(theirs)["float_params"] - tensor_bytes(ours)["float_params"]
    assert saved == 2 * n_float  # 2 bytes per non-quantized parameter

    # ...and it still trains: a LoRA step with bf16 storage and fp32 compute
    wrapped = peftadapt.wrap(ours, "lora", r=4, target_modules="all-linear")
    lora = [p for n, p in wrapped.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    wrapped.train()
    batch = token_batch()
    loss = wrapped(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)


def _lora_grads(folder, checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_quantized(folder, bits=4, device="cpu", gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    batch = token_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lora_gradients(saved_tiny):
    folder, _ = saved_tiny("llama")
    with_ckpt, without = _lora_grads(folder, True), _lora_grads(folder, False)
    assert with_ckpt.keys() == without.keys() and len(with_ckpt) == 8
    for n in with_ckpt:
        assert with_ckpt[n].abs().sum() > 0, n  # the first layer's adapters get gradients too
        torch.testing.assert_close(with_ckpt[n], without[n], rtol=1e-4, atol=1e-6)


def test_prefix_tuning_turns_checkpointing_off_with_a_warning(saved_tiny):
    from peft import PrefixTuningConfig, get_peft_model

    from peftadapt.quant import check_prefix_compat
    from peftadapt.quant.prepare import is_checkpointing

    folder, _ = saved_tiny("llama")
    model = load_quantized(folder, bits=4, device="cpu")
    assert is_checkpointing(model)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.warns(UserWarning, match="turned OFF"):
        check_prefix_compat(model)
    assert not is_checkpointing(model)
    wrapped = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    wrapped.train()
    batch = token_batch()
    wrapped(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prefix_compat(model)  # nothing to do the second time: no warning


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_prepare_on_a_wrapped_classifier_trains_adapters_and_head_in_fp32(saved_tiny, method):
    """wrap() casts the head copy (created in the base dtype) to fp32; prepare keeps it so and lets it run."""
    folder, _ = saved_tiny("llama", "seqcls")
    model = load_quantized(folder, bits=4, dtype="bf16", task="seqcls", device="cpu", num_labels=2)
    wrapped = peftadapt.wrap(model, method)
    named = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    trainable = list(named.values())
    head = [p for n, p in named.items() if "score" in n]
    assert len(head) == 1 and head[0].dtype == torch.float32  # wrap() trains heads in fp32 on a half-precision base
    prepare_for_kbit_training(wrapped)
    assert [p for p in wrapped.parameters() if p.requires_grad] == trainable  # nothing frozen
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in wrapped.parameters() if not p.requires_grad and p.is_floating_point()} == {torch.bfloat16}
    wrapped.train()
    out = wrapped(**token_batch(), labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16  # the fp32 head hands back the stream's dtype
    assert all(p.grad is not None for p in trainable)
    assert head[0].dtype == torch.float32 and head[0].grad.abs().sum() > 0
