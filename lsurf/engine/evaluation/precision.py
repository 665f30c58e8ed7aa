"""Adaptive precision: a point's pass over a split stops once its mean loss is known well enough.

Samples are taken in one seeded order, the same at every point (so neighbouring points share
their samples, and their differences are far less noisy than each value); after ``min_samples``
the pass stops as soon as the standard error of the mean loss, as an estimate of the whole split's,
is at most ``tolerance``. That error has the finite-population factor: it is zero once the whole
split is seen, so a point that never settles gets the exact value. Far from the minimum the loss
is large but its differences are larger still, and few samples settle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lsurf.engine.data.splits import AnySplit, Split
from lsurf.errors import UserError


def subset_error(total: float, squares: float, n: int, size: int) -> float:
    """Standard error of the mean of ``n`` of ``size`` values drawn without replacement, from
    their sum and sum of squares (sample variance, finite-population factor 1 − n/size)."""
    if n < 2 or n >= size:
        return 0.0
    mean = total / n
    var = max(squares - n * mean * mean, 0.0) / (n - 1)
    return math.sqrt(var / n * (1 - n / size))


@dataclass(frozen=True)
class Precision:
    """Stop a split's pass at standard error ``tolerance`` after at least ``min_samples``; samples in
    the order seeded by ``seed``."""

    tolerance: float
    min_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise UserError(f"`tolerance` {self.tolerance}: must be positive")
        if self.min_samples < 2:
            raise UserError(f"`min_samples` {self.min_samples}: must be at least 2")

    def ordered(self, split: AnySplit) -> Split:
        """The split's samples in this precision's seeded order, in host memory."""
        whole = split.materialise()
        order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(self.seed))
        return Split(whole.x[order], whole.y[order])

    def settled(self, total: float, squares: float, n: int, size: int) -> bool:
        """Whether ``n`` samples of ``size`` (with these loss sums) are enough."""
        return n >= size or (n >= self.min_samples and subset_error(total, squares, n, size) <= self.tolerance)

    def accounting(self, total: float, squares: float, n: int, size: int) -> list[float]:
        """The values of the accounting quantities (lsurf.engine.evaluation.quantities.ACCOUNTING) for a
        split's pass: the samples it used and the standard error of its mean loss against the whole split's."""
        return [float(n), subset_error(total, squares, n, size)]
