"""Curvature of the loss: Hessian-vector products over a whole split and the spectra built on them.

The loss is the mean per-sample loss over all batches, so eigenvalues do not depend on how the
split is batched. Every quantity comes from one Lanczos routine (full reorthogonalisation): top
eigenvalues, the extreme pair (λ_max, λ_min) for convexity maps (Li et al.: |λ_min/λ_max| small
means locally convex), and the eigenvalue density by stochastic Lanczos quadrature; the trace is
Hutchinson's estimate (with its standard error). The model is used at its current weights and in
its current mode.

A split may be divided among processes: each holds its share of the batches, ``n`` is the sample
count of the whole split and ``reduce`` sums a vector over the processes (the run layer supplies
it; the engine knows no MPI). Each product is then one reduction, and since everything after it
(Lanczos, the CPU-drawn start and probe vectors) is the same arithmetic on the same numbers, every
process gets the same spectrum as one process holding the whole split.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import h5py
import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.engine.geometry.directions import Directions
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # re-iterable: read once per product
Extreme = Literal["max", "max2", "min"]
EXTREMES: dict[str, int] = {"max": 0, "max2": 1, "min": -1}  # position in the eigenvalues, largest first
Reduce = Callable[[np.ndarray], np.ndarray]  # float64 array -> its sum over the processes sharing the split


class Hessian:
    """The Hessian of the mean loss of ``model`` over ``batches`` w.r.t. ``params``, as an operator.

    ``batches`` may be this process's share of a split: then ``n`` is the whole split's sample
    count (default: the samples in ``batches``) and ``reduce`` adds the shares' products."""

    def __init__(self, model: nn.Module, batches: Batches, loss_fn, params: list[nn.Parameter] | None = None, *,
                 n: int | None = None, reduce: Reduce | None = None):
        self.model, self.batches, self.loss_fn, self.reduce = model, batches, loss_fn, reduce
        self.params: list[torch.Tensor] = [p for p in (params if params is not None else model.parameters())
                                           if p.requires_grad]
        if not self.params:
            raise UserError("Hessian needs a twice-differentiable model: it has no trainable parameters")
        self.n = n if n is not None else sum(len(x) for x, _ in batches)
        self.size = sum(p.numel() for p in self.params)
        ref = self.params[0]
        self.device, self.dtype = ref.device, ref.dtype

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a flat vector ``v`` (double back-propagation, batch by batch; shares added once)."""
        vs = self._split(v)
        out = torch.zeros_like(v)
        with twice_differentiable():
            for x, y in self.batches:
                grads = torch.autograd.grad(self._batch_loss(x, y), self.params, create_graph=True, allow_unused=True)
                live = [(g, vi) for g, vi in zip(grads, vs) if g is not None and g.grad_fn is not None]
                if not live:
                    raise UserError("Hessian needs a twice-differentiable model: no gradient depends on the "
                                    "weights (argmax, sign, rounding or detach in the forward?)")
                dot = sum((g * vi).sum() for g, vi in live)
                assert isinstance(dot, torch.Tensor)  # live is not empty, so sum() never returns its start 0
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                  for h, p in zip(hv, self.params)])
        if self.reduce is None:
            return out
        total = self.reduce(out.detach().to(device="cpu", dtype=torch.float64).numpy())
        return torch.from_numpy(np.asarray(total)).to(device=self.device, dtype=self.dtype)

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A batch's share of the mean loss."""
        return self.loss_fn(self.model(x), y).sum() / self.n

    def top_eigenvalues(self, k: int = 1, iters: int = 100, tol: float = 1e-6, seed: int = 0):
        """The k largest eigenvalues (descending) and their eigenvectors (flat, unit norm)."""
        values, vectors = self._ritz(iters, tol, seed)
        order = np.argsort(values)[::-1][:k]
        return values[order], [vectors(i) for i in order]

    def eigenpairs(self, which: Sequence[Extreme], iters: int = 100, tol: float = 1e-6, seed: int = 0):
        """Eigenvalues and eigenvectors named by ``which`` (``max``, ``max2``: the largest two;
        ``min``: the most negative), from one Lanczos run: extreme Ritz pairs converge first."""
        values, vectors = self._ritz(iters, tol, seed)
        order = np.argsort(values)[::-1]
        picks = [order[EXTREMES[w]] for w in which]
        if "max2" in which and len(order) < 2:
            raise UserError("`max2`: the Lanczos run found one eigenvalue only (a one-parameter model?)")
        return values[picks], [vectors(i) for i in picks]

    def extreme_eigenvalues(self, iters: int = 100, tol: float = 1e-6, seed: int = 0) -> tuple[float, float]:
        """(λ_max, λ_min) from one Lanczos run: its extreme Ritz values converge first."""
        values, _ = self._ritz(iters, tol, seed)
        return float(values.max()), float(values.min())

    def trace(self, samples: int = 100, seed: int = 0) -> float:
        """Hutchinson's estimate: the mean of vᵀHv over Rademacher vectors v."""
        return self.trace_and_error(samples, seed)[0]

    def trace_and_error(self, samples: int = 100, seed: int = 0) -> tuple[float, float]:
        """Hutchinson's estimate and its standard error (sample sd / √samples; NaN for one sample),
        so a reader can tell how many digits of the estimate mean anything."""
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same vectors on every device
        quad = np.empty(samples)
        for i in range(samples):
            v = self._draw(lambda shape: torch.randint(0, 2, shape, generator=gen).to(self.dtype) * 2 - 1)
            quad[i] = self.dot(v, self.hvp(v))
        stderr = float(quad.std(ddof=1) / np.sqrt(samples)) if samples > 1 else float("nan")
        return float(quad.mean()), stderr

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
        """Ritz values, and a function giving the i-th Ritz vector Σⱼ s[j, i]·qⱼ. It adds the basis
        vectors one at a time into one float64 vector: the basis is the largest thing Lanczos holds
        (steps × parameters), so no copy of it as a whole (stacked, or cast to float64) is made."""
        alpha, beta, basis = self._lanczos(min(iters, self.size), tol, seed)
        theta, s = np.linalg.eigh(_tridiagonal(alpha, beta))

        def vector(i: int) -> torch.Tensor:
            out = torch.zeros_like(basis[0], dtype=torch.float64)
            for c, q in zip(s[:, i].tolist(), basis):
                out.add_(q, alpha=c)
            return out.to(self.dtype)

        return theta, vector

    def _lanczos(self, steps: int, tol: float, seed: int):
        """α, β of the tridiagonal T = QᵀHQ and the orthonormal basis Q (fully reorthogonalised)."""
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        q = self._draw(lambda shape: torch.randn(shape, generator=gen, dtype=self.dtype))
        q /= self.dot(q, q) ** 0.5
        basis, alpha, beta = [q], [], []
        for _ in range(steps):
            w = self.hvp(basis[-1])
            alpha.append(self.dot(w, basis[-1]))
            for _ in range(2):  # twice is enough (Kahan): keeps Q orthogonal in floating point
                for b in basis:
                    w -= self.dot(w, b) * b
            norm = self.dot(w, w) ** 0.5
            stop = len(alpha) == steps or norm <= tol * max(abs(a) for a in alpha)
            if self._stops_together(stop):
                break
            beta.append(norm)
            basis.append(w / norm)
        return alpha, beta, basis[: len(alpha)]

    def _stops_together(self, stop: bool) -> bool:
        """Whether any process stops: one stopping alone would leave the others waiting in a product."""
        return stop if self.reduce is None else bool(self.reduce(np.array([float(stop)]))[0] > 0)

    def _draw(self, tensor: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        """A random flat vector on the device, drawn on the CPU one parameter's tensor at a time
        (``tensor(shape)``), so that a sharded operator can keep its rows of the same vector."""
        return torch.cat([tensor(tuple(p.shape)).reshape(-1) for p in self.params]).to(self.device)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The inner product of two flat vectors (of a sharded operator: summed over its group)."""
        return float(a @ b)

    def flat(self, model: nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """A direction over named tensors of ``model`` as a flat vector over this operator's
        parameters (their order): parameters it does not move are zeros, buffers are dropped."""
        by_name = dict(zip(names, tensors))
        params = {id(p): name for name, p in model.named_parameters()}
        parts = [by_name.get(params.get(id(p), ""), torch.zeros_like(p)) for p in self.params]
        return torch.cat([t.detach().to(device=self.device, dtype=self.dtype).reshape(-1) for t in parts])

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, k = [], 0
        for p in self.params:
            out.append(v[k : k + p.numel()].view_as(p))
            k += p.numel()
        return out


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Gradients on, and attention computed by the one kernel torch back-propagates twice (its
    fused CPU and GPU kernels have no derivative of their backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def _tridiagonal(alpha: list[float], beta: list[float]) -> np.ndarray:
    k = len(alpha)
    return np.diag(alpha) + np.diag(beta[: k - 1], 1) + np.diag(beta[: k - 1], -1)


@dataclass(frozen=True)
class SpectrumSpec:
    """What ``lsurf hessian`` computes: the ``top_k`` eigenvalues by ``iters`` Lanczos steps,
    Hutchinson's trace from ``trace_samples`` vectors (0: none), the SLQ density if asked, and with
    ``directions`` the top two eigenvectors (one if ``top_k`` is 1) as directions. Refused on
    construction where the counts cannot be used, so a job on many ranks fails before any product."""

    top_k: int = 5
    iters: int = 100
    trace_samples: int = 50
    density: bool = False
    directions: bool = False

    def __post_init__(self) -> None:
        for name, least in (("top_k", 1), ("iters", 1), ("trace_samples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"`{name}` {value!r}: must be a whole number, at least {least}")


def spectrum(h: Hessian, spec: SpectrumSpec, seed: int = 0, vectors: int = 0
             ) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """What ``lsurf hessian`` reports (``spec``): the eigenvalues, Hutchinson's trace and its
    standard error (``trace``, ``trace_stderr``; when ``trace_samples`` > 0) and the SLQ density
    (``density_grid``, ``density``) when asked for; and the eigenvectors of the first ``vectors``
    eigenvalues (flat, unit norm), which come with the eigenvalues at no extra products."""
    values, vecs = h.top_eigenvalues(spec.top_k, spec.iters, seed=seed)
    results: dict[str, np.ndarray] = {"eigenvalues": values}
    if spec.trace_samples:
        trace, stderr = h.trace_and_error(spec.trace_samples, seed)
        results["trace"], results["trace_stderr"] = np.array(trace), np.array(stderr)
    if spec.density:
        results["density_grid"], results["density"] = h.density(steps=min(spec.iters, 80), seed=seed)
    return results, vecs[:vectors]


def eigen_directions(model: nn.Module, h: Hessian, values: np.ndarray, vectors: list[torch.Tensor],
                     meta: dict | None = None) -> Directions:
    """Eigenvectors of ``h`` as an ordinary direction file's directions (``dir_type`` weights: one
    tensor per ``model.named_parameters()``), so ``lsurf surface`` can walk along them. Parameters
    the Hessian does not cover (frozen ones) are zeros: the eigenvectors do not move them."""
    info = eigen_meta(values, len(vectors), meta)
    offsets, k = {}, 0
    for p in h.params:
        offsets[id(p)] = k
        k += p.numel()
    named = list(model.named_parameters())

    def unflatten(v: torch.Tensor) -> list[torch.Tensor]:
        v = v.detach().cpu()
        return [v[offsets[id(p)] : offsets[id(p)] + p.numel()].reshape(p.shape).clone() if id(p) in offsets
                else torch.zeros(p.shape, dtype=v.dtype) for _, p in named]

    dirs = [unflatten(v) for v in vectors]
    return Directions([n for n, _ in named], dirs[0], dirs[1] if len(dirs) > 1 else None, info)


def eigen_meta(values: np.ndarray, count: int, meta: dict | None) -> dict:
    """What a direction file of Hessian eigenvectors records: their eigenvalues, unnormalised weights."""
    if not 1 <= count <= 2:
        raise UserError(f"a direction file holds one or two directions, not {count}")
    return {"source": "hessian", "kind": "hessian", "eigenvalues": [float(x) for x in values[:count]],
            "dir_type": "weights", "norm": "none", **(meta or {})}


def save_results(results: dict[str, np.ndarray], path: str, config: dict) -> None:
    """The results as HDF5 datasets, with the configuration that made them."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for k, v in results.items():
            f[k] = v
        f.attrs["config"] = json.dumps(config, default=str)
        f.attrs["lsurf_version"] = __version__
