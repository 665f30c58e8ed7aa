"""Class labels outside the model's outputs, stopped in one line: before a run from the data's
label range, and during each pass from flags counted on the device and read back with the pass's
sums (on a GPU an index out of range is a device assert that ends the process's CUDA context)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lsurf.engine.data.splits import AnySplit, label_range
from lsurf.engine.evaluation.losses import LossFn, class_targets, pick_output
from lsurf.errors import UserError

FLAGS = 3  # a pass's label check, read back with its sums: [labels out of range, first one's row, its value]


def check_labels(data: dict[str, AnySplit], classes: int) -> None:
    """Refuse class labels outside the model's outputs before any work: on the CPU such a label ends
    in an index error mid-run, on a GPU in an asynchronous device assert."""
    for name, split in data.items():
        span = label_range(split)
        if span is not None and (span[0] < 0 or span[1] >= classes):
            raise UserError(f"the {name} split has class labels {span[0]} to {span[1]}, but the model gives {classes} "
                            f"outputs per sample: labels must lie in 0 to {classes - 1}")


def flag_labels(y: torch.Tensor, classes: int, ignore_index: int, flags: torch.Tensor, row: int) -> torch.Tensor:
    """``y`` (rows ``row``... of a pass) with class labels (or token ids other than
    ``ignore_index``) outside ``classes`` outputs replaced by 0, counted into ``flags`` [count,
    first row, its value] on ``y``'s device without a host sync: the caller reads the flags with
    the sums it reads anyway (:func:`check_label_flags`). On a GPU an index out of range would be
    a device assert that ends the process's CUDA context."""
    bad = (y < 0) | (y >= classes)
    if y.dim() > 1:
        bad &= y != ignore_index
    flat = bad.reshape(-1)
    first = flat.to(torch.uint8).argmax()
    value = y.reshape(-1).gather(0, first[None])[0].long()  # gather: indexing by a tensor would sync
    found = torch.stack([flat.sum(), row + first // (flat.numel() // len(y)), value])
    first_found = (flags[0] == 0) & (found[0] > 0)
    flags[1:] = torch.where(first_found, found[1:], flags[1:])
    flags[0] += found[0]
    return torch.where(bad, torch.zeros_like(y), y)


def check_label_flags(split: str, flags: Sequence[float], classes: int, first_row: int = 0) -> None:
    """Stop at the labels :func:`flag_labels` counted: one line naming the split, the row (rows
    counted from ``first_row``, this rank's first) and the value."""
    count, row, value = flags
    if count:
        raise UserError(f"the {split} split holds label {int(value)} at row {int(row) + first_row}, outside the "
                        f"model's {classes} outputs ({int(count)} such label{'s' * (count > 1)} in the pass): "
                        f"labels must lie in 0 to {classes - 1}")


def check_class_labels(model: Callable[[torch.Tensor], Any], sample: torch.Tensor, labels: Iterable[torch.Tensor],
                       loss_fn: LossFn, split: str, first_row: int = 0, output: str | None = None) -> None:
    """Stop at class labels outside the model's outputs among ``labels`` (rows ``first_row``... of
    ``split``, in order) before work whose loss indexes the outputs with every one of them (a
    Hessian's products, a curve's training): the count each evaluator pass makes, made once here
    and read back in one sync, with the same one-line error. ``sample``: inputs on the model's
    device, whose first row tells how many outputs there are; the model (or any forward) must be in
    eval mode."""
    ignore = class_targets(loss_fn)
    ys = [y for y in labels if y.numel()]
    if ignore is None or not ys or ys[0].is_floating_point():
        return
    with torch.inference_mode():
        out = pick_output(model(sample[:1]), output)
    if out.dim() != ys[0].dim() + 1:
        return
    flags = torch.zeros(FLAGS, dtype=torch.int64, device=ys[0].device)
    row = 0
    for y in ys:
        flag_labels(y, out.shape[-1], ignore, flags, row)
        row += len(y)
    check_label_flags(split, flags.tolist(), out.shape[-1], first_row)
