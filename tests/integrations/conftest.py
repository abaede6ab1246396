"""Helpers for the add_alignment tests: tokenized toy sentiment data, HF / TRL trainers on tiny models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ..conftest import make_tiny
from ..train.conftest import VOCAB, sentiment, tiny_classifier  # noqa: F401  (re-exported for the tests)


def tokenized(tok: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` labeled toy-sentiment examples tokenized for a transformers Trainer."""
    texts, labels = sentiment(n, seed)
    enc = tok(texts)
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(n)]


def perturb_lora(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """LoRA B starts at 0; move it so both LoRA matrices get a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def hf_options(out: str, **kw: Any) -> dict[str, Any]:
    """The TrainingArguments options every plugin test shares (tiny, CPU, deterministic), with ``kw``."""
    opts: dict[str, Any] = {
        "output_dir": out,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "learning_rate": 1e-2,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    opts.update(kw)
    return opts


def hf_args(out: str, **kw: Any) -> Any:
    import transformers as tf

    return tf.TrainingArguments(**hf_options(out, **kw))


def tiny_llama_lora(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama causal LM (MiniLM's vocabulary) with LoRA on q/v (peft), no dropout."""
    from peft import LoraConfig, get_peft_model

    m = make_tiny("llama", "causal", seed=seed, vocab_size=VOCAB)
    torch.manual_seed(seed)
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


@pytest.fixture(scope="session")
def tok(minilm_tokenizer: Any) -> Any:
    return minilm_tokenizer


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    """transformers' Trainer fixes Accelerate's process-wide state (mixed precision, device);
    reset it after each test so later tests build their own Accelerator."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
