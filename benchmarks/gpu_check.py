"""QLoRA SFT on one GPU, side by side: peftadapt's Trainer, ``add_alignment`` (MMD) on TRL's SFTTrainer,
and plain peft + bitsandbytes + TRL; gradient checkpointing on and off; plus a 70B-shaped step.

Every part is an 8B-shaped Llama (``peftadapt.bench.models.LLAMA_SIZES["8b"]``: Llama-3-8B's shape) with
random weights built directly in 4-bit NF4 (``peftadapt.build_quantized``), sequence 2048, batch 2 (MMD's
unbiased estimator needs two examples per domain),
LoRA r=16 on all linear layers, bf16 compute, AdamW (``adamw_torch``) in every trainer:

  peftadapt        build_quantized (our k-bit preparation) + peftadapt.wrap + peftadapt.Trainer
  trl_mmd          the same model in TRL's SFTTrainer + peftadapt.add_alignment(MMD on last-token features,
                   a second, target batch per step)
  trl_peft         TRL's QLoRA recipe: a 4-bit model as from_pretrained with a BitsAndBytesConfig gives it
                   (here build_quantized(prepare=False)) + SFTTrainer(peft_config=LoraConfig(...)); TRL wraps
                   it with peft's get_peft_model (it does not call prepare_model_for_kbit_training, whose fp32
                   upcast bench_qlora.py's peft_qlora mode measures)

TRL casts the LoRA weights of a 4-bit model to bf16 (both TRL parts; peftadapt's Trainer keeps them fp32).
  70b              the peftadapt part on a 70B shape (Llama-3-70B), one step: does it fit, peak vs analytic

Each part runs in its own process under its own timeout (a failure or a kill loses that part only),
and the results are rewritten after each part: ``benchmarks/results/gpu_check/gpu_check.{json,md}``.
Peak = ``torch.cuda.max_memory_allocated`` (reserved beside it) over the training steps; tokens/s over
the steps after the first; analytic = ``peftadapt.bench.memory_model.analytic_memory`` for the same
configuration (our preparation; the trl_mmd row adds the target batch's activations).

    benchmarks/gpu_check.sh                        # on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu_check.py --tiny          # the same code on the CPU at a tiny size (tests run it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repo's peftadapt and benchmarks/
    sys.path.insert(0, str(REPO))

from benchmarks.bench_qlora import machine  # noqa: E402  (the machine record: one home)
from peftadapt.bench import memory_model as mm  # noqa: E402
from peftadapt.bench.models import llama_config  # noqa: E402
from peftadapt.bench.report import fmt_mib, write_atomic  # noqa: E402

IMPLS = ("peftadapt", "trl_mmd", "trl_peft")
NEEDS = {"peftadapt": ("bitsandbytes", "peft"), "trl_mmd": ("bitsandbytes", "peft", "trl", "datasets")}
NEEDS["trl_peft"] = NEEDS["trl_mmd"]
NEEDS["70b"] = NEEDS["peftadapt"]
WHEELS = "benchmarks/gpu_wheels.sh"  # downloads the wheels the GPU image lacks


def parts(tiny: bool, only: list[str] | None) -> list[dict[str, Any]]:
    """The run order: checkpointing on (the useful setting) first, then the 70B step, then off."""
    size, big = ("tiny", "tiny") if tiny else ("8b", "70b")
    out = [{"name": f"{i}/ckpt", "impl": i, "size": size, "ckpt": True} for i in IMPLS]
    out.append({"name": "70b/ckpt", "impl": "peftadapt", "size": big, "ckpt": True, "steps": 1, "big": True})
    out += [{"name": f"{i}/no-ckpt", "impl": i, "size": size, "ckpt": False} for i in IMPLS]
    if only:
        out = [p for p in out if p["name"] in only or p["name"].split("/")[0] in only]
    return out


# ----------------------------------------------------------------------------------------------------------
# worker: one part in this process


def word_tokenizer(vocab: int):
    """A tokenizer whose text ``"t5 t17 t3"`` is exactly the ids 5, 17, 3 (no download; random ids >= 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # special tokens are split out of the text before the words: their names must not be inside a word
    words = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def random_texts(n: int, seq: int, vocab: int, seed: int) -> list[str]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def analytic(size: str, impl: str, ckpt: bool, seq: int, batch: int, dtype: str, r: int) -> dict[str, int]:
    arch = mm.Arch.from_config(llama_config(size))
    return mm.analytic_memory(
        arch,
        "lora",
        batch,
        seq,
        dtype=dtype,
        quant="4bit",
        grad_ckpt=ckpt,
        optimizer="adamw_torch",
        adapter_dtype="bfloat16" if impl.startswith("trl") else "float32",  # TRL casts QLoRA adapters to bf16
        dequant=True,
        regularizer=impl == "trl_mmd",
        r=r,
        targets=tuple(arch.linear_shapes()),
    )


class _Clock:
    """Step times with the device synchronized at both ends."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self._t = cuda, [], 0.0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def _hf_args(out: str, a, ckpt: bool, cuda: bool, steps: int, **kw):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=a.batch,
        learning_rate=1e-4,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=a.seq,
        packing=False,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def _trl_trainer(a, impl: str, model, tok, steps: int, clock: _Clock, out: str, cuda: bool):
    import datasets
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            clock.start()

        def on_step_end(self, *args, **kw):
            clock.stop()

    n = a.batch * steps
    ids = [tok(t)["input_ids"] for t in random_texts(n, a.seq, len(tok), 0)]
    source = datasets.Dataset.from_dict({"input_ids": ids})  # already tokenized: TRL keeps it as is
    kw: dict[str, Any] = {}
    if impl == "trl_peft":
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(
            r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = SFTTrainer(
        model=model,
        args=_hf_args(out, a, a.ckpt, cuda, steps),
        train_dataset=source,
        processing_class=tok,
        callbacks=[Timer()],
        **kw,
    )
    if impl == "trl_mmd":
        from peftadapt import MMD, Term, add_alignment

        add_alignment(
            trainer,
            target=random_texts(n, a.seq, len(tok), 1),
            pooling="last",
            regularizers=[Term(MMD(), weight=1.0)],
        )
    return trainer


def _peftadapt_trainer(a, model, tok, steps: int, clock: _Clock, out: str):
    from peftadapt.train import Trainer

    tr = Trainer(
        model,
        tok,
        random_texts(a.batch * steps, a.seq, len(tok), 0),
        task="causal_lm",
        max_length=a.seq,
        output_dir=out,
        per_device_train_batch_size=a.batch,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        gradient_checkpointing=a.ckpt,
        disable_tqdm=True,
        plot=False,
        save_total_limit=1,
    )
    step = tr.train_step

    def timed_step():  # the recipe's step, timed (an instance attribute wins over the method)
        clock.start()
        try:
            return step()
        finally:
            clock.stop()

    tr.train_step = timed_step  # type: ignore[method-assign]
    # no checkpoints (the TRL parts run with save_strategy="no"): at 70B the trainable weights and AdamW
    # state are 2.5 GB to write, time the budget needs for the steps
    tr.save_checkpoint = lambda: None  # type: ignore[method-assign]
    return tr


def worker(a) -> dict[str, Any]:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    import peftadapt
    from peftadapt.bench.harness import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

    cuda = a.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    cfg = llama_config(a.size)
    cfg.use_cache = False
    tok = word_tokenizer(cfg.vocab_size)
    t0 = time.perf_counter()
    common = dict(bits=4, device=a.device, compute_dtype=dtype, dtype=dtype, seed=0)
    if a.impl == "trl_peft":
        model = peftadapt.build_quantized(cfg, prepare=False, **common)
    else:
        model = peftadapt.build_quantized(cfg, gradient_checkpointing=a.ckpt, **common)
        model = peftadapt.wrap(model, "lora", r=a.r, alpha=2 * a.r, dropout=0.0, target_modules="all-linear")
    build_s = time.perf_counter() - t0
    steps = a.steps
    clock = _Clock(cuda)
    out = os.path.join(a.tmp, f"{a.impl}-{a.size}-{int(a.ckpt)}")
    if a.impl == "peftadapt":
        trainer = _peftadapt_trainer(a, model, tok, steps, clock, out)
    else:
        trainer = _trl_trainer(a, a.impl, model, tok, steps, clock, out, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        trim_heap()
        reset_peak_rss()
        base = rss_bytes()
    trainer.train()
    m = trainer.model if a.impl != "peftadapt" else model
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    times = clock.times
    timed = times[1:] if len(times) > 1 else times
    tokens = a.batch * a.seq * (2 if a.impl == "trl_mmd" else 1)
    res: dict[str, Any] = {
        "impl": a.impl,
        "size": a.size,
        "ckpt": a.ckpt,
        "seq": a.seq,
        "batch": a.batch,
        "r": a.r,
        "steps": len(times),
        "params": mm.Arch.from_config(cfg).total_params(),
        "trainable": trainable,
        "build_s": round(build_s, 2),
        "step_times": [round(t, 4) for t in times],
        "step_s": round(sum(timed) / max(1, len(timed)), 4),
        "analytic": analytic(a.size, a.impl, a.ckpt, a.seq, a.batch, dtype, a.r),
    }
    res["tokens_per_s"] = round(tokens / res["step_s"], 1) if res["step_s"] else None
    if cuda:
        res["peak"] = torch.cuda.max_memory_allocated()
        res["peak_reserved"] = torch.cuda.max_memory_reserved()
    else:
        res["peak"] = peak_rss_bytes()  # the process's peak RSS, all of it: on the CPU this only exercises the code
    res["before_steps"] = base  # the model (CUDA: allocated; CPU: the process's RSS)
    res["peak_over_analytic"] = round(res["peak"] / res["analytic"]["total"], 3)
    return res


# ----------------------------------------------------------------------------------------------------------
# driver


def prerequisites(device: str) -> dict[str, Any]:
    """Versions of what the parts need, whether CUDA is there, and what is missing (checked first)."""
    import importlib.util

    import torch

    info = machine(device)
    for mod in ("trl", "datasets", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__ if importlib.util.find_spec(mod) else None
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
            info[mod] = f"broken: {type(e).__name__}: {e}"[:200]
    info["missing"] = sorted(
        m for m in ("bitsandbytes", "peft", "trl", "datasets", "accelerate") if not isinstance(info.get(m), str)
    )
    info["broken"] = sorted(m for m, v in info.items() if isinstance(v, str) and v.startswith("broken"))
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        free, _ = torch.cuda.mem_get_info()
        info["gpu_free_gib"] = round(free / 2**30, 1)
    return info


def markdown(results: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    lines = [
        "# QLoRA SFT on one GPU: peftadapt vs add_alignment on TRL vs peft + bitsandbytes + TRL",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("missing", "broken")),
        "",
        (
            "Llama shapes from `peftadapt.bench.models.LLAMA_SIZES`, random weights built in 4-bit NF4 "
            "(`build_quantized`), LoRA r=16 on all linear layers, AdamW. Peak = max_memory_allocated over the "
            "steps (reserved in brackets; on the CPU: the process's peak RSS, an exercise of the code only). "
            "Analytic = `analytic_memory` (computed; LoRA in bf16 for the TRL rows, which TRL casts to bf16, fp32 "
            "for peftadapt's Trainer). tokens/s counts the target batch of trl_mmd too."
        ),
        "",
        (
            "| part | model | grad. ckpt | trainable | before steps MiB | analytic weights MiB | peak MiB "
            "| analytic MiB | peak / analytic | step (s) | tokens/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('size', '')} | | | failed: {r['error'][-160:]} | | | | | | |")
            continue
        peak = fmt_mib(r["peak"]) + (f" ({fmt_mib(r['peak_reserved'])})" if "peak_reserved" in r else "")
        lines.append(
            f"| {r['name']} | {r['size']} ({r['params'] / 1e9:.2f} B) | {'on' if r['ckpt'] else 'off'} | "
            f"{r['trainable'] / 1e6:.2f} M | {fmt_mib(r['before_steps'])} | {fmt_mib(r['analytic']['weights'])} | "
            f"{peak} | {fmt_mib(r['analytic']['total'])} | "
            f"{r['peak_over_analytic']:.2f} | {r['step_s']:.3f} | {r['tokens_per_s']} |"
        )
    return "\n".join(lines) + "\n"


def _run_part(p: dict[str, Any], a, timeout: float, tmp: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", p["impl"], "--size", p["size"]]
    cmd += ["--device", a.device, "--seq", str(a.seq), "--batch", str(a.batch), "--r", str(a.r), "--tmp", tmp]
    cmd += ["--steps", str(p.get("steps", a.steps))] + (["--ckpt"] if p["ckpt"] else [])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.device == "cpu":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()
        return {"error": " / ".join(tail[-3:])[-400:] or f"exit {out.returncode}"}
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny Llama on the CPU, seq 32: tests the script")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, cpu with --tiny")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 32 with --tiny)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (default 2: MMD needs 2 per domain)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="training steps per part; the first is not timed")
    ap.add_argument("--parts", default=None, help="comma-separated part names or implementations (default: all)")
    ap.add_argument("--timeout", type=float, default=100, help="seconds per 8B part (default 100)")
    ap.add_argument("--timeout-big", type=float, default=150, help="seconds for the 70B part (default 150)")
    ap.add_argument("--budget", type=float, default=460, help="seconds for all parts together (default 460)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.seq = a.seq or (32 if a.tiny else 2048)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0

    t_all = time.perf_counter()
    info = prerequisites(a.device)
    print("prerequisites:", json.dumps(info), flush=True)
    if a.device == "cuda" and not info["cuda"]:
        print("gpu_check: --device cuda but torch sees no CUDA device (use --tiny on a CPU)", file=sys.stderr)
        return 2
    if "bitsandbytes" in info["missing"] or "peft" in info["missing"]:
        print(f"gpu_check: missing {info['missing']}: run {WHEELS} here, carry .whl (see its header)", file=sys.stderr)
        return 2
    command = "benchmarks/gpu_check.sh" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for p in parts(a.tiny, [s.strip() for s in a.parts.split(",")] if a.parts else None):
            left = a.budget - (time.perf_counter() - t_all)
            lacking = [m for m in NEEDS["70b" if p.get("big") else p["impl"]] if m in info["missing"] + info["broken"]]
            t = time.perf_counter()
            if lacking:
                res = {"error": f"skipped: {', '.join(lacking)} not importable"}
            elif left < 20:
                res = {"error": f"skipped: the {a.budget:.0f}s budget is spent"}
            else:
                res = _run_part(p, a, min(a.timeout_big if p.get("big") else a.timeout, left), tmp)
            res = {"name": p["name"], **({"size": p["size"]} if "error" in res else {}), **res}
            results.append(res)
            took = time.perf_counter() - t
            if "error" in res:
                print(f"{p['name']:<18} FAILED ({took:.0f}s): {res['error'][-300:]}", flush=True)
            else:
                print(
                    f"{p['name']:<18} peak {fmt_mib(res['peak'])} analytic {fmt_mib(res['analytic']['total'])} "
                    f"step {res['step_s']:.3f}s {res['tokens_per_s']} tok/s ({took:.0f}s)",
                    flush=True,
                )
            payload = {"command": command, "machine": info, "args": vars(a), "results": results}
            payload["wall_s"] = round(time.perf_counter() - t_all, 1)
            stem = "gpu_check_tiny" if a.tiny else "gpu_check"
            write_atomic(str(out_dir / f"{stem}.json"), json.dumps(payload, indent=1, default=str) + "\n")
            write_atomic(str(out_dir / f"{stem}.md"), markdown(results, info, command))
    print(markdown(results, info, command))
    ok = sum("error" not in r for r in results)
    print(f"gpu_check: {ok}/{len(results)} parts ran, {time.perf_counter() - t_all:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
