"""The peft backend: every method that sits on peft (LoRA, prefix, IA3, ...), carried by a ``peft.PeftModel``.

Saved in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), so
``PeftModel.from_pretrained`` reads what we write and we read what it writes (transformers'
``load_adapter``: the README says which methods it reads). Before handing a folder to peft,
:meth:`PeftBackend.load` checks the saved shapes against the model and says what differs
(peft's own errors are deep size mismatches).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import safe_open

from ..core.hf import check_transformers_model, classifier_heads, hf_config, unwrap, wrapped_reason
from ..methods.peft_support import task_type_of
from ..methods.prefix import prefix_task_type
from ..quant import is_quantized, merge_quantized

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "PeftBackend", "is_peft_model"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# peft is imported inside the functions that use it: `import peft` costs ~3.5 s here (it imports
# transformers' model zoo and bitsandbytes; `python -X importtime -c "import peft"`), and
# `import peftadapt` should not pay it before a peft method is used.


def is_peft_model(model: object) -> bool:
    """True for a ``peft.PeftModel``; never imports peft (none can exist before it is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


class PeftBackend:
    """Adapters that sit on peft (``MethodConfig.backend == "peft"``)."""

    name = "peft"
    config_file = CONFIG_FILE

    def owns(self, model: object) -> bool:
        return is_peft_model(model)

    def adapter_names(self, model: Any) -> list[str]:
        return list(model.peft_config)

    @contextlib.contextmanager
    def disabled(self, model: Any) -> Iterator[nn.Module]:
        if not model.peft_config[model.active_adapter].is_prompt_learning:
            with model.disable_adapter():
                yield model
            return
        from peft.utils.other import AuxiliaryTrainingWrapper

        # peft's own disable_adapter() fails for prompt learning on models without
        # prepare_inputs_for_generation (classifiers) and leaves trained heads on.
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

    def merge(self, model: Any, unload: bool) -> nn.Module:
        config = model.peft_config[model.active_adapter]
        kind = str(config.peft_type.value)
        if config.is_prompt_learning:
            raise ValueError(
                f"a {kind} adapter does not merge into the weights (its virtual tokens are inputs, not weight "
                "updates); keep the wrapped model"
            )
        if is_quantized(unwrap(model)):
            if kind != "LORA":
                raise ValueError(f"only LoRA/DoRA merge into a quantized base; this model holds a {kind} adapter")
            if not unload:
                raise ValueError("a LoRA on a quantized base merges only with unload=True (into dequantized weights)")
            return merge_quantized(model)
        if unload:
            merged: nn.Module = model.merge_and_unload()
            return merged
        if _merged(model):
            raise ValueError("the adapter is already merged; unmerge(model) first")
        model.merge_adapter()
        return model

    def unmerge(self, model: Any) -> nn.Module:
        if not _merged(model):
            raise ValueError("nothing to unmerge: the adapter is not merged (merge(model, unload=False) merges it)")
        model.unmerge_adapter()
        return model

    def after_optimizer_step(self, model: Any, step: int) -> None:
        # AdaLoRA (and AdaMSS) re-allocate their rank budget from the gradients of the step: peft
        # leaves the call to the training loop, after optimizer.step() and before zero_grad()
        update = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
        if callable(update):
            update(step)

    def load(self, base: nn.Module, path: Path, adapter_name: str | None, is_trainable: bool) -> nn.Module:
        adapter_name = adapter_name or "default"
        target = unwrap(base)
        check_transformers_model(target)
        cfg = _read_json(path / CONFIG_FILE)
        shapes = _read_safetensors_shapes(path)
        _check_peft_adapter_fits(target, cfg, shapes, path)
        config = _peft_config_here(target, cfg, shapes)
        # peft loads prompt learning (prefix, prompt tuning) for inference only; set trainable or frozen below
        peft_trainable = is_trainable and not config.is_prompt_learning
        try:
            if self.owns(base):
                # torch types Module attributes as Tensor | Module
                base.load_adapter(str(path), adapter_name=adapter_name, is_trainable=peft_trainable)  # type: ignore[operator]
                loaded: nn.Module = base
            elif wrapped_reason(base) is not None:
                raise ValueError("load() onto a model that already carries adapters: pass the wrapped model itself")
            else:
                from peft import PeftModel

                loaded = PeftModel.from_pretrained(
                    base, str(path), adapter_name=adapter_name, is_trainable=peft_trainable, config=config
                )
        except RuntimeError as e:  # size mismatches that slipped past our checks
            raise ValueError(
                f"the adapter in {path} does not fit this {hf_config(target).model_type} model: {e}"
            ) from e
        if config.is_prompt_learning:
            _prompt_trainable(loaded, adapter_name, is_trainable)
        return loaded


def _prompt_trainable(model: Any, adapter_name: str, trainable: bool) -> None:
    """Set a prompt-learning adapter that peft loaded for inference trainable, or frozen.

    peft loads prompt learning for inference only, and leaves its prompt trainable. It saves a
    prefix as its flat key/value vectors (the MLP's output when it was trained with
    ``prefix_projection``): training goes on from those vectors directly (the projection is a
    reparameterisation: same function, no MLP to restore). The adapter's task-head copy
    (``modules_to_save``) follows the prompt.
    """
    config = model.peft_config[adapter_name]
    encoder = model.prompt_encoder[adapter_name]
    if trainable:
        if getattr(encoder, "prefix_projection", False):
            encoder.prefix_projection = False
            config.prefix_projection = False
        config.inference_mode = False
    for p in encoder.parameters():
        p.requires_grad_(trainable)
    for name, p in model.named_parameters():
        if f".modules_to_save.{adapter_name}." in name:
            p.requires_grad_(trainable)


def _merged(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


def _peft_config_here(model: nn.Module, cfg: dict, shapes: dict):
    """The saved peft config, with a prefix adapter's task type re-picked for this transformers."""
    from peft import PeftConfig

    config = PeftConfig.from_peft_type(**{k: v for k, v in cfg.items() if k != "peft_version"})
    if cfg.get("peft_type") == "PREFIX_TUNING" and task_type_of(model) is not None:
        task = prefix_task_type(model)
        if task != config.task_type:
            heads = [h for h in classifier_heads(model) if any(k == h or k.startswith(h + ".") for k in shapes)]
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
    file = path / WEIGHTS_FILE
    if not file.is_file():
        others = sorted(p.name for p in path.glob("adapter_model*"))
        raise FileNotFoundError(
            f"missing adapter weights {file}"
            + (f" (found {others}; peftadapt reads safetensors only)" if others else "")
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            # safe_open has keys() but is not iterable
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"corrupt adapter weights {file}: {e}") from e


def _in_out(mod: nn.Module) -> tuple[int, int] | None:
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        # torch types Module attributes as Tensor | Module
        return int(mod.in_features), int(mod.out_features)  # type: ignore[arg-type]
    if type(mod).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        # torch types Module attributes as Tensor | Module
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])  # type: ignore[index]
    return None


def _check_peft_adapter_fits(model: nn.Module, cfg: dict, shapes: dict, path: Path) -> None:
    config = hf_config(model)
    mt = config.model_type
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise ValueError(f"{path / CONFIG_FILE} has no 'peft_type'; it is not a peft adapter config")
    if ptype == "PREFIX_TUNING":
        from peft import PrefixTuningConfig
        from peft.utils import _prepare_prompt_learning_config

        # what peft writes for this model: token_dim is head_dim * num_key_value_heads under GQA
        here = _prepare_prompt_learning_config(PrefixTuningConfig(num_virtual_tokens=1), config)
        want = {"num_layers": here.num_layers, "token_dim": here.token_dim}
        bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) not in (None, v)}
        if bad:
            raise ValueError(
                f"the prefix adapter in {path} was saved for a different base model: "
                + ", ".join(f"{k} saved {s} vs this {mt} model's {m}" for k, (s, m) in bad.items())
            )
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    tags = tuple(set(PEFT_TYPE_TO_PREFIX_MAPPING.values()))  # a tuner's parameter names: lora_A, ia3_l, oft_R, ...
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        if not key.startswith("base_model.model."):
            continue
        parts = key[len("base_model.model.") :].split(".")
        at = next((i for i, part in enumerate(parts) if part.startswith(tags)), None)
        if at is None:  # a fully trained module (modules_to_save): parameter path
            mod_name, pname = ".".join(parts[:-1]), parts[-1]
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
        mod_name = ".".join(parts[:at])
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
