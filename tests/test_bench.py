"""peftadapt.bench: the analytic memory model, the harness, the runner and the CLI.

Figures of the right kind and order only; never absolute times.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftadapt.bench import memory_model as mm
from peftadapt.bench import report as R
from peftadapt.bench.cli import main
from peftadapt.bench.harness import make_spec, run

from .conftest import make_tiny


# -- analytic model -------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,head",
    [
        ("llama", "causal"),
        ("llama", "seqcls"),
        ("qwen2", "causal"),
        ("mistral", "seqcls"),
        ("bert", "seqcls"),
        ("bert", "base"),
    ],
)
def test_analytic_param_count_matches_the_real_model(kind, head):
    model = make_tiny(kind, head)
    arch = mm.Arch.from_config(model.config, head)
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


def test_analytic_trainable_counts_match_peft_lora_and_prefix():
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    arch = mm.Arch.from_config(make_tiny("llama", "causal").config, "causal")
    lora = get_peft_model(make_tiny("llama", "causal"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert mm.trainable_params(arch, "lora", r=4) == n
    pre = get_peft_model(make_tiny("llama", "causal"), PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    n = sum(p.numel() for p in pre.parameters() if p.requires_grad)
    assert mm.trainable_params(arch, "prefix", prefix_tokens=5) == n


def test_analytic_memory_orders_methods_and_options():
    from peftadapt.bench.models import llama_config

    arch = mm.Arch.from_config(llama_config("60m"), "causal")
    est = {m: mm.analytic_memory(arch, m, batch=4, seq=256) for m in mm.METHODS}
    for m in ("lora", "dora", "houlsby", "pfeiffer", "prefix", "head"):
        assert est[m]["total"] < est["full"]["total"], m
        assert est[m]["trainable"] < est["full"]["trainable"], m
    # full fine-tuning: AdamW keeps 8 bytes per parameter, the gradient 4 (fp32)
    assert est["full"]["optimizer"] == 8 * arch.total_params()
    assert est["full"]["grads"] == 4 * arch.total_params()
    # a frozen base saves fewer activations than a trainable one; DoRA saves more than LoRA
    assert est["lora"]["activations"] < est["full"]["activations"]
    assert est["dora"]["activations"] > est["lora"]["activations"]
    assert est["head"]["activations"] < est["pfeiffer"]["activations"] < est["houlsby"]["activations"]
    ck = mm.analytic_memory(arch, "lora", batch=4, seq=256, grad_ckpt=True)
    assert ck["activations"] < est["lora"]["activations"]
    w = {q: mm.weight_bytes(arch, quant=q) for q in (None, "8bit", "4bit")}
    assert w["4bit"] < w["8bit"] < w[None]
    reg = mm.analytic_memory(arch, "lora", batch=4, seq=256, regularizer=True)
    layers = mm.activation_bytes(arch, "lora", 4, 256)["layers"]
    assert reg["activations"] == est["lora"]["activations"] + layers + arch.hidden * 4 * 256 * 4
    longer = mm.analytic_memory(arch, "lora", batch=4, seq=512)
    assert longer["activations"] > 1.9 * est["lora"]["activations"]


def test_analytic_rejects_bad_values_with_the_choices():
    arch = mm.Arch.from_config(make_tiny("llama", "causal").config, "causal")
    with pytest.raises(ValueError, match=r"valid choices.*lora"):
        mm.analytic_memory(arch, "lorax", batch=1, seq=8)
    with pytest.raises(ValueError, match="quant"):
        mm.weight_bytes(arch, quant="3bit")
    with pytest.raises(ValueError, match="batch"):
        mm.analytic_memory(arch, "lora", batch=0, seq=8)


# -- harness ----------------------------------------------------------------------
def test_spec_validation_names_the_choices():
    with pytest.raises(ValueError, match="valid methods"):
        make_spec(impl="peft", method="houlsby")
    with pytest.raises(ValueError, match="quantized"):
        make_spec(method="full", quant="4bit")
    with pytest.raises(ValueError, match="valid fields"):
        make_spec(modle="llama-20m")
    with pytest.raises(ValueError, match="valid models"):
        run({"model": "llama-3t", "method": "lora"}, prime=False)


@pytest.fixture(scope="module")
def tiny_runs():
    common = dict(model="llama-tiny", batch=2, seq=16, steps=2, warmup=1)
    return {m: run({**common, "method": m}, prime=False) for m in ("full", "lora", "houlsby")}


def test_harness_reports_numbers_of_the_right_kind(tiny_runs):
    r = tiny_runs["lora"]
    assert r["median_step_s"] > 0 and len(r["step_times_s"]) == 2
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_step_s"])
    assert r["peak_bytes"] >= 0 and r["peak_rss_reset"] is True
    assert r["analytic"]["total"] > 0 and r["ratio_measured_analytic"] == pytest.approx(
        r["peak_bytes"] / r["analytic"]["total"]
    )
    json.dumps(r)  # every figure is JSON-able


def test_full_finetuning_trains_and_stores_more_than_peft(tiny_runs):
    full, lora, houlsby = tiny_runs["full"], tiny_runs["lora"], tiny_runs["houlsby"]
    assert full["trainable_params"] == full["total_params"] == full["analytic_total_params"]
    for r in (lora, houlsby):
        assert r["trainable_params"] < full["trainable_params"] / 10
        # AdamW state: exactly two fp32 moments per trainable parameter
        assert r["state_bytes"]["optimizer"] == 8 * r["trainable_params"]
        assert r["saved_bytes"] < full["saved_bytes"]
        assert r["saved_tensors_bytes"] < full["saved_tensors_bytes"]
        assert r["analytic"]["total"] < full["analytic"]["total"]
    assert full["state_bytes"]["optimizer"] == 8 * full["trainable_params"]
    # the analytic trainable count agrees with the wrapped model
    arch = mm.Arch.from_config(make_tiny("llama", "causal").config, "causal")
    from peftadapt.bench.models import llama_config

    arch = mm.Arch.from_config(llama_config("tiny"), "causal")
    assert mm.trainable_params(arch, "lora") == lora["trainable_params"]
    assert mm.trainable_params(arch, "houlsby") == houlsby["trainable_params"]


def test_saved_tensor_meter_sees_activations_not_weights():
    from peftadapt.bench.harness import SavedTensorMeter

    lin = torch.nn.Linear(64, 64)
    x = torch.randn(10, 64)
    with SavedTensorMeter(list(lin.parameters())) as m:
        lin(x).relu().sum()
    # linear saves its input (10x64 fp32), relu its output (10x64 fp32); the weight is excluded
    assert m.bytes == 2 * 10 * 64 * 4


def test_regularizer_and_checkpointing_runs():
    common = dict(model="llama-tiny", method="lora", batch=2, seq=16, steps=1)
    plain = run(common, prime=False)
    reg = run({**common, "regularizer": "mmd"}, prime=False)
    ck = run({**common, "grad_ckpt": True}, prime=False)
    assert "error" not in reg and "error" not in ck
    # the target batch's layer activations are kept for the backward pass (its logits are not)
    assert reg["saved_tensors_bytes"] > 1.3 * plain["saved_tensors_bytes"]
    assert ck["saved_tensors_bytes"] < plain["saved_tensors_bytes"]
    assert reg["analytic"]["activations"] > plain["analytic"]["activations"]


# -- report ------------------------------------------------------------------------
def _fake(impl, rep, t, peak, method="lora"):
    spec = make_spec(model="llama-tiny", method=method, impl=impl)
    return {
        "spec": spec,
        "rep": rep,
        "env": "main",
        "median_step_s": t,
        "peak_bytes": peak,
        "trainable_params": 10,
        "transformers": "x",
    }


def test_peer_ratios_pair_interleaved_repetitions():
    res = [
        _fake("peftadapt", 0, 1.0, 100),
        _fake("peft", 0, 2.0, 200),
        _fake("peftadapt", 1, 3.0, 100),
        _fake("peft", 1, 3.0, 100),
        _fake("peftadapt", 2, 1.0, 90),
        _fake("peft", 2, 1.0, 100),
    ]
    (r,) = R.peer_ratios(res)
    assert r["peer"] == "peft" and r["pairs"] == 3
    assert r["time_ratio"] == pytest.approx(1.0)  # median of 0.5, 1.0, 1.0
    assert r["memory_ratio"] == pytest.approx(0.9)  # median of 0.5, 1.0, 0.9
    assert "| lora | peft |" in R.peers_table([r])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = []
    for size, peak in ((1000, 10), (2000, 20)):
        r = _fake("peftadapt", 0, 1.0, peak * 2**20)
        r["analytic_total_params"] = size
        res.append(r)
    path = R.plot(
        res, "analytic_total_params", "peak_bytes", str(tmp_path / "p.png"), xlabel="x", ylabel="y", title="t"
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- CLI (end to end through the fork server) ------------------------------------------------
def test_cli_dry_run_and_bad_values(capsys):
    assert (
        main(["memory", "--models", "llama-tiny", "--methods", "full,lora", "--quant", "none,4bit", "--dry-run"]) == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 3  # full is skipped on the 4-bit base
    assert main(["memory", "--models", "llama-3t", "--dry-run"]) == 2
    assert "valid models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "--methods", "lorax"])


def test_cli_analytic_needs_no_model(capsys):
    assert (
        main(
            [
                "memory",
                "--analytic",
                "--models",
                "llama-7b",
                "--methods",
                "full,lora",
                "--quant",
                "none,4bit",
                "--seq",
                "512",
            ]
        )
        == 0
    )
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| llama-7b")]
    assert len(rows) == 3 and "6.74B" in rows[0]
    total = {r.split("|")[2].strip(): float(r.split("|")[-2].replace(",", "")) for r in rows}
    assert total["lora (4bit)"] < total["lora"] < total["full"]


def test_cli_memory_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(
        [
            "memory",
            "--models",
            "llama-8m",
            "--methods",
            "full,lora",
            "--seq",
            "16",
            "--steps",
            "1",
            "--out",
            str(out),
            "--name",
            "t",
            "--no-plots",
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads((out / "t.json").read_text())
    assert data["machine"]["cores"] == os.cpu_count()
    by = {r["spec"]["method"]: r for r in data["results"]}
    assert "error" not in by["full"] and "error" not in by["lora"], data["results"]
    # a fresh process per configuration: full fine-tuning's 8.6M params x 16 bytes show in its peak
    assert by["full"]["peak_bytes"] > by["lora"]["peak_bytes"] + 60 * 2**20
    assert by["full"]["trainable_params"] > 100 * by["lora"]["trainable_params"]
    md = (out / "t.md").read_text()
    assert "| llama-8m (causal) | full |" in md and "| llama-8m (causal) | lora |" in md
    assert "Machine:" in capsys.readouterr().out


def test_shared_machine_note_only_when_load_exceeds_cores():
    from peftadapt.bench.report import is_shared, machine_lines

    assert not is_shared(1.2, 2)  # the benchmark's own start-up on an idle 2-core machine
    assert is_shared(2.5, 2) and is_shared(12.0, 16) is False
    assert is_shared(1.5, 1)
    quiet = machine_lines({"cores": 2, "loadavg": (1.2, 1.0, 0.9)})
    busy = machine_lines({"cores": 2, "loadavg": (10.4, 9.0, 8.0)})
    assert "shared" not in quiet and "shared with other jobs" in busy


def test_peer_ratios_report_the_noise_and_the_fastest_steps():
    res = [
        _fake("peftadapt", 0, 1.1, 100),
        _fake("peft", 0, 1.0, 100),
        _fake("peftadapt", 1, 0.9, 100),
        _fake("peft", 1, 1.0, 100),
        _fake("peftadapt", 2, 1.2, 100),
        _fake("peft", 2, 1.0, 100),
    ]
    res[0]["step_times_s"], res[1]["step_times_s"] = [1.1, 0.8], [1.0, 1.0]
    (r,) = R.peer_ratios(res)
    assert r["time_ratio"] == pytest.approx(1.1)
    assert r["time_ratio_range"] == pytest.approx([0.9, 1.2])
    assert r["time_ratio_fastest"] == pytest.approx(0.8 / 1.0)  # fastest step of each side over all pairs
    row = R.peers_table([r])
    assert "1.100 (0.90 to 1.20)" in row and "time within noise" in row
    r2 = dict(r, time_ratio_range=[1.05, 1.2])
    assert "no (time <= 1.02" in R.peers_table([r2])
    assert "| yes |" in R.peers_table([dict(r, time_ratio=1.0)])


def test_cpu_sdpa_with_dropout_keeps_three_probability_matrices():
    """The memory model's "math" attention: torch's CPU SDPA falls back to the math kernel when
    attention dropout is on, and keeps three B x a x s x s matrices more than the flash kernel
    (which keeps its output and logsumexp instead)."""
    import torch.nn.functional as F

    from peftadapt.bench import memory_model as mm

    B, a, s, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, a, s, d, requires_grad=True) for _ in range(3))

    def saved(p):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return sum(sizes)

    extra = saved(0.1) - saved(0.0)
    assert abs(extra - 3 * B * a * s * s * 4) <= B * a * s * (d + 1) * 4
    arch = mm.Arch(
        family="bert",
        hidden=a * d,
        layers=2,
        intermediate=4 * a * d,
        heads=a,
        kv_heads=a,
        vocab=100,
        head="seqcls",
        attn_dropout=0.1,
    )
    assert arch.sdpa_kernel("cpu") == "math" and arch.sdpa_kernel("cuda") == "sdpa"
    assert arch.sdpa_kernel("cpu", training=False) == "sdpa"
    m = mm.activation_bytes(arch, "lora", B, s, attention="math")["layers"]
    f = mm.activation_bytes(arch, "lora", B, s, attention="sdpa")["layers"]
    assert m - f == 2 * 3 * a * s * B * s * 4  # layers x 3 matrices x (a x s per token) x tokens x 4 bytes


def test_trim_heap_returns_freed_memory_to_the_kernel():
    """glibc keeps freed heap chunks resident; trim_heap hands them back, which is why the
    harness trims before it resets the peak (else the build's garbage counts as the step's).
    Run in a child process: the test fills and frees 100 MiB of heap."""
    import subprocess
    import sys

    code = """
import ctypes, sys
from peftadapt.bench import harness as H
try:
    libc = ctypes.CDLL("libc.so.6")
except OSError:
    sys.exit(3)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(1600)]  # 100 MiB in 64 KiB heap chunks
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for b in blocks[:-1]:  # the last one pins the heap top: only a trim can give the rest back
    libc.free(b)
before = H.rss_bytes()
assert H.trim_heap()
print((before - H.rss_bytes()) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode == 3:
        pytest.skip("no glibc")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) > 50  # MiB handed back


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_model_matches_saved_tensors_with_fp32_lora_on_a_bf16_base(dtype):
    """The decoder stack's saved-for-backward bytes (autograd hooks) against ``activation_bytes``: at
    bf16, RMSNorm's fp32 copies and each LoRA module's fp32 cast of its input are what autograd keeps."""
    import transformers as tf

    import peftadapt
    from peftadapt.bench.harness import SavedTensorMeter
    from peftadapt.bench.models import llama_config
    from peftadapt.core.hf import unwrap

    cfg = llama_config("8m")
    torch.manual_seed(0)
    model = peftadapt.wrap(
        tf.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)), "lora", r=16, target_modules="all-linear"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.train()
    seq = 128
    ids = torch.randint(1, cfg.vocab_size, (1, seq))
    with SavedTensorMeter(list(model.parameters()) + list(model.buffers())) as meter:
        unwrap(model).model(input_ids=ids)
    arch = mm.Arch.from_config(cfg)
    est = mm.activation_bytes(
        arch, "lora", 1, seq, dtype=dtype, r=16, targets=tuple(arch.linear_shapes()), adapter_dtype="float32"
    )
    final_norm = arch.hidden * seq * 4
    ratio = meter.bytes / (est["layers"] + final_norm)
    assert 0.9 < ratio < 1.1, ratio


def test_memory_table_in_the_docs_is_the_generated_one(capsys):
    """docs/quantization.md holds the output of ``python -m peftadapt.bench memory-table``."""
    from pathlib import Path

    from peftadapt.bench import fit

    doc = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text()
    block = doc.split("<!-- memory-table:start -->\n", 1)[1].split("\n<!-- memory-table:end -->", 1)[0]
    assert main(["memory-table"]) == 0
    assert block == capsys.readouterr().out.rstrip("\n") == fit.document()
    # 4 bits + checkpointing puts a 70b on one 80 GB card; 16 bits does not fit it on any
    row = next(line for line in block.split("\n") if line.startswith("| 70b (70.55 B) | 4 | on |"))
    assert row.endswith("| no | no | yes | yes |")
    assert fit.fits(10 * 2**30, fit.GPUS["24 GB"]) and not fit.fits(22 * 2**30, fit.GPUS["24 GB"])
