"""Fixtures for the trainer tests: a learnable toy sentiment task, tiny models
sized for the MiniLM tokenizer (vocab 30522), and run folders on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ..conftest import make_tiny

VOCAB = 30522  # the MiniLM (BERT uncased) tokenizer
POS = ["good", "great", "fine", "nice", "lovely", "superb", "helpful", "calm"]
NEG = ["bad", "awful", "terrible", "poor", "nasty", "horrible", "useless", "painful"]


def sentiment(n: int, seed: int, words: int = 5):
    """Texts made of positive (label 1) or negative (label 0) words; learnable in a few steps."""
    r = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        y = r.randint(0, 1)
        texts.append(" ".join(r.choice(POS if y else NEG) for _ in range(r.randint(2, words))))
        labels.append(y)
    return texts, labels


def text_data(n: int, seed: int, labeled: bool = True, name: str = "data"):
    from peftadapt.train import TextData

    t, y = sentiment(n, seed)
    return TextData(t, y if labeled else None, name=name)


def tiny_classifier(seed: int = 0, dropout: float = 0.1, method: str = "lora", **options):
    """A wrapped tiny BERT classifier. dropout=0 makes training a deterministic function of the batches."""
    import peftadapt

    m = make_tiny(
        "bert", "seqcls", seed=seed, vocab_size=VOCAB, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )
    if method == "lora":
        options = {"r": 4, "dropout": dropout, **options}
    return peftadapt.wrap(m, method, **options)


def write_csv(path: Path, texts, labels=None, label_col: str = "label", sep: str = ",") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["text"] + ([label_col] if labels is not None else []))
        for i, t in enumerate(texts):
            w.writerow([t] + ([labels[i]] if labels is not None else []))
    return path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def tok(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny BERT classifier + the MiniLM tokenizer saved as a local model folder."""
    d = tmp_path_factory.mktemp("tiny_bert")
    make_tiny("bert", "seqcls", vocab_size=VOCAB).save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def run_files(tmp_path_factory):
    """CSV source / target / eval files of the toy task (labels as strings)."""
    d = tmp_path_factory.mktemp("data")
    names = ["negative", "positive"]
    t, y = sentiment(48, 0)
    write_csv(d / "source.csv", t, [names[v] for v in y])
    t, _ = sentiment(48, 1)
    write_csv(d / "target.csv", t)
    t, y = sentiment(24, 2)
    write_csv(d / "test.csv", t, [names[v] for v in y])
    return d


def run_config(model_dir, files, out, **training) -> dict:
    """A small valid run config (a dict, as yaml.safe_load would return)."""
    return {
        "model": {"path": str(model_dir), "task": "classification"},
        "method": {"name": "lora", "r": 4},
        "regularizers": [{"name": "mmd", "weight": 0.1, "start": 0.25}],
        "data": {
            "labels": ["negative", "positive"],
            "max_length": 16,
            "source": {"path": str(files / "source.csv"), "text": "text", "label": "label"},
            "target": {"path": str(files / "target.csv"), "text": "text"},
            "eval": {"target": {"path": str(files / "test.csv"), "text": "text", "label": "label"}},
        },
        "training": {
            "output_dir": str(out),
            "per_device_train_batch_size": 8,
            "max_steps": 8,
            "learning_rate": 0.02,
            "eval_steps": 4,
            "disable_tqdm": True,
            "plot": False,
            "seed": 0,
            **training,
        },
    }
