"""QLoRA memory and speed: 4-bit base + LoRA vs a 16-bit base + LoRA vs full fine-tuning.

Each (size, mode) runs in its own subprocess (peak memory is per process) on a
Llama-architecture config with random weights; 4-bit bases are built with
``peftadapt.build_quantized`` (no download, no fp32 copy). For every run the
measured peak is printed next to an analytic lower bound:

    bound = bytes of the model's tensors (quantized codes + quantization state
            + unquantized params, adapters included; exact, summed off the model)
          + trainable params x 12 bytes (fp32 grad + two fp32 Adam moments)
          + activations under checkpointing:
              L x B x T x d x act_bytes            (one saved input per block)
            + B x T x (4 d + 3 f) x act_bytes      (one block recomputed in backward:
            + B x H x T^2 x act_bytes               its projections, MLP and attention probabilities)
            + 3 x B x T x V x 4                    (fp32 logits, the log-probabilities the
                                                    cross-entropy saves, and the logits' gradient)
          + CORAL modes: a second batch's activations and three (B T)^2 fp32 Gram matrices
          + the largest dequantized weight (bitsandbytes dequantizes one layer at
            a time into the compute dtype; 4-bit modes only)

CPU (default): peak RSS growth over the process's RSS after imports (glibc is
told to return freed large blocks, so RSS tracks live memory), measured over
the training steps only (the peak is reset with /proc/self/clear_refs after
the model is built). CUDA: ``torch.cuda.max_memory_allocated`` / ``_reserved``.

Modes:
  qlora             4-bit NF4 base (double quant), our k-bit preparation, LoRA, AdamW
  qlora_coral       the same + a CORAL term between the token-level last hidden states
                    (B*T rows) of the source batch and of a second (target) batch:
                    two forwards per step
  peft_qlora        4-bit base, peft's prepare_model_for_kbit_training + get_peft_model
  peft_qlora_coral  the same + CORAL
  lora16            bf16 dense base (no quantization), LoRA
  full              full fine-tuning, fp32 weights, AdamW

Usage:
  python benchmarks/bench_qlora.py                     # the CPU matrix (~10 min on 2 cores)
  python benchmarks/bench_qlora.py --device cuda       # 8B and 70B, seq 2048, with/without CORAL, vs peft
  python benchmarks/bench_qlora.py --runs 50m:qlora,50m:full --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peftadapt.bench.models import LLAMA_SIZES

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Llama-architecture shapes: the package's one size table (peftadapt.bench.models.LLAMA_SIZES).
SIZES = LLAMA_SIZES
MODES = ("qlora", "qlora_coral", "peft_qlora", "peft_qlora_coral", "lora16", "full")

# The CPU matrix: (size, mode, storage dtype of unquantized params). qlora/peft_qlora in bf16 storage show
# peft's fp32 upcast; CPU bf16 matmuls are slow here (no AVX512-BF16), so those run one step, small sizes.
CPU_RUNS = [
    ("50m", "qlora", "fp32"), ("50m", "full", "fp32"), ("50m", "lora16", "bf16"),
    ("50m", "qlora", "bf16"), ("50m", "peft_qlora", "bf16"),
    ("150m", "qlora", "fp32"), ("150m", "full", "fp32"),
    ("400m", "qlora", "fp32"),
    ("1b", "qlora", "fp32"),
]
CUDA_RUNS = [(s, m, "bf16") for s in ("8b", "70b") for m in ("qlora", "qlora_coral", "peft_qlora", "peft_qlora_coral")]


def n_params(cfg: dict) -> int:
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * V * d + d


# ----------------------------------------------------------------------------------------------------------
# worker: one (size, mode) in this process


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _build(size, mode, device, store, r):
    import torch
    import transformers as tf

    import peftadapt
    from peftadapt.quant import build_quantized

    cfg = tf.LlamaConfig(**SIZES[size], max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False)
    store_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[store]
    lora = dict(r=r, alpha=2 * r, target_modules="all-linear")
    if mode in ("qlora", "qlora_coral"):
        model = build_quantized(cfg, bits=4, device=device, dtype=store_dtype)  # our prepare: on by default
        return peftadapt.wrap(model, "lora", **lora)
    if mode in ("peft_qlora", "peft_qlora_coral"):
        import peft

        model = build_quantized(cfg, bits=4, device=device, dtype=store_dtype, prepare=False)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if mode == "lora16" else torch.float32)
    from peftadapt.quant import prepare_for_kbit_training

    if mode == "lora16":
        prepare_for_kbit_training(model)  # freeze + checkpointing; nothing quantized
        return peftadapt.wrap(model, "lora", **lora)
    prepare_for_kbit_training(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _bound(model, size, mode, batch, seq, store):

    from peftadapt.quant import tensor_bytes

    cfg = SIZES[size]
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    act = 2 if (store == "bf16" and not mode.startswith("peft")) or mode == "lora16" else 4
    tb = tensor_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_batches = 2 if mode.endswith("coral") else 1
    H = cfg["num_attention_heads"]
    block = batch * seq * (4 * d + 3 * f) * act + batch * H * seq * seq * act
    acts = n_batches * (L * batch * seq * d * act + block) + 3 * batch * seq * V * 4
    if n_batches == 2:  # CORAL's three (B T) x (B T) Gram matrices in fp32
        acts += 3 * (batch * seq) ** 2 * 4
    deq = max(d * f, d * d) * 4 if "qlora" in mode else 0
    parts = {"tensors": sum(tb.values()), "grads+adam": 12 * trainable, "activations": acts, "dequant": deq}
    return parts, trainable, tb


def worker(args) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    import bitsandbytes  # noqa: F401 - imported before the baseline so its import is not counted
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftadapt

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device == "cuda"
    base_kb = _rss_kb()
    t0 = time.perf_counter()
    model = _build(args.size, args.mode, device, args.store, args.r)
    build_s = time.perf_counter() - t0
    parts, trainable, tb = _bound(model, args.size, args.mode, args.batch, args.seq, args.store)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    coral = peftadapt.align.build("coral") if args.mode.endswith("coral") else None
    tap = peftadapt.FeatureTap(model, pooling="mean") if coral is not None else None
    V = SIZES[args.size]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    src = torch.randint(1, V, (args.batch, args.seq), generator=g).to(device)
    tgt = torch.randint(1, V, (args.batch, args.seq), generator=g).to(device)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_ok = _reset_peak_rss()
    times: list[float] = []
    for _ in range(args.steps):
        t = time.perf_counter()
        out = model(input_ids=src, labels=src)
        loss = out.loss
        if coral is not None:
            # token-level features (B*T rows): CORAL needs >= 2 rows per domain, and this is its costly form
            fs = tap.features.reshape(-1, tap.features.shape[-1])
            model(input_ids=tgt)
            ft = tap.features.reshape(-1, tap.features.shape[-1])
            loss = loss + coral(fs, ft)
            del fs, ft
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out, loss
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    res = {
        "size": args.size, "mode": args.mode, "store": args.store, "device": device,
        "params": n_params(SIZES[args.size]), "trainable": trainable,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "r": args.r,
        "build_s": round(build_s, 2),
        "step_s": round(sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0], 3),
        "step_times": [round(x, 3) for x in times],
        "bound_parts": parts, "bound": sum(parts.values()), "tensor_bytes": tb,
    }
    tokens = args.batch * args.seq * (2 if coral is not None else 1)
    res["tokens_per_s"] = round(tokens / res["step_s"], 2)
    if cuda:
        res["peak"] = torch.cuda.max_memory_allocated()
        res["peak_reserved"] = torch.cuda.max_memory_reserved()
    else:
        res["peak"] = (_rss_kb("VmHWM") - base_kb) * 1024
        res["peak_window"] = "training steps" if reset_ok else "build + training (clear_refs not permitted)"
    res["ratio"] = round(res["peak"] / res["bound"], 3)
    return res


# ----------------------------------------------------------------------------------------------------------
# driver


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _fmt_bytes(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def markdown(results: list[dict], info: dict, args) -> str:
    lines = [
        f"# QLoRA memory and speed ({args.device})",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Command: `python benchmarks/bench_qlora.py --device {args.device}"
        + (f" --runs {args.runs}" if args.runs else "")
        + f" --seq {args.seq} --batch {args.batch} "
        f"--steps {args.steps}`",
        "",
        "Peak = "
        + (
            "peak RSS growth over the process after imports, during the training steps"
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated (reserved in brackets)"
        )
        + "; bound = the analytic lower bound (see the script's docstring); step = mean step time after "
        "the first step (the single step when steps=1).",
        "",
        "| size | params | mode | unquantized dtype | trainable | peak | bound | peak/bound | step (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | | {r['mode']} | {r['store']} | | failed: {r['error'][:80]} | | | | |")
            continue
        peak = _fmt_bytes(r["peak"]) + (f" ({_fmt_bytes(r['peak_reserved'])})" if "peak_reserved" in r else "")
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f} M | {r['mode']} | {r['store']} | "
                     f"{r['trainable'] / 1e6:.2f} M | {peak} | {_fmt_bytes(r['bound'])} | {r['ratio']:.2f} | "
                     f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} |")
    pairs = {}
    for r in results:
        if "error" not in r and r["mode"] in ("qlora", "peft_qlora", "qlora_coral", "peft_qlora_coral"):
            pairs.setdefault((r["size"], r["store"], r["mode"].endswith("coral")), {})[r["mode"].startswith("peft")] = r
    rows = [(k, v) for k, v in pairs.items() if len(v) == 2]
    if rows:
        lines += [
            "",
            "## Our k-bit preparation vs peft's prepare_model_for_kbit_training",
            "",
            "| size | unquantized dtype | CORAL | peak, ours | peak, peft | saved | tensors, ours | tensors, peft |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (size, store, c), v in rows:
            ours, theirs = v[False], v[True]
            lines.append(
                f"| {size} | {store} | {'yes' if c else 'no'} | {_fmt_bytes(ours['peak'])} | "
                f"{_fmt_bytes(theirs['peak'])} | {_fmt_bytes(theirs['peak'] - ours['peak'])} | "
                f"{_fmt_bytes(ours['bound_parts']['tensors'])} | {_fmt_bytes(theirs['bound_parts']['tensors'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    labels = [f"{r['size']}\n{r['mode']}\n{r['store']}" for r in ok]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["peak"] / 2**30 for r in ok], width=0.4, label="measured peak")
    ax.bar([i + 0.2 for i in x], [r["bound"] / 2**30 for r in ok], width=0.4, label="analytic lower bound")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("GiB")
    ax.set_title(f"QLoRA vs LoRA vs full fine-tuning: peak memory ({ok[0]['device']})")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", default=None,
                    help="comma-separated size:mode[:store] (store bf16|fp32); default: the device's matrix")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on cpu, 2048 on cuda)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 2 cpu, 4 cuda)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (all linear layers)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: torch's); 1 is faster on a CPU shared with other jobs")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default=None, help="results file stem (default qlora_<device>)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--store", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seq = args.seq or (2048 if args.device == "cuda" else 128)
    args.steps = args.steps or (4 if args.device == "cuda" else 2)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.runs:
        runs = []
        for item in args.runs.split(","):
            parts = item.split(":")
            if len(parts) not in (2, 3) or parts[0] not in SIZES or parts[1] not in MODES:
                raise SystemExit(f"bad run {item!r}: size:mode[:store], sizes {list(SIZES)}, modes {list(MODES)}")
            runs.append(
                (parts[0], parts[1], parts[2] if len(parts) == 3 else ("fp32" if args.device == "cpu" else "bf16"))
            )
    else:
        runs = CPU_RUNS if args.device == "cpu" else CUDA_RUNS

    info = machine(args.device)
    if args.threads:
        info["torch_threads"] = args.threads
    print("machine:", json.dumps(info))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    t_all = time.perf_counter()
    for size, mode, store in runs:
        steps = args.steps
        if args.device == "cpu" and (store == "bf16" or mode == "lora16"):
            steps = 1  # CPU bf16 matmuls are slow here: one step gives the peak
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device, "--size", size,
               "--mode", mode, "--store", store, "--seq", str(args.seq), "--batch", str(args.batch),
               "--steps", str(steps), "--r", str(args.r)] + (["--threads", str(args.threads)] if args.threads else [])
        t = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                res = {"size": size, "mode": mode, "store": store, "error": (out.stderr or out.stdout)[-400:]}
            else:
                res = json.loads(line[len("RESULT "):])
        except subprocess.TimeoutExpired:
            res = {"size": size, "mode": mode, "store": store, "error": f"timeout after {args.timeout}s"}
        results.append(res)
        if "error" in res:
            print(f"{size:>5} {mode:<17} {store}: FAILED {res['error'][-200:]}", flush=True)
        else:
            print(f"{size:>5} {mode:<17} {store}: peak {_fmt_bytes(res['peak'])}  bound {_fmt_bytes(res['bound'])}  "
                  f"ratio {res['ratio']:.2f}  step {res['step_s']:.2f}s  ({time.perf_counter() - t:.0f}s wall)",
                  flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"qlora_{args.device}"
    payload = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "size", "mode", "store")},
        "wall_s": round(time.perf_counter() - t_all, 1),
        "results": results,
    }
    _write_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=1) + "\n")
    md = markdown(results, info, args)
    _write_atomic(out_dir / f"{stem}.md", md)
    plot(results, out_dir / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
