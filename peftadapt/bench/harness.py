"""Measure one configuration in this process: peak memory and time of a training step.

A *spec* is a plain dict (JSON-able, so it crosses a subprocess boundary):

    model      "llama-20m" ... "llama-1b", "minilm", or a model folder
    head       "causal" | "seqcls"
    method     "full" | "head" | "lora" | "dora" | "houlsby" | "pfeiffer" | "prefix"
    impl       "peftadapt" | "peft" | "adapters"
    quant      null | "4bit" | "8bit"
    batch, seq, grad_ckpt, regularizer (null or a peftadapt.align name),
    warmup, steps, dtype, device ("cpu" | "cuda"), seed, threads (null = torch's default)

One step is forward, backward, optimizer (AdamW) step and zero_grad, on a
random batch. The first warm-up step also counts the bytes autograd saves for
the backward pass (``saved_tensors_hooks``, distinct storages), which is the
measured counterpart of the analytic activation term; the timed steps run
without hooks. Peak memory is taken over the timed steps only:

* CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` after
  ``reset_peak_memory_stats``;
* CPU: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the timed steps) minus its resident set
  before the model was built. Run each spec in a fresh process
  (:mod:`peftadapt.bench.runner` does) so that one configuration's freed
  memory does not count for the next. Before the reset, glibc is asked to
  hand freed heap memory back to the kernel (``malloc_trim(0)``): building a
  model, quantizing it in particular, frees hundreds of MiB that glibc would
  otherwise keep resident, and the peak would count memory the step never
  needs (a 150M Llama on a 4-bit base: 233 MiB of it).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import tempfile
import time
from typing import Any

import torch

from . import memory_model as mm
from . import methods as M
from .models import build_model, tiny_variant

SPEC_DEFAULTS: dict[str, Any] = {
    "model": "llama-20m",
    "head": "causal",
    "method": "lora",
    "impl": "peftadapt",
    "quant": None,
    "batch": 1,
    "seq": 128,
    "grad_ckpt": False,
    "regularizer": None,
    "warmup": 1,
    "steps": 3,
    "dtype": "float32",
    "device": "cpu",
    "seed": 0,
    "threads": None,
    "attn": None,
}
MiB = 1024 * 1024


def make_spec(**kw: Any) -> dict[str, Any]:
    """Fill defaults and check every field (ValueError naming the bad value and the choices)."""
    unknown = sorted(set(kw) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown spec field(s) {unknown}; valid fields: {sorted(SPEC_DEFAULTS)}")
    s = {**SPEC_DEFAULTS, **kw}
    M.check(s["impl"], s["method"])
    if s["head"] not in ("causal", "seqcls"):
        raise ValueError(f"unknown head {s['head']!r}; valid heads: ['causal', 'seqcls']")
    if s["quant"] not in (None, "4bit", "8bit"):
        raise ValueError(f"unknown quant {s['quant']!r}; valid choices: [None, '4bit', '8bit']")
    if s["dtype"] not in mm.DTYPE_BYTES:
        raise ValueError(f"unknown dtype {s['dtype']!r}; valid choices: {sorted(mm.DTYPE_BYTES)}")
    if s["device"] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {s['device']!r}; valid choices: ['cpu', 'cuda']")
    for k in ("batch", "seq", "steps"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {s[k]!r}")
    if not isinstance(s["warmup"], int) or s["warmup"] < 1:
        raise ValueError(
            f"warmup must be an integer >= 1 (the first step allocates optimizer state), got {s['warmup']!r}"
        )
    if s["quant"] is not None and s["method"] == "full":
        raise ValueError("full fine-tuning of a quantized base is not possible; choose a PEFT method")
    return s


# -- process memory -----------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort elsewhere


def trim_heap() -> bool:
    """Return freed heap memory to the kernel (glibc ``malloc_trim(0)``); False where there is
    no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0), after trimming the heap so the
    peak starts from memory actually held. False where the reset is not possible."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (distinct storages, parameters and buffers
    excluded) inside a ``with`` block: the measured activation memory."""

    def __init__(self, exclude=()):
        self.storages: dict[int, int] = {}
        # parameters and buffers are saved by reference (a linear saves its weight): not activations
        self._exclude = set()
        for t in exclude:
            with contextlib.suppress(RuntimeError, NotImplementedError):
                self._exclude.add(t.untyped_storage().data_ptr())

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in self._exclude:
                self.storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


# -- the step -----------------------------------------------------------------
def _batch(model, head: str, batch: int, seq: int, seed: int, device: str, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        if head == "causal":
            out["labels"] = ids.clone()
        else:
            out["labels"] = torch.randint(0, getattr(model.config, "num_labels", 2), (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


class _Features:
    """Mean-pooled features of the last forward: ``peftadapt.FeatureTap`` when present, else the
    last hidden state (the fallback asks the model for hidden states)."""

    def __init__(self, model):
        self.tap = None
        try:
            # lazy: a peer's venv (e.g. AdapterHub's transformers 4.57) may hold a peftadapt that fails to import
            from ..features import FeatureTap

            self.tap = FeatureTap(model, pooling="mean")
        except Exception:  # noqa: BLE001 - fall back to hidden states
            self.tap = None

    def forward(self, model, batch):
        if self.tap is not None:
            out = model(**batch)
            return out, self.tap.pooled(batch["attention_mask"])
        out = model(**batch, output_hidden_states=True)
        hs = out.hidden_states[-1]
        m = batch["attention_mask"].unsqueeze(-1).to(hs.dtype)
        return out, (hs * m).sum(1) / m.sum(1).clamp_min(1)


def _regularizer(name: str, dim: int, num_classes: int):
    """``peftadapt.align.build(name)``, filling in the feature size / class count the adversarial ones need."""
    # lazy: a peer's venv may hold a peftadapt that fails to import (the regularizer runs need ours)
    from ..align.registry import build_with_defaults

    return build_with_defaults(name, {"in_features": dim, "num_classes": num_classes})


def _prime(s: dict[str, Any]) -> None:
    """One step of a tiny model of the same family through the same code path, before the baseline:
    lazy imports, kernel set-up and thread pools then do not count as the configuration's memory."""
    import gc

    tiny = {**s, "model": tiny_variant(s["model"]), "batch": 2, "seq": 8, "warmup": 1, "steps": 1}
    _measure(tiny, prime=False, measure=False)
    gc.collect()


def run(spec: dict[str, Any], prime: bool = True) -> dict[str, Any]:
    """Measure ``spec`` (see the module docstring) and return every raw figure.

    With ``prime`` a tiny model of the same family first runs one step through
    the same code, so that lazy imports and one-off kernel set-up are part of
    the baseline, not of the configuration's peak."""
    return _measure(make_spec(**spec), prime=prime, measure=True)


def _measure(spec: dict[str, Any], prime: bool, measure: bool) -> dict[str, Any]:
    s = make_spec(**spec)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    dev = s["device"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but torch.cuda.is_available() is False; valid choices here: ['cpu']")
    import transformers

    res: dict[str, Any] = {"spec": s, "torch": torch.__version__, "transformers": transformers.__version__}
    if prime:
        _prime(s)
    trim_heap()  # the baseline too: what priming freed is not the configuration's
    base_rss = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(
            s["model"],
            s["head"],
            dtype=s["dtype"],
            quant=s["quant"],
            seed=s["seed"],
            attn=s["attn"],
            tmpdir=tmp,
            use_ours=s["impl"] == "peftadapt",
            device=dev,
        )
        if dev == "cuda" and s["quant"] is None:
            model.to(dev)
        arch = mm.Arch.from_config(model.config, s["head"])
        if s["grad_ckpt"] and s["quant"] is None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = M.apply(model, s["impl"], s["method"], s["head"], quant=s["quant"], grad_ckpt=s["grad_ckpt"])
        model.train()
        trainable, total = M.trainable_counts(model)
        res.update(trainable_params=trainable, total_params=total, analytic_total_params=arch.total_params())
        params = [p for p in model.parameters() if p.requires_grad]
        reg = feats = None
        if s["regularizer"]:
            num_classes = arch.num_labels if s["head"] == "seqcls" else arch.vocab
            reg = _regularizer(s["regularizer"], arch.hidden, num_classes).to(dev)
            params += [p for p in reg.parameters() if p.requires_grad]
            feats = _Features(model)
        opt = torch.optim.AdamW(params, lr=1e-4)
        src = _batch(model, s["head"], s["batch"], s["seq"], s["seed"], dev)
        tgt = _batch(model, s["head"], s["batch"], s["seq"], s["seed"] + 1, dev, labels=False)

        def step():
            if reg is None:
                loss = model(**src).loss
            else:
                assert feats is not None  # made with reg (above)
                out_s, fs = feats.forward(model, src)
                out_t, ft = feats.forward(model, tgt)
                if getattr(reg, "needs_logits", False):
                    ls, lt = _pooled_logits(out_s, src), _pooled_logits(out_t, tgt)
                    d = reg(fs, ft, ls, lt)
                else:
                    d = reg(fs, ft)
                loss = out_s.loss + d
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        held = list(model.parameters()) + list(model.buffers())
        if reg is not None:
            held += list(reg.parameters()) + list(reg.buffers())
        with SavedTensorMeter(held) as meter:
            step()
        res["saved_tensors_bytes"] = meter.bytes
        if not measure:
            return res
        for _ in range(s["warmup"] - 1):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        res["peak_rss_reset"] = reset_peak_rss()
        times = []
        for _ in range(s["steps"]):
            t0 = time.perf_counter()
            loss = step()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res["loss"] = loss
        res["step_times_s"] = times
        res["median_step_s"] = statistics.median(times)
        res["tokens_per_s"] = s["batch"] * s["seq"] / res["median_step_s"]
        res["peak_rss_bytes"] = peak_rss_bytes() - base_rss
        res["baseline_rss_bytes"] = base_rss
        if dev == "cuda":
            res["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            res["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        res["state_bytes"] = _state_bytes(model, opt)
        res["saved_bytes"], res["saved_is_estimate"] = M.saved_size_bytes(model, s["impl"], s["method"], tmp)

    attention = "eager" if s["attn"] == "eager" else arch.sdpa_kernel(dev)
    res["analytic"] = mm.analytic_memory(
        arch,
        s["method"],
        s["batch"],
        s["seq"],
        dtype=s["dtype"],
        quant=s["quant"],
        grad_ckpt=s["grad_ckpt"],
        attention=attention,
        trainable=trainable,
        regularizer=bool(s["regularizer"]),
        r=M.DEFAULTS["r"],
        reduction_factor=M.DEFAULTS["reduction_factor"],
        prefix_tokens=M.DEFAULTS["prefix_tokens"],
        targets=tuple(M.targets_for(model)),
    )
    measured = res["cuda_max_allocated_bytes"] if dev == "cuda" else res["peak_rss_bytes"]
    res["peak_bytes"] = measured
    res["ratio_measured_analytic"] = measured / max(1, res["analytic"]["total"])
    return res


def _pooled_logits(out, batch):
    logits = out.logits
    if logits.dim() == 3:  # causal LM: mean over the real tokens
        m = batch["attention_mask"].unsqueeze(-1).to(logits.dtype)
        logits = (logits * m).sum(1) / m.sum(1).clamp_min(1)
    return logits


def _state_bytes(model, opt) -> dict[str, int]:
    """Bytes of the tensors torch holds for training: weights (+buffers), gradients, optimizer state."""
    seen: set[int] = set()
    w = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        w += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        absmax = getattr(qs, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            w += absmax.numel() * absmax.element_size()
    o = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                o += v.numel() * v.element_size()
    return {"weights": w, "optimizer": o}
