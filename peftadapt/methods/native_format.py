"""The file format of peftadapt's own adapters (bottleneck adapters, trained heads).

A folder::

    peftadapt_config.json        {"format": "peftadapt", "format_version": 1,
                                  "active_adapter": ..., "adapters": {name: {"method", "options",
                                  "injection_points", "head_modules"}}, "base_model": {...}}
    peftadapt_model.safetensors  "<adapter>.<module path>.<param>"    adapter weights
                                 "<adapter>.head.<head name>.<param>" trained head copies

Adapter names therefore may not contain ".". Both files are written atomically. The
functions take an :class:`~peftadapt.methods.adapted_model.AdaptedModel` (its methods
``save_pretrained`` / ``load_adapter`` call them).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..core.hf import LM_HEAD_NAMES, find_task_head
from ..core.io import write_atomic
from ..core.version import __version__
from .base import build_config
from .slots import AdapterSlot, HeadSlot

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "base_info",
    "load_adapters",
    "read_config",
    "save_adapters",
]

CONFIG_NAME = "peftadapt_config.json"
WEIGHTS_NAME = "peftadapt_model.safetensors"
FORMAT = "peftadapt"
FORMAT_VERSION = 1


def base_info(hf: nn.Module) -> dict[str, Any]:
    """What an adapter file records of its base model, to refuse a different one at load."""
    cfg = hf.config
    heads = find_task_head(hf)
    info = {
        "model_type": getattr(cfg, "model_type", None),
        "model_class": type(hf).__name__,
        "architectures": list(getattr(cfg, "architectures", None) or [type(hf).__name__]),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "head_modules": heads,
    }
    if any(h not in LM_HEAD_NAMES for h in heads):  # a classification-like head: num_labels matters
        info["num_labels"] = getattr(cfg, "num_labels", None)
    return info


def save_adapters(model: Any, save_directory: str | os.PathLike[str], names: list[str]) -> None:
    """Write ``peftadapt_config.json`` + ``peftadapt_model.safetensors`` for adapters ``names``."""
    os.makedirs(save_directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    adapters: dict[str, Any] = {}
    for n in names:
        cfg = model.adapter_configs[n]
        options = cfg.to_dict()
        options.pop("method")
        points = [p for p, s in model.slots() if isinstance(s, AdapterSlot) and n in s.entries]
        heads = [p for p, s in model.slots() if isinstance(s, HeadSlot) and n in s.entries]
        adapters[n] = {"method": cfg.method, "options": options, "injection_points": points, "head_modules": heads}
        # clone: safetensors refuses tensors that share storage
        tensors.update({k: v.detach().to("cpu").clone().contiguous() for k, v in model.adapter_state_dict(n).items()})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftadapt_version": __version__,
        "active_adapter": model.active_adapter if model.active_adapter in names else names[0],
        "adapters": adapters,
        "base_model": base_info(model.model),
    }
    text = json.dumps(meta, indent=2, sort_keys=False)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    write_atomic(
        os.path.join(save_directory, WEIGHTS_NAME),
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "peftadapt_format": str(FORMAT_VERSION)}),
    )
    write_atomic(os.path.join(save_directory, CONFIG_NAME), write_json)


def load_adapters(model: Any, path: str | os.PathLike[str], adapter_name: str | None, is_trainable: bool) -> None:
    """Load the saved adapter(s) in ``path`` into ``model`` (see ``AdaptedModel.from_pretrained``).

    The active adapter stays; a model with none yet activates the saved active adapter (or
    the first loaded one). On any error the adapters loaded so far are removed again.
    """
    meta = read_config(path)
    _check_compatible(base_info(model.model), meta["base_model"], path)
    saved = meta["adapters"]
    if adapter_name is None:
        plan = {n: n for n in saved}
    elif adapter_name in saved:
        plan = {adapter_name: adapter_name}
    elif len(saved) == 1:
        plan = {next(iter(saved)): adapter_name}
    else:
        raise ValueError(f"{path} holds adapters {sorted(saved)}; adapter_name {adapter_name!r} is none of them")
    for new in plan.values():
        model.check_new_name(new)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    tensors = _read_weights(path, weights_file)
    previous_active = model.active_adapter
    loaded: list[str] = []
    try:
        for old, new in plan.items():
            _check_entry(model, saved[old], old, meta, path)
            model.add_adapter(new, build_config(saved[old]["method"], **saved[old]["options"]))
            loaded.append(new)
            _load_tensors(
                model, new, {k[len(old) + 1 :]: v for k, v in tensors.items() if k.startswith(old + ".")}, weights_file
            )
            if not is_trainable:
                model.set_inference_only(new)
        unused = sorted(k for k in tensors if k.split(".", 1)[0] not in saved)
        if unused:
            raise ValueError(f"{weights_file}: unexpected keys of no saved adapter: {unused[:5]}")
    except BaseException:
        for n in loaded:
            model.delete_adapter(n)
        raise
    if previous_active is not None:
        model.set_adapter(previous_active)  # adding to a wrapped model does not switch adapters
    else:
        model.set_adapter(plan.get(meta.get("active_adapter"), loaded[0]))


def _read_weights(path: str | os.PathLike[str], weights_file: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path} (found {_listing(path)})")
    try:
        return load_file(weights_file)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(
            f"could not read {weights_file}: not a valid safetensors file ({type(e).__name__}: {e})"
        ) from e


def _check_entry(model: Any, entry: Any, old: str, meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    if not isinstance(entry, dict) or "method" not in entry or not isinstance(entry.get("options"), dict):
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: adapter {old!r} has no method/options")
    children = dict(model.model.named_children())
    lacking = [h for h in entry.get("head_modules") or [] if h not in children]
    if lacking:
        raise ValueError(
            f"adapter {old!r} in {path} trained the head module(s) {lacking} of a "
            f"{meta['base_model'].get('model_class')}, but the given {type(model.model).__name__} has "
            f"no such module; load the base model with the same class "
            f"(e.g. AutoModelForSequenceClassification)"
        )


def _load_tensors(model: Any, adapter_name: str, tensors: dict[str, torch.Tensor], weights_file: str) -> None:
    own = {k[len(adapter_name) + 1 :]: v for k, v in model.adapter_state_dict(adapter_name).items()}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not match adapter {adapter_name!r} built from its config: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, target in own.items():
        if tuple(tensors[k].shape) != tuple(target.shape):
            raise ValueError(
                f"{weights_file}: {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for k, target in own.items():
            target.copy_(tensors[k])


def _check_compatible(here: dict[str, Any], saved: dict[str, Any], path: str | os.PathLike[str]) -> None:
    keys = ["model_type", "hidden_size", "num_hidden_layers"]
    if "num_labels" in saved and "num_labels" in here:
        keys.append("num_labels")
    diff = [k for k in keys if saved.get(k) != here.get(k)]
    if diff:

        def show(d: dict[str, Any]) -> str:
            return ", ".join(f"{k}={d.get(k)!r}" for k in keys) + f" ({d.get('model_class')})"

        raise ValueError(
            f"the adapter in {path} was saved for a different base model: saved for {show(saved)}, "
            f"but the given model has {show(here)}; differing: {diff}"
        )


def _listing(path: str | os.PathLike[str]) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist (or is not a folder)")
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        hint = (
            " (it looks like a peft adapter folder: load it with peftadapt.load)"
            if os.path.isfile(os.path.join(path, "adapter_config.json"))
            else ""
        )
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (found {_listing(path)}){hint}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {cfg_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{cfg_file} is not a peftadapt adapter config (missing "format": "{FORMAT}")')
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {version!r}; this peftadapt reads up to {FORMAT_VERSION}")
    if (
        not isinstance(meta.get("adapters"), dict)
        or not meta["adapters"]
        or not isinstance(meta.get("base_model"), dict)
    ):
        raise ValueError(f'{cfg_file} is missing its "adapters" or "base_model" section')
    return meta
