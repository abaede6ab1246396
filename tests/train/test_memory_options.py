"""Single-GPU memory options of a run: ``model.attn_implementation``, ``training.gradient_checkpointing``
with ``gradient_checkpointing_kwargs`` (non-reentrant by default). Checkpointing must give the same
losses and adapter weights as the plain run, on a peft-wrapped and on a 4-bit model, and the
recomputation must really happen (each layer's attention runs twice per micro-batch)."""

from __future__ import annotations

import pytest
import torch

from peftadapt.core.hf import check_attn_implementation
from peftadapt.quant.prepare import checkpoint_kwargs, is_checkpointing
from peftadapt.train import Trainer
from peftadapt.train.schema import load_run_config

from ..conftest import make_tiny
from .conftest import VOCAB

TEXTS = ["the cat sat on the mat and the dog sat on the log", "a b c d e f g h i j", "one two three four five"] * 4


def _run_file(tmp_path, model: dict | None = None, training: dict | None = None) -> dict:
    return {
        "model": {"path": str(tmp_path), "task": "causal_lm", **(model or {})},
        "data": {"source": {"path": str(tmp_path / "x.jsonl")}},
        "training": training or {},
    }


def test_run_file_defaults_and_checks(tmp_path):
    run = load_run_config(_run_file(tmp_path))
    assert run.model.attn_implementation == "sdpa"
    assert run.training.gradient_checkpointing is False
    assert run.training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    run = load_run_config(
        _run_file(
            tmp_path,
            {"attn_implementation": "eager"},
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        )
    )
    assert run.model.attn_implementation == "eager" and run.training.gradient_checkpointing_kwargs["use_reentrant"]
    with pytest.raises(ValueError, match=r"attn_implementation.*flash_attention_2"):
        load_run_config(_run_file(tmp_path, {"attn_implementation": "flash"}))
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs: unknown option 'reentrant'"):
        load_run_config(_run_file(tmp_path, training={"gradient_checkpointing_kwargs": {"reentrant": False}}))
    with pytest.raises(TypeError, match="use_reentrant: expected bool"):
        checkpoint_kwargs({"use_reentrant": "no"})
    assert checkpoint_kwargs({"preserve_rng_state": False}) == {"preserve_rng_state": False, "use_reentrant": False}


def test_flash_attention_2_needs_the_package_and_cuda(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    with pytest.raises(ValueError, match=r"model.attn_implementation: flash_attention_2 needs the flash-attn package"):
        check_attn_implementation("flash_attention_2", "cuda", where="model.attn_implementation")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    with pytest.raises(ValueError, match="runs on a CUDA GPU only, not on cpu; use sdpa"):
        check_attn_implementation("flash_attention_2", "cpu")
    assert check_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"
    assert check_attn_implementation("eager") == "eager"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_runner_passes_attn_implementation_to_from_pretrained(tmp_path, attn):
    from peftadapt.train.runner import load_base_model

    make_tiny("llama", "causal").save_pretrained(tmp_path)
    run = load_run_config(_run_file(tmp_path, {"attn_implementation": attn}))
    model = load_base_model(run.model, None)
    assert model.config._attn_implementation == attn


def _tiny_lora(quantized: bool):
    import peftadapt

    if quantized:
        from peftadapt.quant import build_quantized

        from ..conftest import _tiny_config

        cfg = _tiny_config("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128)
        base = build_quantized(cfg, bits=4, device="cpu", seed=0, gradient_checkpointing=False)
    else:
        base = make_tiny("llama", "causal", vocab_size=VOCAB)
    torch.manual_seed(0)
    model = peftadapt.wrap(base, "lora", r=4, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # LoRA B starts at 0: move it so A gets a gradient from step 1
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def _train(tok, tmp_path, quantized: bool, ckpt: dict | None):
    model = _tiny_lora(quantized)
    layer_calls = [0]
    # transformers checkpoints a decoder layer's forward (its own hooks run once); the modules inside run twice
    layers = [m for n, m in model.named_modules() if type(m).__name__ == "LlamaAttention"]
    for m in layers:
        m.register_forward_pre_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
    opts = {"gradient_checkpointing": ckpt is not None}
    if ckpt is not None:
        opts["gradient_checkpointing_kwargs"] = ckpt
    tr = Trainer(
        model,
        tok,
        TEXTS,
        task="causal_lm",
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        max_length=16,
        max_grad_norm=None,
        learning_rate=0.01,
        disable_tqdm=True,
        plot=False,
        **opts,
    )
    tr.train()
    assert is_checkpointing(model) == (ckpt is not None)
    losses = [r["loss"] for r in tr.history if "loss" in r]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, layer_calls[0] / (3 * len(layers))


@pytest.mark.parametrize("quantized", [False, True], ids=["peft-lora", "4bit-lora"])
def test_checkpointing_trains_like_the_plain_run(tok, tmp_path, quantized):
    plain_loss, plain_w, plain_calls = _train(tok, tmp_path / "plain", quantized, None)
    assert plain_calls == 1  # each layer runs once per step without checkpointing
    variants = [{"use_reentrant": False}, {"use_reentrant": True}] if not quantized else [{"use_reentrant": False}]
    for kw in variants:
        loss, w, calls = _train(tok, tmp_path / str(kw["use_reentrant"]), quantized, kw)
        assert calls == 2, kw  # forward + the recomputation in backward
        assert len(loss) == 3 and loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6), kw
        assert plain_loss[-1] < plain_loss[0]  # it trains
        for n in plain_w:
            torch.testing.assert_close(w[n], plain_w[n], atol=1e-5, rtol=1e-4, msg=f"{kw} {n}")


def test_build_quantized_takes_attn_implementation():
    from peftadapt.quant import build_quantized

    from ..conftest import _tiny_config

    cfg = _tiny_config("llama", hidden_size=64, intermediate_size=128)
    model = build_quantized(cfg, bits=4, device="cpu", attn_implementation="eager", gradient_checkpointing=False)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        build_quantized(cfg, bits=4, device="cpu", attn_implementation="flash")
