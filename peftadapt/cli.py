"""The ``peftadapt`` command.

    peftadapt train  CONFIG.yaml [--resume] [--output-dir DIR] [--set training.learning_rate=1.0e-3 ...]
    peftadapt eval   CONFIG.yaml --checkpoint DIR [--output FILE.json]
    peftadapt sweep  CONFIG.yaml --grid KEY=V1,V2,... [--grid ...] --select VALIDATOR [--set ...]
    peftadapt config CONFIG.yaml [--set ...] [--json]   (check a run file, print it resolved)
    peftadapt config --schema [--json]                   (every section's keys, types, defaults, help)
    peftadapt demo  [--output-dir DIR] [--quick] [--seed N]
    peftadapt bench ...            (memory / speed benchmarks: peftadapt bench --help)

The config is validated before anything heavy is loaded; a bad key or value
is reported with the allowed ones and exit status 2. A run stopped by a NaN / inf
loss or gradient (``training.nan_policy``) prints its one line and exits with status 1.
A write that fails for lack of space, a read-only filesystem or a permission (``ENOSPC``,
``EROFS``, ``EACCES``, ``EDQUOT``) is one line naming the file, exit status 1; any other
error is a traceback (``PEFTADAPT_DEBUG=1`` shows one for the above too).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from .bench.cli import main as bench_main
from .core.io import check_writable_dir, json_text, write_json
from .demo import run_demo
from .train.nonfinite import NonFiniteError
from .train.progress import on_terminal
from .train.runner import build_trainer, evaluate_checkpoint
from .train.schema import format_schema, load_run_config, schema
from .train.sweep import run_sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftadapt", description="Parameter-efficient fine-tuning and domain adaptation.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,sweep,config,demo,bench}")
    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML run file (see examples/)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in training.output_dir")
    t.add_argument("--output-dir", help="override training.output_dir")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (VALUE is parsed as YAML); repeatable",
    )
    e = sub.add_parser("eval", help="evaluate a saved adapter on the config's data.eval sets")
    e.add_argument("config", help="the YAML run file the adapter was trained with")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (OUTPUT_DIR/final, OUTPUT_DIR/checkpoint-N) or an adapter folder",
    )
    e.add_argument("--output", help="also write the metrics to this JSON file")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s = sub.add_parser("sweep", help="train a grid of a run file and pick the cell by a validator (resumable)")
    s.add_argument("config", help="YAML run file; its eval sets name the validators (data.eval.NAME.validators)")
    s.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...", help="a grid axis; repeatable")
    s.add_argument(
        "--select", required=True, help="a validator (e.g. snd) or SET/METRIC: picks the cell and checkpoint"
    )
    s.add_argument(
        "--score", help="labeled metric the pick is compared with (default: a labeled target set's accuracy)"
    )
    s.add_argument("--output-dir", help="the sweep's folder (default training.output_dir); one subfolder per cell")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c = sub.add_parser("config", help="check a run file and print it resolved, or print the run-file schema")
    c.add_argument("config", nargs="?", help="YAML run file to check")
    c.add_argument("--schema", action="store_true", help="print every section's keys, types, defaults and help")
    c.add_argument("--json", action="store_true", help="machine-readable JSON instead of text / YAML")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    d = sub.add_parser("demo", help="offline cross-domain adaptation demo on drug reviews (MiniLM, CPU)")
    d.add_argument("--output-dir", default="peftadapt-demo", help="where results go (default ./peftadapt-demo)")
    d.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny steps and data)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--warmup-steps", type=int, default=None, help="source-only warm-up steps shared by all runs")
    d.add_argument("--steps", type=int, default=None, help="steps of each run after the warm-up")
    d.add_argument("--max-length", type=int, default=None, help="tokens per review")
    sub.add_parser("bench", help="memory / speed benchmarks (peftadapt bench --help)", add_help=False)
    return p


def _config(args) -> int:
    """Check a run file without loading anything heavy (and show what its defaults resolve to),
    or list the schema: the answer to "what keys are there" without reading the source."""
    if args.schema:
        print(json.dumps(schema(), indent=2, default=str) if args.json else format_schema())
        return 0
    if not args.config:
        raise ValueError("give a run file to check (peftadapt config FILE.yaml) or --schema")
    run = load_run_config(args.config, args.set)
    print(json.dumps(run.to_dict(), indent=2) if args.json else yaml.safe_dump(run.to_dict(), sort_keys=False), end="")
    return 0


# OSErrors that say the disk, not the program, is at fault: one line and a way out
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
}


def _disk_error(command: str, e: OSError, folder: str | None) -> str:
    path = str(e.filename or folder or "the output folder")
    # core.io.write_atomic's hidden temp file (.m.json.k3j2.tmp) stands for the file it becomes
    path = re.sub(r"(^|/)\.([^/]+)\.[^./]+\.tmp$", r"\1\2", path)
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    if command == "train":
        fix += " (or choose another --output-dir), then continue with peftadapt train --resume"
    return f"cannot write {path!r}: {DISK_ERRORS.get(e.errno or 0, e.strerror)}; {fix}"


def _train(args) -> int:
    run = load_run_config(args.config, args.set, output_dir=args.output_dir)
    args.writing = run.training.output_dir  # named by a disk error that gives no file name
    trainer = build_trainer(run)
    metrics = trainer.train(resume=args.resume)
    out = run.training.output_dir
    acc = getattr(trainer, "accelerator", None)
    if acc is None or acc.is_main_process:  # under `accelerate launch`: one summary, not one per process
        summary = {k: v for k, v in trainer.summary.items() if k != "final_metrics"}
        print(json_text({"output_dir": out, "final_metrics": metrics, **summary}))
    return 0


def _eval(args) -> int:
    run = load_run_config(args.config, args.set)
    if args.output:  # before the evaluation, not after it
        if Path(args.output).is_dir():
            raise ValueError(f"--output: {args.output!r} is a folder; give a JSON file name, e.g. {args.output}/m.json")
        check_writable_dir(Path(args.output).absolute().parent, "--output")
        args.writing = args.output
    metrics = evaluate_checkpoint(run, args.checkpoint)
    print(json_text(metrics))
    if args.output:
        Path(args.output).absolute().parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, metrics)
    return 0


def _sweep(args) -> int:
    run_sweep(args.config, args.grid, args.select, overrides=args.set, output_dir=args.output_dir, score=args.score)
    return 0


def _demo(args) -> int:
    run_demo(
        output_dir=args.output_dir,
        quick=args.quick,
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        max_length=args.max_length,
    )
    return 0


def _bench(argv: Sequence[str]) -> int:
    rc = bench_main(list(argv))
    return 0 if rc is None else int(rc)


def _no_bars_off_terminal() -> None:
    """In a log file, the hub's, datasets' and transformers' own bars (loading, writing shards) are noise."""
    if on_terminal():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    ds_tqdm = sys.modules.get("datasets.utils.tqdm")
    if ds_tqdm is not None:
        ds_tqdm.disable_progress_bars()
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:  # imported already: switch its bars off (transformers follows it when imported)
        hub.utils.disable_progress_bars()
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is not None:
        tf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _no_bars_off_terminal()
    if argv and argv[0] == "bench":  # its own parser reads the rest
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"train": _train, "eval": _eval, "sweep": _sweep, "config": _config, "demo": _demo}[args.command](args)
    except NonFiniteError as e:  # the run failed (not the input): status 1, the step and the way out
        if os.environ.get("PEFTADAPT_DEBUG"):
            raise
        print(f"peftadapt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        if os.environ.get("PEFTADAPT_DEBUG"):
            raise
        print(f"peftadapt {args.command}: error: {e}", file=sys.stderr)
        # a checkpoint write the disk refused (CheckpointWriteError: its own line, also an OSError) is a
        # disk error like the others below: status 1; a bad input is status 2
        return 1 if isinstance(e, OSError) and e.errno in DISK_ERRORS else 2
    except OSError as e:
        if e.errno not in DISK_ERRORS or os.environ.get("PEFTADAPT_DEBUG"):
            raise  # not the disk's fault: a bug, shown whole
        message = _disk_error(args.command, e, getattr(args, "writing", None))
        print(f"peftadapt {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
