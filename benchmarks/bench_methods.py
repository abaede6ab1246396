"""Memory and speed of every method, the committed CPU results: ``python benchmarks/bench_methods.py``.

Runs five sweeps through ``peftadapt bench`` (each configuration in a fresh
forked process) and writes, under ``benchmarks/results/``:

  methods_size.*        peak memory vs model size, every method (+ PNG)
  methods_seq.*         step time vs sequence length (+ PNG)
  methods_quant.*       PEFT methods over a 4-bit and an 8-bit base
  methods_ckpt.*        with and without gradient checkpointing
  methods_regularizer.* LoRA with an alignment term on a second (target) batch
  methods.md            the five Markdown tables in one file

``--quick`` runs a small version of each (minutes); the defaults are sized
for a shared 2-core CPU (about 30 minutes at load 10-15; larger models: pass your own
``peftadapt bench memory --models llama-400m,llama-1b ...``).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from peftadapt.bench.cli import main  # noqa: E402

ALL = "full,head,lora,dora,houlsby,pfeiffer,prefix"
# Sized for a 2-core CPU shared with other jobs (the committed results ran at load 10-15); on an idle machine
# or a GPU, widen them: e.g. --models llama-20m,llama-60m,llama-150m,llama-400m and --steps 5.
SWEEPS = {
    "methods_size": ["memory", "--models", "llama-8m,llama-20m,llama-60m", "--methods", ALL, "--seq", "128",
                     "--steps", "2"],
    "methods_seq": ["speed", "--models", "llama-20m", "--methods", "full,lora", "--seq", "64,512", "--steps", "1"],
    "methods_quant": ["memory", "--models", "llama-60m", "--methods", "lora", "--quant", "none,4bit,8bit",
                      "--seq", "128", "--steps", "1"],
    "methods_ckpt": ["memory", "--models", "llama-20m", "--methods", "lora", "--seq", "512", "--grad-ckpt", "both",
                     "--steps", "1"],
    "methods_regularizer": ["memory", "--models", "llama-20m", "--methods", "lora", "--batch", "4", "--seq", "64",
                            "--regularizer", "none,coral,mmd,dann", "--steps", "1"],
}
QUICK = {
    "methods_size": ["memory", "--models", "llama-8m,llama-20m", "--methods", ALL, "--seq", "64", "--steps", "1"],
    "methods_seq": ["speed", "--models", "llama-8m", "--methods", "full,lora", "--seq", "32,64", "--steps", "1"],
    "methods_quant": ["memory", "--models", "llama-8m", "--methods", "lora", "--quant", "none,4bit,8bit", "--seq", "32",
                      "--steps", "1"],
    "methods_ckpt": ["memory", "--models", "llama-8m", "--methods", "lora", "--seq", "64", "--grad-ckpt", "both",
                     "--steps", "1"],
    "methods_regularizer": ["memory", "--models", "llama-8m", "--methods", "lora", "--batch", "2", "--seq", "32",
                            "--regularizer", "none,coral", "--steps", "1"],
}
TITLES = {
    "methods_size": "Peak memory vs model size (batch 1, length 128)",
    "methods_seq": "Step time vs sequence length (20M, batch 1; length 128 is in the size table)",
    "methods_quant": "LoRA over a 4-bit / 8-bit base (60M, batch 1, length 128)",
    "methods_ckpt": "Gradient checkpointing (20M, LoRA, batch 1, length 512)",
    "methods_regularizer": (
        "What domain adaptation costs: LoRA + alignment term on a target batch (20M, batch 4 + 4, length 64)"
    ),
}


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="a small version of every sweep")
    ap.add_argument("--only", default=None, help="comma-separated sweep names (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    sweeps = QUICK if args.quick else SWEEPS
    names = list(sweeps) if not args.only else [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in sweeps]
    if bad:
        ap.error(f"unknown sweep(s) {bad}; valid: {list(sweeps)}")
    rc = 0
    for name in names:
        rc |= main(sweeps[name] + ["--out", args.out, "--name", name, "--device", args.device], keep_servers=True)
    # the analytic model where this machine cannot measure (1B and 7B, 4-bit and checkpointing)
    from peftadapt.bench.cli import _parser, analytic_table, sweep_specs

    an_args = _parser().parse_args(["memory", "--models", "llama-1b,llama-7b", "--methods", "full,lora,houlsby,prefix",
                                    "--quant", "none,4bit", "--batch", "4", "--seq", "512", "--grad-ckpt", "both",
                                    "--dtype", "bfloat16"])
    from peftadapt.bench.report import write_atomic

    write_atomic(os.path.join(args.out, "methods_analytic.md"),
                 "# Analytic memory model: 1B and 7B (bf16 compute, AdamW, batch 4 x 512)\n\n"
                 "Command: `peftadapt bench memory --analytic --models llama-1b,llama-7b --methods "
                 "full,lora,houlsby,prefix --quant none,4bit --batch 4 --seq 512 --grad-ckpt both --dtype bfloat16`"
                 "\n\nPredicted, not measured (no GPU here); the measured/analytic ratios of the smaller models "
                 "say how far to trust it.\n\n" + analytic_table(sweep_specs(an_args)) + "\n")
    parts = ["# peftadapt methods: memory and speed", "",
             ("Generated by `python benchmarks/bench_methods.py`; each section is one `peftadapt bench` run "
             "(its command and machine are in the section's own .md/.json)."), ""]
    for name in sweeps:
        path = os.path.join(args.out, f"{name}.md")
        if os.path.exists(path):
            with open(path) as fh:
                text = fh.read().split("\n", 1)[1]
            parts += [f"## {TITLES.get(name, name)}", text.replace("\n## ", "\n### "), ""]
    write_atomic(os.path.join(args.out, "methods.md"), "\n".join(parts))
    return rc


if __name__ == "__main__":
    sys.exit(run())
