"""Step time of peftadapt vs its peer in ONE process, alternating step by step.

    python benchmarks/bench_peers_time.py                     # LoRA vs peft, Houlsby / Pfeiffer vs adapters

``peftadapt bench peers`` measures each configuration in its own forked
process, which is what peak memory needs; but on a shared virtual CPU the
step time of two processes running the very same code differs by up to 25%
(measured: LoRA, where peftadapt *is* peft's code), so a 2% time target cannot
be resolved that way. Here both models live in one process and their training
steps alternate (A, B, B, A, A, B, ...), so slow drifts and bursts of load hit
both alike. Reported per method: the median over rounds of (ours / peer) step
time, its interquartile range, and the ratio of the fastest steps.

Same configurations as ``peftadapt bench peers`` (``peftadapt.bench.methods``):
the MiniLM sequence classifier, LoRA r=8 on query/value vs ``peft``, and
Houlsby / Pfeiffer (reduction factor 16, ReLU) vs AdapterHub ``adapters``,
the task head trained in every case. The adapters rows run in the adapters
virtualenv (``benchmarks/.venv-adapters``, created by ``bench_peers.py``),
where both implementations use the same transformers 4.57.6.
Writes ``benchmarks/results/peers_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def measure(method: str, peer: str, rounds: int, batch: int, seq: int, threads: int | None) -> dict:
    """Run in this process: alternate training steps of ours and the peer's model."""
    import torch

    from peftadapt.bench import harness as H
    from peftadapt.bench import methods as M
    from peftadapt.bench.models import build_model, resolve_model

    if threads:
        torch.set_num_threads(threads)
    model_path = resolve_model("minilm") if peer == "peft" else os.environ["PEFTADAPT_MINILM"]
    runs = {}
    for impl in ("peftadapt", peer):
        torch.manual_seed(0)
        m = build_model(model_path, "seqcls", dtype="float32", quant=None, seed=0, attn="sdpa", tmpdir=None,
                        use_ours=impl == "peftadapt", device="cpu")
        m = M.apply(m, impl, method, "seqcls")
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        batch_ = H._batch(m, "seqcls", batch, seq, 0, "cpu")
        runs[impl] = (m, opt, batch_, M.trainable_counts(m)[0])

    def step(impl: str) -> float:
        m, opt, b, _ = runs[impl]
        t0 = time.perf_counter()
        m(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for impl in runs:  # warm-up: allocator, thread pools, lazy kernels
        step(impl)
        step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    for r in range(rounds):
        order = ("peftadapt", peer) if r % 2 == 0 else (peer, "peftadapt")
        for impl in order:
            times[impl].append(step(impl))
    ratios = sorted(a / b for a, b in zip(times["peftadapt"], times[peer], strict=False))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], statistics.median(ratios), ratios[-1]]
    import transformers

    return {"method": method, "peer": peer, "rounds": rounds, "batch": batch, "seq": seq,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "trainable": {impl: runs[impl][3] for impl in runs},
            "median_step_s": {impl: statistics.median(t) for impl, t in times.items()},
            "fastest_step_s": {impl: min(t) for impl, t in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[-1],
            "ratio_fastest": min(times["peftadapt"]) / min(times[peer]),
            "step_times_s": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="alternating step pairs per method (default 30)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="lora,houlsby,pfeiffer")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: METHOD:PEER, print JSON
    args = ap.parse_args(argv)
    if args.one:
        method, peer = args.one.split(":")
        print("RESULT " + json.dumps(measure(method, peer, args.rounds, args.batch, args.seq, args.threads)))
        return 0

    from bench_peers import adapters_python

    from peftadapt.bench.models import resolve_model

    minilm = resolve_model("minilm")
    results = []
    t_start = time.time()
    load_start = os.getloadavg()
    for method in args.methods.split(","):
        peer = "peft" if method in ("lora", "dora", "prefix") else "adapters"
        python = sys.executable if peer == "peft" else adapters_python(create=True)
        cmd = [
            python,
            os.path.abspath(__file__),
            "--one",
            f"{method}:{peer}",
            "--rounds",
            str(args.rounds),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PEFTADAPT_MINILM": minilm})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} vs {peer}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"{method} vs {peer}: ratio {r['ratio_median']:.3f} (IQR {r['ratio_q1']:.3f} to {r['ratio_q3']:.3f}), "
              f"fastest-step ratio {r['ratio_fastest']:.3f}; median step {r['median_step_s']['peftadapt']:.3f} s vs "
              f"{r['median_step_s'][peer]:.3f} s", flush=True)
    from peftadapt.bench.report import is_shared, machine_info

    info = machine_info()
    payload = {
        "machine": info,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "wall_s": time.time() - t_start,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers_time.json"), "w") as f:
        json.dump(payload, f, indent=1)
    lines = [
        "# Step time, peftadapt vs peer, alternating in one process",
        "",
        f"Command: `python benchmarks/{payload['command']}`",
        "",
        f"Machine: {info.get('cpu')} ({info.get('cores')} cores), torch {info.get('torch')}, python "
        f"{platform.python_version()}; load average at start {load_start[0]:.2f}"
        + (" (shared with other jobs)" if is_shared(load_start[0], info.get("cores")) else " (quiet)")
        + f", at end {payload['load_end'][0]:.2f}; wall {payload['wall_s']:.0f} s.",
        "",
        (
            "MiniLM sequence classifier, batch x seq = "
            f"{args.batch} x {args.seq}, AdamW, {args.rounds} alternating rounds per method after 2 warm-up steps each."
        ),
        "",
        (
            "| method | peer | transformers | trainable (ours / peer) | median step s (ours / peer) "
            "| time ratio, median of rounds | IQR | fastest-step ratio |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["peer"]
        lines.append(
            f"| {r['method']} | {p} | {r['transformers']} | {r['trainable']['peftadapt']:,} / {r['trainable'][p]:,} "
            f"| {r['median_step_s']['peftadapt']:.3f} / {r['median_step_s'][p]:.3f} | {r['ratio_median']:.3f} "
            f"| {r['ratio_q1']:.3f} to {r['ratio_q3']:.3f} | {r['ratio_fastest']:.3f} |"
        )
    with open(os.path.join(args.out, "peers_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
