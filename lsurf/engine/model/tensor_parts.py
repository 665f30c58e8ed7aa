"""The part of a tensor this rank holds: of a sharded model's parameter (a DTensor, see
lsurf.engine.model.sharding), its rows; of any other tensor, the whole. Kept apart from the sharding
itself so that what reads tensors (fingerprints, directions) needs none of its imports."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from lsurf.errors import UserError

T = TypeVar("T")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor, without importing DTensor's module (0.5 s): none exists unless
    something imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: its shard (which the model's own parameter reads) or ``t``."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]  # a DTensor's


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded tensor gathered from its group (collective: every rank of it calls), or ``t``."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]  # a DTensor's


def whole_of(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``rows`` are this rank's part, laid out as ``like`` (a sharded
    tensor: gathered from its group, collective) or ``rows`` itself (``like`` is whole here)."""
    if not is_sharded(like):
        return rows
    from torch.distributed.tensor import DTensor

    assert isinstance(like, DTensor)
    part = rows.to(local_part(like).device)
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=part.new_empty(like.shape, device="meta").stride()).full_tensor()


def read_in_group(read: Callable[[], T], tensors: Iterable[torch.Tensor], what: str) -> T:
    """``read()``, which each rank of a sharded model's group runs apart (its rows of a file),
    refused on every rank of the group if it refused on one (collective where one of ``tensors`` is
    sharded): before any gather, so a rank that cannot see ``what`` does not leave the others
    waiting in one."""
    like = next((t for t in tensors if is_sharded(t)), None)
    try:
        result = read()
    except UserError:
        if like is not None:
            _group_agrees(False, like)
        raise
    if like is not None and not _group_agrees(True, like):
        raise UserError(f"{what}: another rank of the group could not read it")
    return result


def _group_agrees(ok: bool, like: torch.Tensor) -> bool:
    """Whether every rank of sharded tensor ``like``'s group is ``ok`` (collective)."""
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device=local_part(like).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=like.device_mesh.get_group())  # type: ignore[attr-defined]
    return bool(flag.item())


def local_rows(t: torch.Tensor) -> slice | None:
    """The rows of ``t``'s whole tensor that this rank holds (None: ``t`` is whole here, e.g. a buffer)."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor import DTensor, Shard

    assert isinstance(t, DTensor)
    if t.device_mesh.ndim != 1 or list(t.placements) != [Shard(0)]:
        raise UserError(f"a sharded tensor laid out as {t.placements} over a {t.device_mesh.ndim}-D mesh: "
                        "lsurf moves tensors sharded along dim 0 over one group")
    n, parts, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    start = min(rank * -(-n // parts), n)
    return slice(start, start + t.to_local().shape[0])
