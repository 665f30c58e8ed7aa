"""Curvature of the loss: Hessian-vector products over a whole split and the spectra built on them.

The loss is the mean per-sample loss over all batches, so eigenvalues do not depend on how the
split is batched. Every quantity comes from one Lanczos routine (full reorthogonalisation): top
eigenvalues, the extreme pair (λ_max, λ_min) for convexity maps (Li et al.: |λ_min/λ_max| small
means locally convex), and the eigenvalue density by stochastic Lanczos quadrature; the trace is
Hutchinson's estimate. The model is used at its current weights and in its current mode.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable

import h5py
import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.errors import UserError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # re-iterable: read once per product


class Hessian:
    """The Hessian of the mean loss of ``model`` over ``batches`` w.r.t. ``params``, as an operator."""

    def __init__(self, model: nn.Module, batches: Batches, loss_fn, params: list[nn.Parameter] | None = None):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not self.params:
            raise UserError("Hessian needs a twice-differentiable model: it has no trainable parameters")
        self.n = sum(len(x) for x, _ in batches)
        self.size = sum(p.numel() for p in self.params)
        ref = self.params[0]
        self.device, self.dtype = ref.device, ref.dtype

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a flat vector ``v`` (double back-propagation, batch by batch)."""
        vs = self._split(v)
        out = torch.zeros_like(v)
        with torch.enable_grad():
            for x, y in self.batches:
                loss = self.loss_fn(self.model(x), y).sum() / self.n
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                live = [(g, vi) for g, vi in zip(grads, vs) if g is not None and g.grad_fn is not None]
                if not live:
                    raise UserError("Hessian needs a twice-differentiable model: no gradient depends on the "
                                    "weights (argmax, sign, rounding or detach in the forward?)")
                dot = sum((g * vi).sum() for g, vi in live)
                assert isinstance(dot, torch.Tensor)  # live is not empty, so sum() never returns its start 0
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                  for h, p in zip(hv, self.params)])
        return out

    def top_eigenvalues(self, k: int = 1, iters: int = 100, tol: float = 1e-6, seed: int = 0):
        """The k largest eigenvalues (descending) and their eigenvectors (flat, unit norm)."""
        values, vectors = self._ritz(iters, tol, seed)
        order = np.argsort(values)[::-1][:k]
        return values[order], [vectors(i) for i in order]

    def extreme_eigenvalues(self, iters: int = 100, tol: float = 1e-6, seed: int = 0) -> tuple[float, float]:
        """(λ_max, λ_min) from one Lanczos run: its extreme Ritz values converge first."""
        values, _ = self._ritz(iters, tol, seed)
        return float(values.max()), float(values.min())

    def trace(self, samples: int = 100, seed: int = 0) -> float:
        """Hutchinson's estimate: the mean of vᵀHv over Rademacher vectors v."""
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same vectors on every device
        total = 0.0
        for _ in range(samples):
            v = (torch.randint(0, 2, (self.size,), generator=gen).to(self.dtype) * 2 - 1).to(self.device)
            total += float(v @ self.hvp(v))
        return total / samples

    def density(self, runs: int = 1, steps: int = 50, seed: int = 0, bins: int = 200, sigma: float | None = None):
        """Eigenvalue density by stochastic Lanczos quadrature, Gaussian-broadened: (grid, density).

        ``sigma`` defaults to 1 % of the spectrum's width; the grid has at least ``bins`` points and
        at least four per ``sigma``, so the density integrates to one."""
        node_parts: list[np.ndarray] = []
        weight_parts: list[np.ndarray] = []
        for r in range(runs):
            alpha, beta, _ = self._lanczos(steps, 0.0, seed + r)
            theta, s = np.linalg.eigh(_tridiagonal(alpha, beta))
            node_parts.append(theta)
            weight_parts.append(s[0] ** 2 / runs)
        nodes, weights = np.concatenate(node_parts), np.concatenate(weight_parts)
        lo, hi = nodes.min(), nodes.max()
        width = hi - lo or max(abs(hi), 1.0)
        sigma = sigma or width / 100
        pad = max(0.1 * width, 4 * sigma)  # keep the kernels' tails inside the grid
        bins = max(bins, min(20000, int(np.ceil((hi - lo + 2 * pad) / (sigma / 4)))))  # resolve each kernel
        grid = np.linspace(lo - pad, hi + pad, bins)
        dens = (weights[None] * np.exp(-((grid[:, None] - nodes[None]) ** 2) / (2 * sigma**2))).sum(1)
        return grid, dens / (sigma * np.sqrt(2 * np.pi))

    def _ritz(self, iters: int, tol: float, seed: int):
        alpha, beta, basis = self._lanczos(min(iters, self.size), tol, seed)
        theta, s = np.linalg.eigh(_tridiagonal(alpha, beta))
        q = torch.stack(basis).to(torch.float64)

        def vector(i: int) -> torch.Tensor:
            return (torch.as_tensor(s[:, i], device=q.device) @ q).to(self.dtype)

        return theta, vector

    def _lanczos(self, steps: int, tol: float, seed: int):
        """α, β of the tridiagonal T = QᵀHQ and the orthonormal basis Q (fully reorthogonalised)."""
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        q = torch.randn(self.size, generator=gen, dtype=self.dtype).to(self.device)
        q /= q.norm()
        basis, alpha, beta = [q], [], []
        for _ in range(steps):
            w = self.hvp(basis[-1])
            alpha.append(float(w @ basis[-1]))
            for _ in range(2):  # twice is enough (Kahan): keeps Q orthogonal in floating point
                for b in basis:
                    w -= (w @ b) * b
            norm = float(w.norm())
            if len(alpha) == steps or norm <= tol * max(abs(a) for a in alpha):
                break
            beta.append(norm)
            basis.append(w / norm)
        return alpha, beta, basis[: len(alpha)]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, k = [], 0
        for p in self.params:
            out.append(v[k : k + p.numel()].view_as(p))
            k += p.numel()
        return out


def _tridiagonal(alpha: list[float], beta: list[float]) -> np.ndarray:
    k = len(alpha)
    return np.diag(alpha) + np.diag(beta[: k - 1], 1) + np.diag(beta[: k - 1], -1)


def spectrum(h: Hessian, top_k: int = 5, iters: int = 100, trace_samples: int = 50, density: bool = False,
             seed: int = 0) -> dict[str, np.ndarray]:
    """What ``lsurf hessian`` reports: the ``top_k`` eigenvalues, Hutchinson's trace (when
    ``trace_samples`` > 0) and the SLQ density (``density_grid``, ``density``) when asked for."""
    if top_k < 1 or iters < 1 or trace_samples < 0:
        raise UserError(f"`top_k` {top_k}, `iters` {iters}, `trace_samples` {trace_samples}: "
                        "need top_k >= 1, iters >= 1, trace_samples >= 0")
    values, _ = h.top_eigenvalues(top_k, iters, seed=seed)
    results: dict[str, np.ndarray] = {"eigenvalues": values}
    if trace_samples:
        results["trace"] = np.array(h.trace(trace_samples, seed))
    if density:
        results["density_grid"], results["density"] = h.density(steps=min(iters, 80), seed=seed)
    return results


def save_spectrum(results: dict[str, np.ndarray], path: str, config: dict) -> None:
    """The results as HDF5 datasets, with the configuration that made them."""
    tmp = f"{path}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in results.items():
                f[k] = v
            f.attrs["config"] = json.dumps(config, default=str)
            f.attrs["lsurf_version"] = __version__
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"cannot write {path!r}: {e.strerror or e}") from None
