"""Subprocess entry: ``python _worker.py SPEC_JSON OUT_JSON`` measures one spec in a fresh process.

Run as a script (not ``-m``) so that a peer run (impl ``peft`` or ``adapters``)
does not execute ``peftadapt/__init__``: the peers must be measurable even in
an environment where peftadapt itself does not import (e.g. an older
transformers), and a peer's figures must not include peftadapt's imports.
"""

import json
import os
import sys
import traceback
import types


def _setup(impl: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if sys.path and os.path.abspath(sys.path[0]) == here:
        sys.path.pop(0)  # the bench folder itself must not shadow top-level modules
    sys.path.insert(0, root)
    if impl != "peftadapt":
        # a namespace stand-in: ``peftadapt.bench.*`` imports without running peftadapt/__init__
        pkg = types.ModuleType("peftadapt")
        pkg.__path__ = [os.path.join(root, "peftadapt")]
        sys.modules["peftadapt"] = pkg


def main() -> int:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    _setup(spec.get("impl", "peftadapt"))
    try:
        # lazy: imported after _setup() prepared sys.path and the environment for this implementation
        from peftadapt.bench.harness import run

        res = run(spec)
    except Exception as e:  # noqa: BLE001 - the runner records the failure next to the other figures
        res = {"spec": spec, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
