"""Fork server: ``python _server.py [adapters] [bitsandbytes]`` imports the heavy libraries once, then for each
JSON spec line on stdin forks a fresh child that measures it and writes one JSON result line to stdout.

Why: importing transformers + peft costs 10-20 s of CPU on a small machine;
paying it once per configuration would dominate a sweep. A forked child still
starts from a clean heap (its own peak resident set, reset at fork), which is
what a per-configuration peak-memory figure needs. The parent never runs a
torch operation, so no thread pool exists at fork time.

Run as a script (not ``-m``), so that the server still starts where ``import
peftadapt`` fails (then the peer specs run and the peftadapt specs report why).
"""

import contextlib
import json
import os
import sys
import traceback
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


def _preload(extra: list[str]) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    for mod in ["peft", *extra]:
        with contextlib.suppress(Exception):  # optional peers; a spec that needs one reports the error
            __import__(mod)


_IMPORT_ERROR = None


def _child(spec: dict, out_fd: int) -> None:
    try:
        if spec.get("impl", "peftadapt") == "peftadapt" and _IMPORT_ERROR:
            raise ImportError(f"import peftadapt failed in this environment: {_IMPORT_ERROR}")
        # lazy: imported in the forked child, after the server set up sys.path and the stand-in package
        from peftadapt.bench.harness import run

        res = run(spec)
    except Exception as e:  # noqa: BLE001 - reported next to the other figures
        res = {"spec": spec, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    data = (json.dumps(res) + "\n").encode()
    while data:
        n = os.write(out_fd, data)
        data = data[n:]


def main() -> int:
    if sys.path and os.path.abspath(sys.path[0]) == _HERE:
        sys.path.pop(0)
    sys.path.insert(0, _ROOT)
    _preload([m for m in sys.argv[1:] if m in ("adapters", "bitsandbytes")])
    # import peftadapt once here, before any fork, so its import is part of every child's baseline
    # (a peer's child never calls it). Where it does not import (e.g. an older transformers), a
    # stand-in package still lets the bench modules load, and peftadapt specs report the error.
    global _IMPORT_ERROR
    try:
        import peftadapt.wrap  # noqa: F401  lazy: loads the whole package once, before any fork (see above)
    except Exception as e:  # noqa: BLE001
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        for k in [k for k in sys.modules if k == "peftadapt" or k.startswith("peftadapt.")]:
            sys.modules.pop(k)
        pkg = types.ModuleType("peftadapt")
        pkg.__path__ = [os.path.join(_ROOT, "peftadapt")]
        sys.modules["peftadapt"] = pkg
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            code = 0
            try:
                _child(spec, w)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os.close(w)
                os._exit(code)
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode().strip()
        if not text:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            text = json.dumps({"spec": spec, "error": f"child died (exit status {status}, signal {sig})"})
        out.write(text.encode() + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
