"""Fixtures for the quantization tests: tiny saved models to load back in 4/8 bits."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("bitsandbytes")

from tests.conftest import make_tiny, token_batch  # noqa: F401


@pytest.fixture(autouse=True)
def _quiet_bnb():
    # bitsandbytes' 8-bit matmul warns at every call that it casts inputs to fp16.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        warnings.filterwarnings("ignore", message=".*use_cache=True.*")
        yield


@pytest.fixture
def saved_tiny(tmp_path):
    """Factory: save a tiny random model with save_pretrained; return (folder, the fp32 model)."""

    def make(kind: str = "llama", head: str = "causal", seed: int = 0, **overrides):
        model = make_tiny(kind, head, seed=seed, **overrides)
        folder = tmp_path / f"{kind}-{head}-{seed}"
        model.save_pretrained(folder)
        return folder, model

    return make
