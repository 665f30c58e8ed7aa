"""Loss and accuracy of a model at θ* + α·d₁ + β·d₂, over device-resident batches.

Weights at every point are written afresh from θ* with foreach ops (no drift, no allocation), and
each split's statistics stay on the device until one host synchronisation per point.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Split
from .directions import Directions
from .errors import UserError
from .models import load_plugin

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Per split and point: mean loss, its standard error, accuracy (%), its standard error.
STATS = ("loss", "loss_stderr", "acc", "acc_stderr")


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.reshape(len(out), -1) - y.reshape(len(y), -1)).pow(2).mean(1)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(spec: str) -> LossFn:
    """A built-in loss or ``pkg.module:fn``; every loss returns one value per sample."""
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" in spec:
        return load_plugin(spec, "loss")
    raise UserError(f"--loss {spec!r}: expected cross_entropy, mse or pkg.module:fn")


def check_outputs_fit(model: nn.Module, split: Split, loss_fn: LossFn, device, dtype) -> None:
    """Run one tiny batch so a model/label mismatch is a clear error before any work starts.

    The model must already be in eval mode: a forward in train mode would move BatchNorm statistics.
    """
    x = split.x[:2].to(device=device, dtype=dtype)
    y = split.y[:2].to(device=device, dtype=dtype if split.y.is_floating_point() else split.y.dtype)
    try:
        with torch.inference_mode():
            out = model(x)
            loss = loss_fn(out, y)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model outputs do not fit the data: {msg}") from None
    if loss.shape != (len(x),):
        raise UserError(f"loss must give one value per sample; got shape {tuple(loss.shape)} for {len(x)} samples")


class Evaluator:
    """Evaluates loss/accuracy of ``model`` at grid coordinates around its current weights θ*.

    ``targets`` are the tensors the directions move (they share storage with the model); θ* is
    copied once here and the model is put back exactly by :meth:`restore`.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[torch.Tensor],
        directions: Directions,
        batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        loss_fn: LossFn,
        bn: str = "eval",
    ):
        self.model = model.eval()
        idx = [i for i, t in enumerate(targets) if t.is_floating_point()]
        self.params = [targets[i] for i in idx]
        self.origin = [t.detach().clone() for t in self.params]
        self.d1 = [directions.x[i] for i in idx]
        self.d2 = None if directions.y is None else [directions.y[i] for i in idx]
        self.batches = batches
        self.loss_fn = loss_fn
        if bn not in ("eval", "recalibrate"):
            raise UserError(f"--bn {bn!r}: expected eval or recalibrate")
        self.bn = bn
        self.saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def set_point(self, a: float, b: float) -> None:
        """Weights ← θ* + a·d₁ + b·d₂, in place."""
        torch._foreach_copy_(self.params, self.origin)
        if a != 0.0:
            torch._foreach_add_(self.params, self.d1, alpha=a)
        if self.d2 is not None and b != 0.0:
            torch._foreach_add_(self.params, self.d2, alpha=b)

    @torch.no_grad()
    def restore(self) -> None:
        self.model.load_state_dict(self.saved_state)

    def evaluate(self, a: float, b: float = 0.0) -> dict[str, np.ndarray]:
        """``{split: [loss, loss_stderr, acc, acc_stderr]}`` at (a, b)."""
        self.set_point(a, b)
        if self.bn == "recalibrate":
            self._recalibrate_bn()
        pending = {s: self._pass(batches) for s, batches in self.batches.items()}
        # One host synchronisation for the whole point.
        host = torch.stack(list(pending.values())).cpu().numpy()
        return {s: host[k] for k, s in enumerate(pending)}

    @torch.inference_mode()
    def _pass(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        losses, correct = [], []
        classify = not batches[0][1].is_floating_point()
        for x, y in batches:
            out = self.model(x)
            losses.append(self.loss_fn(out, y))
            if classify:
                correct.append(out.argmax(1) == y)
        return summarize(torch.cat(losses), torch.cat(correct) if classify else None)

    @torch.no_grad()
    def _recalibrate_bn(self) -> None:
        """Re-estimate BatchNorm running statistics on the training batches at this point."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the whole pass
        self.model.train()
        for x, _ in self.batches.get("train") or next(iter(self.batches.values())):
            self.model(x)
        self.model.eval()
        for m, mom in zip(bns, momenta):
            m.momentum = mom


def summarize(losses: torch.Tensor, correct: torch.Tensor | None) -> torch.Tensor:
    """[mean loss, its standard error, accuracy %, its standard error] as one float64 device tensor."""
    lo = losses.double()
    n = lo.numel()
    mean = lo.mean()
    se = lo.std() / n**0.5 if n > 1 else torch.zeros((), dtype=torch.float64, device=lo.device)
    if correct is None:
        nan = torch.full((), float("nan"), dtype=torch.float64, device=lo.device)
        return torch.stack([mean, se, nan, nan])
    p = correct.double().mean()
    return torch.stack([mean, se, 100 * p, 100 * (p * (1 - p) / n).sqrt()])
