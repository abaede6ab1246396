"""benchmarks/gpu_check.sh, the GPU side-by-side, exercised on the CPU at a tiny size: every
implementation (peftadapt's Trainer, add_alignment on TRL, plain peft + TRL) must run and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check as G

REPO = Path(__file__).resolve().parents[1]


def test_parts_order_and_selection():
    names = [p["name"] for p in G.parts(False, None)]
    # checkpointing on first (the setting users run), then the 70B step, then off
    assert names == [
        "peftadapt/ckpt",
        "trl_mmd/ckpt",
        "trl_peft/ckpt",
        "70b/ckpt",
        "peftadapt/no-ckpt",
        "trl_mmd/no-ckpt",
        "trl_peft/no-ckpt",
    ]
    big = next(p for p in G.parts(False, None) if p.get("big"))
    assert big["size"] == "70b" and big["steps"] == 1 and all(p["size"] == "8b" for p in G.parts(False, ["trl_mmd"]))
    assert [p["name"] for p in G.parts(True, ["trl_peft/no-ckpt"])] == ["trl_peft/no-ckpt"]


def test_analytic_counts_the_target_batch_and_checkpointing():
    a = {i: G.analytic("8b", i, True, 2048, 2, "bfloat16", 16)["total"] for i in G.IMPLS}
    assert a["trl_mmd"] > a["peftadapt"] > a["trl_peft"]  # TRL's adapters are bf16, ours fp32
    assert G.analytic("8b", "peftadapt", False, 2048, 2, "bfloat16", 16)["total"] > a["peftadapt"] + 2**34


def test_word_tokenizer_maps_each_word_to_its_id():
    tok = G.word_tokenizer(200)
    text = G.random_texts(2, 50, 200, 0)
    ids = tok(text)["input_ids"]
    assert [len(i) for i in ids] == [50, 50]
    assert [f"t{i}" for i in ids[0]] == text[0].split() and min(min(i) for i in ids) >= 3
    assert tok("t12 t199 t3")["input_ids"] == [12, 199, 3] and tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_a_failed_part_is_a_row_not_a_crash():
    md = G.markdown([{"name": "70b/ckpt", "size": "70b", "error": "timeout after 150s"}], {"cuda": True}, "x")
    assert "| 70b/ckpt | 70b | | | failed: timeout after 150s | | | | | | |" in md


def test_tiny_cpu_run_writes_json_and_markdown(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "res"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--steps", "2"]
    cmd += ["--parts", "trl_mmd/ckpt,70b/ckpt", "--out", str(out), "--budget", "400", "--timeout", "200"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads((out / "gpu_check_tiny.json").read_text())
    res = {r["name"]: r for r in data["results"]}
    assert set(res) == {"trl_mmd/ckpt", "70b/ckpt"}
    for r in res.values():
        assert "error" not in r, r
        assert r["ckpt"] and r["peak"] > 0 and r["tokens_per_s"] > 0 and r["trainable"] > 0
        assert r["analytic"]["total"] > r["analytic"]["weights"] > 0 and len(r["step_times"]) == r["steps"]
    assert res["trl_mmd/ckpt"]["impl"] == "trl_mmd" and res["70b/ckpt"]["impl"] == "peftadapt"
    assert res["70b/ckpt"]["steps"] == 1
    md = (out / "gpu_check_tiny.md").read_text()
    assert md.count("| tiny (0.00 B) | on |") == 2
