"""`AdaptedModel`: the wrapper that carries peftadapt's own methods.

Bottleneck adapters (:mod:`peftadapt.methods.adapter`) and head-only training
(:mod:`peftadapt.methods.head`) are not in peft, so they live here. The design
follows peft's ``PeftModel`` closely, so code written for one reads the other:
the Hugging Face model is held as ``.model``; ``forward`` / ``__call__``,
``generate`` and unknown attributes are forwarded to it; adapters are injected
*into* that model as slots (:mod:`peftadapt.methods.slots`); the file format is
:mod:`peftadapt.methods.native_format`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..core.hf import trainable_and_total, validate_adapter_name, wrapped_reason
from . import native_format
from .base import build_config
from .slots import HeadSlot, Slot, get_parent

__all__ = ["AdaptedModel", "check_unwrapped"]


def check_unwrapped(model: nn.Module) -> None:
    """ValueError if ``model`` already carries adapters (see :func:`wrapped_reason`)."""
    reason = wrapped_reason(model)
    if reason is not None:
        raise ValueError(
            f"cannot wrap this {type(model).__name__}: {reason}. To put another adapter on it, use "
            "model.add_adapter(name, config) (or peftadapt.add_adapter(model, name, method, **options)) "
            "and switch with set_adapter(name)."
        )


class AdaptedModel(nn.Module):
    """A Hugging Face model carrying peftadapt adapters (bottleneck adapters, trained heads).

    Build it with ``peftadapt.wrap(model, "houlsby")`` / ``Adapter(...).apply(model)``
    rather than directly. The base model's parameters are frozen; the active
    adapter's parameters (and its head copy) are trainable; inactive adapters
    and adapters loaded with ``is_trainable=False`` are frozen.
    """

    _peftadapt_wrapper = True  # what core.hf.wrapped_reason looks for (no import of this class there)

    def __init__(self, model: nn.Module):
        super().__init__()
        check_unwrapped(model)
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
        # torch types Module attributes as Tensor | Module
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

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

    def slots(self) -> Iterator[tuple[str, Slot]]:
        """(module path, slot) of every injected module."""
        for name, module in self.model.named_modules():
            if isinstance(module, Slot):
                yield name, module

    def add_adapter(self, adapter_name: str, config: Any, **options: Any) -> None:
        """Add another adapter (a config object or a method name + options); it is not activated.

        Use :meth:`set_adapter` to make it the one that runs and trains.
        """
        cfg = build_config(config, **options)
        if cfg.backend != "native":
            raise ValueError(
                f"an AdaptedModel carries only 'adapter' (houlsby/pfeiffer) and 'head' adapters, "
                f"got method {cfg.method!r}"
            )
        cfg.add_to(self, adapter_name)

    def register_adapter(self, adapter_name: str, config: Any) -> None:
        """Called by a config's ``add_to`` after it injected its modules."""
        self.adapter_configs[adapter_name] = config
        if self._active is None:
            self.set_adapter(adapter_name)
        else:
            self._refresh()

    def check_new_name(self, adapter_name: str) -> None:
        """ValueError unless ``adapter_name`` follows the naming rule and is not taken."""
        validate_adapter_name(adapter_name)
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
        for _, slot in self.slots():
            slot.active = self._active
            for name, module in slot.entries.items():
                train = name == self._active and name not in self._inference_only
                for p in module.parameters():
                    p.requires_grad_(train)

    def set_inference_only(self, adapter_name: str) -> None:
        """Keep ``adapter_name`` frozen even when active (loaded with ``is_trainable=False``)."""
        self._inference_only.add(adapter_name)
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; a slot left empty gives its original module back to the model."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {self.adapter_names}")
        for name, slot in list(self.slots()):
            if adapter_name in slot.entries:
                del slot.entries[adapter_name]
            if len(slot.entries) == 0:
                parent, child = get_parent(self.model, name)
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
        slots = [slot for _, slot in self.slots()]
        saved = [slot.active for slot in slots]
        try:
            for slot in slots:
                slot.active = None
            yield
        finally:
            for slot, active in zip(slots, saved, strict=False):
                slot.active = active

    def unwrap(self) -> nn.Module:
        """Remove all adapter modules and return the plain Hugging Face model.

        The original modules (and the original, untrained heads) are put back
        and the parameters' ``requires_grad`` flags are restored to what they
        were before wrapping. Trained adapters and head copies are discarded:
        save them first.
        """
        for name, slot in sorted(self.slots(), key=lambda t: -t[0].count(".")):
            parent, child = get_parent(self.model, name)
            setattr(parent, child, slot.base_layer)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad.get(n, p.requires_grad))
        self.adapter_configs.clear()
        self._active = None
        return self.model

    # -- parameters --------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit weights count as peft counts them."""
        return trainable_and_total(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors one adapter owns, keyed as in the saved file."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {self.adapter_names}")
        out = {}
        for name, slot in self.slots():
            if adapter_name not in slot.entries:
                continue
            prefix = f"{adapter_name}.head.{name}." if isinstance(slot, HeadSlot) else f"{adapter_name}.{name}."
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
            # torch types Module attributes as Tensor | Module
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)  # type: ignore[operator]
        if (
            not getattr(self.model, "_require_grads_hooks", None)
            and getattr(self.model, "_require_grads_hook", None) is None
        ):
            # torch types Module attributes as Tensor | Module
            self.model.enable_input_require_grads()  # type: ignore[operator]

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        # torch types Module attributes as Tensor | Module
        (disable or self.model.gradient_checkpointing_disable)()  # type: ignore[operator]
        # torch types Module attributes as Tensor | Module
        self.model.disable_input_require_grads()  # type: ignore[operator]

    # -- save / load -------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], adapter_names: list[str] | None = None) -> None:
        """Write ``peftadapt_config.json`` + ``peftadapt_model.safetensors`` (atomically;
        format in :mod:`peftadapt.methods.native_format`).

        Only adapter weights and trained head copies are saved, never the base
        model. ``adapter_names=None`` saves every adapter.
        """
        names = self.adapter_names if adapter_names is None else list(adapter_names)
        if not names:
            raise ValueError("this AdaptedModel has no adapter to save")
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; existing adapters: {self.adapter_names}")
        native_format.save_adapters(self, save_directory, names)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None, is_trainable: bool = False
    ) -> AdaptedModel:
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

    def load_adapter(
        self, path: str | os.PathLike[str], adapter_name: str | None = None, is_trainable: bool = False
    ) -> AdaptedModel:
        """Load saved adapter(s) into this model (see :meth:`from_pretrained`); returns ``self``.

        The active adapter stays; a model with none yet activates the saved
        active adapter (or the first loaded one).
        """
        native_format.load_adapters(self, path, adapter_name, is_trainable)
        return self

    def __repr__(self) -> str:
        return f"AdaptedModel(active_adapter={self._active!r}, adapters={self.adapter_names},\n  model={self.model!r})"
