"""Run specs, each in a fresh forked process, optionally alternating between Python environments.

A :class:`Server` is one ``_server.py`` process (libraries imported once) under
a given Python executable; it forks a fresh child per spec. :func:`run_specs`
sends the specs one at a time (never two at once: they would share the CPU)
and, with ``reps > 1``, cycles through the whole list ``reps`` times (every
other time backwards, so that in a pair each side goes first equally often),
so that repetitions of two implementations are interleaved and slow drifts of
a shared machine's load hit both alike.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from .report import model_label

_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")


class Server:
    """One fork server under ``python`` (default: this interpreter)."""

    def __init__(
        self, python: str | None = None, env: dict[str, str] | None = None, stderr=None, preload: tuple[str, ...] = ()
    ):
        self.python = python or sys.executable
        e = dict(os.environ)
        e.setdefault("HF_HUB_OFFLINE", "1")
        e.setdefault("TRANSFORMERS_OFFLINE", "1")
        e.setdefault("TOKENIZERS_PARALLELISM", "false")
        e.setdefault("TRANSFORMERS_VERBOSITY", "error")
        e.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        e.setdefault("PYTHONWARNINGS", "ignore")
        if env:
            e.update(env)
        self.proc = subprocess.Popen(
            [self.python, _SERVER, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            env=e,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes (above)
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        first = self._stdout.readline()
        if not first:
            raise RuntimeError(f"benchmark server under {self.python} failed to start (exit {self.proc.wait()})")

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._stdin.write((json.dumps(spec) + "\n").encode())
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            return {"spec": spec, "error": f"server under {self.python} died (exit {self.proc.poll()})"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self._stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_specs(
    specs: Iterable[dict[str, Any]],
    *,
    reps: int = 1,
    pythons: dict[str, str] | None = None,
    log: Callable[[str], None] | None = print,
    stderr=None,
    keep_servers: bool = False,
) -> list[dict[str, Any]]:
    """Measure every spec ``reps`` times, cycling through the list (interleaved repetitions).

    ``pythons`` maps an environment label to a Python executable; a spec's
    ``"env"`` key (default ``"main"`` = this interpreter) picks the server.
    Each result gets ``rep`` and ``env`` fields.
    """
    specs = list(specs)
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    pythons = {"main": sys.executable, **(pythons or {})}
    servers: dict[str, Server] = {}
    out = []
    try:
        for rep in range(reps):
            # odd repetitions run the list backwards: in a pair (ours, peer) each goes first equally often
            order = list(enumerate(specs)) if rep % 2 == 0 else list(reversed(list(enumerate(specs))))
            for _i, spec in order:
                spec = dict(spec)
                env = spec.pop("env", "main")
                if env not in pythons:
                    raise ValueError(f"unknown env {env!r}; valid: {sorted(pythons)}")
                if env not in servers:
                    servers[env] = _server(pythons[env], stderr, _preloads(specs))
                t0 = time.time()
                res = servers[env].measure(spec)
                res["rep"], res["env"], res["wall_s"] = rep, env, time.time() - t0
                out.append(res)
                if log:
                    log(_one_line(res, len(out), len(specs) * reps))
    finally:
        if not keep_servers:
            for s in servers.values():
                s.close()
                _POOL.pop(s.python, None)
    return out


# servers kept between run_specs calls of one process (keep_servers=True): a script that runs several
# sweeps pays the library imports once. A lazily imported library is still measured right: each child
# primes (imports) before its baseline.
_POOL: dict[str, Server] = {}


def _server(python: str, stderr, preload: tuple[str, ...]) -> Server:
    s = _POOL.get(python)
    if s is None or s.proc.poll() is not None:
        s = _POOL[python] = Server(python, stderr=stderr, preload=preload)
    return s


def close_servers() -> None:
    for s in list(_POOL.values()):
        s.close()
    _POOL.clear()


atexit.register(close_servers)


def _preloads(specs: list[dict[str, Any]]) -> tuple[str, ...]:
    """Optional libraries the specs need (imported once by the server, not once per child)."""
    out = []
    if any(s.get("impl") == "adapters" for s in specs):
        out.append("adapters")
    if any(s.get("quant") for s in specs):
        out.append("bitsandbytes")
    return tuple(out)


def _one_line(res: dict[str, Any], done: int, total: int) -> str:
    s = res["spec"]
    tag = (
        f"[{done}/{total}] {res.get('env', 'main')}:{s.get('impl', '?')} {s.get('method')} "
        f"{model_label(s.get('model', '?'))} q={s.get('quant')} b={s.get('batch')} s={s.get('seq')} "
        f"ckpt={s.get('grad_ckpt')} "
        f"reg={s.get('regularizer')}"
    )
    if res.get("error"):
        return f"{tag}: ERROR {res['error'][:200]}"
    return (
        f"{tag}: {res['median_step_s']:.3f} s/step, peak {res['peak_bytes'] / 2**20:.1f} MiB "
        f"(analytic {res['analytic']['total'] / 2**20:.1f}, x{res['ratio_measured_analytic']:.2f}), "
        f"trainable {res['trainable_params']:,}"
    )
