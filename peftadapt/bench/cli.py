"""``peftadapt bench memory|speed|peers``: peak memory and step time of PEFT methods, next to the
analytic model and to the peer libraries (peft, AdapterHub ``adapters``).

Examples::

    peftadapt bench memory --models llama-20m,llama-60m --methods full,lora,houlsby
    peftadapt bench speed --models llama-20m --seq 64,128,256 --methods full,lora,prefix
    peftadapt bench memory --methods lora --quant none,4bit,8bit --grad-ckpt both
    peftadapt bench memory --methods lora --regularizer none,coral,mmd
    peftadapt bench peers --model minilm --head seqcls --batch 16 --seq 128 --reps 3 \\
        --adapters-python benchmarks/.venv-adapters/bin/python
    peftadapt bench memory --dry-run          # list the configurations, measure nothing
    peftadapt bench memory-table              # what fits on a 24/48/80/141 GB GPU (computed)

Each configuration runs in a fresh forked process (its own peak memory); the
output is the machine, a Markdown table, JSON with every raw figure, and PNG
plots, written to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any

from ..align import build
from . import fit
from . import memory_model as mm
from . import methods as M
from . import report as R
from .harness import make_spec
from .models import LLAMA_SIZES, llama_config, resolve_model
from .report import fmt_mib, fmt_params, method_label, model_label
from .runner import run_specs

_SUB = ("memory", "speed", "peers")


def _list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _ints(name: str):
    def parse(text: str) -> list[int]:
        try:
            vals = [int(t) for t in _list(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} takes comma-separated integers, got {text!r}") from None
        if not vals or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"--{name} values must be >= 1, got {text!r}")
        return vals

    return parse


def _choices(name: str, valid):
    def parse(text: str) -> list[str]:
        vals = _list(text)
        bad = [v for v in vals if v not in valid]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"--{name}: unknown value(s) {bad or text!r}; valid: {', '.join(valid)}")
        return vals

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peftadapt bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="what", metavar="{memory,speed,peers,memory-table}")
    sub.required = True
    fit.add_parser(sub)

    def common(sp, models: str, seqs: str, batch: str):
        sp.add_argument(
            "--models",
            "--model",
            dest="models",
            type=_list,
            default=_list(models),
            help="comma-separated: llama-tiny, llama-20m, llama-60m, llama-150m, llama-400m, llama-1b, "
            f"minilm, or model folders (default {models})",
        )
        sp.add_argument(
            "--head",
            choices=["causal", "seqcls"],
            default=None,
            help="task head (default: causal for llama-*, seqcls for folders/minilm)",
        )
        sp.add_argument(
            "--batch", type=_ints("batch"), default=_ints("batch")(batch), help=f"batch sizes (default {batch})"
        )
        sp.add_argument(
            "--seq", type=_ints("seq"), default=_ints("seq")(seqs), help=f"sequence lengths (default {seqs})"
        )
        sp.add_argument(
            "--steps", type=int, default=3, help="timed steps per configuration (median reported; default 3)"
        )
        sp.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
        sp.add_argument("--reps", type=int, default=1, help="interleaved repetitions of the whole list (default 1)")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
        sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        sp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        sp.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
        sp.add_argument("--name", default=None, help="file name prefix (default: the subcommand)")
        sp.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
        sp.add_argument("--no-plots", action="store_true")
        sp.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")

    for name, models, seqs in (("memory", "llama-20m,llama-60m", "128"), ("speed", "llama-20m", "64,128,256")):
        sp = sub.add_parser(
            name,
            help=f"{name} of a training step across methods",
            description=f"Peak {name if name == 'memory' else 'step time'} of one training step per method.",
        )
        common(sp, models, seqs, "1")
        sp.add_argument(
            "--methods",
            type=_choices("methods", M.METHODS),
            default=list(M.METHODS),
            help=f"comma-separated, from: {', '.join(M.METHODS)} (default: all)",
        )
        sp.add_argument(
            "--quant",
            type=_choices("quant", ["none", "4bit", "8bit"]),
            default=["none"],
            help="base precision(s): none, 4bit, 8bit (full fine-tuning is skipped on a quantized base)",
        )
        sp.add_argument("--grad-ckpt", choices=["off", "on", "both"], default="off", help="gradient checkpointing")
        sp.add_argument(
            "--regularizer",
            type=_list,
            default=["none"],
            help="alignment term(s) on a second (target) batch: none, coral, mmd, dann, ... (default none)",
        )
        sp.add_argument("--attn", choices=["sdpa", "eager"], default=None, help="attention implementation")
        sp.add_argument(
            "--analytic",
            action="store_true",
            help="print the analytic memory model's estimate for each configuration; measure nothing "
            "(instant, any size: e.g. --models llama-7b --quant none,4bit)",
        )
    sp = sub.add_parser(
        "peers",
        help="peftadapt vs peft and AdapterHub adapters, alternating, same configuration",
        description="peftadapt / peer ratios of step time and peak memory, interleaved repetitions.",
    )
    common(sp, "minilm", "128", "16")
    sp.add_argument(
        "--methods",
        type=_choices("methods", ["lora", "dora", "prefix", "houlsby", "pfeiffer"]),
        default=["lora", "dora", "prefix", "houlsby", "pfeiffer"],
        help="lora/dora/prefix compare with peft; houlsby/pfeiffer with adapters",
    )
    sp.add_argument(
        "--adapters-python",
        default=None,
        help="Python of a virtualenv with AdapterHub adapters (and peftadapt installed --no-deps); "
        "both peftadapt and adapters run there (same transformers). Default: "
        "benchmarks/.venv-adapters/bin/python if it exists",
    )
    sp.set_defaults(reps=3, steps=4)
    return p


def _head_for(model: str, head: str | None) -> str:
    if head:
        return head
    return "causal" if model.startswith("llama-") else "seqcls"


def _resolve(models: list[str]) -> list[str]:
    return [resolve_model(m) for m in models]


def sweep_specs(args) -> list[dict[str, Any]]:
    """The cartesian product of the options (quantized full fine-tuning skipped)."""
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    regs = [None if r == "none" else r for r in args.regularizer]
    if any(regs):
        for r in filter(None, regs):
            try:
                build(r)
            except ValueError as e:  # a missing option (dann's in_features) is filled in later; a bad name is not
                if "unknown regularizer" in str(e):
                    raise
    specs = []
    for model, quant, ck, reg, b, s, method in itertools.product(
        _resolve(args.models), args.quant, ckpt, regs, args.batch, args.seq, args.methods
    ):
        q = None if quant == "none" else quant
        if q and method == "full":
            continue
        specs.append(
            make_spec(
                model=model,
                head=_head_for(model, args.head),
                method=method,
                impl="peftadapt",
                quant=q,
                batch=b,
                seq=s,
                grad_ckpt=ck,
                regularizer=reg,
                warmup=args.warmup,
                steps=args.steps,
                dtype=args.dtype,
                device=args.device,
                threads=args.threads,
                attn=args.attn,
            )
        )
    return specs


def peer_specs(args, adapters_python: str | None) -> list[dict[str, Any]]:
    specs = []
    for model, b, s in itertools.product(_resolve(args.models), args.batch, args.seq):
        head = _head_for(model, args.head)
        base = dict(
            model=model,
            head=head,
            batch=b,
            seq=s,
            warmup=args.warmup,
            steps=args.steps,
            dtype=args.dtype,
            device=args.device,
            threads=args.threads,
        )
        for method in args.methods:
            if method in M.PEER_METHODS["peft"]:
                for impl in ("peftadapt", "peft"):
                    specs.append({**make_spec(method=method, impl=impl, **base), "env": "main"})
            else:
                env = "adapters" if adapters_python else None
                if env is None:
                    continue
                for impl in ("peftadapt", "adapters"):
                    specs.append({**make_spec(method=method, impl=impl, **base), "env": env})
    return specs


def analytic_table(specs: list[dict[str, Any]]) -> str:
    """The analytic memory model for each spec, as a Markdown table (no model is built)."""

    rows = [
        (
            "| model | method | batch x seq | trainable | weights MiB | grads + optimizer MiB | activations MiB "
            "| total MiB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in specs:
        if s["model"].startswith("llama-") and s["model"][6:] in LLAMA_SIZES:
            cfg = llama_config(s["model"][6:], s["head"])
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(s["model"])
        arch = mm.Arch.from_config(cfg, s["head"])
        a = mm.analytic_memory(
            arch,
            s["method"],
            s["batch"],
            s["seq"],
            dtype=s["dtype"],
            quant=s["quant"],
            grad_ckpt=s["grad_ckpt"],
            regularizer=bool(s["regularizer"]),
            attention="eager" if s["attn"] == "eager" else arch.sdpa_kernel(s["device"]),
            r=M.DEFAULTS["r"],
            reduction_factor=M.DEFAULTS["reduction_factor"],
            prefix_tokens=M.DEFAULTS["prefix_tokens"],
        )
        rows.append(
            f"| {model_label(s['model'])} ({fmt_params(arch.total_params())}) | {method_label(s)} | "
            f"{s['batch']} x {s['seq']} | {fmt_params(a['trainable'])} | {fmt_mib(a['weights'])} | "
            f"{fmt_mib(a['grads'] + a['optimizer'])} | {fmt_mib(a['activations'])} | {fmt_mib(a['total'])} |"
        )
    return "\n".join(rows)


def _default_adapters_python() -> str | None:
    p = os.path.join("benchmarks", ".venv-adapters", "bin", "python")
    return p if os.path.exists(p) else None


def main(argv: list[str] | None = None, keep_servers: bool = False) -> int:
    """Run ``peftadapt bench ARGV``; 0 on success, 1 when every configuration failed, 2 on bad options.

    ``keep_servers`` keeps the fork servers alive for the next call in this process (scripts running
    several sweeps)."""
    args = _parser().parse_args(argv)
    if args.what == "memory-table":
        return fit.main(args)

    try:
        if args.what == "peers":
            ap = args.adapters_python or _default_adapters_python()
            if ap and not os.path.exists(ap):
                raise ValueError(f"--adapters-python {ap!r} does not exist")
            specs = peer_specs(args, ap)
            pythons = {"adapters": ap} if ap else {}
        else:
            specs = sweep_specs(args)
            pythons = {}
    except ValueError as e:
        print(f"peftadapt bench: error: {e}", file=sys.stderr)
        return 2
    if not specs:
        print("peftadapt bench: error: no configuration to run (see --methods / --quant)", file=sys.stderr)
        return 2
    if args.dry_run:
        for s in specs:
            print(s)
        return 0
    if getattr(args, "analytic", False):
        print(analytic_table(specs))
        return 0

    machine = R.machine_info()
    print("# peftadapt bench " + args.what)
    print(R.machine_lines(machine))
    t0 = time.time()
    log = None if args.quiet else (lambda line: print(line, flush=True))
    results = run_specs(specs, reps=args.reps, pythons=pythons, log=log, keep_servers=keep_servers)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["bench_wall_s"] = round(time.time() - t0, 1)
    name = args.name or args.what
    command = "peftadapt bench " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        f"# peftadapt bench {args.what}",
        "",
        f"Command: `{command}`",
        "",
        "Machine:",
        "",
        R.machine_lines(machine),
        f"- wall time: {machine['bench_wall_s']} s",
        "",
    ]
    payload: dict[str, Any] = {"command": command, "machine": machine, "results": results}
    if args.what == "peers":
        ratios = R.peer_ratios(results)
        payload["ratios"] = ratios
        md += ["## peftadapt / peer (median over interleaved pairs)", "", R.peers_table(ratios), ""]
    md += ["## Every configuration", "", R.results_table(results), R.errors_section(results), ""]
    text = "\n".join(md)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    R.write_json(os.path.join(args.out, f"{name}.json"), payload)
    R.write_atomic(os.path.join(args.out, f"{name}.md"), text)
    if not args.no_plots:
        ok = [r for r in results if not r.get("error")]
        if len({r["analytic_total_params"] for r in ok}) > 1:
            R.plot(
                ok,
                "analytic_total_params",
                "peak_bytes",
                os.path.join(args.out, f"{name}_memory_vs_size.png"),
                xlabel="model parameters",
                ylabel="peak memory (MiB)",
                logx=True,
                logy=True,
                analytic=True,
                title=f"Peak training-step memory vs model size (dashed: analytic model; {machine.get('cpu')})",
            )
        if len({r["spec"]["seq"] for r in ok}) > 1:
            R.plot(
                ok,
                "seq",
                "median_step_s",
                os.path.join(args.out, f"{name}_time_vs_seq.png"),
                xlabel="sequence length",
                ylabel="step time (s)",
                logx=True,
                logy=True,
                title=f"Training-step time vs sequence length ({machine.get('cpu')})",
            )
    print(f"\nwrote {os.path.join(args.out, name)}.{{json,md}}")
    return 1 if results and all(r.get("error") for r in results) else 0
