"""Hessian spectra against closed forms (a quadratic) and dense autograd Hessians (non-convex),
in one process and divided among the ranks of an MPI job."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, _env, lsurf, mpirun, requires_mpi
from torch import nn

from lsurf import UserError
from lsurf.engine.curvature.hessian import Hessian, SpectrumSpec
from lsurf.engine.data.batches import resident_batches
from lsurf.engine.data.splits import Split
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.run.curvature import model_spectrum
from lsurf.run.options import Options
from lsurf.run.sources import load_inputs

N, D = 90, 6
F64 = torch.float64


def regression_data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Inputs, targets and A = [X, 1]: under MSE, H w.r.t. (w, b) is exactly 2 AᵀA / n."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, D, dtype=torch.float64)
    y = torch.randn(N, generator=g, dtype=torch.float64)
    return x, y, np.hstack([x.numpy(), np.ones((N, 1))])


def regression(batch: int):
    """Linear regression under MSE, its batches and its exact Hessian."""
    x, y, a = regression_data()
    model = nn.Linear(D, 1).double()
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, N, batch)]
    return model, batches, 2 * a.T @ a / N


def regression_spectrum(comm, out) -> None:
    """The top two eigenpairs of linear regression at its least-squares solution, on every rank of
    ``comm`` (None: one process), saved by rank 0 to ``out`` (.npz); also run by an MPI driver."""
    x, y, a = regression_data()
    solution = np.linalg.lstsq(a, y.numpy(), rcond=None)[0]
    model = nn.Linear(D, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(solution[:D]).view(1, D))
        model.bias.fill_(float(solution[D]))
    before = [t.clone() for t in model.state_dict().values()]
    done = model_spectrum(model, Split(x, y), Options(loss="mse", dtype="float64", batch_size=7),
                          SpectrumSpec(top_k=2, trace_samples=10, directions=True), torch.device("cpu"), comm)
    assert all(torch.equal(b, t) for b, t in zip(before, model.state_dict().values()))  # left as it was
    if done is not None:
        results, dirs = done
        assert dirs is not None and dirs.y is not None
        np.savez(out, values=results["eigenvalues"], trace=results["trace"], stderr=results["trace_stderr"],
                 x=torch.cat([t.reshape(-1) for t in dirs.x]).numpy(),
                 y=torch.cat([t.reshape(-1) for t in dirs.y]).numpy())


def mse(out, y):
    return (out.squeeze(1) - y) ** 2


@pytest.mark.parametrize("batch", [N, 7])
def test_quadratic_spectrum_matches_numpy(batch):
    model, batches, H = regression(batch)
    h = Hessian(model, batches, mse)
    exact = np.linalg.eigvalsh(H)
    v = torch.randn(D + 1, dtype=F64)
    np.testing.assert_allclose(h.hvp(v).numpy(), H @ v.numpy(), rtol=1e-10, atol=1e-12)
    top, vecs = h.top_eigenvalues(k=3)
    np.testing.assert_allclose(top, exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(np.abs(vecs[0].numpy() @ np.linalg.eigh(H)[1][:, -1]), 1, rtol=1e-6)
    lam_max, lam_min = h.extreme_eigenvalues()
    assert lam_max == pytest.approx(exact[-1], rel=1e-6) and lam_min == pytest.approx(exact[0], rel=1e-6)
    basis = torch.eye(D + 1, dtype=F64)
    assert sum(float(basis[i] @ h.hvp(basis[i])) for i in range(D + 1)) == pytest.approx(np.trace(H), rel=1e-10)


def test_hutchinson_trace_is_unbiased():
    model, batches, H = regression(N)
    estimate, stderr = Hessian(model, batches, mse).trace_and_error(samples=400, seed=1)
    # Rademacher variance: 2 Σ_{i≠j} H_ij²; four standard errors of the mean
    sd = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 400)
    assert abs(estimate - np.trace(H)) < 4 * sd
    assert stderr == pytest.approx(sd, rel=0.25)  # the sample's estimate of that standard error
    assert Hessian(model, batches, mse).trace(samples=400, seed=1) == estimate


def test_density_integrates_to_one_and_peaks_at_eigenvalues():
    model, batches, H = regression(N)
    grid, dens = Hessian(model, batches, mse).density(runs=2, steps=D + 1, sigma=0.05)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    assert abs(grid[np.argmax(dens)] - np.linalg.eigvalsh(H)).min() < 0.1


def test_non_convex_net_against_dense_hessian():
    torch.manual_seed(3)
    x, y = torch.randn(40, 3, dtype=F64), torch.randint(0, 2, (40,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        chunks, k = [], 0
        for s in shapes:
            n = int(np.prod(s))
            chunks.append(flat[k : k + n].reshape(s))
            k += n
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], chunks)), (x,))
        return nn.functional.cross_entropy(out, y)

    dense = torch.autograd.functional.hessian(loss_of, flat0).numpy()
    exact = np.linalg.eigvalsh(dense)
    assert exact[0] < 0 < exact[-1]  # really non-convex here
    h = Hessian(model, [(x[:25], y[:25]), (x[25:], y[25:])], resolve_loss("cross_entropy"))
    lam_max, lam_min = h.extreme_eigenvalues(iters=len(flat0))
    assert lam_max == pytest.approx(exact[-1], rel=1e-5) and lam_min == pytest.approx(exact[0], rel=1e-5)


def test_quadratic_curvature_does_not_move_with_the_weights():
    model, batches, H = regression(N)
    h = Hessian(model, batches, mse)
    before = h.extreme_eigenvalues()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 3)
    assert h.extreme_eigenvalues() == pytest.approx(before, rel=1e-8)


def test_non_differentiable_model_is_refused():
    class Rounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.round(self.lin(x))  # zero derivative almost everywhere, no graph to the weights

    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    with pytest.raises(UserError, match="twice-differentiable"):
        Hessian(Rounded().double(), [(x, y)], resolve_loss("cross_entropy")).hvp(torch.randn(8, dtype=F64))


# A fresh process measures the Ritz step's memory: a diagonal quadratic (H = diag(2x²): every
# Lanczos step is taken, each product costs O(P)) of P float32 weights; it prints how far the peak
# resident set (Linux's VmHWM, reset just before) rose during top_eigenvalues, in units of the basis
# (steps × P × 4 bytes), and the top Ritz pair's Rayleigh quotient over its value.
_RITZ_MEMORY = r"""
import re, sys, torch
from torch import nn
from lsurf.engine.curvature.hessian import Hessian
torch.set_num_threads(1)
P, STEPS = int(sys.argv[1]), int(sys.argv[2])

class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(P))

    def forward(self, x):
        return self.w * x

x = torch.randn(1, P, generator=torch.Generator().manual_seed(0))
h = Hessian(Scale(), [(x, torch.zeros_like(x))], lambda out, t: ((out - t) ** 2).sum(1))
def peak_kib():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))

h.hvp(torch.randn(P))  # the product's own transients are in the peak before
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak is now what is resident: the import's transients no longer hide the step's
before = peak_kib()
values, vectors = h.top_eigenvalues(k=1, iters=STEPS)
grown = (peak_kib() - before) * 1024
v = vectors[0]
print(grown / (STEPS * P * 4), float(v @ h.hvp(v)) / float(values[0]))
"""


@pytest.mark.system  # a fresh interpreter that imports torch: seconds, more under load
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mmap threshold, Linux's peak resident set")
def test_ritz_vectors_make_no_copy_of_the_basis():
    """The peak memory of top_eigenvalues is the Lanczos basis and a few vectors, not the basis
    stacked and cast to float64 too (4x the basis). glibc's mmap threshold is fixed at 1 MiB so
    every vector is its own mapping, returned on free: the peak resident set is then the peak of the
    live tensors, not of what glibc kept of freed ones. Measured: about 1, and 4.06 with the copies."""
    p = subprocess.run([sys.executable, "-c", _RITZ_MEMORY, "500000", "20"], capture_output=True, text=True,
                       timeout=60, env=_env({"MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}))
    assert p.returncode == 0, p.stderr
    grown, quotient = map(float, p.stdout.split())
    assert 0.8 < grown < 2  # the basis is seen, and far less than its copies beyond it
    assert quotient == pytest.approx(1, abs=1e-4)  # a Ritz pair: vᵀHv = θ (float32)


@pytest.mark.cli
def test_hessian_command(tmp_path):
    p = lsurf("hessian", "--model", "linear", "--data", "synthetic:shape=4,n=60,task=regression", "--loss", "mse",
              "--dtype", "float64", "--top-k", "2", "--trace-samples", "20", "--density", "--out", tmp_path / "h.h5",
              check=True)
    assert "top eigenvalues" in p.stdout
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["eigenvalues"].shape == (2,) and f["eigenvalues"][0] >= f["eigenvalues"][1]
        assert "density" in f and "trace" in f and f["trace_stderr"][()] > 0
    assert "(standard error)" in p.stdout


@pytest.mark.mpi
@requires_mpi
def test_curvature_maps_of_a_quadratic_under_mpi(tmp_path):
    """Per-point λ_max and λ_min of linear regression are the same everywhere, on 2 ranks each
    taking points, and on a group of 2 sharing every point (each its half of the split)."""
    from lsurf import load_data

    x = load_data("synthetic:shape=4,n=60,task=regression", ("train",))["train"].x.double().numpy()
    a = np.hstack([x, np.ones((len(x), 1))])
    exact = np.linalg.eigvalsh(2 * a.T @ a / len(x))
    for group in ("1", "2"):
        out = tmp_path / f"hq{group}.h5"
        mpirun(2, "surface", "--model", "linear", "--data", "synthetic:shape=4,n=60,task=regression", "--loss", "mse",
               "--dtype", "float64", "--x", "-1:1:3", "--y", "-1:1:3", "--hessian", "--hessian-iters", "5",
               "--ranks-per-point", group, "--out", out, "--no-progress", check=True)
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["hessian_max"][()], exact[-1], rtol=1e-6)
            np.testing.assert_allclose(f["hessian_min"][()], exact[0], rtol=1e-6)
    lsurf("plot", out, "--quantity", "hessian_ratio", "--kind", "heatmap", "--out-dir", tmp_path, check=True)


@pytest.mark.mpi
@requires_mpi
def test_distributed_regression_matches_numpy_on_one_and_two_ranks(tmp_path):
    """The split divided between 2 ranks (45 rows each, batches of 7) gives numpy's top pair."""
    (tmp_path / "driver.py").write_text("import sys\nfrom mpi4py import MPI\nfrom test_hessian import "
                                        "regression_spectrum\nregression_spectrum(MPI.COMM_WORLD, sys.argv[1])\n")
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root", sys.executable, str(tmp_path / "driver.py"),
           str(tmp_path / "two.npz")]
    env = _env({"PYTHONPATH": f"{REPO / 'tests'}:{_env()['PYTHONPATH']}"})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    regression_spectrum(None, tmp_path / "one.npz")
    _, _, a = regression_data()
    exact, vectors = np.linalg.eigh(2 * a.T @ a / N)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for got in (one, two):
        np.testing.assert_allclose(got["values"], exact[::-1][:2], rtol=1e-8)
        np.testing.assert_allclose(np.abs([got["x"] @ vectors[:, -1], got["y"] @ vectors[:, -2]]), 1, rtol=1e-8)
    for key in ("values", "trace", "stderr"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-12)


CNN = ("--model", "cnn", "--data", "digits", "--dtype", "float64", "--subset", "200", "--threads", "1",
       "--iters", "30")


@pytest.mark.mpi
@requires_mpi
def test_cnn_spectrum_is_the_same_on_one_and_two_ranks(tmp_path, digits_checkpoint):
    args = ("hessian", *CNN, "--checkpoint", digits_checkpoint, "--top-k", "5", "--trace-samples", "4", "--density")
    lsurf(*args, "--out", tmp_path / "one.h5", check=True)
    p = mpirun(2, *args, "--out", tmp_path / "two.h5", check=True)
    assert p.stdout.count("top eigenvalues") == 1 and p.stdout.count("wrote") == 1  # rank 0 alone
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(tmp_path / "two.h5") as two:
        assert one["eigenvalues"].shape == (5,) and json.loads(two.attrs["config"])["ranks"] == 2
        for key in ("eigenvalues", "trace", "trace_stderr", "density_grid"):
            np.testing.assert_allclose(two[key][()], one[key][()], rtol=1e-6)
        np.testing.assert_allclose(two["density"][()], one["density"][()], atol=1e-6 * one["density"][()].max())


@pytest.mark.mpi
@requires_mpi
def test_saved_eigenvectors_are_a_direction_file_for_surface(tmp_path, digits_checkpoint):
    saved = tmp_path / "eig.h5"
    mpirun(2, "hessian", *CNN, "--checkpoint", digits_checkpoint, "--top-k", "3", "--trace-samples", "0",
           "--save-directions", saved, check=True)
    with h5py.File(saved) as f:
        assert f.attrs["kind"] == "hessian" and json.loads(f.attrs["meta"])["dir_type"] == "weights"
        values = json.loads(f.attrs["eigenvalues"])
        vecs = [torch.cat([torch.from_numpy(f[g][str(i)][()]).reshape(-1) for i in range(len(f[g]))])
                for g in ("xdirection", "ydirection")]
    model, data = load_inputs(Options(model="cnn", data="digits", subset=200, dtype="float64",
                                      checkpoint=str(digits_checkpoint)))
    assert data is not None
    batches = resident_batches(data["train"], 128, torch.device("cpu"), torch.float64)
    h = Hessian(model.eval(), batches, resolve_loss("cross_entropy"))
    assert len(values) == 2 and values[0] >= values[1] > 0 and abs(float(vecs[0] @ vecs[1])) < 1e-8
    for lam, v in zip(values, vecs):
        assert float(v.norm()) == pytest.approx(1, abs=1e-10)
        assert float((h.hvp(v) - lam * v).norm()) / abs(lam) <= 1e-6
    out = tmp_path / "s.h5"
    lsurf("surface", *CNN[:-2], "--checkpoint", digits_checkpoint, "--dir-file", saved, "--x", "-1:1:3",
          "--y", "-1:1:3", "--out", out, "--no-progress", check=True)
    with h5py.File(out) as f:
        loss = f["train_loss"][()]
        assert loss.shape == (3, 3) and np.isfinite(loss).all() and loss[1, 1] < loss.max()
