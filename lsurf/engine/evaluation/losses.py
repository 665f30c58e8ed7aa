"""What a point is scored by: the loss per sample (or per token), the model output it is computed
on, and the precision outputs are reduced in. Vocabulary shared by every pass over the data (the
evaluator, Hessian-vector products, training a curve)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lsurf.engine.io import load_plugin
from lsurf.errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-sample cross-entropy, or per token for (B, T, V) logits against (B, T) token targets
    (zero where the target is ``ignore_index``). For (N, C) logits and class labels it is computed
    as logsumexp − logit of the label: the same value, 3.5x faster than F.cross_entropy on a CPU
    (whose log_softmax dominated a small MLP's evaluation)."""
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return torch.logsumexp(out, 1) - out.gather(1, y[:, None]).squeeze(1)
    if out.dim() == 3 and y.dim() == 2 and not y.is_floating_point():
        flat = F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=ignore_index, reduction="none")
        return flat.view(y.shape)
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.reshape(len(out), -1) - y.reshape(len(y), -1)).pow(2).mean(1)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(spec: str, ignore_index: int = -100) -> LossFn:
    """A built-in loss or ``pkg.module:fn``; every loss returns one value per sample (or, for token
    targets, per token: the built-in cross-entropy, which skips ``ignore_index`` targets)."""
    if spec == "cross_entropy":
        return functools.partial(_cross_entropy, ignore_index=ignore_index)
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" in spec:
        return load_plugin(spec, "loss")
    raise UserError(f"`loss` {spec!r}: expected cross_entropy, mse or pkg.module:fn")


def pick_output(out: Any, name: str | None = None) -> torch.Tensor:
    """The tensor to score from what a model returned: the tensor itself, the entry ``name`` of a
    dict or ``ModelOutput``-like object (default ``logits``), or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        if name is not None:
            raise UserError(f"`output` {name!r}: the model returns a tensor, not named outputs")
        return out
    key = name or "logits"
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        if key in out.keys():
            return out[key]
        raise UserError(f"the model's outputs have no {key!r} entry (it has {', '.join(map(str, out.keys()))}): "
                        "name one with `output`")
    if isinstance(out, (tuple, list)) and name is None and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UserError(f"the model returns a {type(out).__name__}: expected a tensor, or a dict/ModelOutput whose "
                    "entry `output` names")


def is_low_precision(dtype: torch.dtype) -> bool:
    """bfloat16/float16 weights: perturbed in float32 and rounded once, scored in float32."""
    return dtype in (torch.bfloat16, torch.float16)


def class_targets(loss_fn: LossFn) -> int | None:
    """The ``ignore_index`` of the built-in cross-entropy, whose targets index the outputs; None
    for any other loss (its targets are no class indices to check)."""
    if isinstance(loss_fn, functools.partial) and loss_fn.func is _cross_entropy:
        return int(loss_fn.keywords.get("ignore_index", -100))
    return -100 if loss_fn is _cross_entropy else None
