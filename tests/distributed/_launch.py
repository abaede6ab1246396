"""Start N local processes of ``tests/distributed/_worker.py`` over gloo on 127.0.0.1.

Plain subprocesses with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR / MASTER_PORT): the same variables ``accelerate launch`` sets, so the
Trainer's Accelerator joins the process group the worker opened. Each run has a
wall-clock limit: a hang kills every process and fails the test instead of
blocking CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_available() -> str | None:
    """None if gloo over TCP works here, else the reason."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def launch(
    scenario: str | None,
    out: Path,
    world: int = 2,
    timeout: float = 150.0,
    worker: str = "tests.distributed._worker",
    **args,
) -> list[dict]:
    """Run ``scenario`` of the ``worker`` module (``python -m worker [scenario] out``) on ``world``
    processes; return each rank's result dict (``out/result<rank>.json``, rank order)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(args))
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
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
        log = open(out / f"rank{r}.log", "w")  # noqa: SIM115 - held open by the child; closed in the finally below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", worker, *([scenario] if scenario else []), str(out)],
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
        logs = "\n".join(f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        raise AssertionError(
            f"{scenario!r} on {world} processes did not finish in {timeout:.0f} s (hang?)\n{logs}"
        ) from None
    finally:
        for _, log in procs:
            log.close()
    results = []
    for r, (p, _) in enumerate(procs):
        f = out / f"result{r}.json"
        if p.returncode != 0 or not f.exists():
            raise AssertionError(
                f"rank {r} of {scenario!r} failed (exit {p.returncode}):\n" + (out / f"rank{r}.log").read_text()[-4000:]
            )
        results.append(json.loads(f.read_text()))
    return results
