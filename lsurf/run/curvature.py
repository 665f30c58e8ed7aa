"""``lsurf hessian`` as a library call: the Hessian of the options' model and split, on the
options' device and dtype, and its spectrum — in one process or divided among the ranks of an MPI
job (each rank its share of the split's batches, one allreduce per Hessian-vector product), with
the same numbers either way."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lsurf.engine.batches import resident_batches
from lsurf.engine.data import AnySplit
from lsurf.engine.directions import Directions
from lsurf.engine.evaluate import resolve_loss
from lsurf.engine.hessian import Hessian, Reduce, check_spectrum, eigen_directions, spectrum
from lsurf.engine.plan import default_batch_size
from lsurf.engine.snapshot import preserved
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.sources import load_inputs
from lsurf.run.world import World, abort_on_failure

Spectrum = tuple[dict[str, np.ndarray], Directions | None]


def hessian_spectrum(options: Options, device: torch.device, comm: Any = None, *, top_k: int = 5, iters: int = 100,
                     trace_samples: int = 50, density: bool = False, directions: bool = False) -> Spectrum | None:
    """Top eigenvalues, trace (with its standard error) and (optionally) density of the mean loss
    over ``options.split`` (one split) at the checkpoint, and with ``directions`` the top two
    eigenvectors (one if ``top_k`` is 1) as directions for ``lsurf surface``.

    Call it on every rank with the same ``comm`` (None: one process): each rank loads the inputs
    and takes its share of the split. Returns (results, directions or None) on rank 0, None
    elsewhere. The seed of the Lanczos and Hutchinson vectors is ``options.seed``."""
    w = World.of(comm)
    with abort_on_failure(w):
        model, split = w.agree(lambda: _inputs(options))
        return model_spectrum(model, split, options, device, comm, top_k=top_k, iters=iters,
                              trace_samples=trace_samples, density=density, directions=directions)


def _inputs(options: Options) -> tuple[nn.Module, AnySplit]:
    if len(options.split) != 1:
        raise UserError(f"`split` {','.join(options.split)!r}: the Hessian is of one split, train or test")
    model, data = load_inputs(options)
    if data is None:
        raise UserError("`data` is needed for the Hessian")
    return model, data[options.split[0]]


def model_spectrum(model: nn.Module, split: AnySplit, options: Options, device: torch.device, comm: Any = None, *,
                   top_k: int = 5, iters: int = 100, trace_samples: int = 50, density: bool = False,
                   directions: bool = False) -> Spectrum | None:
    """:func:`hessian_spectrum` of a model the caller holds, over ``split``, on every rank of
    ``comm``; the model comes back exactly as it was (device, dtype, mode, weights), also on failure."""
    w = World.of(comm)
    with abort_on_failure(w):
        group = w.groups(w.size)  # all ranks share the one split: its reduction is the allreduce
        try:
            with preserved(model):
                model.to(device=device, dtype=options.torch_dtype).eval()
                batches = resident_batches(split, options.batch_size or default_batch_size(device), device,
                                           options.torch_dtype, shard=(group.rank, group.size))
                reduce = group.add_sums()
                local = np.array([sum(len(x) for x, _ in batches)], dtype=np.float64)
                n = int((reduce(local) if reduce else local)[0])
                h = w.agree(lambda: _operator(model, batches, options, n, reduce, (top_k, iters, trace_samples)))
                keep = min(top_k, 2) if directions else 0
                results, vectors = spectrum(h, top_k, iters, trace_samples, density, options.seed, keep)
                meta = {"split": options.split[0], "loss": options.loss, "seed": options.seed}
                dirs = eigen_directions(model, h, results["eigenvalues"], vectors, meta) if vectors else None
        finally:
            group.free()
    return (results, dirs) if w.is_root else None


def _operator(model: nn.Module, batches: list, options: Options, n: int, reduce: Reduce | None,
              counts: tuple[int, int, int]) -> Hessian:
    """The Hessian, once its inputs are known good (asked on every rank, before any product)."""
    check_spectrum(*counts)
    return Hessian(model, batches, resolve_loss(options.loss), n=n, reduce=reduce)
