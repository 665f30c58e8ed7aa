"""Every value a point yields, named once: the metrics' statistics of each split
(``{split}_{name}``: the built-in loss and accuracy, a user's own), the accounting of a pass stopped
early (``{split}_samples``, ``{split}_loss_error``), the per-point probes (the Hessian's extremes,
``hessian_max``, ``hessian_min``) and the standard errors that go with a value (``_stderr``).

The evaluator's results, the datasets of a new file, the names a plug-in metric may not take and
the readers that show a value without its error all take their names from here, so a new kind of
quantity is added in this one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lsurf.engine.evaluation.metrics import Accuracy, MeanLoss, Metric, TokenAccuracy, TokenLoss

# per split, of a pass stopped early (lsurf.engine.evaluation.precision): the samples the point
# used, and the standard error of its mean loss against the whole split's (0 when it used them all)
ACCOUNTING = ("samples", "loss_error")
PROBES = ("hessian_max", "hessian_min")  # per point, not per split: λ_max and λ_min of the Hessian
ERROR_SUFFIX = "_stderr"  # "{name}_stderr": the standard error of quantity "{name}"


@dataclass(frozen=True)
class Quantities:
    """The quantities of a run: ``metrics`` over each of ``splits``, the accounting if passes stop
    early (``accounting``), the Hessian's extremes at every point if asked (``probes``)."""

    splits: tuple[str, ...]
    metrics: tuple[Metric, ...]
    probes: bool = False
    accounting: bool = False

    @classmethod
    def of(cls, splits: Iterable[str], metrics: Sequence[Metric], probes: bool = False,
           accounting: bool = False) -> Quantities:
        return cls(tuple(splits), tuple(metrics), probes, accounting)

    @property
    def names(self) -> list[str]:
        """Dataset names, in the order of a result: each split's statistics, then the probes."""
        per_split = [n for m in self.metrics for n in m.names] + list(ACCOUNTING if self.accounting else ())
        return [f"{s}_{n}" for s in self.splits for n in per_split] + list(PROBES if self.probes else ())


def reserved_names() -> set[str]:
    """Per-split names a user's metric may not take: every built-in statistic and the accounting."""
    return {n for m in (MeanLoss, Accuracy, TokenLoss, TokenAccuracy) for n in m.names} | set(ACCOUNTING)


def is_error(name: str) -> bool:
    """Whether ``name`` is the standard error of another quantity (shown with it, not on its own)."""
    return name.endswith(ERROR_SUFFIX)
