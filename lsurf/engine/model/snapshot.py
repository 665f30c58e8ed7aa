"""The caller's model, handed back exactly as it came.

Evaluating moves a model (to a device, a dtype, a memory layout, eval mode) and writes perturbed
weights into it. A library call must leave the caller's object as it was even when it fails or is
interrupted, so :func:`preserved` records every parameter's and buffer's tensor object and values
and every module's ``training`` flag, and puts them all back on the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lsurf.engine.model.tensor_parts import local_part


@dataclass
class _Slot:
    """One parameter or buffer: where it lives, the tensor object it holds, and its values then."""

    module: nn.Module
    name: str
    holder: torch.Tensor  # the Parameter (or the buffer tensor) itself
    data: torch.Tensor  # its storage at the time: ``.to()`` replaces ``param.data`` with a new tensor
    values: torch.Tensor  # a copy, since the storage itself may be written in place


class ModelSnapshot:
    """Everything about a model that evaluation may change, taken before it does."""

    def __init__(self, model: nn.Module):
        self.slots: list[_Slot] = []
        copies: dict[int, torch.Tensor] = {}  # a tensor tied into two modules is copied once
        for module in model.modules():
            for kind in (module._parameters, module._buffers):
                for name, t in kind.items():
                    if t is not None:
                        values = copies.setdefault(id(t), t.detach().clone())
                        self.slots.append(_Slot(module, name, t, t.data, values))
        self.modes = [(m, m.training) for m in model.modules()]

    def copy_of(self, t: torch.Tensor) -> torch.Tensor | None:
        """The copy taken of ``t``'s values, if ``t`` is still the storage a slot held then (not moved
        to another device, dtype or layout since) — so an evaluator need not copy θ* a second time:
        for a model that barely fits, one copy of the weights is all the room there is."""
        if not hasattr(self, "_by_place"):  # of a sharded model: this rank's shards
            self._by_place = {_place(local_part(s.data)): local_part(s.values) for s in self.slots}
        return self._by_place.get(_place(t))

    @torch.no_grad()
    def restore(self) -> None:
        for s in self.slots:
            if isinstance(s.holder, nn.Parameter):
                s.module._parameters[s.name] = s.holder
                s.holder.data = s.data
            else:
                s.module._buffers[s.name] = s.holder
            s.data.copy_(s.values)
        for module, training in self.modes:
            module.training = training


def _place(t: torch.Tensor) -> tuple:
    """Where a tensor's values live: two views with equal places are the same values."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """``with preserved(model): ...`` — whatever happens inside (an exception, Ctrl-C), the model's
    weights, buffers, device, dtype, memory layout and train/eval flags are as before afterwards."""
    snapshot = ModelSnapshot(model)
    try:
        yield model
    finally:
        snapshot.restore()
