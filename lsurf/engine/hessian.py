"""Curvature of the loss: Hessian-vector products over a whole split and the spectra built on them.

The loss is the mean per-sample loss over all batches, so eigenvalues do not depend on how the
split is batched. Every quantity comes from one Lanczos routine (full reorthogonalisation): top
eigenvalues, the extreme pair (λ_max, λ_min) for convexity maps (Li et al.: |λ_min/λ_max| small
means locally convex), and the eigenvalue density by stochastic Lanczos quadrature; the trace is
Hutchinson's estimate. The model is used at its current weights and in its current mode.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.errors import UserError

Batches = list[tuple[torch.Tensor, torch.Tensor]]


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
        gen = torch.Generator(device=self.device).manual_seed(seed)
        total = 0.0
        for _ in range(samples):
            v = torch.randint(0, 2, (self.size,), generator=gen, device=self.device).to(self.dtype) * 2 - 1
            total += float(v @ self.hvp(v))
        return total / samples

    def density(self, runs: int = 1, steps: int = 50, seed: int = 0, bins: int = 200, sigma: float | None = None):
        """Eigenvalue density by stochastic Lanczos quadrature, Gaussian-broadened: (grid, density).

        ``sigma`` defaults to 1 % of the spectrum's width; the grid has at least ``bins`` points and
        at least four per ``sigma``, so the density integrates to one."""
        nodes, weights = [], []
        for r in range(runs):
            alpha, beta, _ = self._lanczos(steps, 0.0, seed + r)
            theta, s = np.linalg.eigh(_tridiagonal(alpha, beta))
            nodes.append(theta)
            weights.append(s[0] ** 2 / runs)
        nodes, weights = np.concatenate(nodes), np.concatenate(weights)
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
        gen = torch.Generator(device=self.device).manual_seed(seed)
        q = torch.randn(self.size, generator=gen, device=self.device, dtype=self.dtype)
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


def add_arguments(p) -> None:
    p.add_argument("--model", default="cnn")
    p.add_argument("--checkpoint")
    p.add_argument("--data", default="digits")
    p.add_argument("--subset", type=int)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--trace-samples", type=int, default=50, help="Hutchinson samples (0: skip)")
    p.add_argument("--density", action="store_true", help="also the eigenvalue density (SLQ)")
    p.add_argument("--iters", type=int, default=100, help="Lanczos steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="HDF5 file for the results")


def run(args) -> int:
    import h5py

    from lsurf.engine.data import load_data, resident_batches
    from lsurf.engine.evaluate import resolve_loss
    from lsurf.engine.models import load_model

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    split = load_data(args.data, (args.split,), args.subset)[args.split]
    model = load_model(args.model, tuple(split.x.shape[1:]), split.num_outputs, args.checkpoint, dtype).eval()
    batches = resident_batches(split, args.batch_size, torch.device("cpu"), dtype)
    h = Hessian(model, batches, resolve_loss(args.loss))
    values, _ = h.top_eigenvalues(args.top_k, args.iters, seed=args.seed)
    results = {"eigenvalues": values}
    print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in values))
    if args.trace_samples:
        results["trace"] = np.array(h.trace(args.trace_samples, args.seed))
        print(f"trace (Hutchinson, {args.trace_samples} samples): {float(results['trace']):.6g}")
    if args.density:
        results["density_grid"], results["density"] = h.density(steps=min(args.iters, 80), seed=args.seed)
        print(f"density: {len(results['density'])} bins over [{results['density_grid'][0]:.4g}, "
              f"{results['density_grid'][-1]:.4g}]")
    if args.out:
        with h5py.File(args.out, "w") as f:
            for k, v in results.items():
                f[k] = v
            f.attrs["config"] = json.dumps({k: v for k, v in vars(args).items() if k != "func"}, default=str)
            f.attrs["lsurf_version"] = __version__
        print(f"wrote {args.out}")
    return 0
