"""Checkpoints: written atomically, rotated, read back for resume.

A checkpoint is a folder ``checkpoint-<step>/`` holding

- ``adapter/``                   ``model.save_pretrained`` output (load with ``peftadapt.load``)
- ``trainable.safetensors``      every trainable parameter, by name (exact resume)
- ``regularizers.safetensors``   the alignment modules' state (discriminators)
- ``optimizer.pt`` / ``scheduler.pt``  their state dicts (read with ``weights_only=True``)
- ``rng.safetensors``            torch CPU / CUDA generator states
- ``trainer_state.json``         step, best metric, eval history, Python / NumPy RNG states

The folder is first written as ``.tmp-checkpoint-<step>`` and renamed when
complete, so a run killed mid-write leaves no half checkpoint behind that
``resume`` could pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    py = {"python": [version, list(state), gauss],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, py


def set_rng_state(tensors: dict[str, torch.Tensor], py: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, s, g = py["python"]
    random.setstate((v, tuple(s), g))
    n = py["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in params)
    if missing or unknown:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unknown[:5]}; "
            "was it written by a run with the same model and method?"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def save_checkpoint(folder: str | Path, *, model, alignment, optimizer, scheduler,
                    state: dict[str, Any], save_adapter: bool = True) -> Path:
    """Write a complete checkpoint to ``folder`` atomically and return it."""
    folder = Path(folder)
    tmp = folder.with_name(".tmp-" + folder.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if save_adapter:
        model.save_pretrained(str(tmp / "adapter"))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if alignment is not None:
        reg = {k: v.detach().cpu().contiguous() for k, v in alignment.state_dict().items()}
        save_file(reg, str(tmp / "regularizers.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    tensors, py = rng_state()
    save_file(tensors, str(tmp / "rng.safetensors"))
    # the state file goes last: its presence marks a complete checkpoint
    write_json(tmp / STATE_FILE, {**state, "rng": py})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder: str | Path, *, model, alignment, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; return the trainer state."""
    folder = Path(folder)
    with open(folder / STATE_FILE, encoding="utf-8") as f:
        state = json.load(f)
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    if alignment is not None and (folder / "regularizers.safetensors").exists():
        alignment.load_state_dict(load_file(str(folder / "regularizers.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(load_file(str(folder / "rng.safetensors")), state.pop("rng"))
    return state


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = []
    d = Path(output_dir)
    if not d.exists():
        return out
    for p in d.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    cks = list_checkpoints(output_dir)
    return cks[-1][1] if cks else None


def rotate(output_dir: str | Path, keep_last: int, best: Path | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one."""
    cks = [p for _, p in list_checkpoints(output_dir)]
    keep = set(cks[-keep_last:] if keep_last > 0 else [])
    if best is not None:
        keep.add(Path(best))
    for p in cks:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(output_dir).glob(".tmp-checkpoint-*"):  # leftovers of a killed write
        shutil.rmtree(p, ignore_errors=True)
