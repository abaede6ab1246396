"""`AdaptedModel`: the wrapper that carries peftadapt's own methods.

Bottleneck adapters (:mod:`peftadapt.methods.adapter`) and head-only training
(:mod:`peftadapt.methods.head`) are not in peft, so they live here. The design
follows peft's ``PeftModel`` closely, so code written for one reads the other:

* the Hugging Face model is held as ``.model``; ``forward`` / ``__call__``,
  ``generate`` and unknown attributes are forwarded to it;
* adapters are injected *into* that model: each injection point (a Linear at
  the end of an attention or feed-forward sublayer) is replaced by an
  :class:`_AdapterSlot` that holds the original module as ``base_layer`` and
  one adapter per name in a ``ModuleDict``; only the active adapter runs;
* a trained task head is a per-adapter *copy* held by a :class:`_HeadSlot`
  (peft calls this ``modules_to_save``), so two adapters never train the same
  head and :meth:`AdaptedModel.disable_adapter` gives exactly the base model's
  outputs (original head included).

Saved format (a folder)::

    peftadapt_config.json        {"format": "peftadapt", "format_version": 1,
                                  "active_adapter": ..., "adapters": {name: {"method", "options",
                                  "injection_points", "head_modules"}}, "base_model": {...}}
    peftadapt_model.safetensors  "<adapter>.<module path>.<param>"    adapter weights
                                 "<adapter>.head.<head name>.<param>" trained head copies

Adapter names therefore may not contain ".".
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Iterator

import torch
import torch.nn as nn

CONFIG_NAME = "peftadapt_config.json"
WEIGHTS_NAME = "peftadapt_model.safetensors"
FORMAT = "peftadapt"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# injected modules
# ---------------------------------------------------------------------------
class _Slot(nn.Module):
    """Common part of the injected modules: the original module + a per-adapter dict.

    ``active`` is the adapter name that runs (``None``: pass-through to the
    original module). Unknown attributes fall back to ``base_layer`` so model
    code that reads e.g. ``self.o_proj.weight`` or Conv1D's ``nf`` still works.
    """

    _dict_name = ""
    _peftadapt_injected = True  # marks injected modules (tests check unwrap() leaves none)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active: str | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name in ("base_layer", self._dict_name):  # half-built (unpickling): no recursion
                raise
            return getattr(base, name)

    @property
    def entries(self) -> nn.ModuleDict:
        return getattr(self, self._dict_name)


class _AdapterSlot(_Slot):
    """``y = adapter(base_layer(x))`` with the active adapter; ``base_layer(x)`` if none."""

    _dict_name = "adapters"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.active is None or self.active not in self.adapters:
            return out
        adapter = self.adapters[self.active]
        if isinstance(out, tuple):  # a sublayer returning (hidden, extras...)
            return (adapter(out[0]),) + out[1:]
        return adapter(out)


class _HeadSlot(_Slot):
    """Runs the active adapter's copy of the head; the original head if it has none."""

    _dict_name = "heads"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.heads = nn.ModuleDict()

    def forward(self, *args, **kwargs):
        if self.active is not None and self.active in self.heads:
            return self.heads[self.active](*args, **kwargs)
        return self.base_layer(*args, **kwargs)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _validate_adapter_name(name: Any) -> None:
    """The one rule for adapter names (wrap, add_adapter, AdaptedModel.add_adapter): a
    non-empty string of letters, digits, '_' or '-'. A name prefixes module paths and saved
    weight keys, so '.' (a path separator), '/' or spaces would break them."""
    if isinstance(name, str) and "." in name:
        raise ValueError(f"adapter name {name!r} may not contain '.' (it prefixes the saved weight keys); "
                         "use letters, digits, '_' or '-'")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"adapter name must be a non-empty string of letters, digits, '_' or '-'; got {name!r}")


def _is_wrapped(model: nn.Module) -> str | None:
    """Say why ``model`` already carries adapters (``None`` if it does not)."""
    if isinstance(model, AdaptedModel):
        return "it is already a peftadapt AdaptedModel"
    peft = sys.modules.get("peft")  # a PeftModel can only exist if peft was imported
    if peft is not None:
        if isinstance(model, getattr(peft, "PeftModel", ())):
            return "it is already a peft PeftModel"
        tuner_layer = getattr(getattr(getattr(peft, "tuners", None), "tuners_utils", None), "BaseTunerLayer", None)
        if tuner_layer is not None and any(isinstance(m, tuner_layer) for m in model.modules()):
            return "it already has peft adapter layers injected"
    if getattr(model, "_hf_peft_config_loaded", False):
        return "it already has adapters loaded through transformers' add_adapter"
    if any(isinstance(m, _Slot) for m in model.modules()):
        return "it already has peftadapt adapter modules injected"
    return None


def _check_unwrapped(model: nn.Module) -> None:
    reason = _is_wrapped(model)
    if reason is not None:
        raise ValueError(
            f"cannot wrap this {type(model).__name__}: {reason}. To put another adapter on it, use "
            "model.add_adapter(name, config) (or peftadapt.add_adapter(model, name, method, **options)) "
            "and switch with set_adapter(name)."
        )


def _count(param: torch.Tensor) -> int:
    n = param.numel()
    # bitsandbytes 4-bit weights pack two values per byte of quant storage (as peft counts them)
    if param.__class__.__name__ == "Params4bit":
        n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
    return n


def _write_atomic(path: str, write) -> None:
    """Write through ``write(tmp_path)`` to a temp file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------
class AdaptedModel(nn.Module):
    """A Hugging Face model carrying peftadapt adapters (bottleneck adapters, trained heads).

    Build it with ``peftadapt.wrap(model, "houlsby")`` / ``Adapter(...).apply(model)``
    rather than directly. The base model's parameters are frozen; the active
    adapter's parameters (and its head copy) are trainable; inactive adapters
    and adapters loaded with ``is_trainable=False`` are frozen.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_unwrapped(model)
        self.model = model
        self.adapter_configs: dict[str, Any] = {}
        self._active: str | None = None
        self._inference_only: set[str] = set()  # adapters loaded with is_trainable=False
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.training = model.training

    # -- forwarding --------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """Generate with the active adapter (causal LMs); forwarded to ``model.generate``."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate(); use a *ForCausalLM model")
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (incl. .model)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name == "model":  # not set up yet (__init__, unpickling): no recursion
                raise
            return getattr(model, name)

    @property
    def config(self):
        return self.model.config

    def get_base_model(self) -> nn.Module:
        """The Hugging Face model (with the adapter modules injected)."""
        return self.model

    # -- adapters ----------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def method(self) -> str | None:
        """Method name of the active adapter ("adapter" or "head")."""
        return self.adapter_configs[self._active].method if self._active is not None else None

    def _slots(self) -> Iterator[tuple[str, _Slot]]:
        for name, module in self.model.named_modules():
            if isinstance(module, _Slot):
                yield name, module

    def add_adapter(self, adapter_name: str, config: Any, **options: Any) -> None:
        """Add another adapter (a config object or a method name + options); it is not activated.

        Use :meth:`set_adapter` to make it the one that runs and trains.
        """
        from .methods.adapter import Adapter
        from .methods.base import build_config
        from .methods.head import Head

        cfg = build_config(config, **options)
        if not isinstance(cfg, (Adapter, Head)):
            raise ValueError(
                f"an AdaptedModel carries only 'adapter' (houlsby/pfeiffer) and 'head' adapters, "
                f"got method {cfg.method!r}"
            )
        cfg.add_to(self, adapter_name)

    def _register(self, adapter_name: str, config: Any) -> None:
        """Called by a config's ``add_to`` after it injected its modules."""
        self.adapter_configs[adapter_name] = config
        if self._active is None:
            self.set_adapter(adapter_name)
        else:
            self._refresh()

    def _check_new_name(self, adapter_name: str) -> None:
        _validate_adapter_name(adapter_name)
        if adapter_name in self.adapter_configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapter_names}")

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter that runs (and trains, unless loaded for inference)."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {self.adapter_names}")
        self._active = adapter_name
        self._refresh()

    def _refresh(self) -> None:
        """Point every slot at the active adapter; only its parameters require grad."""
        for _, slot in self._slots():
            slot.active = self._active
            for name, module in slot.entries.items():
                train = name == self._active and name not in self._inference_only
                for p in module.parameters():
                    p.requires_grad_(train)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; a slot left empty gives its original module back to the model."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {self.adapter_names}")
        for name, slot in list(self._slots()):
            if adapter_name in slot.entries:
                del slot.entries[adapter_name]
            if len(slot.entries) == 0:
                parent, child = _get_parent(self.model, name)
                setattr(parent, child, slot.base_layer)
        del self.adapter_configs[adapter_name]
        self._inference_only.discard(adapter_name)
        if self._active == adapter_name:
            self._active = next(iter(self.adapter_configs), None)
        self._refresh()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, the model computes the base model's outputs exactly.

        Every slot passes through to its original module: adapters are skipped
        and the *original* task head runs instead of the trained copy (heads
        are copied per adapter, so the base head is never modified).
        """
        slots = [slot for _, slot in self._slots()]
        saved = [slot.active for slot in slots]
        try:
            for slot in slots:
                slot.active = None
            yield
        finally:
            for slot, active in zip(slots, saved):
                slot.active = active

    def unwrap(self) -> nn.Module:
        """Remove all adapter modules and return the plain Hugging Face model.

        The original modules (and the original, untrained heads) are put back
        and the parameters' ``requires_grad`` flags are restored to what they
        were before wrapping. Trained adapters and head copies are discarded:
        save them first.
        """
        for name, slot in sorted(self._slots(), key=lambda t: -t[0].count(".")):
            parent, child = _get_parent(self.model, name)
            setattr(parent, child, slot.base_layer)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad.get(n, p.requires_grad))
        self.adapter_configs.clear()
        self._active = None
        return self.model

    # -- parameters --------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit weights count as peft counts them."""
        trainable = total = 0
        for p in self.parameters():
            n = _count(p)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors one adapter owns, keyed as in the saved file."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {self.adapter_names}")
        out = {}
        for name, slot in self._slots():
            if adapter_name not in slot.entries:
                continue
            prefix = f"{adapter_name}.head.{name}." if isinstance(slot, _HeadSlot) else f"{adapter_name}.{name}."
            for k, v in slot.entries[adapter_name].state_dict().items():
                out[prefix + k] = v
        return out

    # -- checkpointing -----------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Turn on the base model's gradient checkpointing, working with a frozen base.

        With every base weight frozen, the embeddings' output does not require
        grad, and (reentrant) checkpointed layers would then give the adapters
        no gradient. So the input embeddings are made to require grad
        (``enable_input_require_grads``; transformers >= 5 does this itself,
        4.x does not), and the non-reentrant variant is the default.
        """
        kw = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if not getattr(self.model, "_require_grads_hooks", None) and getattr(self.model, "_require_grads_hook", None) is None:
            self.model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()
        self.model.disable_input_require_grads()

    # -- save / load -------------------------------------------------------
    def _base_info(self) -> dict[str, Any]:
        from .methods.head import LM_HEAD_NAMES, find_task_head

        cfg = self.model.config
        heads = find_task_head(self.model)
        info = {
            "model_type": getattr(cfg, "model_type", None),
            "model_class": type(self.model).__name__,
            "architectures": list(getattr(cfg, "architectures", None) or [type(self.model).__name__]),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "head_modules": heads,
        }
        if any(h not in LM_HEAD_NAMES for h in heads):  # a classification-like head: num_labels matters
            info["num_labels"] = getattr(cfg, "num_labels", None)
        return info

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: list[str] | None = None) -> None:
        """Write ``peftadapt_config.json`` + ``peftadapt_model.safetensors`` (atomically).

        Only adapter weights and trained head copies are saved, never the base
        model. ``adapter_names=None`` saves every adapter.
        """
        from safetensors.torch import save_file

        names = self.adapter_names if adapter_names is None else list(adapter_names)
        if not names:
            raise ValueError("this AdaptedModel has no adapter to save")
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; existing adapters: {self.adapter_names}")
        os.makedirs(save_directory, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        adapters: dict[str, Any] = {}
        for n in names:
            cfg = self.adapter_configs[n]
            options = cfg.to_dict()
            options.pop("method")
            points = [p for p, s in self._slots() if isinstance(s, _AdapterSlot) and n in s.entries]
            heads = [p for p, s in self._slots() if isinstance(s, _HeadSlot) and n in s.entries]
            adapters[n] = {"method": cfg.method, "options": options, "injection_points": points, "head_modules": heads}
            # clone: safetensors refuses tensors that share storage
            tensors.update({k: v.detach().to("cpu").clone().contiguous() for k, v in self.adapter_state_dict(n).items()})
        from . import __version__

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "peftadapt_version": __version__,
            "active_adapter": self._active if self._active in names else names[0],
            "adapters": adapters,
            "base_model": self._base_info(),
        }
        text = json.dumps(meta, indent=2, sort_keys=False)

        def write_json(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        _write_atomic(os.path.join(save_directory, WEIGHTS_NAME),
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "peftadapt_format": str(FORMAT_VERSION)}))
        _write_atomic(os.path.join(save_directory, CONFIG_NAME), write_json)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str | None = None,
        is_trainable: bool = False,
    ) -> "AdaptedModel":
        """Wrap ``model`` and load saved adapter(s) into it.

        ``adapter_name=None`` loads every saved adapter under its saved name;
        a name loads the folder's only adapter under that name, or (folder with
        several) selects the saved adapter of that name. ``is_trainable=False``
        keeps the loaded adapters frozen and puts the model in eval mode.
        On any error the model is given back unmodified.
        """
        wrapped = cls(model)
        try:
            wrapped.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
        except BaseException:
            wrapped.unwrap()
            raise
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None,
                     is_trainable: bool = False) -> "AdaptedModel":
        """Load saved adapter(s) into this model (see :meth:`from_pretrained`); returns ``self``.

        The active adapter stays; a model with none yet activates the saved
        active adapter (or the first loaded one).
        """
        from safetensors.torch import load_file

        from .methods import adapter as _adapter, head as _head  # noqa: F401  (register the methods)
        from .methods.base import build_config

        meta = _read_config(path)
        self._check_compatible(meta["base_model"], path)
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
            self._check_new_name(new)

        weights_file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path} (found {_listing(path)})")
        try:
            tensors = load_file(weights_file)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"could not read {weights_file}: not a valid safetensors file ({type(e).__name__}: {e})") from e

        previous_active = self._active
        loaded: list[str] = []
        try:
            for old, new in plan.items():
                entry = saved[old]
                if not isinstance(entry, dict) or "method" not in entry or not isinstance(entry.get("options"), dict):
                    raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: adapter {old!r} has no method/options")
                children = dict(self.model.named_children())
                lacking = [h for h in entry.get("head_modules") or [] if h not in children]
                if lacking:
                    raise ValueError(
                        f"adapter {old!r} in {path} trained the head module(s) {lacking} of a "
                        f"{meta['base_model'].get('model_class')}, but the given {type(self.model).__name__} has "
                        f"no such module; load the base model with the same class "
                        f"(e.g. AutoModelForSequenceClassification)"
                    )
                cfg = build_config(entry["method"], **entry["options"])
                self.add_adapter(new, cfg)
                loaded.append(new)
                self._load_tensors(new, {k[len(old) + 1:]: v for k, v in tensors.items() if k.startswith(old + ".")},
                                   weights_file)
                if not is_trainable:
                    self._inference_only.add(new)
            unused = sorted(k for k in tensors if k.split(".", 1)[0] not in saved)
            if unused:
                raise ValueError(f"{weights_file}: unexpected keys of no saved adapter: {unused[:5]}")
        except BaseException:
            for n in loaded:
                self.delete_adapter(n)
            raise
        if previous_active is not None:
            self.set_adapter(previous_active)  # adding to a wrapped model does not switch adapters
        else:
            self.set_adapter(plan.get(meta.get("active_adapter"), loaded[0]))
        return self

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], weights_file: str) -> None:
        own = {k[len(adapter_name) + 1:]: v for k, v in self.adapter_state_dict(adapter_name).items()}
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
                raise ValueError(f"{weights_file}: {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            for k, target in own.items():
                target.copy_(tensors[k])

    def _check_compatible(self, saved: dict[str, Any], path) -> None:
        here = self._base_info()
        keys = ["model_type", "hidden_size", "num_hidden_layers"]
        if "num_labels" in saved and "num_labels" in here:
            keys.append("num_labels")
        diff = [k for k in keys if saved.get(k) != here.get(k)]
        if diff:
            def show(d):
                return ", ".join(f"{k}={d.get(k)!r}" for k in keys) + f" ({d.get('model_class')})"

            raise ValueError(
                f"the adapter in {path} was saved for a different base model: saved for {show(saved)}, "
                f"but the given model has {show(here)}; differing: {diff}"
            )

    def __repr__(self) -> str:
        return (f"AdaptedModel(active_adapter={self._active!r}, adapters={self.adapter_names},\n"
                f"  model={self.model!r})")


def _listing(path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _read_config(path) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist (or is not a folder)")
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        hint = " (it looks like a peft adapter folder: load it with peftadapt.load)" if os.path.isfile(
            os.path.join(path, "adapter_config.json")) else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (found {_listing(path)}){hint}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {cfg_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a peftadapt adapter config (missing \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {version!r}; this peftadapt reads up to {FORMAT_VERSION}")
    if not isinstance(meta.get("adapters"), dict) or not meta["adapters"] or not isinstance(meta.get("base_model"), dict):
        raise ValueError(f"{cfg_file} is missing its \"adapters\" or \"base_model\" section")
    return meta
