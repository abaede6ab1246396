"""``peftadapt sweep`` on a tiny grid: cells, resumability, the pick, the report files."""

from __future__ import annotations

import json

import pytest

from peftadapt.cli import main
from peftadapt.train.sweep import parse_grid
from peftadapt.validators import spearman

from .conftest import run_config


def test_sweep_runs_the_grid_picks_by_the_validator_and_skips_finished_cells(
    tiny_model_dir, run_files, tmp_path, capsys
):
    import yaml

    raw = run_config(tiny_model_dir, run_files, tmp_path / "sweep", max_steps=4, eval_steps=2)
    raw["data"]["eval"] = {
        "target": {"path": str(run_files / "target.csv"), "validators": ["snd", "im"]},
        "target_test": {"path": str(run_files / "test.csv"), "label": "label"},
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    argv = ["sweep", str(cfg), "--grid", "regularizers.0.weight=0.1,1", "--select", "snd"]
    assert main(argv) == 0
    root = tmp_path / "sweep"
    result = json.loads((root / "sweep.json").read_text())
    assert result["select"] == "target/snd" and result["reference"] == "target_test/accuracy"
    cells = result["cells"]
    assert [c["cell"] for c in cells] == [{"regularizers.0.weight": 0.1}, {"regularizers.0.weight": 1}]
    for c in cells:
        summary = json.loads((root / c["output_dir"].split("/")[-1] / "summary.json").read_text())
        assert summary["metric_for_best"] == "target/snd"
        assert c["score"] == summary["final_metrics"]["target/snd"]
        assert c["reference"] == summary["final_metrics"]["target_test/accuracy"]
    picked = max(cells, key=lambda c: c["score"])
    assert picked["selected"] and result["selected"] == picked
    assert result["regret"] == pytest.approx(max(c["reference"] for c in cells) - picked["reference"])
    table = (root / "sweep.md").read_text()
    assert "target/snd" in table and "**yes**" in table and (root / "sweep.png").stat().st_size > 0
    # a rerun trains nothing: every cell has its summary.json
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")} == stamps
    # a validator no eval set names: one line that says where to add it
    assert main(["sweep", str(cfg), "--grid", "regularizers.0.weight=0.1", "--select", "bnm"]) == 2
    assert "data.eval.NAME.validators" in capsys.readouterr().err


def test_parse_grid_and_spearman():
    assert parse_grid(["regularizers.0.weight=0.1,0.3,1", "training.seed=0,1"]) == [
        ("regularizers.0.weight", [0.1, 0.3, 1]),
        ("training.seed", [0, 1]),
    ]
    for bad in ("weight=0.1", "regularizers.0.weight", "regularizers.0.weight=0.1,0.1"):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid([bad])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
