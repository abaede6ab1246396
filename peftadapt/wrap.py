"""The two-line API: ``wrap`` a transformers model, then load, merge, switch.

``wrap(model, "lora", r=8)`` returns a ``peft.PeftModel`` for the methods that
sit on peft (LoRA, DoRA, rsLoRA, prefix) and a :class:`peftadapt.AdaptedModel`
for our own (bottleneck adapters, head-only). Every function here accepts
either kind, so user code does not need to know which one it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .methods import _peft
from .methods.base import MethodConfig, build_config

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
OURS_CONFIG = "peftadapt_config.json"


# -- what kind of model is this ---------------------------------------------------------

def _is_peft(model: object) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _is_ours(model: object) -> bool:
    from .model import AdaptedModel

    return isinstance(model, AdaptedModel)


def is_wrapped(model: object) -> bool:
    """True for a model that ``wrap`` (or peft, or transformers' add_adapter) already adapted."""
    from .model import _is_wrapped

    return isinstance(model, nn.Module) and _is_wrapped(model) is not None


def base_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a wrapped (or plain) model."""
    if _is_peft(model):
        return model.get_base_model()
    if _is_ours(model):
        return model.model
    return model


# -- wrap ---------------------------------------------------------------------------

def wrap(model: nn.Module, method: "str | MethodConfig", *, adapter_name: str = "default", **options: Any) -> nn.Module:
    """Adapt a transformers model with a parameter-efficient method.

    ``method`` is a name (``"lora"``, ``"dora"``, ``"rslora"``, ``"adapter"``,
    ``"houlsby"``, ``"pfeiffer"``, ``"prefix"``, ``"head"``) or a config object
    (``LoRA(r=8)``, ``Adapter(...)``, ``Prefix(...)``, ``Head()``); ``options``
    are that method's fields (see ``peftadapt.LoRA.help()`` etc.).

    The base weights are frozen; the method's parameters, and the task head where
    the model has one, are trainable. Returns the wrapped model.
    """
    _load_methods()
    _peft.check_transformers_model(model)
    from .model import _is_wrapped, _validate_adapter_name

    _validate_adapter_name(adapter_name)

    reason = _is_wrapped(model)
    if reason is not None:
        raise ValueError(
            f"this {type(model).__name__} is already wrapped ({reason}); to put a second adapter on it use "
            "peftadapt.add_adapter(model, name, method, ...), or wrap the original transformers model"
        )
    config = build_config(method, **options)
    if config.method == "prefix":
        from .quant.prepare import _check_prefix_compat

        _check_prefix_compat(model)  # peft's prefix cannot run under gradient checkpointing
    wrapped = config.apply(model, adapter_name)
    _trainable_in_fp32(wrapped)
    if _is_quantized(wrapped):  # also a base the user quantized with from_pretrained(quantization_config=...)
        from .quant._bnb import guard_4bit_cpu

        guard_4bit_cpu(wrapped)
    return wrapped


def _trainable_in_fp32(wrapped: nn.Module) -> None:
    """On a half-precision or quantized base, train adapters and heads in fp32.

    New head copies (peft's modules_to_save, our head slots) are created in the
    base's dtype; bf16 rounds away updates smaller than 2^-8 of a weight.
    """
    frozen_half = any(p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) for p in wrapped.parameters())
    if frozen_half or _is_quantized(wrapped):
        from .quant.prepare import cast_trainable_to_fp32

        cast_trainable_to_fp32(wrapped)


def add_adapter(model: nn.Module, name: str, method: "str | MethodConfig", **options: Any) -> nn.Module:
    """Add another named adapter to a wrapped model (it becomes trainable only once active)."""
    _load_methods()
    from .model import _validate_adapter_name

    _validate_adapter_name(name)
    if not (_is_peft(model) or _is_ours(model)):
        raise TypeError("add_adapter() needs a model returned by peftadapt.wrap(); call wrap() first")
    config = build_config(method, **options)
    on_peft = config.method in ("lora", "prefix")
    if on_peft != _is_peft(model):
        kind = "peft-backed (lora/dora/prefix)" if _is_peft(model) else "peftadapt-native (adapter/head)"
        raise ValueError(
            f"cannot add a {config.method!r} adapter to a model wrapped with a {kind} method; "
            "several named adapters on one model must come from the same family"
        )
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists; existing: {adapter_names(model)}")
    config.add_to(model, name)
    _trainable_in_fp32(model)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    if _is_peft(model):
        return list(model.peft_config)
    if _is_ours(model):
        return list(model.adapter_names)
    return []


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active (and trainable) adapter."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; this model has {names}")
    model.set_adapter(name)


def _load_methods() -> None:
    # Importing registers each method's config in METHODS.
    from .methods import lora, prefix  # noqa: F401
    from .methods import adapter, head  # noqa: F401


# -- parameters ----------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        t, n = model.get_nb_trainable_parameters()
        return int(t), int(n)
    from .model import _count  # counts 4-bit weights as peft does

    trainable = total = 0
    for p in model.parameters():
        k = _count(p)
        total += k
        if p.requires_grad:
            trainable += k
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    t, n = trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}")


# -- switching adaptation off ------------------------------------------------------------

@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes the base model's outputs (adapters and trained heads off)."""
    if _is_ours(model):
        with model.disable_adapter():
            yield model
        return
    if not _is_peft(model):
        raise TypeError("disabled() needs a model returned by peftadapt.wrap()")
    if not model.peft_config[model.active_adapter].is_prompt_learning:
        with model.disable_adapter():
            yield model
        return
    # peft's own disable_adapter() fails for prompt learning on models without
    # prepare_inputs_for_generation (classifiers) and leaves trained heads on.
    from peft.utils.other import AuxiliaryTrainingWrapper

    heads = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    old_forward = model.forward
    model.forward = model.get_base_model().forward
    for h in heads:
        h.enable_adapters(False)
    try:
        yield model
    finally:
        model.forward = old_forward
        for h in heads:
            h.enable_adapters(True)


# -- merge ---------------------------------------------------------------------------

def _peft_type(model: nn.Module) -> str:
    return str(model.peft_config[model.active_adapter].peft_type.value)


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base_model(model).modules())


def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold LoRA into the base weights.

    ``unload=True`` returns a plain transformers model (same outputs, within fp32
    tolerance); ``unload=False`` merges in place and keeps the wrapper so that
    :func:`unmerge` can restore the separate weights.
    """
    if _is_ours(model):
        raise ValueError(
            f"cannot merge a {model.method!r} model: bottleneck adapters are nonlinear modules, not weight "
            "updates; keep the wrapped model, or use model.unwrap() to get the base model back"
        )
    if not _is_peft(model):
        raise TypeError("merge() needs a model returned by peftadapt.wrap(model, 'lora', ...)")
    kind = _peft_type(model)
    if kind != "LORA":
        raise ValueError(f"only LoRA/DoRA adapters merge into the weights; this model holds a {kind} adapter")
    if _is_quantized(model):
        if not unload:
            raise ValueError("a LoRA on a quantized base merges only with unload=True (into dequantized weights)")
        from .quant import merge_quantized

        return merge_quantized(model)
    if unload:
        return model.merge_and_unload()
    if _merged(model):
        raise ValueError("the adapter is already merged; unmerge(model) first")
    model.merge_adapter()
    return model


def _merged(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)``."""
    if not _is_peft(model):
        raise TypeError("unmerge() needs a peft-backed model merged with merge(model, unload=False)")
    if not _merged(model):
        raise ValueError("nothing to unmerge: the adapter is not merged (merge(model, unload=False) merges it)")
    model.unmerge_adapter()
    return model


# -- save / load -----------------------------------------------------------------------

def save(model: nn.Module, path: "str | os.PathLike[str]") -> None:
    """Save the adapter (not the base model) of a wrapped model to ``path``."""
    if not (_is_peft(model) or _is_ours(model)):
        raise TypeError("save() needs a model returned by peftadapt.wrap()")
    model.save_pretrained(str(path))


def load(base: nn.Module, path: "str | os.PathLike[str]", adapter_name: str | None = None, is_trainable: bool = False) -> nn.Module:
    """Load an adapter saved by peftadapt or by plain peft onto ``base``.

    ``base`` is the transformers model the adapter was trained on (same
    architecture and sizes), or an already wrapped model to which the adapter
    is added. ``adapter_name``: the name to load under (peft format, default
    ``"default"``), or which saved adapter to load (peftadapt format, default:
    all of them under their saved names). Checks the saved shapes against
    ``base`` before loading and says what differs. ``is_trainable=False``
    loads for inference (everything frozen).
    """
    _load_methods()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter folder at {str(path)!r}")
    if (path / OURS_CONFIG).is_file():
        from .model import AdaptedModel

        if _is_ours(base):
            return base.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        if _is_peft(base):
            raise ValueError(f"{path} holds a peftadapt bottleneck/head adapter; it cannot be added to a peft model")
        return AdaptedModel.from_pretrained(base, str(path), adapter_name=adapter_name, is_trainable=is_trainable)
    if not (path / PEFT_CONFIG).is_file():
        raise FileNotFoundError(
            f"no adapter in {str(path)!r}: expected {PEFT_CONFIG} (peft format: LoRA/DoRA/prefix) "
            f"or {OURS_CONFIG} (peftadapt format: adapter/head); found {sorted(p.name for p in path.iterdir())}"
        )
    adapter_name = adapter_name or "default"
    target = base_model(base)
    _peft.check_transformers_model(target)
    cfg = _read_json(path / PEFT_CONFIG)
    shapes = _read_safetensors_shapes(path)
    _check_peft_adapter_fits(target, cfg, shapes, path)
    from peft import PeftModel

    try:
        if _is_peft(base):
            base.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)  # same family as base
            return base
        if is_wrapped(base):
            raise ValueError("load() onto a model that already carries adapters: pass the wrapped model itself")
        return PeftModel.from_pretrained(
            base, str(path), adapter_name=adapter_name, is_trainable=is_trainable, config=_peft_config_here(target, cfg, shapes)
        )
    except RuntimeError as e:  # size mismatches that slipped past our checks
        raise ValueError(f"the adapter in {path} does not fit this {target.config.model_type} model: {e}") from e


def _peft_config_here(model: nn.Module, cfg: dict, shapes: dict):
    """The saved peft config, with a prefix adapter's task type re-picked for this transformers."""
    from peft import PeftConfig

    config = PeftConfig.from_peft_type(**{k: v for k, v in cfg.items() if k != "peft_version"})
    if cfg.get("peft_type") == "PREFIX_TUNING" and _peft.task_type_of(model) is not None:
        from .methods.prefix import _head_names, prefix_task_type

        task = prefix_task_type(model)
        if task != config.task_type:
            heads = [h for h in _head_names(model) if any(k == h or k.startswith(h + ".") for k in shapes)]
            config.task_type = task
            config.modules_to_save = heads or None if task == "FEATURE_EXTRACTION" else None
    return config


def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt adapter config {file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"corrupt adapter config {file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    file = path / PEFT_WEIGHTS
    if not file.is_file():
        others = sorted(p.name for p in path.glob("adapter_model*"))
        raise FileNotFoundError(f"missing adapter weights {file}" + (f" (found {others}; peftadapt reads safetensors only)" if others else ""))
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"corrupt adapter weights {file}: {e}") from e


def _in_out(mod: nn.Module) -> tuple[int, int] | None:
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        return int(mod.in_features), int(mod.out_features)
    if type(mod).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return None


def _check_peft_adapter_fits(model: nn.Module, cfg: dict, shapes: dict, path: Path) -> None:
    mt = model.config.model_type
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise ValueError(f"{path / PEFT_CONFIG} has no 'peft_type'; it is not a peft adapter config")
    if ptype == "PREFIX_TUNING":
        want = {"num_layers": model.config.num_hidden_layers, "token_dim": model.config.hidden_size}
        bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) not in (None, v)}
        if bad:
            raise ValueError(
                f"the prefix adapter in {path} was saved for a different base model: "
                + ", ".join(f"{k} saved {s} vs this {mt} model's {m}" for k, (s, m) in bad.items())
            )
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        if not key.startswith("base_model.model."):
            continue
        rest = key[len("base_model.model."):]
        for tag in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B"):
            if tag in rest:
                mod_name = rest.split(tag)[0]
                break
        else:  # a fully trained module (modules_to_save): parameter path
            mod_name, _, pname = rest.rpartition(".")
            mod = modules.get(mod_name)
            if mod is None:
                raise ValueError(
                    f"the adapter in {path} was saved for a different architecture: it trains module "
                    f"{mod_name!r}, which this {mt} model ({type(model).__name__}) does not have"
                )
            p = getattr(mod, pname, None)
            if p is not None and tuple(p.shape) != shape:
                raise ValueError(
                    f"the adapter in {path} does not fit this {mt} model: {mod_name}.{pname} was saved with "
                    f"shape {shape}, this model has {tuple(p.shape)} (different num_labels or hidden size?)"
                )
            continue
        mod = modules.get(mod_name)
        if mod is None:
            raise ValueError(
                f"the adapter in {path} was saved for a different architecture: it adapts {mod_name!r}, "
                f"which this {mt} model ({type(model).__name__}) does not have"
            )
        io = _in_out(mod)
        if io is None:
            continue
        fin, fout = io
        if ".lora_A." in key and shape[-1] != fin:
            raise ValueError(
                f"the adapter in {path} was saved for a different hidden size: {mod_name} takes "
                f"{fin} inputs in this model, the adapter expects {shape[-1]}"
            )
        if ".lora_B." in key and shape[0] != fout:
            raise ValueError(
                f"the adapter in {path} was saved for a different hidden size: {mod_name} gives "
                f"{fout} outputs in this model, the adapter expects {shape[0]}"
            )
