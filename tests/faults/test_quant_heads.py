"""Issue 18: a task head stays unquantized under ``load_quantized`` (and ``model.quantize``), so
LoRA can train it: a fresh head (the packaged MiniLM has none) and a saved one (a BERT classifier)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("bitsandbytes")

import peftadapt
from peftadapt.core.hf import unwrap

from ..conftest import make_tiny


def _lora_step(model: nn.Module) -> nn.Module:
    """Wrap with LoRA, one forward + backward; return the head of the wrapped model's base."""
    wrapped = peftadapt.wrap(model, "lora", r=4)
    wrapped.train()
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        out = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    head_grads = [n for n, p in wrapped.named_parameters() if "classifier" in n and p.grad is not None]
    lora_grads = [n for n, p in wrapped.named_parameters() if "lora_" in n and p.grad is not None]
    assert head_grads and lora_grads  # the head's trained copy and the LoRA factors both learn
    return unwrap(wrapped).classifier


@pytest.mark.parametrize("bits", [4, 8])
def test_minilm_without_head_keeps_a_float_head(minilm_dir, bits):
    model = peftadapt.load_quantized(minilm_dir, bits=bits, task="seqcls", num_labels=2)
    head = unwrap(model).classifier
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    trained = _lora_step(model)
    # peft trains a copy of the head (modules_to_save); both copies stay float nn.Linear
    leaves = [m for m in trained.modules() if not list(m.children())]
    assert len(leaves) == 2 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in leaves)


def test_saved_bert_classifier_head_is_not_quantized(tmp_path):
    make_tiny("bert", "seqcls", vocab_size=30522).save_pretrained(tmp_path / "bert")
    model = peftadapt.load_quantized(tmp_path / "bert", bits=4, task="seqcls")
    assert type(unwrap(model).classifier) is nn.Linear
    _lora_step(model)
    # the encoder is quantized all the same
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
