"""The modules peftadapt's own methods inject into a transformers model.

Each injection point (a Linear at the end of an attention or feed-forward
sublayer) is replaced by an :class:`AdapterSlot` that holds the original module
as ``base_layer`` and one adapter per name in a ``ModuleDict``; only the active
adapter runs. A trained task head is a per-adapter *copy* held by a
:class:`HeadSlot` (peft calls this ``modules_to_save``), so two adapters never
train the same head and disabling the adapters gives exactly the base model's
outputs (original head included).
"""

from __future__ import annotations

import copy

import torch.nn as nn

__all__ = ["AdapterSlot", "HeadSlot", "Slot", "add_head_copies", "get_parent"]


class Slot(nn.Module):
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


class AdapterSlot(Slot):
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
            return (adapter(out[0]), *out[1:])
        return adapter(out)


class HeadSlot(Slot):
    """Runs the active adapter's copy of the head; the original head if it has none."""

    _dict_name = "heads"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.heads = nn.ModuleDict()

    def forward(self, *args, **kwargs):
        if self.active is not None and self.active in self.heads:
            return self.heads[self.active](*args, **kwargs)
        return self.base_layer(*args, **kwargs)


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def add_head_copies(wrapped: nn.Module, adapter_name: str, head_names: list[str]) -> None:
    """Give ``adapter_name`` its own trainable copy of each head module."""
    hf = wrapped.model
    for name in head_names:
        # torch types Module attributes as Tensor | Module
        module = hf.get_submodule(name)  # type: ignore[union-attr]
        if not isinstance(module, HeadSlot):
            slot = HeadSlot(module)
            setattr(hf, name, slot)
            module = slot
        head = copy.deepcopy(module.base_layer)  # also unties a tied lm_head: the copy owns its weight
        for p in head.parameters():
            p.requires_grad_(True)
        module.heads[adapter_name] = head
