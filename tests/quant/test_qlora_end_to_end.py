"""QLoRA end to end on the CPU: load 4-bit, wrap, train with CORAL, save, load, merge."""

from __future__ import annotations

import pytest
import torch

import peftadapt
from peftadapt.quant import load_quantized, make_optimizer, merge_quantized
from tests.conftest import token_batch


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_load_wrap_train_with_coral_save_load_merge(saved_tiny, tmp_path, kind):
    folder, fp32_model = saved_tiny(kind, initializer_range=0.2)  # wider init: a loss that moves in 5 steps
    model = load_quantized(folder, bits=4, device="cpu")
    model = peftadapt.wrap(model, "lora", r=8, target_modules="all-linear")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    source, target = token_batch(seed=1, batch=4), token_batch(seed=2, batch=4)
    coral = peftadapt.align.build("coral")  # paper scale 1 / (4 d^2)
    opt = make_optimizer(trainable, "adamw_8bit", lr=1e-2)
    tap = peftadapt.FeatureTap(model, pooling="mean")
    before = [p.detach().clone() for p in trainable]
    task_losses, coral_losses = [], []
    model.train()
    for _ in range(5):
        out = model(**source, labels=source["input_ids"])
        fs = tap.pooled(source["attention_mask"])
        model(**target)
        ft = tap.pooled(target["attention_mask"])
        align = coral(fs, ft)
        (out.loss + 10.0 * align).backward()
        opt.step()
        opt.zero_grad()
        task_losses.append(out.loss.item())
        coral_losses.append(align.item())
    tap.remove()
    assert all(torch.isfinite(torch.tensor(task_losses + coral_losses)))
    assert task_losses[-1] < task_losses[0] - 1.0, task_losses
    assert 0 < coral_losses[-1] < 0.6 * coral_losses[0], coral_losses  # the alignment term is optimized too
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))

    eval_batch = token_batch(seed=3)
    adapted = _logits(model, eval_batch)
    peftadapt.save(model, tmp_path / "adapter")

    # load the adapter onto a freshly loaded 4-bit base: the same model
    reloaded = peftadapt.load(load_quantized(folder, bits=4, device="cpu"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, eval_batch), adapted, atol=1e-5, rtol=0)

    # merge into the dequantized base, export fp32: matches the adapted 4-bit model to fp32 round-off
    merged = merge_quantized(reloaded, dtype="fp32")
    assert type(merged).__name__.endswith("ForCausalLM")
    assert not any(type(m).__name__ in ("Linear4bit", "LoraLayer") for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    merged_logits = _logits(merged, eval_batch)
    assert (merged_logits - adapted).abs().max() < 1e-4

    # a round trip through save_pretrained gives the same dense model
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(dense, eval_batch), merged_logits, atol=1e-6, rtol=0)

    # merging the same adapter into the separately held fp32 weights gives a *different* model
    wrong = peftadapt.load(fp32_model, tmp_path / "adapter")
    wrong_logits = _logits(peftadapt.merge(wrong), eval_batch)
    assert (wrong_logits - adapted).abs().max() > 100 * (merged_logits - adapted).abs().max()


def _adapted_4bit(folder, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_quantized(folder, bits=4, device="cpu")
    return get_peft_model(
        base, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora)
    )


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2), ("fp16", 5e-3)])
def test_merged_export_dtype_and_tolerance(saved_tiny, dtype, tol):
    folder, _ = saved_tiny("llama")
    model = _adapted_4bit(folder, r=4, lora_alpha=8)
    batch = token_batch()
    ref = _logits(model, batch)
    merged = merge_quantized(model, dtype=dtype)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {p.dtype for p in merged.parameters()} == {want}
    rel = (_logits(merged, batch) - ref).abs().max() / ref.abs().max()
    assert rel < tol


def test_merge_dora_and_8bit(saved_tiny):
    folder, _ = saved_tiny("llama")
    batch = token_batch()
    dora = _adapted_4bit(folder, r=4, lora_alpha=8, use_dora=True)
    ref = _logits(dora, batch)
    assert (_logits(merge_quantized(dora, dtype="fp32"), batch) - ref).abs().max() < 1e-4

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    eight = get_peft_model(
        load_quantized(folder, bits=8, device="cpu"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    ref = _logits(eight, batch)
    # LLM.int8() also quantizes the activations, the merged dense model does not: a looser match
    rel = (_logits(merge_quantized(eight, dtype="fp32"), batch) - ref).abs().max() / ref.abs().max()
    assert rel < 0.03


def test_merge_refuses_what_cannot_be_merged(saved_tiny):
    from peft import PrefixTuningConfig, get_peft_model

    from peftadapt.quant import check_prefix_compat

    folder, _ = saved_tiny("llama")
    with pytest.warns(UserWarning):
        base = check_prefix_compat(load_quantized(folder, bits=4, device="cpu"))
    prefix = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_quantized(prefix)
    adapter = peftadapt.wrap(load_quantized(folder, bits=4, device="cpu"), "adapter")
    with pytest.raises(ValueError, match="not linear"):
        merge_quantized(adapter)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        merge_quantized(adapter, dtype="int8")


def test_dora_on_a_cpu_8bit_base_is_refused_with_the_ways_out(saved_tiny):
    """peft + bitsandbytes fail at the second DoRA training step on a CPU 8-bit base (the 8-bit
    scales are gone); wrap refuses up front. The failure itself is checked, so this test notices
    when a new peft / bitsandbytes fixes it and the refusal can go."""
    from peft import LoraConfig, get_peft_model

    import peftadapt

    folder, _ = saved_tiny("llama")
    batch = token_batch()
    with pytest.raises(ValueError, match=r"DoRA on an 8-bit base.*4-bit base.*plain LoRA"):
        peftadapt.wrap(load_quantized(folder, bits=8, device="cpu"), "dora", r=4)
    plain = get_peft_model(
        load_quantized(folder, bits=8, device="cpu", prepare=False),
        LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    )
    plain.train()
    plain(**batch, labels=batch["input_ids"]).loss.backward()  # the first step works
    with pytest.raises(AttributeError):
        plain(**batch, labels=batch["input_ids"]).loss.backward()
    # LoRA on the same 8-bit base trains step after step
    lora = peftadapt.wrap(load_quantized(folder, bits=8, device="cpu"), "lora", r=4)
    for _ in range(2):
        lora(**batch, labels=batch["input_ids"]).loss.backward()
