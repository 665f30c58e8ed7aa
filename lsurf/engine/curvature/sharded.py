"""The Hessian of a model sharded by rows over a rank group: exact products, 1/G of every vector.

FSDP2 cannot back-propagate twice: its all-gather runs outside autograd and gradients reach the
shards through hooks. So the sharded Hessian keeps FSDP2's layout (rank r of G holds rows
``torch.chunk(p, G)[r]`` of every parameter, possibly none) but not its runtime: each local shard is
a leaf tensor, made whole for the forward by an all-gather whose backward is a reduce-scatter, whose
backward is the all-gather again, so autograd differentiates through the collectives as often as
asked. The reduce-scatter sums the ranks' gradients: each rank back-propagates its own batches and
gets its rows of the group's product, with no further reduction. Inner products add the ranks'
parts. While a product runs a rank holds what its graph keeps — the gathered weights and
whole-size gradient terms, a few times the whole model's size at its peak; at rest, θ* and every
Lanczos vector are 1/G.

Every rank must run the same collectives in the same order: as many batches each (an empty one
runs a one-sample ``filler`` whose loss counts zero: some double backwards fail on 0 rows) and the
same graph, which a model without data-dependent control flow gives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lsurf.engine.curvature.hessian import Hessian, eigen_meta
from lsurf.engine.geometry.directions import Directions, hash_into
from lsurf.engine.model.tensor_parts import is_sharded, local_part
from lsurf.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


def chunk_rows(n: int, parts: int, rank: int) -> slice:
    """The rows of an ``n``-row tensor that rank ``rank`` of ``parts`` holds (torch.chunk's, as FSDP2)."""
    size = -(-n // parts)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _all_gather(shard: torch.Tensor, n: int, group) -> torch.Tensor:
    import torch.distributed as dist

    parts = dist.get_world_size(group)
    size = -(-n // parts)  # chunks padded to one size: all_gather_into_tensor takes equal pieces
    out = shard.new_empty((parts * size, *shard.shape[1:]))
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, _padded(shard, size).contiguous(), group=group)
    return out[:n]


def _reduce_scatter(full: torch.Tensor, rows: int, group) -> torch.Tensor:
    import torch.distributed as dist

    parts = dist.get_world_size(group)
    size = -(-full.shape[0] // parts)
    out = full.new_empty((size, *full.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)  # the older name: torch < 2.13
    scatter(out, _padded(full, parts * size).contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out[:rows]


class _Gather(torch.autograd.Function):
    """Rows of every rank -> the whole tensor; backward: the ranks' gradients summed, this rank's rows."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, n: int, group):
        ctx.rows, ctx.group = shard.shape[0], group
        return _all_gather(shard, n, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Scatter.apply(grad, ctx.rows, ctx.group), None, None


class _Scatter(torch.autograd.Function):
    """The whole tensor summed over the ranks -> this rank's rows; backward: the whole, gathered."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, rows: int, group):
        ctx.n, ctx.group = full.shape[0], group
        return _reduce_scatter(full, rows, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Gather.apply(grad, ctx.n, ctx.group), None, None


def gather_rows(shard: torch.Tensor, n: int, group) -> torch.Tensor:
    """The whole ``n``-row tensor from every rank's ``shard``, differentiable any number of times."""
    return _Gather.apply(shard, n, group)


class ShardedHessian(Hessian):
    """The Hessian of the mean loss of ``skeleton`` over every rank's ``batches``, with respect to
    parameters held as ``shards`` (name -> this rank's rows, named_parameters order) of tensors of
    ``sizes`` rows, over ``group`` (a torch.distributed group). ``skeleton``: the model's modules
    and buffers (its parameters may be on the meta device: they are never read). ``n``: the
    group's sample count; ``filler``: one real sample, run in place of an empty batch."""

    def __init__(self, skeleton: nn.Module, shards: dict[str, torch.Tensor], sizes: dict[str, int],
                 batches: Iterable[Batch], loss_fn: Callable, *, n: int, group, filler: Batch):
        import torch.distributed as dist

        self.model, self.batches, self.loss_fn, self.n, self.group = skeleton, batches, loss_fn, n, group
        self.names, self.sizes, self.filler = list(shards), sizes, filler
        self.params = [t.detach().requires_grad_(True) for t in shards.values()]
        self.rank, self.parts = dist.get_rank(group), dist.get_world_size(group)
        self.size = sum(sizes[k] * math.prod(t.shape[1:]) for k, t in shards.items())  # of the whole model
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.reduce = None  # each product is already the group's (and rows of it): nothing to add

    @classmethod
    def of(cls, model: nn.Module, skeleton: nn.Module, batches: Iterable[Batch], loss_fn: Callable, *, n: int,
           group, filler: Batch) -> ShardedHessian:
        """The Hessian at ``model``'s weights held by rows over ``group``: an FSDP2 model's own shards
        (their local rows, as they are now: a point's), or a whole model's rows cut here; run through
        ``skeleton`` (the model's modules and buffers, its parameters never read)."""
        import torch.distributed as dist

        rank, parts = dist.get_rank(group), dist.get_world_size(group)
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if any(p.dim() == 0 for p in params.values()):
            raise UserError("the sharded Hessian holds parameters by rows: this model has a scalar parameter")
        rows = {name: local_part(p) if is_sharded(p) else p[chunk_rows(p.shape[0], parts, rank)]
                for name, p in params.items()}
        return cls(skeleton, rows, {name: p.shape[0] for name, p in params.items()}, batches, loss_fn, n=n,
                   group=group, filler=filler)

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A batch's share of the mean loss; of an empty batch, the filler's times 0 (same graph,
        same collectives). Back through the scatters, the ranks' parts of g·v are gathered whole:
        each rank's product is its rows of H·v, already summed over the group."""
        if len(x) == 0:
            return self.loss_fn(self.forward(self.filler[0]), self.filler[1]).sum() * 0.0
        return self.loss_fn(self.forward(x), y).sum() / self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs at the weights (collective: every rank of the group calls it): the
        skeleton run on the parameters gathered whole, differentiably."""
        whole = {k: gather_rows(p, self.sizes[k], self.group) for k, p in zip(self.names, self.params)}
        return torch.func.functional_call(self.model, whole, (x,))

    def _draw(self, tensor: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        """This rank's rows of the vector the unsharded operator draws: each tensor drawn whole, in
        the same order from the same generator, and cut."""
        parts = []
        for k, p in zip(self.names, self.params):
            rows = chunk_rows(self.sizes[k], self.parts, self.rank)
            parts.append(tensor((self.sizes[k], *p.shape[1:]))[rows].reshape(-1))
        return torch.cat(parts).to(self.device)

    def flat(self, model: nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's rows of a direction over named tensors, flat: each tensor given whole (cut
        here) or as this rank's rows already (a sharded run's directions); zeros where it has none."""
        by_name = dict(zip(names, tensors))
        parts = []
        for k, p in zip(self.names, self.params):
            t = by_name.get(k)
            if t is None:
                t = torch.zeros_like(p)
            elif t.shape[0] == self.sizes[k] and t.shape != p.shape:  # whole: this rank's rows of it
                t = t[chunk_rows(self.sizes[k], self.parts, self.rank)]
            parts.append(t.detach().to(device=self.device, dtype=self.dtype).reshape(-1))
        return torch.cat(parts)

    def _stops_together(self, stop: bool) -> bool:
        return bool(self._group_sum(np.array([float(stop)]))[0] > 0)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self._group_sum(np.array([float(a.double() @ b.double())]))[0])

    def _group_sum(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed over the group, in float64 (on the group's device: NCCL's are GPUs)."""
        import torch.distributed as dist

        t = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t, group=self.group)
        return t.cpu().numpy()

    def directions(self, model: nn.Module, values: np.ndarray, vectors: list[torch.Tensor],
                   meta: dict | None = None) -> Directions:
        """Eigenvectors (this rank's rows, flat) as the directions of a sharded surface: this rank's
        rows of one tensor per ``model.named_parameters()`` (zeros where the Hessian has none), and
        the hash of the whole ones, each gathered in turn (collective: every rank calls)."""
        info = eigen_meta(values, len(vectors), meta)
        mine = dict(zip(self.names, zip(*(self._split(v) for v in vectors))))
        named = list(model.named_parameters())
        rows = [chunk_rows(p.shape[0], self.parts, self.rank) for _, p in named]
        parts: list[list[torch.Tensor]] = [[], []]
        digest = hashlib.sha256()
        for k in range(len(vectors)):
            for (name, p), r in zip(named, rows):
                part = mine[name][k] if name in mine else torch.zeros((r.stop - r.start, *p.shape[1:]),
                                                                       dtype=self.dtype, device=self.device)
                hash_into(digest, _all_gather(part.detach(), p.shape[0], self.group))
                parts[k].append(part.detach().cpu().clone())
        return Directions([n for n, _ in named], parts[0], parts[1] or None, info, rows=list(rows),
                          digest=digest.hexdigest())
