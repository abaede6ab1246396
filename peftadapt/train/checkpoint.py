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

Sharded parameters (FSDP2 ``fully_shard``: each parameter a ``DTensor``
holding one shard per process). Saving is then a collective: every process
calls :func:`save_checkpoint` (and :func:`trainable_state`,
:func:`optimizer_state`), which gather the full tensors of the *trainable*
parameters and of their optimizer state (``DTensor.full_tensor()``, one
all-gather each, the same order on every process); only the process with
``write=True`` (the main one) writes. The frozen base is never gathered. The
files are the same as without sharding, so a checkpoint written by N sharded
processes loads in one process and the other way round: loading cuts each
full tensor back into this process's shard (``distribute_tensor`` with the
parameter's mesh and placements, no communication: every process reads the
file). FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``): the
trainable parameters are gathered with ``summon_full_params``; its optimizer
state is not (no ``optimizer.pt``; a resume restarts the moments, with a
warning). DeepSpeed ZeRO-3 is not supported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.io import write_json

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy (tuple) form: get_state's default
    py = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
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


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every process must call it
    for the same tensors in the same order); a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` cut into ``param``'s shard when ``param`` is a DTensor (each process slices
    its own part: no communication, every process holds ``full``); else ``full`` as it is."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )


def _fsdp1_roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """[model] if it holds FSDP1 units (``summon_full_params`` takes any module that
    contains them), else []."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    return [model] if any(isinstance(m, FSDP) for m in model.modules()) else []


def _clean(name: str) -> str:
    """A parameter name without the FSDP1 / DDP / checkpoint wrapper prefixes."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name


def is_sharded(model: torch.nn.Module) -> bool:
    """True if some parameter of ``model`` is a shard (FSDP2 DTensor, or under FSDP1)."""
    return bool(_fsdp1_roots(model)) or any(_is_dtensor(p) for p in model.parameters())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of every trainable parameter.

    With sharded parameters this is a collective (see the module docstring):
    call it on every process. Every process gets the full tensors (trainable
    parameters are the small part of a PEFT model).
    """
    roots = _fsdp1_roots(model)
    if roots:  # FSDP1: flat parameters; summon_full_params shows the original ones (collective)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(roots[0], writeback=False, rank0_only=False):
            return {
                _clean(n): p.detach().to("cpu").contiguous().clone()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
    return {n: _full(p.detach()).to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (full tensors, by name) into the trainable parameters; a sharded
    parameter receives its own shard. Call it on every process (each reads the same state)."""
    roots = _fsdp1_roots(model)
    if roots:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(roots[0], writeback=True, rank0_only=False):
            _copy_into({_clean(n): p for n, p in model.named_parameters()}, state)
        return
    _copy_into(dict(model.named_parameters()), state)


def _copy_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in params)
    if missing or unknown:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unknown[:5]}; "
            "was it written by a run with the same model and method?"
        )
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint tensor {n!r} has shape {tuple(t.shape)}, the model's parameter "
                    f"{tuple(p.shape)}; was it written by a run with the same model and method?"
                )
            p.copy_(_shard_like(t.to(p.dtype), p))


def optimizer_state(optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded (DTensor) state tensors gathered whole: a
    collective with sharded parameters (call it on every process)."""
    sd = optimizer.state_dict()
    state = {}
    for i in sorted(sd["state"]):  # same order on every process
        state[i] = {k: (_full(v).to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in sd["state"][i].items()}
    return {**sd, "state": state}


def load_optimizer_state(optimizer, sd: dict[str, Any]) -> None:
    """Load :func:`optimizer_state` output; state tensors of sharded parameters are cut into
    this process's shard (``Optimizer.load_state_dict`` would keep them whole)."""
    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p) or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not _is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = _shard_like(v.to(p.dtype), p)


@contextlib.contextmanager
def _full_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Temporarily replace the trainable (sharded) parameters by the full tensors of
    ``state``, so that ``save_pretrained`` (peft's or peftadapt's) reads whole tensors.
    Local to this process: no forward or collective may run inside."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        yield
        return
    swapped = []
    try:
        for name, full in state.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            old = owner._parameters[leaf]
            assert old is not None  # state names registered parameters
            owner._parameters[leaf] = torch.nn.Parameter(full, requires_grad=old.requires_grad)
            swapped.append((owner, leaf, old))
        yield
    finally:
        for owner, leaf, old in reversed(swapped):
            owner._parameters[leaf] = old


def write_adapter(
    model: torch.nn.Module, folder: str | Path, state: dict[str, torch.Tensor] | None = None, write: bool = True
) -> None:
    """``model.save_pretrained(folder)`` on the process with ``write=True``. With FSDP2
    sharded parameters, from the full ``state`` (:func:`trainable_state`, gathered on every
    process beforehand); under FSDP1 call it on every process (``summon_full_params`` is a
    collective)."""
    if _fsdp1_roots(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, rank0_only=False):
            if write:
                # torch types Module attributes as Tensor | Module
                model.save_pretrained(str(folder))  # type: ignore[operator]
        return
    if not write:
        return
    if state is None and is_sharded(model):
        raise ValueError(
            "write_adapter on sharded parameters needs state=trainable_state(model), gathered on "
            "every process first (a gather on the writing process alone would wait forever)"
        )
    with _full_parameters(model, state or {}):
        # torch types Module attributes as Tensor | Module
        model.save_pretrained(str(folder))  # type: ignore[operator]


def save_checkpoint(
    folder: str | Path,
    *,
    model,
    alignment,
    optimizer,
    scheduler,
    state: dict[str, Any],
    save_adapter: bool = True,
    write: bool = True,
) -> Path:
    """Write a complete checkpoint to ``folder`` atomically and return it.

    With sharded parameters call it on every process: the gathers are
    collectives; only the process with ``write=True`` writes (the others
    return after the gathers).
    """
    folder = Path(folder)
    if not write and not is_sharded(model):
        return folder  # nothing to gather: the writing process holds whole tensors itself
    weights = trainable_state(model)  # collectives first, on every process
    # FSDP1 keeps each process's optimizer state as flat local shards, which this module does
    # not gather: such a checkpoint holds no optimizer state (resume restarts the moments)
    optim = None if _fsdp1_roots(model) else optimizer_state(optimizer)
    if not write:
        if save_adapter:
            write_adapter(model, folder, weights, write=False)  # FSDP1: its collective
        return folder
    tmp = folder.with_name(".tmp-" + folder.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if save_adapter:
        write_adapter(model, tmp / "adapter", weights, write=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    if alignment is not None:
        reg = {k: v.detach().cpu().contiguous() for k, v in alignment.state_dict().items()}
        save_file(reg, str(tmp / "regularizers.safetensors"))
    if optim is not None:
        torch.save(optim, tmp / "optimizer.pt")
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
    """Restore everything :func:`save_checkpoint` wrote; return the trainer state.
    Call it on every process (each reads the files and keeps its own shard)."""
    folder = Path(folder)
    with open(folder / STATE_FILE, encoding="utf-8") as f:
        state = json.load(f)
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    if alignment is not None and (folder / "regularizers.safetensors").exists():
        alignment.load_state_dict(load_file(str(folder / "regularizers.safetensors")))
    if (folder / "optimizer.pt").exists():
        load_optimizer_state(optimizer, torch.load(folder / "optimizer.pt", weights_only=True))
    else:
        import warnings

        warnings.warn(
            f"{folder} holds no optimizer state (written under FSDP1): the optimizer's moments restart from zero",
            stacklevel=2,
        )
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(load_file(str(folder / "rng.safetensors")), state.pop("rng"))
    return state


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out: list[tuple[int, Path]] = []
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
