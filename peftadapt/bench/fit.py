"""``peftadapt bench memory-table``: which single-GPU combination fits which model size, computed.

For each Llama-shaped size of :data:`peftadapt.bench.models.LLAMA_SIZES`, base precision (4-bit NF4,
8-bit LLM.int8(), 16-bit bf16), gradient checkpointing on/off and optimizer (``paged_adamw_8bit`` /
``adamw_torch``), the analytic memory model (:func:`peftadapt.bench.memory_model.analytic_memory`)
gives the peak of one LoRA training step (r=16 on every linear layer, fp32 adapters, bf16 compute,
SDPA attention, batch 1, sequence 2048 by default). A combination fits a GPU when

    total * ALLOC_SLACK + CUDA_CONTEXT <= the memory the card reports

(the allocator's fragmentation and the CUDA context / cuBLAS workspace are not in the model).
Computed, not measured: ``benchmarks/gpu_check.sh`` measures the 8B and 70B rows on a GPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import memory_model as mm
from .models import llama_config

# what nvidia-smi reports for a representative card of each size (MiB)
GPUS: dict[str, int] = {
    "24 GB": 24564,  # RTX 3090 / 4090
    "48 GB": 49140,  # RTX A6000
    "80 GB": 81559,  # A100 / H100 80GB
    "141 GB": 143771,  # H200
}
CUDA_CONTEXT = 1 << 30  # CUDA context, cuBLAS workspace, kernels: about 0.5-1 GiB
ALLOC_SLACK = 1.10  # the caching allocator's fragmentation and transient buffers
SIZES = ("1b", "3b", "8b", "14b", "32b", "70b")
BITS = {4: "4bit", 8: "8bit", 16: None}
OPTIMS = ("paged_adamw_8bit", "adamw_torch")


def estimate(size: str, bits: int, ckpt: bool, optim: str, seq: int = 2048, batch: int = 1, r: int = 16) -> dict:
    """The memory model's parts for one combination (bytes)."""
    arch = mm.Arch.from_config(llama_config(size))
    return mm.analytic_memory(
        arch,
        "lora",
        batch,
        seq,
        dtype="bfloat16",
        quant=BITS[bits],
        grad_ckpt=ckpt,
        optimizer=optim,
        adapter_dtype="float32",
        dequant=True,
        r=r,
        targets=tuple(arch.linear_shapes()),
    )


def fits(total: int, gpu_mib: int) -> bool:
    return total * ALLOC_SLACK + CUDA_CONTEXT <= gpu_mib * 2**20


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f}"


def table(seq: int = 2048, batch: int = 1, r: int = 16, sizes=SIZES) -> str:
    """The Markdown table (one row per size x bits x checkpointing; both optimizers in each row)."""
    gpus = list(GPUS)
    head = (
        "| model | bits | grad. ckpt | weights | activations | total, paged_adamw_8bit | total, adamw_torch | "
        + " | ".join(gpus)
        + " |"
    )
    lines = [head, "|" + "---|" * (7 + len(gpus))]
    for size in sizes:
        n = mm.Arch.from_config(llama_config(size)).total_params()
        for bits in BITS:
            for ckpt in (True, False):
                e8, e32 = (estimate(size, bits, ckpt, o, seq, batch, r) for o in OPTIMS)
                marks = []
                for g in gpus:
                    if fits(e32["total"], GPUS[g]):
                        marks.append("yes")
                    elif fits(e8["total"], GPUS[g]):
                        marks.append("8-bit optim only")
                    else:
                        marks.append("no")
                cells = [f"{size} ({n / 1e9:.2f} B)", str(bits), "on" if ckpt else "off"]
                cells += [_gib(e8["weights"]), _gib(e8["activations"]), _gib(e8["total"]), _gib(e32["total"])]
                lines.append("| " + " | ".join(cells + marks) + " |")
    return "\n".join(lines)


def command(seq: int, batch: int, r: int) -> str:
    extra = "".join(f" --{k} {v}" for k, v, d in (("seq", seq, 2048), ("batch", batch, 1), ("r", r, 16)) if v != d)
    return "python -m peftadapt.bench memory-table" + extra


def document(seq: int = 2048, batch: int = 1, r: int = 16) -> str:
    """The table with its heading lines: what docs/quantization.md holds between its markers."""
    return (
        f"Computed with `{command(seq, batch, r)}` (analytic memory model, **not measured**). "
        f"LoRA r={r} on all linear layers, fp32 adapters, bf16 compute, SDPA, batch {batch} x {seq} tokens. "
        f"GiB; a GPU column says whether `total x {ALLOC_SLACK:.2f} + {CUDA_CONTEXT / 2**30:.0f} GiB` fits in what "
        "the card reports (24564 / 49140 / 81559 / 143771 MiB); '8-bit optim only': fits with "
        "`paged_adamw_8bit`, not with `adamw_torch`.\n\n" + table(seq, batch, r)
    )


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "memory-table",
        help="which bits / checkpointing / optimizer fits which model on a 24-141 GB GPU (computed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    sp.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    sp.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")


def main(args: Any) -> int:
    if min(args.seq, args.batch, args.r) < 1:
        raise SystemExit("peftadapt bench memory-table: --seq, --batch and --r must be >= 1")
    print(document(args.seq, args.batch, args.r))
    return 0
