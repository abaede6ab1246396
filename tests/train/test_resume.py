"""A run killed with SIGKILL mid-checkpoint and resumed ends exactly like an uninterrupted run."""

import json
import subprocess
import sys
import textwrap

import yaml
from safetensors.torch import load_file

from peftadapt.cli import main
from peftadapt.train.checkpoint import list_checkpoints

from .conftest import run_config

# The child trains through the real CLI and SIGKILLs itself while writing the
# checkpoint of step 6: after the temp folder exists, before the rename. The
# surviving checkpoints are steps 2 and 4; metrics.jsonl already has step 5-6 lines.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from peftadapt.train import checkpoint as ck
    real = ck.save_checkpoint
    def dying(folder, **kw):
        if Path(folder).name == "checkpoint-6":
            tmp = Path(folder).with_name(".tmp-checkpoint-6")
            tmp.mkdir(parents=True)
            (tmp / "trainable.safetensors").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, **kw)
    ck.save_checkpoint = dying
    from peftadapt.cli import main
    sys.exit(main(["train", sys.argv[1]]))
""")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_model_dir, run_files):
    # dropout on, a DANN discriminator with its own dropout, and an MMD term: resuming
    # must restore RNG states, the discriminator and the optimizer to match exactly
    training = dict(max_steps=10, eval_steps=2, save_steps=2, save_total_limit=2)
    killed = run_config(tiny_model_dir, run_files, tmp_path / "killed", **training)
    killed["regularizers"] = [
        {"name": "dann", "weight": 0.2, "hidden_size": 16, "start": 0.2},
        {"name": "mmd", "weight": 0.1},
    ]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(killed))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed
    out = tmp_path / "killed"
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert (out / ".tmp-checkpoint-6").exists()  # the half-written one, ignored by resume
    assert max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) == 6

    assert main(["train", str(cfg_path), "--resume"]) == 0
    assert not (out / ".tmp-checkpoint-6").exists()

    ref = dict(killed, training=dict(killed["training"], output_dir=str(tmp_path / "ref")))
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump(ref))
    assert main(["train", str(ref_path)]) == 0

    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert a["final_metrics"] == b["final_metrics"]
    assert a["step"] == b["step"] == 10
    wa = load_file(str(out / "final" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "ref" / "final" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    ra = load_file(str(out / "checkpoint-10" / "regularizers.safetensors"))
    rb = load_file(str(tmp_path / "ref" / "checkpoint-10" / "regularizers.safetensors"))
    assert all((ra[k] == rb[k]).all() for k in ra)
    # the log was cut back to the checkpoint and continued: same records as the reference
    la = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]
