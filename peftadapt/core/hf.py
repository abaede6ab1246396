"""Facts about Hugging Face transformers models that every layer needs, in one place.

- the task-head attribute names (:data:`HEAD_NAMES` and its parts);
- :func:`unwrap`: the transformers model inside a peft ``PeftModel`` or a peftadapt
  ``AdaptedModel`` (both expose ``get_base_model()``);
- :func:`find_task_head`, :func:`count_params` (4-bit weights counted as peft counts them),
  :func:`check_transformers_model` and the adapter-name rule :func:`validate_adapter_name`;
- :func:`check_model_folder`: what a ``save_pretrained`` folder must hold, checked in
  milliseconds before anything is loaded (config.json parses, no safetensors file is cut short).
- the attention kernels ``from_pretrained`` takes (:data:`AttnImplementation`) and
  :func:`check_attn_implementation`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn as nn

if TYPE_CHECKING:  # for annotations only: the package does not import transformers at import time
    from transformers import PretrainedConfig

# Top-level attribute names transformers gives its task heads. The final projection of a
# classifier-like head: its *input* is the feature the classifier reads.
CLASSIFIER_HEADS = ("classifier", "score", "qa_outputs")
# Language-model heads: vocabulary-sized and usually tied to the input embeddings.
LM_HEAD_NAMES = ("lm_head", "cls", "vocab_transform", "vocab_layer_norm", "vocab_projector")
# Every head module, in the order a model applies them (DistilBERT: pre_classifier, then classifier).
HEAD_NAMES = ("pre_classifier", *CLASSIFIER_HEADS, *LM_HEAD_NAMES)
# The last projection of each kind of head (feature taps read its input; quantization skips it).
OUTPUT_HEADS = (*CLASSIFIER_HEADS, "lm_head")
# Final norms that produce the last hidden state in decoder stacks.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


# The attribute `wrap(model, "full")` sets on a model whose every weight trains (full fine-tuning).
FULL_FINETUNE_MARK = "_peftadapt_full_finetune"

# transformers' causal-LM class names end like this (LlamaForCausalLM, GPT2LMHeadModel)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


# transformers' ``attn_implementation`` values (from_pretrained / from_config): torch's fused
# scaled_dot_product_attention, the plain matmul-softmax-matmul, or the flash-attn package's kernels
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)


def check_attn_implementation(name: Any, device: Any = None, where: str = "attn_implementation") -> str:
    """``name`` if this machine can run it, else one-line ``ValueError`` with the way out.

    ``flash_attention_2`` needs the ``flash-attn`` package and a CUDA GPU; ``device`` is where the
    model will run (default: CUDA when torch sees a GPU)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{where}: unknown attention implementation {name!r}; valid: {list(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                f"{where}: flash_attention_2 needs the flash-attn package, which is not installed "
                "(pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa"
            )
        if not cuda:
            raise ValueError(
                f"{where}: flash_attention_2 runs on a CUDA GPU only, not on {device or 'the CPU'}; use sdpa"
            )
    return name


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the transformers model inside ``model`` is a causal LM (by its class name)."""
    return type(unwrap(model)).__name__.endswith(CAUSAL_LM_SUFFIXES)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` / peftadapt ``AdaptedModel`` (or ``model``)."""
    for _ in range(4):  # a wrapper of a wrapper at most; never loops on a model returning itself
        get_base = getattr(model, "get_base_model", None)
        if not callable(get_base):
            break
        inner = get_base()
        if inner is model or not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def hf_config(model: nn.Module) -> PretrainedConfig:
    """``model.config``, typed: torch annotates every dynamic module attribute as ``Tensor | Module``."""
    return model.config  # type: ignore[return-value]  # torch types Module.__getattr__ as Tensor | Module


def find_task_head(model: nn.Module) -> list[str]:
    """Names of the task-head modules of a transformers model (top-level attributes).

    ``classifier`` for BERT classifiers, ``score`` for decoder classifiers,
    ``["pre_classifier", "classifier"]`` for DistilBERT, ``lm_head`` for causal
    LMs, ``qa_outputs`` for question answering; ``[]`` for a bare encoder
    (``AutoModel``). Names are relative to the transformers model, also when
    ``model`` is an AdaptedModel or a peft PeftModel.
    """
    children = dict(unwrap(model).named_children())
    return [n for n in HEAD_NAMES if n in children and isinstance(children[n], nn.Module)]


def classifier_heads(model: nn.Module) -> list[str]:
    """The classifier-like heads (:data:`CLASSIFIER_HEADS`) that ``model`` has as attributes."""
    return [n for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)]


def count_params(param: torch.Tensor) -> int:
    """Elements of a parameter; bitsandbytes 4-bit weights pack two values per byte of
    storage, counted unpacked (as peft counts them)."""
    n = param.numel()
    if param.__class__.__name__ == "Params4bit":
        n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
    return n


def trainable_and_total(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights unpacked."""
    trainable = total = 0
    for p in model.parameters():
        k = count_params(p)
        total += k
        if p.requires_grad:
            trainable += k
    return trainable, total


def check_transformers_model(model: object) -> None:
    """TypeError unless ``model`` looks like a transformers PreTrainedModel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap() needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if getattr(model, "config", None) is None or not hasattr(model.config, "model_type"):
        raise TypeError(
            f"wrap() needs a Hugging Face transformers model (with a .config); got {type(model).__name__}. "
            "Load one with e.g. AutoModelForSequenceClassification.from_pretrained(path)."
        )


def validate_adapter_name(name: Any) -> None:
    """The one rule for adapter names (wrap, add_adapter, AdaptedModel.add_adapter): a
    non-empty string of letters, digits, '_' or '-'. A name prefixes module paths and saved
    weight keys, so '.' (a path separator), '/' or spaces would break them."""
    if isinstance(name, str) and "." in name:
        raise ValueError(
            f"adapter name {name!r} may not contain '.' (it prefixes the saved weight keys); "
            "use letters, digits, '_' or '-'"
        )
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"adapter name must be a non-empty string of letters, digits, '_' or '-'; got {name!r}")


def wrapped_reason(model: nn.Module) -> str | None:
    """Say why ``model`` already carries adapters (``None`` if it does not): a peftadapt
    AdaptedModel or injected slot (their ``_peftadapt_*`` markers), a peft PeftModel or tuner
    layer, or adapters loaded through transformers' ``add_adapter``."""
    if getattr(type(model), "_peftadapt_wrapper", False):
        return "it is already a peftadapt AdaptedModel"
    if getattr(model, FULL_FINETUNE_MARK, False):
        return "it is set up for full fine-tuning (peftadapt.wrap(model, 'full'))"
    peft = sys.modules.get("peft")  # a PeftModel can only exist if peft was imported
    if peft is not None:
        if isinstance(model, getattr(peft, "PeftModel", ())):
            return "it is already a peft PeftModel"
        tuner_layer = getattr(getattr(getattr(peft, "tuners", None), "tuners_utils", None), "BaseTunerLayer", None)
        if tuner_layer is not None and any(isinstance(m, tuner_layer) for m in model.modules()):
            return "it already has peft adapter layers injected"
    if getattr(model, "_hf_peft_config_loaded", False):
        return "it already has adapters loaded through transformers' add_adapter"
    if any(getattr(type(m), "_peftadapt_injected", False) for m in model.modules()):
        return "it already has peftadapt adapter modules injected"
    return None


# -- a saved model folder, checked before loading ------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot load (truncated, bad header), read from its header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return f"its header says {n} bytes of metadata but the file has {size} bytes: truncated"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        return f"its header is not valid JSON ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"the tensors need {need} bytes but the file has {size}: truncated"
    return None


def check_model_folder(path: str | os.PathLike[str], key: str = "model.path", model: bool = True) -> None:
    """One clear error for a model folder that cannot load, before anything is loaded.

    A local folder must hold a ``config.json`` that parses and weights whose safetensors
    headers are whole (a truncated download or copy fails here, not deep in the loader). A
    name that is not a local path is a hub id: fine while the hub is reachable, refused
    offline unless the hub cache holds it. ``model=False``: a tokenizer folder (no
    config.json or weights needed).
    """
    p = Path(path).expanduser()
    if not p.exists():
        if not _HUB_ID.match(str(path)):
            raise FileNotFoundError(
                f"{key}: folder not found: {str(path)!r}; give the folder of a save_pretrained model"
            )
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(str(path), "config.json"), str):
                raise ValueError(
                    f"{key}: {str(path)!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with "
                    "no cached copy; give the folder of a save_pretrained model"
                )
        return
    if not p.is_dir():
        raise ValueError(f"{key}: {str(path)!r} is a file; give the folder of a save_pretrained model")
    config = p / "config.json"
    if not model:
        return
    if not config.is_file():
        raise ValueError(
            f"{key}: {str(path)!r} holds no config.json, so it is not a save_pretrained model folder "
            f"(it holds {sorted(q.name for q in p.iterdir())[:8]})"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{key}: {str(config)!r} is not valid JSON ({e}); re-save the model (save_pretrained)"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{key}: {str(config)!r} holds {type(parsed).__name__}, not a JSON object; re-save the model")
    for weights in sorted(p.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise ValueError(f"{key}: {str(weights)!r} is corrupt ({problem}); re-save or re-download the model")


def saved_classifier_rows(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(weight name, classes)`` of the classifier head saved in a model folder's safetensors
    files (read from their headers only), or None: no such folder, or no head saved (a bare
    encoder, whose head a classifier run initializes fresh)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    for weights in sorted(p.glob("*.safetensors")):
        if _safetensors_problem(weights):
            continue
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            parts = name.split(".")
            if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in CLASSIFIER_HEADS and len(parts) <= 3:
                shape = info.get("shape") if isinstance(info, dict) else None
                if shape and len(shape) == 2:
                    return name, int(shape[0])
    return None
