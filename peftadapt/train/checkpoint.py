"""Checkpoints: written atomically, checksummed, rotated, verified and read back for resume.

A checkpoint is a folder ``checkpoint-<step>/`` holding

- ``adapter/``                   ``model.save_pretrained`` output (load with ``peftadapt.load``)
- ``trainable.safetensors``      every trainable parameter, by name (exact resume)
- ``regularizers.safetensors``   the alignment modules' state (discriminators)
- ``optimizer.pt`` / ``scheduler.pt``  their state dicts (read with ``weights_only=True``)
- ``rng.safetensors``            torch CPU / CUDA generator states
- ``trainer_state.json``         step, best metric, eval history, Python / NumPy RNG states
- ``manifest.json``              size and sha256 of every file above, written last

The folder is first written as ``.tmp-checkpoint-<step>`` (each file through
:func:`peftadapt.core.io.write_atomic`, fsynced), its manifest last, and
renamed when complete, so a run killed mid-write leaves no half checkpoint
behind that ``resume`` could pick up. A write that fails (disk full,
read-only, no permission) removes the temp folder and raises
:class:`CheckpointWriteError`: the checkpoints already complete stay as they were.

What "complete" means has one home here: :func:`list_checkpoints` lists the
folders holding a manifest, :func:`verify_checkpoint` checks their files
against it. Resuming (:func:`load_newest`) verifies and reads the whole
folder before changing anything; a damaged one (a missing, truncated or
altered file, a pickle where a tensor file should be) is skipped with one
warning naming the file, for the newest checkpoint that verifies. A
checkpoint without ``optimizer.pt`` is complete only when its manifest
says why (``no_optimizer``: written under FSDP1). Checkpoints written before
manifests existed (a ``trainer_state.json``, no ``manifest.json``) are read
with a warning that they cannot be verified; without ``optimizer.pt`` they
count as damaged unless this run is under FSDP1 too.

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
state is not (no ``optimizer.pt``, said in the manifest; a resume restarts
the moments, with a warning). DeepSpeed ZeRO-3 is not supported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..core.io import json_text, write_atomic, write_json

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TRAINABLE_FILE = "trainable.safetensors"
REGULARIZERS_FILE = "regularizers.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.safetensors"
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint skipped by a resume is renamed checkpoint-N.damaged
NO_OPTIMIZER_FSDP1 = "written under FSDP1, whose flat per-process optimizer shards peftadapt does not gather"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read: a missing, truncated or changed file. A
    ValueError, so the CLI prints it as one line."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, read-only, no permission): its temp folder was
    removed and the complete checkpoints are untouched. Also an OSError, with the cause's errno."""


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
    return after the gathers). A failed write (disk full, read-only, no
    permission) removes the half-written temp folder and raises
    :class:`CheckpointWriteError`; the checkpoints already complete are untouched.
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
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if save_adapter:
            write_adapter(model, tmp / "adapter", weights, write=True)
        files = {}  # name -> bytes, serialized in memory: a full disk then fails in a plain write (OSError)
        files[TRAINABLE_FILE] = safetensors_bytes(weights)
        if alignment is not None:
            files[REGULARIZERS_FILE] = safetensors_bytes(
                {k: v.detach().cpu().contiguous() for k, v in alignment.state_dict().items()}
            )
        if optim is not None:
            files[OPTIMIZER_FILE] = _torch_bytes(optim)
        files[SCHEDULER_FILE] = _torch_bytes(scheduler.state_dict())
        tensors, py = rng_state()
        files[RNG_FILE] = safetensors_bytes(tensors)
        files[STATE_FILE] = json_text({**state, "rng": py}).encode()
        for name, data in files.items():
            _write_bytes(tmp / name, data)
        # the manifest goes last: it makes the checkpoint complete
        write_json(tmp / MANIFEST, _manifest(tmp, files, None if optim is not None else NO_OPTIMIZER_FSDP1))
        _replace_dir(tmp, folder)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # fails on a read-only disk: resume ignores .tmp- folders
        raise _write_error(folder, e, left=tmp if tmp.exists() else None) from e
    return folder


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(tmp: Path, written: dict[str, bytes], no_optimizer: str | None) -> dict[str, Any]:
    """Size and sha256 of every file in ``tmp``: of the bytes handed to the writer for the files
    written here, read back for the adapter folder (``save_pretrained`` wrote it)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if not p.is_file():
            continue
        name = p.relative_to(tmp).as_posix()
        data = written.get(name)
        if data is not None:
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            files[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "files": files}
    if no_optimizer is not None:
        manifest["no_optimizer"] = no_optimizer
    return manifest


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` to ``folder``, its entries and the rename synced to disk. An
    existing ``folder`` (the same step written again) is moved aside first and deleted after;
    a kill between the two renames leaves both under ``.tmp-`` names, which resume ignores
    (it takes the checkpoint before) and rotation deletes."""
    _fsync_dir(tmp)
    old = folder.with_name(".tmp-old-" + folder.name)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # POSIX; a folder cannot be opened so on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(folder: Path, e: OSError | SafetensorError, left: Path | None) -> CheckpointWriteError:
    code = e.errno if isinstance(e, OSError) else _os_error_code(str(e))
    why = os.strerror(code) if code else str(e)
    hint = {
        errno.ENOSPC: "free some disk space",
        errno.EDQUOT: "free some disk space",
        errno.EROFS: "make the folder writable",
        errno.EACCES: "make the folder writable",
        errno.EPERM: "make the folder writable",
    }.get(code or 0, "fix the cause")
    latest = latest_checkpoint(folder.parent)
    kept = f"the newest complete checkpoint, {latest.name}, is intact" if latest else "no earlier checkpoint exists"
    half = "nothing half-written was left" if left is None else f"the half-written {left.name} is never resumed"
    err = CheckpointWriteError(
        f"could not write {folder.name} in {str(folder.parent)!r}: {why}; {half} and "
        f"{kept}; {hint}, then continue the run with peftadapt train CONFIG --resume (Trainer.train(resume=True))"
    )
    err.errno = code
    return err


def _os_error_code(message: str) -> int | None:
    """The errno inside a Rust I/O error message (safetensors: "... (os error 28)")."""
    m = re.search(r"os error (\d+)", message)
    return int(m.group(1)) if m else None


# -- reading and verifying ------------------------------------------------------------------


def verify_checkpoint(folder: str | Path, only: tuple[str, ...] | None = None) -> bool:
    """Check ``folder`` against its manifest: every listed file present, of its size and sha256
    (only the files in ``only`` and the manifest's own rules, when given). Returns True if it
    verifies, False for a checkpoint without a manifest written by an older version (its
    files cannot be verified); raises :class:`CheckpointError` naming every bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {str(folder)!r}")
    if not (folder / MANIFEST).exists():
        if (folder / STATE_FILE).exists():
            return False
        raise CheckpointError(f"{folder.name}: no {MANIFEST}: not a complete checkpoint")
    manifest = _read_manifest(folder)
    files = manifest["files"]
    needed = [STATE_FILE, TRAINABLE_FILE, SCHEDULER_FILE, RNG_FILE]
    if "no_optimizer" not in manifest:
        needed.append(OPTIMIZER_FILE)
    problems = [f"{name} is not in its {MANIFEST}" for name in needed if name not in files]
    for name, entry in files.items():
        if only is not None and name not in only:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written (truncated?)")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256 (changed after it was written)")
    if problems:
        raise CheckpointError(f"{folder.name}: " + "; ".join(problems))
    return True


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        for entry in manifest["files"].values():
            if not (isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
                raise TypeError(f"a file entry without its bytes and sha256: {entry!r}")
    except Exception as e:  # any way the manifest cannot be parsed: the checkpoint is not trusted
        raise CheckpointError(f"{folder.name}: {MANIFEST} cannot be read ({_first_line(e)})") from e
    return manifest


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first if len(first) <= limit else first[:limit] + '...'}"


@contextlib.contextmanager
def _reading(folder: Path, name: str):
    """Any failure to read or parse ``name`` (a truncated file, a pickle ``weights_only`` refuses,
    bad JSON) becomes one :class:`CheckpointError` line naming the file."""
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it all
            warnings.simplefilter("ignore")
            yield folder / name
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{folder.name}: {name} holds pickled objects other than tensors: refused without running them "
            "(torch.load with weights_only=True)"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{folder.name}: {name} cannot be read ({_first_line(e)})") from e


@dataclasses.dataclass
class _Loaded:
    """A checkpoint's files read into memory (nothing applied yet)."""

    folder: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    regularizers: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    no_optimizer: str | None  # why optimizer is None
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]


def read_trainable(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a checkpoint, verified against its manifest first
    (:class:`CheckpointError` if damaged)."""
    folder = Path(folder)
    verify_checkpoint(folder, only=(TRAINABLE_FILE,))
    with _reading(folder, TRAINABLE_FILE) as path:
        return load_file(str(path))


def _read(folder: Path, fsdp1: bool) -> _Loaded:
    """Verify ``folder`` and read all of it; :class:`CheckpointError` if anything is damaged.
    ``fsdp1``: whether this run is under FSDP1 (a checkpoint without a manifest and without
    ``optimizer.pt`` is then taken as written the same way)."""
    verified = verify_checkpoint(folder)
    no_optimizer = None
    if verified:
        no_optimizer = _read_manifest(folder).get("no_optimizer")
    elif not (folder / OPTIMIZER_FILE).exists():
        if not fsdp1:
            raise CheckpointError(f"{folder.name}: {OPTIMIZER_FILE} is missing")
        no_optimizer = NO_OPTIMIZER_FSDP1
    with _reading(folder, STATE_FILE) as path:
        state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not {"step", "rng"} <= state.keys():
        raise CheckpointError(f"{folder.name}: {STATE_FILE} holds no step and RNG states")
    with _reading(folder, TRAINABLE_FILE) as path:
        trainable = load_file(str(path))
    regularizers = None
    if (folder / REGULARIZERS_FILE).exists():
        with _reading(folder, REGULARIZERS_FILE) as path:
            regularizers = load_file(str(path))
    optim = None
    if no_optimizer is None:
        with _reading(folder, OPTIMIZER_FILE) as path:
            optim = torch.load(path, weights_only=True)
    with _reading(folder, SCHEDULER_FILE) as path:
        scheduler = torch.load(path, weights_only=True)
    with _reading(folder, RNG_FILE) as path:
        rng = load_file(str(path))
    if not verified:
        warnings.warn(
            f"{folder} has no {MANIFEST} (written by a peftadapt before checkpoints carried checksums): "
            "its files cannot be verified; they were read as they are",
            stacklevel=3,
        )
    return _Loaded(folder, state, trainable, regularizers, optim, no_optimizer, scheduler, rng)


def _apply(loaded: _Loaded, *, model, alignment, optimizer, scheduler) -> dict[str, Any]:
    load_trainable_state(model, loaded.trainable)
    if alignment is not None and loaded.regularizers is not None:
        alignment.load_state_dict(loaded.regularizers)
    if loaded.optimizer is not None:
        load_optimizer_state(optimizer, loaded.optimizer)
    else:
        warnings.warn(
            f"{loaded.folder} holds no optimizer state ({loaded.no_optimizer}): "
            "the optimizer's moments restart from zero",
            stacklevel=3,
        )
    scheduler.load_state_dict(loaded.scheduler)
    state = dict(loaded.state)
    set_rng_state(loaded.rng, state.pop("rng"))
    return state


def load_checkpoint(folder: str | Path, *, model, alignment, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; return the trainer state.
    Call it on every process (each reads the files and keeps its own shard).

    The folder is verified and read whole before anything is changed: a damaged checkpoint
    raises :class:`CheckpointError` (one line naming the bad files) and leaves the model,
    optimizer and RNGs as they were."""
    folder = Path(folder)
    loaded = _read(folder, fsdp1=bool(_fsdp1_roots(model)))
    return _apply(loaded, model=model, alignment=alignment, optimizer=optimizer, scheduler=scheduler)


def load_newest(
    output_dir: str | Path, *, model, alignment, optimizer, scheduler, set_aside: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint in ``output_dir`` that verifies and reads; return it and
    its trainer state, or None when there is no checkpoint at all.

    Damaged checkpoints newer than it are skipped with one warning naming their bad files
    and (``set_aside``: on the writing process) renamed ``checkpoint-N.damaged``, so that
    rotation and later resumes no longer count them. If none verifies: :class:`CheckpointError`.
    """
    cks = list_checkpoints(output_dir)
    if not cks:
        return None
    fsdp1 = bool(_fsdp1_roots(model))
    bad: list[tuple[Path, CheckpointError]] = []
    for _, folder in reversed(cks):
        try:
            loaded = _read(folder, fsdp1)
        except CheckpointError as e:
            bad.append((folder, e))
            continue
        if bad:
            kept = ""
            if set_aside:
                kept = "; set aside as " + ", ".join(_set_aside(f).name for f, _ in bad)
            warnings.warn(
                f"resuming from {folder.name} in {str(output_dir)!r}, not from the newer damaged "
                + "; ".join(str(e) for _, e in bad)
                + kept,
                stacklevel=2,
            )
        return folder, _apply(loaded, model=model, alignment=alignment, optimizer=optimizer, scheduler=scheduler)
    raise CheckpointError(
        f"no checkpoint in {str(output_dir)!r} can be resumed: "
        + "; ".join(str(e) for _, e in bad)
        + "; start afresh without --resume and with training.overwrite_output_dir: true"
    )


def _set_aside(folder: Path) -> Path:
    dest = folder.with_name(folder.name + DAMAGED_SUFFIX)
    n = 1
    while dest.exists():
        n += 1
        dest = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(folder, dest)
    return dest


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first: folders ``checkpoint-<step>``
    holding a manifest (written last), or, from older versions, a ``trainer_state.json``.
    Whether their files are intact is :func:`verify_checkpoint`'s question."""
    out: list[tuple[int, Path]] = []
    d = Path(output_dir)
    if not d.exists():
        return out
    for p in d.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and ((p / MANIFEST).exists() or (p / STATE_FILE).exists()):
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
    for p in Path(output_dir).glob(".tmp-*checkpoint-*"):  # leftovers of a killed write
        shutil.rmtree(p, ignore_errors=True)
