"""A model sharded over a rank group with PyTorch's FSDP2 (``fully_shard``), for the evaluator.

Each rank of a group holds 1/G of every parameter: rows [start, stop) along dim 0, the chunk
``torch.chunk`` gives FSDP2 (uneven, possibly empty). A point moves the weights by writing the
local shards in place (θ* + αd₁ + βd₂ on the rank's rows of each tensor); the next forward's
per-block all-gather sees them. So the evaluator works on the shards as on whole tensors, given
the directions' matching rows: a direction is drawn whole per tensor from its seed (so it is the
unsharded direction whatever G) and cut to the rank's rows.

Three habits of FSDP2 that this module keeps (each seen to matter): inference mode breaks its
all-gather (the sharded pass runs under no_grad); the root module is sharded with
``reshard_after_forward=True`` as well, or its parameters stay gathered after the first forward
and a point written into the shards afterwards is not seen; and every rank of the group must run
the same forwards, so each split gets as many batches on every rank (a short rank's last ones
empty). The caller's model is never touched: a copy is sharded — or, for a model too large for one
rank, :func:`load_sharded` builds it sharded and reads each rank's rows of its checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsurf.engine.model.tensor_parts import is_sharded, local_part, local_rows, read_in_group
from lsurf.engine.model.weights_file import WeightsFile, open_weights
from lsurf.errors import UserError


def shard_model(model: nn.Module, mesh: Any, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype``, in eval mode, sharded over ``mesh`` (a 1-D DeviceMesh, its
    device the one evaluated on)."""
    return shard_modules(copy.deepcopy(model).to(dtype=dtype).eval(), mesh)


def shard_modules(work: nn.Module, mesh: Any) -> nn.Module:
    """``work`` itself, sharded over ``mesh``: each block (an element of a ModuleList or Sequential
    that holds parameters) gathered on its own in the forward, the rest with the root."""
    from torch.distributed.fsdp import fully_shard  # here: its import costs a process start-up 0.6 s

    blocks = [m for parent in work.modules() if isinstance(parent, (nn.ModuleList, nn.Sequential))
              for m in parent.children() if any(True for _ in m.parameters())]
    # innermost first: FSDP2 takes a module's parameters that no block inside it has taken
    for m in reversed([m for m in work.modules() if any(m is b for b in blocks) and m is not work]):
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
    fully_shard(work, mesh=mesh, reshard_after_forward=True)
    return work


def is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded (DTensors), e.g. one :func:`load_sharded` made."""
    return any(is_sharded(p) for p in model.parameters())


def without_grad(sharded: bool) -> contextlib.AbstractContextManager:
    """What a forward that needs no gradient runs under: inference mode, or no_grad for a sharded
    model, whose per-block all-gather inference mode breaks."""
    return torch.no_grad() if sharded else torch.inference_mode()


def load_sharded(build: Callable[[], nn.Module], checkpoint: str | Path, mesh: Any, dtype: torch.dtype) -> nn.Module:
    """The model ``build()`` makes, in ``dtype`` and eval mode, sharded over ``mesh`` and each rank's
    shard read from ``checkpoint`` (lsurf.engine.model.weights_file): no rank ever holds it whole.

    It is built with its parameters on the meta device (no memory, no initialisation), sharded,
    given empty shards on the mesh's device, and filled with this rank's rows of each tensor.
    Buffers are built for real (small; some, such as a rotary embedding's frequencies, are computed
    when built and are not in any checkpoint) and those the checkpoint holds are read whole."""
    with _parameters_on_meta():
        model = build()
    model = shard_modules(model.to(dtype=dtype).eval(), mesh)
    built = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=mesh.device_type)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(built[name])
        with open_weights(checkpoint) as f:
            _fill(model, f, str(checkpoint))
    return model


def meta_skeleton(build: Callable[[], nn.Module], like: nn.Module) -> nn.Module:
    """The model ``build()`` makes, with its parameters on the meta device (never read: whoever runs
    it supplies them) and ``like``'s buffers (its BatchNorm statistics, read from the checkpoint)."""
    with _parameters_on_meta():
        skeleton = build()
    buffers = dict(like.named_buffers())
    for name, b in skeleton.named_buffers():
        b.data = buffers[name].detach()
    return skeleton.eval()


def copy_skeleton(model: nn.Module, like: nn.Module) -> nn.Module:
    """A copy of whole ``model``'s modules with its parameters on the meta device (never copied)
    and ``like``'s buffers (a sharded copy's, on its device and in its dtype)."""
    on_meta = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    skeleton = copy.deepcopy(model, on_meta)
    buffers = dict(like.named_buffers())
    for name, b in skeleton.named_buffers():
        b.data = buffers[name].detach()
    return skeleton.eval()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered meanwhile go to the meta device as they are registered (before a
    layer's initialisation touches them), buffers stay real. The hook is torch's
    ``register_parameter``, put back on the way out."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def read_rows(model: nn.Module, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """This rank's rows of every parameter of sharded ``model`` (and each buffer the file holds,
    whole) as ``checkpoint`` stores them, in the model's dtype: another model of the same
    architecture read as ``model`` is held, e.g. for the direction towards it. Checked to fit as
    :func:`load_sharded` checks its checkpoint; collective over the model's group, whose ranks all
    refuse if one cannot read the file."""
    def read() -> dict[str, torch.Tensor]:
        with open_weights(checkpoint) as f:
            return {name: part.to(local_part(t).dtype) for name, t, part in _rows(model, f, str(checkpoint))}
    return read_in_group(read, model.parameters(), f"checkpoint {str(checkpoint)!r}")


def _fill(model: nn.Module, f: WeightsFile, where: str) -> None:
    """Each parameter's local rows, and each buffer the file holds, read from ``f`` (see :func:`_rows`)."""
    for _, t, rows in _rows(model, f, where):
        local_part(t).copy_(rows)


def _rows(model: nn.Module, f: WeightsFile, where: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the model's tensor, this rank's rows of it read from ``f``) for each parameter and
    each buffer the file holds, one at a time, checked to fit as ``load_state_dict(strict=True)``
    would: a tensor tied to another may be stored under either name."""
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    wanted = {**params, **{n: b for n, b in model.named_buffers() if n in keys}}
    missing = [n for n in wanted if n not in f and not (n in params and _tied_name(model, n, f))]
    unexpected = [n for n in f.names() if n not in keys]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys, first {missing[0]!r}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys, first {unexpected[0]!r}"] if unexpected else []
        raise UserError(f"checkpoint {where!r} does not fit this model: {'; '.join(parts)}")
    for name, t in wanted.items():
        stored = name if name in f else _tied_name(model, name, f)
        assert stored is not None  # checked above
        if f.shape(stored) != tuple(t.shape):
            raise UserError(f"checkpoint {where!r} does not fit this model: {stored!r} has shape "
                            f"{f.shape(stored)}, the model expects {tuple(t.shape)}")
        yield name, t, f.read(stored, local_rows(t))


def _tied_name(model: nn.Module, name: str, f: WeightsFile) -> str | None:
    """Another name of parameter ``name`` (tied: one tensor, two modules) under which ``f`` holds it."""
    target = model.get_parameter(name)
    return next((other for other, p in model.named_parameters(remove_duplicate=False)
                 if p is target and other != name and other in f), None)


def check_shardable(*, points_per_pass: int, channels_last: bool) -> None:
    """Refuse what the sharded path cannot do, naming it."""
    refused = {"`points_per_pass` > 1 (stacked points call the model functionally, outside FSDP)": points_per_pass > 1,
               "channels-last": channels_last}
    bad = [what for what, on in refused.items() if on]
    if bad:
        raise UserError(f"`shard` fsdp cannot be combined with {', '.join(bad)}")
