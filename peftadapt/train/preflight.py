"""The trainer's pre-flight checks across processes, run once before the first step.

One all_gather of a vector of config hashes (a mismatched config on one process is a
``ValueError`` on every process, naming the differing fields, instead of a hang or silent
divergence), then the batch-size checks (a global batch the world size does not divide; a
batch per process, or global batch, too small for an estimator: MMD and CORAL need 2 per
domain), the launcher check (N processes launched but Accelerate runs one) and the backend
check (DeepSpeed cannot train a discriminator). In one process every check that needs
communication is a no-op.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..align.scope import resolve_scope
from ..core.comm import all_gather_fixed, is_distributed

__all__ = [
    "batch_sizes",
    "check_backend",
    "check_launch",
    "check_min_batch",
    "check_run",
    "check_same_config",
    "check_same_resume_step",
    "config_fingerprint",
    "digest_rows",
    "per_process_batch",
    "preflight",
    "shard_sizes",
]


# ---------------------------------------------------------------------------
# Batch sizes
# ---------------------------------------------------------------------------
def per_process_batch(global_batch: int, world: int, what: str = "global_batch_size") -> int:
    """``global_batch / world``; a ``ValueError`` if the world size does not divide it."""
    if global_batch % world:
        lo, hi = (global_batch // world) * world, (global_batch // world + 1) * world
        raise ValueError(
            f"training.{what}={global_batch} cannot be split evenly over {world} processes; use a multiple "
            f"of {world} (e.g. {lo or hi} or {hi}), or set per_device_train_batch_size (per process) instead"
        )
    return global_batch // world


def shard_sizes(n_examples: int, batch_size: int, world: int) -> tuple[int, int]:
    """(smallest global batch, smallest per-process batch) an epoch of ``n_examples`` yields
    when each of ``world`` processes draws ``batch_size`` per micro-batch (the trainer's
    :class:`~peftadapt.train.data.BatchStream`: the last batch of an epoch is smaller;
    a process whose slice of it is empty reuses one example)."""
    g = batch_size * world
    last = n_examples - (max(1, -(-n_examples // g)) - 1) * g
    smallest_global = min(g, last)
    return smallest_global, max(1, smallest_global // world)


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
def _digest(obj: Any) -> int:
    """A signed 64-bit hash of a JSON-able object (stable across processes, unlike hash())."""
    blob = json.dumps(obj, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True)


def digest_rows(rows: Sequence[Sequence[int]] | None, labels: Sequence[Any] | None = None) -> int:
    """A 64-bit hash of tokenized data, streamed row by row (no JSON of millions of ints);
    ``labels``: one class id per row, or one target per token (causal-LM rows)."""
    h = hashlib.blake2b(digest_size=8)
    for row in rows or ():
        h.update(len(row).to_bytes(4, "little"))
        h.update(array.array("q", row).tobytes())
    if labels is not None:
        h.update(b"labels")
        if labels and isinstance(labels[0], Sequence):
            for row in labels:
                h.update(array.array("q", row).tobytes())
        else:
            h.update(array.array("q", labels).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def config_fingerprint(**parts: Any) -> dict[str, int]:
    """{field: 64-bit hash}; dataclasses and mappings are split into one entry per field."""
    out: dict[str, int] = {}
    for key, value in parts.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            for k in sorted(value):
                out[f"{key}.{k}"] = _digest(value[k])
        else:
            out[key] = _digest(value)
    return out


def check_same_config(
    fingerprint: Mapping[str, int], device: torch.device | str = "cpu", hint: str | None = None
) -> None:
    """All processes must hold the same fingerprint (:func:`config_fingerprint`).

    One all_gather of a vector of int64 hashes. Every process receives every
    vector and so raises the same ``ValueError`` (naming the fields that
    differ and the ranks that hold each version): no process goes on to the
    first training collective alone and waits there forever. The field names
    must be the same on every process (they come from code, not from the config).
    """
    if not is_distributed():
        return
    keys = list(fingerprint)
    mine = torch.tensor([len(keys), _digest(keys)] + [fingerprint[k] for k in keys], dtype=torch.long, device=device)
    sizes = [int(s) for s in all_gather_fixed(torch.tensor([mine.numel()], dtype=torch.long, device=device))]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"processes disagree on the configuration layout ({sizes} fields per rank): "
            "are all processes running the same peftadapt version and script?"
        )
    rows = [t.tolist() for t in all_gather_fixed(mine)]
    if any(row[:2] != rows[0][:2] for row in rows):
        raise ValueError(
            "processes disagree on the configuration fields: are all processes running the same "
            "peftadapt version and script?"
        )
    bad = []
    for i, k in enumerate(keys):
        vals = [row[2 + i] for row in rows]
        if len(set(vals)) > 1:
            groups: dict[int, list[int]] = {}
            for rk, v in enumerate(vals):
                groups.setdefault(v, []).append(rk)
            bad.append(f"{k} (" + " vs ".join(f"ranks {g}" for g in groups.values()) + ")")
    if bad:
        raise ValueError(
            f"the run is configured differently on different processes: {', '.join(bad)}. "
            + (
                hint
                or "Every process must run the same script with the same config, data and model (check "
                "per-node files, environment variables and command-line arguments)"
            )
        )


def check_min_batch(
    terms: Iterable[Any],
    *,
    source: tuple[int, int],
    target: tuple[int, int],
    world: int,
    batch_size: int,
    target_batch_size: int,
) -> None:
    """Every term's estimator must get enough samples per domain in every step.

    ``source`` / ``target`` are :func:`shard_sizes` of the two data streams:
    (smallest global batch, smallest per-process batch). A global-scope term
    sees the whole batch, a local one only its process's shard.
    """
    for t in terms:
        reg = t.regularizer
        need = int(getattr(reg, "min_batch", 1))
        scope = resolve_scope(getattr(t, "scope", "auto"), reg) if world > 1 else "local"
        for dom, (g, local), bs in (("source", source, batch_size), ("target", target, target_batch_size)):
            have = g if scope == "global" else local
            if have >= need:
                continue
            where = "in the global batch" if scope == "global" else "per process" if world > 1 else "per batch"
            fix = (
                "scope='global' (then it needs " + str(need) + " in the global batch), "
                if scope == "local" and world > 1
                else ""
            )
            raise ValueError(
                f"alignment term {t.name!r} ({type(reg).__name__}"
                + (f", scope {scope!r}" if world > 1 else "")
                + f") needs at least {need} "
                f"{dom} samples {where}, but with {dom} batch size {bs} per process on {world} process(es) some "
                f"step gives it only {have} (the last, smaller batch of an epoch counts). Use {fix}a larger "
                f"batch size, or a dataset size whose remainder is not that small"
            )


def check_run(
    *,
    fingerprint: Mapping[str, int],
    device: torch.device | str,
    alignment: Any,
    source_len: int,
    target_len: int | None,
    batch_size: int,
    target_batch_size: int,
    world: int,
) -> None:
    """The trainer's pre-flight check: same config everywhere, then batch sizes
    large enough for every alignment term. Raises ``ValueError`` on every process alike."""
    check_same_config(fingerprint, device=device)
    if alignment is not None and target_len is not None:
        check_min_batch(
            alignment.terms,
            source=shard_sizes(source_len, batch_size, world),
            target=shard_sizes(target_len, target_batch_size, world),
            world=world,
            batch_size=batch_size,
            target_batch_size=target_batch_size,
        )


def describe_alignment(alignment: Any) -> Sequence[str]:
    """A stable text description of the terms (for the fingerprint)."""
    if alignment is None:
        return []
    out = []
    for t in alignment.terms:
        out.append(f"{t.name}|{t.extra_repr()}|{t.regularizer!r}|scope={getattr(t, 'scope', 'auto')}")
    return out


def batch_sizes(config: Any, world: int) -> tuple[int, int]:
    """(source, target) examples per process per micro-batch for a TrainConfig.

    ``global_batch_size`` (when set) is split over the processes and must be
    divisible by their number; else ``per_device_train_batch_size`` is per process.
    The target batch (``per_device_target_batch_size``) defaults to the source batch per process.
    """
    g = getattr(config, "global_batch_size", None)
    bs = per_process_batch(g, world) if g else config.per_device_train_batch_size
    return bs, config.per_device_target_batch_size or bs


def check_same_resume_step(step: int, device: torch.device | str = "cpu") -> None:
    """After loading a checkpoint (or not): every process must continue from the same step."""
    check_same_config(
        config_fingerprint(resumed_from_step=step),
        device,
        hint=(
            "The processes resumed from different checkpoints: output_dir must be on a file system that every "
            "machine sees (checkpoints are written by the main process and read by all), or pass the same "
            "checkpoint path to every process"
        ),
    )


def check_launch(accelerator_world: int) -> None:
    """The launcher started N processes but Accelerate runs as one: every process would
    train alone on the whole data (N copies, no gradient sync). Typical cause: torchrun on
    CPU-only machines, where Accelerate needs ``--cpu`` (``ACCELERATE_USE_CPU=1``)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    group_world = (
        torch.distributed.get_world_size()
        if (torch.distributed.is_available() and torch.distributed.is_initialized())
        else 1
    )
    launched = max(env_world, group_world)
    if launched > 1 and accelerator_world != launched:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE / process group) but Accelerate runs "
            f"{accelerator_world}: each process would train alone. Launch with `accelerate launch` "
            "(add --cpu, or set ACCELERATE_USE_CPU=1, on machines without GPUs) so Accelerate joins the group"
        )


def preflight(trainer: Any, accelerator: Any, source: Any, target: Any | None) -> None:
    """Called by the Trainer before the first step (on every process): the launch and backend
    checks, then :func:`check_run` with a fingerprint of the config, task, data, trainable
    parameters and alignment terms. Checks only: it changes nothing."""
    cfg, alignment = trainer.config, trainer.alignment
    world = accelerator.num_processes
    check_launch(world)
    check_backend(getattr(accelerator, "distributed_type", None), alignment)
    kind = str(getattr(accelerator, "distributed_type", "")).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED") and accelerator.is_main_process:
        warnings.warn(
            f"the peftadapt Trainer under {kind} has not been run on GPUs: its sharded checkpointing is tested "
            "with torch FSDP2 on CPU processes only, and DeepSpeed ZeRO-3 checkpoints are not gathered (see "
            "docs/distributed.md, 'What is verified'); DDP (examples/accelerate/ddp.yaml) is the tested "
            "multi-process path",
            stacklevel=3,
        )
    fp = {}
    if world > 1:  # hashing the data costs a little; only worth it with several processes
        fp = config_fingerprint(
            training=dict(dataclasses.asdict(cfg).items()),
            task=trainer.task,
            max_length=trainer.max_length,
            features=[trainer.feature_layer, trainer.pooling, getattr(trainer, "class_tokens", None)],
            trainable=[
                (n, list(p.shape), str(p.dtype)) for n, p in trainer.model.named_parameters() if p.requires_grad
            ],
            alignment=list(describe_alignment(alignment)),
        )
        fp["source_data"] = digest_rows(source.ids, source.labels)
        fp["target_data"] = digest_rows(None if target is None else target.ids)
    check_run(
        fingerprint=fp,
        device=accelerator.device,
        alignment=alignment,
        source_len=len(source.ids),
        target_len=None if target is None else len(target.ids),
        batch_size=source.batch_size,
        target_batch_size=target.batch_size if target is not None else source.batch_size,
        world=world,
    )


def check_backend(distributed_type: Any, alignment: Any) -> None:
    """Stop early where the backend cannot train the alignment module.

    DeepSpeed builds one engine around one model (and owns its optimizer); a
    DANN / CDAN discriminator is a second trainable module that it cannot take.
    """
    kind = str(distributed_type or "").split(".")[-1]
    if kind != "DEEPSPEED" or alignment is None:
        return
    trainable = [t.name for t in alignment.terms if any(p.requires_grad for p in t.parameters())]
    if trainable:
        raise ValueError(
            f"alignment term(s) {trainable} have a trainable discriminator, which DeepSpeed cannot train: "
            "it prepares one model (one engine, its own optimizer) and the discriminator is a second "
            "trainable module. Launch with DDP or FSDP instead (examples/accelerate/ddp.yaml, fsdp_lora.yaml), "
            "or use discriminator-free regularizers under DeepSpeed: mmd, coral, entropy"
        )
