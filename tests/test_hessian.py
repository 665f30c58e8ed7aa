"""Hessian spectra against closed forms (a quadratic) and dense autograd Hessians (non-convex)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import lsurf, mpirun, requires_mpi
from torch import nn

from lsurf import UserError
from lsurf.engine.evaluate import resolve_loss
from lsurf.engine.hessian import Hessian

N, D = 90, 6
F64 = torch.float64


def regression(batch: int):
    """Linear regression under MSE: H w.r.t. (w, b) is exactly 2 AᵀA / n with A = [X, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, D, dtype=torch.float64)
    y = torch.randn(N, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1).double()
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, N, batch)]
    a = np.hstack([x.numpy(), np.ones((N, 1))])
    return model, batches, 2 * a.T @ a / N


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
    estimate = Hessian(model, batches, mse).trace(samples=400, seed=1)
    # Rademacher variance: 2 Σ_{i≠j} H_ij²; four standard errors of the mean
    sd = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 400)
    assert abs(estimate - np.trace(H)) < 4 * sd


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


def test_hessian_command(tmp_path):
    p = lsurf("hessian", "--model", "linear", "--data", "synthetic:shape=4,n=60,task=regression", "--loss", "mse",
              "--dtype", "float64", "--top-k", "2", "--trace-samples", "20", "--density", "--out", tmp_path / "h.h5",
              check=True)
    assert "top eigenvalues" in p.stdout
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["eigenvalues"].shape == (2,) and f["eigenvalues"][0] >= f["eigenvalues"][1]
        assert "density" in f and "trace" in f


@requires_mpi
def test_curvature_maps_of_a_quadratic_under_mpi(tmp_path):
    """Per-point λ_max and λ_min of linear regression are the same everywhere, on 2 ranks."""
    out = tmp_path / "hq.h5"
    mpirun(2, "surface", "--model", "linear", "--data", "synthetic:shape=4,n=60,task=regression", "--loss", "mse",
           "--dtype", "float64", "--x", "-1:1:3", "--y", "-1:1:3", "--hessian", "--hessian-iters", "5",
           "--out", out, "--no-progress", check=True)
    from lsurf import load_data

    x = load_data("synthetic:shape=4,n=60,task=regression", ("train",))["train"].x.double().numpy()
    a = np.hstack([x, np.ones((len(x), 1))])
    exact = np.linalg.eigvalsh(2 * a.T @ a / len(x))
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["hessian_max"][()], exact[-1], rtol=1e-6)
        np.testing.assert_allclose(f["hessian_min"][()], exact[0], rtol=1e-6)
    lsurf("plot", out, "--quantity", "hessian_ratio", "--kind", "heatmap", "--out-dir", tmp_path, check=True)
