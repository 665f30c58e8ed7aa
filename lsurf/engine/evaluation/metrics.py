"""What a pass measures, as small metric objects: a new per-split quantity touches only this module.

Every metric reduces a pass to additive sums on the device (so chunks, batches, points and later
rank groups can be added up) and turns those sums into statistics on the host once per point.
A file stores each as ``{split}_{name}`` (lsurf.engine.evaluation.quantities names every quantity).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from lsurf.engine.io import call_plugin
from lsurf.errors import UserError


class Metric(Protocol):
    """``names``: the statistics it yields per split; ``width``: how many sums it keeps."""

    names: tuple[str, ...]
    width: int

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """(K, width) float64 sums over a chunk: ``out`` (K, B, ...), targets ``y`` (B, ...), per-sample
        ``loss`` (K, B) (or per token (K, B, T) for sequence targets)."""
        ...

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, ...]:
        """The statistics (one per name) of ``n`` samples (sequences) from their sums."""
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


def _ratio_sums(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Σs, Σn, Σs², Σsn, Σn² over sequences (last axis): what a per-sequence standard error of a
    token-weighted mean Σs/Σn needs, additive over chunks, batches and ranks."""
    s, n = s.double(), n.double()
    return torch.stack([s.sum(-1), n.sum(-1), (s * s).sum(-1), (s * n).sum(-1), (n * n).sum(-1)], -1)


def _ratio(sums: Sequence[float], sequences: int) -> tuple[float, float]:
    """The token-weighted mean Σs/Σn and its standard error over ``sequences`` sequences.

    Tokens of one sequence are not independent, so the error is the ratio estimator's, with the
    sequence as the unit: SE² = Σ(sᵢ − m·nᵢ)² / (N(N−1)·n̄²).
    """
    s, n, ss, sn, nn = sums
    if n <= 0:
        return float("nan"), float("nan")
    mean = s / n
    if sequences < 2:
        return mean, 0.0
    spread = max(ss - 2 * mean * sn + mean * mean * nn, 0.0)
    per_sequence = n / sequences
    return mean, math.sqrt(spread / (sequences * (sequences - 1))) / per_sequence


class TokenLoss:
    """A language model's loss: the mean over the valid tokens of the split (token-weighted, as LM
    evaluations report), its per-sequence standard error, and the perplexity exp(loss).

    The loss function gives either per-token values (B, T), zero where the target is
    ``ignore_index``, or one value per sequence (B,) (a custom loss; then each sequence weighs one).
    """

    names: tuple[str, ...] = ("loss", "loss_stderr", "ppl")
    width: int = 5

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if loss.dim() == 3:
            return _ratio_sums(loss.sum(-1), (y != self.ignore_index).sum(-1).expand(len(loss), -1))
        return _ratio_sums(loss, torch.ones_like(loss))

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, float, float]:
        mean, se = _ratio(sums, n)
        return mean, se, math.exp(mean) if mean < 700 else math.inf


class TokenAccuracy:
    """Next-token accuracy in percent over the valid tokens, with its per-sequence standard error."""

    names: tuple[str, ...] = ("acc", "acc_stderr")
    width: int = 5

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        valid = y != self.ignore_index
        right = ((out.max(-1).indices == y) & valid).sum(-1)
        return _ratio_sums(right, valid.sum(-1).expand(len(right), -1))

    def finish(self, sums: Sequence[float], n: int) -> tuple[float, float]:
        mean, se = _ratio(sums, n)
        return 100 * mean, 100 * se


METRICS: tuple[Metric, ...] = (MeanLoss(), Accuracy())


class PluginMetric:
    """A user's additive metric (``metric`` ``pkg.module:factory``) as a :class:`Metric`.

    The user's object keeps the small contract of the README — ``name``, ``sums(outputs, targets)``
    (one point's (B, ...) outputs: a 1-D tensor, additive over batches, ranks and groups) and
    ``value(sums)`` — and this adapter gives it what the evaluator's passes need: K points at once,
    a fixed width (learned from the probe, :func:`bind_plugin`), float64 sums, and one-line errors
    naming the plug-in for whatever it raises or returns wrongly mid-run.
    """

    def __init__(self, spec: str, metric: Any, width: int):
        self.spec, self.metric, self.width = spec, metric, width
        self.who = f"metric plug-in {spec!r}"
        self.names: tuple[str, ...] = (metric.name,)

    def sums(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.one_point(o, y) for o in out])

    def one_point(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The user's sums over one point's outputs, checked: a 1-D tensor of ``width`` values."""
        got = call_plugin(self.who, "sums", lambda: self.metric.sums(out, y))
        if not isinstance(got, torch.Tensor) or got.dim() != 1 or len(got) != self.width:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise UserError(f"{self.who}: sums returned {shape}, but its first call returned "
                            f"{self.width} values: sums must return a 1-D tensor of one length")
        return got.to(torch.float64)

    def finish(self, sums: Sequence[float], n: int) -> tuple[float]:
        value = call_plugin(self.who, "value", lambda: self.metric.value(np.asarray(sums, dtype=np.float64)))
        try:
            return (float(value),)
        except (TypeError, ValueError):
            raise UserError(f"{self.who}: value returned {type(value).__name__}, "
                            "not a number") from None


def check_plugin(spec: str, metric: Any, taken: Collection[str]) -> None:
    """Refuse an object that does not keep the contract, or whose name a built-in quantity (or an
    earlier plug-in) already has: the file stores it as ``{split}_{name}``."""
    missing = [a for a in ("name", "sums", "value") if not hasattr(metric, a)]
    if missing:
        raise UserError(f"metric plug-in {spec!r}: the factory's {type(metric).__name__} has no "
                        f"{', '.join(missing)} (expected name, sums(outputs, targets), value(sums))")
    name = metric.name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise UserError(f"metric plug-in {spec!r}: name {name!r} must be a word of letters, digits and _")
    if name in taken:
        raise UserError(f"metric plug-in {spec!r}: name {name!r} is already a quantity "
                        f"({', '.join(sorted(taken))} are taken)")


def bind_plugin(spec: str, metric: Any, out: torch.Tensor, y: torch.Tensor) -> PluginMetric:
    """The plug-in as a :class:`Metric`, its width learned from its sums over one probe batch
    (``out``: one point's outputs, ``y`` their targets) and checked on its first row alone, and its
    value of them checked, so a plug-in that cannot run fails before any file is touched."""
    got = call_plugin(f"metric plug-in {spec!r}", "sums", lambda: metric.sums(out, y))
    if not isinstance(got, torch.Tensor) or got.dim() != 1 or not len(got) or not got.is_floating_point():
        shape = f"shape {tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise UserError(f"metric plug-in {spec!r}: sums must return a 1-D float tensor (float64 keeps it "
                        f"additive); it returned {shape}")
    bound = PluginMetric(spec, metric, len(got))
    bound.one_point(out[:1], y[:1])  # a length that follows the batch size fails here, not mid-run
    bound.finish(got.double().tolist(), len(y))
    return bound


def metrics_for(y: torch.Tensor, ignore_index: int = -100) -> tuple[Metric, ...]:
    """The metrics for targets like ``y`` (a batch): per-token ones for integer targets with a time
    axis (B, T), per-sample loss and accuracy otherwise."""
    if y.dim() >= 2 and not y.is_floating_point():
        return TokenLoss(ignore_index), TokenAccuracy(ignore_index)
    return METRICS
