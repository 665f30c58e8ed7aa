"""What a pass measures, as small metric objects: a new per-split quantity touches only this module.

Every metric reduces a pass to additive sums on the device (so chunks, batches, points and later
rank groups can be added up) and turns those sums into statistics on the host once per point.
``quantity_names`` gives the datasets a file holds: ``{split}_{name}`` for every metric name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch


class Metric(Protocol):
    """``names``: the statistics it yields per split; ``width``: how many sums it keeps."""

    names: tuple[str, ...]
    width: int

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """(K, width) float64 sums over a chunk: ``out`` (K, B, ...), targets ``y`` (B, ...), per-sample
        ``loss`` (K, B)."""
        ...

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, ...]:
        """The statistics (one per name) of ``n`` samples from their sums."""
        ...


class MeanLoss:
    """The mean per-sample loss and its standard error (from Σl and Σl²)."""

    names: tuple[str, ...] = ("loss", "loss_stderr")
    width: int = 2

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss.sum(-1), loss.square().sum(-1)], -1)

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, float]:
        total, squares = sums
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        return mean, math.sqrt(var / n)


class Accuracy:
    """Top-1 accuracy in percent and its binomial standard error; NaN for regression targets."""

    names: tuple[str, ...] = ("acc", "acc_stderr")
    width: int = 1

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():
            return torch.full_like(loss[:, :1], float("nan"))
        # max's indices are the argmax, at half argmax's cost on a CPU
        return (out.max(-1).indices == y).sum(-1, dtype=torch.float64)[:, None]

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, float]:
        p = sums[0] / n  # NaN stays NaN
        return 100 * p, 100 * math.sqrt(p * (1 - p) / n)


METRICS: tuple[Metric, ...] = (MeanLoss(), Accuracy())
CURVATURE = ("hessian_max", "hessian_min")  # per point, not per split: λ_max and λ_min of the Hessian


def quantity_names(splits: Iterable[str], hessian: bool = False, metrics: Sequence[Metric] = METRICS) -> list[str]:
    """Dataset names of the statistics of these splits, e.g. ``train_loss``, ``test_acc_stderr``,
    and of the curvature maps when asked for."""
    names = [f"{s}_{name}" for s in splits for m in metrics for name in m.names]
    return names + (list(CURVATURE) if hessian else [])
