"""Training a curve's bends (Garipov et al. 2018): SGD on E_{t~U(0,1)} loss(θ(t)), every rank drawing
the same steps and t, so that R ranks take the step one process would."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lsurf.engine.data.splits import Split
from lsurf.engine.evaluation.evaluate import Reduce
from lsurf.engine.evaluation.losses import LossFn, pick_output
from lsurf.engine.geometry.curve import Curve
from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError


@dataclass(frozen=True)
class Training:
    """How the bends are trained: SGD with momentum, weight decay (on the bends: the ends are fixed),
    a per-epoch cosine schedule from ``lr`` over ``epochs``, ``batch_size`` samples per step and
    one t per step, both drawn from ``seed``. The schedule is over ``epochs``: continuing a finished
    curve to more epochs runs the remaining ones on the schedule of the new total (the finished ones
    keep theirs, recorded in the file's ``lr``)."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"`{name}` {getattr(self, name)}: must be at least 1")
        if not self.lr > 0:
            raise UserError(f"`lr` {self.lr}: must be positive")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based): cosine from ``lr`` towards 0."""
        return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2

    def identity(self) -> dict:
        """What a resumed run must share with the one that started the file (not ``epochs``: a
        finished curve may be trained on)."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "seed": self.seed}


def epoch_draws(seed: int, epoch: int, n: int, batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """The sample order and the t of each step of ``epoch``: a function of (seed, epoch) alone, so
    every rank draws the same ones and a resumed run draws what an unbroken one would have."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    perm = torch.randperm(n, generator=gen)
    ts = torch.rand(-(-n // batch_size), generator=gen, dtype=torch.float64)
    return perm, ts.tolist()


@dataclass
class Progress:
    """Where training stands: epochs done, the momentum of each bend tensor, the history."""

    epochs_done: int = 0
    momentum: list[list[torch.Tensor]] | None = None
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def train_curve(model: nn.Module, curve: Curve, split: Split, training: Training, progress: Progress, *,
                loss_fn: LossFn, output: str | None = None, shard: tuple[int, int] = (0, 1),
                reduce: Reduce | None = None, device: torch.device | str = "cpu",
                on_epoch: Callable[[Curve, Progress], None] | None = None) -> tuple[Curve, Progress]:
    """Minimise E_{t~U(0,1)} loss(θ(t)) over the bends, from ``progress`` to ``training.epochs``.

    BatchNorm layers run in train mode on each step's batch statistics (Garipov et al.): the
    running statistics of the ends say nothing about a point between them. Every rank of a job
    draws the same steps and t, computes the loss summed over its ``shard`` (r, R) of each batch,
    and ``reduce`` adds the gradient sums of all ranks, so R ranks take the step one process
    would (for a model without BatchNorm: with it each rank normalises its share by the share's
    own statistics). ``on_epoch(curve, progress)`` sees each finished epoch (to save it). The model comes
    back as it was; the returned curve and progress are on the CPU.
    """
    with preserved(model):
        model.to(device).train()
        live = _live(curve, torch.device(device))
        flat = [p for bend in live.bends for p in bend]
        opt = torch.optim.SGD(flat, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
        if progress.momentum is not None:
            for p, m in zip(flat, (m for bend in progress.momentum for m in bend)):
                opt.state[p]["momentum_buffer"] = m.to(p).clone()
        for epoch in range(progress.epochs_done, training.epochs):
            lr = training.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            mean = _epoch(model, live, split, training, epoch, opt, loss_fn, output, shard, reduce)
            buffers = [opt.state[p]["momentum_buffer"].detach().cpu().clone() for p in flat]
            progress = Progress(epoch + 1, _regroup(buffers, live.num_bends), [*progress.train_loss, mean],
                                [*progress.lr, lr])
            curve = _on_cpu(live)
            if on_epoch is not None:
                on_epoch(curve, progress)
    return curve, progress


def _live(curve: Curve, device: torch.device) -> Curve:
    """The curve on ``device`` with bends as fresh leaf tensors that collect gradients."""
    bends = [[p.detach().to(device).clone().requires_grad_(True) for p in bend] for bend in curve.bends]
    return Curve(curve.kind, curve.names, [a.to(device) for a in curve.a], [b.to(device) for b in curve.b], bends)


def _on_cpu(curve: Curve) -> Curve:
    bends = [[p.detach().cpu().clone() for p in bend] for bend in curve.bends]
    return Curve(curve.kind, curve.names, [a.cpu() for a in curve.a], [b.cpu() for b in curve.b], bends)


def _regroup(flat: list[torch.Tensor], bends: int) -> list[list[torch.Tensor]]:
    per = len(flat) // bends
    return [flat[k * per : (k + 1) * per] for k in range(bends)]


def _epoch(model: nn.Module, live: Curve, split: Split, training: Training, epoch: int, opt: torch.optim.Optimizer,
           loss_fn: LossFn, output: str | None, shard: tuple[int, int], reduce: Reduce | None) -> float:
    """One pass over the training split; returns its mean loss (over all ranks' shares)."""
    perm, ts = epoch_draws(training.seed, epoch, len(split), training.batch_size)
    flat = [p for bend in live.bends for p in bend]
    dtype = flat[0].dtype
    total = torch.zeros((), dtype=torch.float64, device=flat[0].device)  # read once an epoch, not once a step
    for step, t in enumerate(ts):
        idx = perm[step * training.batch_size : (step + 1) * training.batch_size]
        r, size = shard
        mine = idx[r * len(idx) // size : (r + 1) * len(idx) // size]
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), dtype=torch.float64, device=flat[0].device)
        if len(mine):
            x, y = split.x[mine].to(flat[0].device), split.y[mine].to(flat[0].device)
            params = dict(zip(live.names, live.point(t)))
            out = pick_output(torch.func.functional_call(model, params, (x.to(dtype) if x.is_floating_point() else x,)),
                              output)
            per = loss_fn(out, y)
            loss = per.reshape(len(per), -1).mean(1).sum()  # per sample, whatever the loss's shape
            loss.backward()
        total += _average_gradients(flat, loss.detach().double(), len(idx), reduce)
        opt.step()
    return float(total) / len(split)


def _average_gradients(flat: list[torch.Tensor], loss_sum: torch.Tensor, n: int, reduce: Reduce | None) -> torch.Tensor:
    """Every bend's gradient of the batch's mean loss, divided by the batch size where it lies.
    Several ranks add their sums first, in one float64 buffer through the host (the loss sum rides
    along; one allreduce); one process keeps them on the device in their dtype, where the division
    rounds as the float64 one did (53 bits hold twice a float32's 24 and two more). Returns the
    batch's loss sum (float64, on the device)."""
    grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in flat]
    if reduce is not None:
        buf = torch.cat([*(g.reshape(-1).double() for g in grads), loss_sum.reshape(1)]).cpu().numpy()
        summed = torch.from_numpy(np.ascontiguousarray(reduce(buf))).to(loss_sum.device)
        grads = list(summed[:-1].split([p.numel() for p in flat]))
        loss_sum = summed[-1]
    for p, g in zip(flat, grads):
        p.grad = (g / n).view_as(p).to(p)
    return loss_sum
