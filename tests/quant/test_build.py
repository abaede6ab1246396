"""build_quantized: any architecture from a config, built directly in 4/8 bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peftadapt.quant import build_quantized, quant_bits, tensor_bytes

# ~100 M parameters (Llama architecture, GQA): 402 MB in fp32, ~95 MB in NF4 + fp32 embeddings.
_CONFIG = dict(
    vocab_size=8000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=14,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=256,
)

_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, transformers, bitsandbytes, peft
    from peftadapt.quant import build_quantized, tensor_bytes

    warnings.simplefilter("ignore")

    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    # VmHWM is this process's own peak RSS. Not ru_maxrss: Linux carries that
    # high-water mark across fork + exec, so it would include the parent's
    # (pytest's) RSS at spawn time.
    rss_kb = lambda: status_kb("VmRSS")

    cfg = transformers.LlamaConfig(**json.loads(sys.argv[1]))
    base = rss_kb()
    model = build_quantized(cfg, bits=4, device="cpu")
    peak = status_kb("VmHWM")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(1, cfg.vocab_size, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # B gets the first gradient (A is multiplied by B = 0)
    grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    print(json.dumps({"growth": (peak - base) * 1024, "bytes": sum(tensor_bytes(model).values()),
                      "loss": loss.item(), "grads": grads}))
    """
)


def _n_params(cfg: dict) -> int:
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * V * d + d


def test_build_peak_memory_is_about_the_quantized_size():
    # glibc: serve large blocks by mmap and give freed memory back, so RSS tracks what is alive rather than
    # what the allocator caches (its dynamic mmap threshold otherwise keeps freed weights resident at random)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(_CONFIG)], capture_output=True, text=True, env=env, timeout=900
    )  # quantizing ~90 M weights on the CPU; generous for a shared machine
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    fp32_bytes = 4 * _n_params(_CONFIG)
    assert fp32_bytes > 400e6
    # the built model really holds its bytes, and building it never held the fp32 model
    assert 0.9 * res["bytes"] < res["growth"] < 0.5 * fp32_bytes, (res, fp32_bytes)
    assert res["bytes"] < 0.25 * fp32_bytes
    # and it trains: forward + LoRA backward, every adapted layer gets a gradient
    assert torch.isfinite(torch.tensor(res["loss"]))
    assert len(res["grads"]) == 2 * _CONFIG["num_hidden_layers"] and all(g > 0 for g in res["grads"])


@pytest.mark.parametrize("bits", [4, 8])
def test_build_small_qwen2_matches_what_from_pretrained_marks(bits):
    import peft
    import transformers as tf

    cfg = tf.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = build_quantized(cfg, bits=bits, device="cpu", seed=0)
    assert quant_bits(model) == bits
    assert getattr(model, f"is_loaded_in_{bits}bit") is True
    assert type(model.lm_head).__name__ == "Linear"  # the head stays unquantized
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and not q.bias.requires_grad  # Qwen2 q/k/v biases survive
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    n_linear = 2 * 7
    n_quant = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    assert n_quant == n_linear
    # peft recognises the layers as quantized and puts its QLoRA layers on them
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    assert tensor_bytes(model)["quantized"] > 0


def test_build_checks_its_arguments():
    with pytest.raises(TypeError, match="PretrainedConfig"):
        build_quantized({"hidden_size": 8})
    import transformers as tf

    with pytest.raises(ValueError, match="bits=2"):
        build_quantized(tf.LlamaConfig(), bits=2)
