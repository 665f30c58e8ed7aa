"""The sharded runs of tests/test_shard.py: ``mpirun -n 4 python tests/shard_job.py OUT`` samples each
case with the model sharded over its rank groups (``shard`` fsdp); the test samples the same cases
in one process, unsharded, and compares. Models: a linear model, a conv net with BatchNorm, a
causal transformer LM, each in float64 and with a layer of fewer rows than ranks (empty shards);
BatchNorm recalibrated at every point, sharded and in unsharded groups; a split streamed.
It also writes each model's Hessian spectrum, the model held by rows over all 4 ranks (``SPECTRA``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from lm_fixtures import TinyLM
from torch import nn

from lsurf.engine.data.splits import Split
from lsurf.engine.geometry.directions import random_directions
from lsurf.engine.geometry.grid import Grid

# name: (model, ranks per point, options)
CASES = {
    "linear_g4": ("linear", 4, {"fidelity": "on"}),  # the planes' fidelity: the sharded Hessian, one group
    "linear_g2_regenerated": ("linear", 2, {"regenerate": True}),  # directions drawn per tensor, cut
    "bn_cnn_g2": ("bn_cnn", 2, {"hessian_iters": 4}),  # λ_max, λ_min at every point: the sharded Hessian
    "lm_g4": ("lm", 4, {"loss": "cross_entropy"}),
    "circle_g2": ("bn_cnn", 2, {"geometry": True}),  # a plug-in geometry's offsets, cut to each rank's rows
    # BatchNorm statistics at every point: each rank's whole batches of the one process's, pooled
    "bn_cnn_g2_recalibrated": ("bn_cnn", 2, {"bn": "recalibrate"}),
    "bn_cnn_groups_recalibrated": ("bn_cnn", 2, {"bn": "recalibrate", "shard": None}),  # groups, not sharded
    # read afresh at every point: 10 batches over 4 ranks, so two ranks run an empty one (a collective forward)
    "bn_cnn_g4_streamed": ("bn_cnn", 4, {"bn": "recalibrate", "resident": "never"}),
}
GRID = Grid(np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 2))
SPECTRA = ("linear", "bn_cnn", "lm")  # sharded over one group of every rank


def build(name: str) -> tuple[nn.Module, dict[str, Split]]:
    """The model (float64, from seed 0) and its data: 37 samples, so shards of rows are uneven."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "linear":
            # its last layer has 3 rows: at G = 4 one rank holds none of it
            model: nn.Module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
            x, y = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
        elif name == "bn_cnn":
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 6 * 6, 3))
            x, y = torch.randn(37, 1, 6, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
            model.train()(torch.randn(64, 1, 6, 6, generator=g))  # running statistics of its own
        else:
            model = TinyLM(vocab=16, d=8, heads=2, layers=2)
            x = torch.randint(0, 16, (37, 6), generator=g)
            y = torch.roll(x, -1, 1)
    return model.double().eval(), {"train": Split(x.double() if x.is_floating_point() else x, y)}


class Circle:
    """Five points on a circle of radius 0.5 around θ* in the plane of two directions: a geometry."""

    def __init__(self, directions):
        self.d, self.axes = directions, {"t": np.linspace(0, 2 * np.pi, 5)}

    def offset(self, index):
        t = self.axes["t"][index[0]]
        return [0.5 * np.cos(t) * a + 0.5 * np.sin(t) * b for a, b in zip(self.d.x, self.d.y)]

    def identity(self):
        return {"circle": 0.5}


def sample(name: str, out: Path, comm=None, sharded: bool = True):
    from lsurf.run.sampler import sample_geometry, sample_surface

    model_name, g, case = CASES[name]
    extra = dict(case)  # popped below: the table stays as it is
    model, data = build(model_name)
    directions = random_directions(model, seed=3, two=True, regenerate=extra.pop("regenerate", False))
    geometry = extra.pop("geometry", False)
    options = {"comm": comm, "dtype": "float64", "batch_size": 4, "threads": 1, "fidelity": "off", "progress": False,
               "overwrite": True, **({"ranks_per_point": g, "shard": "fsdp"} if sharded else {}), **extra}
    if geometry:
        return sample_geometry(model, data, Circle(directions), out / f"{name}.h5", **options)
    return sample_surface(model, data, directions, GRID, out / f"{name}.h5", **options)


def spectrum(name: str, comm=None, sharded: bool = True) -> dict[str, np.ndarray] | None:
    """Top eigenvalues and Hutchinson's trace of model ``name``'s Hessian (rank 0's; None elsewhere)."""
    from lsurf.engine.curvature.hessian import SpectrumSpec
    from lsurf.run.curvature import model_spectrum
    from lsurf.run.options import Options

    model, data = build(name)
    size = comm.Get_size() if comm is not None else 1
    options = Options(dtype="float64", batch_size=4, seed=1, **({"ranks_per_point": size, "shard": "fsdp"}
                                                                if sharded else {}))
    done = model_spectrum(model, data["train"], options, SpectrumSpec(top_k=2, iters=8, trace_samples=1),
                          torch.device("cpu"), comm)
    return None if done is None else done[0]


if __name__ == "__main__":
    from mpi4py import MPI

    for case in CASES:
        sample(case, Path(sys.argv[1]), MPI.COMM_WORLD)
    for name in SPECTRA:
        results = spectrum(name, MPI.COMM_WORLD)
        if results is not None:
            np.savez(Path(sys.argv[1]) / f"{name}_spectrum.npz", **results)
