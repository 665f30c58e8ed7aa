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
empty). The caller's model is never touched: a copy is sharded.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from lsurf.engine.batches import Batch, shard_range, to_device
from lsurf.engine.data import AnySplit, BatchStreamSplit
from lsurf.errors import UserError


def shard_model(model: nn.Module, mesh: Any, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype``, in eval mode, sharded over ``mesh`` (a 1-D DeviceMesh, its
    device the one evaluated on): each block (an element of a ModuleList or Sequential that holds
    parameters) gathered on its own in the forward, the rest with the root."""
    from torch.distributed.fsdp import fully_shard  # here: its import costs a process start-up 0.6 s

    work = copy.deepcopy(model).to(dtype=dtype).eval()
    blocks = [m for parent in work.modules() if isinstance(parent, (nn.ModuleList, nn.Sequential))
              for m in parent.children() if any(True for _ in m.parameters())]
    # innermost first: FSDP2 takes a module's parameters that no block inside it has taken
    for m in reversed([m for m in work.modules() if any(m is b for b in blocks) and m is not work]):
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
    fully_shard(work, mesh=mesh, reshard_after_forward=True)
    return work


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor, without importing DTensor's module (0.5 s): none exists unless
    something imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: its shard (which the model's own parameter reads) or ``t``."""
    return t.to_local() if _is_sharded(t) else t  # type: ignore[attr-defined]  # a DTensor's


def local_rows(t: torch.Tensor) -> slice | None:
    """The rows of ``t``'s whole tensor that this rank holds (None: ``t`` is whole here, e.g. a buffer)."""
    if not _is_sharded(t):
        return None
    from torch.distributed.tensor import DTensor, Shard

    assert isinstance(t, DTensor)
    if t.device_mesh.ndim != 1 or list(t.placements) != [Shard(0)]:
        raise UserError(f"a sharded tensor laid out as {t.placements} over a {t.device_mesh.ndim}-D mesh: "
                        "lsurf moves tensors sharded along dim 0 over one group")
    n, parts, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    start = min(rank * -(-n // parts), n)
    return slice(start, start + t.to_local().shape[0])


def equal_batches(batches: list[Batch], split: AnySplit, batch_size: int, shard: tuple[int, int],
                  device: torch.device, dtype: torch.dtype) -> list[Batch]:
    """This rank's batches, then empty ones up to the most any rank of the group has: a sharded
    forward is collective, so every rank runs as many."""
    _, parts = shard
    if isinstance(split, BatchStreamSplit):
        raise UserError("`shard` fsdp needs splits of known length: not a stream of batches")
    most = max(-(-(stop - start) // batch_size) for start, stop in (shard_range(len(split), (r, parts))
                                                                   for r in range(parts)))
    if len(batches) == most:
        return batches
    x, y = to_device(*split.rows(0, 1), device, dtype)
    return batches + [(x[:0], y[:0])] * (most - len(batches))


def check_shardable(*, points_per_pass: int, bn: str, hessian_iters: int, channels_last: bool,
                    streamed: bool) -> None:
    """Refuse what the sharded path cannot do, naming it."""
    refused = {"`points_per_pass` > 1 (stacked points call the model functionally, outside FSDP)": points_per_pass > 1,
               "`bn` recalibrate": bn == "recalibrate", "`hessian_iters`": hessian_iters > 0,
               "channels-last": channels_last, "streamed splits (`resident` never)": streamed}
    bad = [what for what, on in refused.items() if on]
    if bad:
        raise UserError(f"`shard` fsdp cannot be combined with {', '.join(bad)}")
