"""One tiny batch through the model before any work: a model, its data, its loss and the user's
metrics that do not fit together are one clear line before a file is touched."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lsurf.engine.data.batches import to_device
from lsurf.engine.data.splits import AnySplit
from lsurf.engine.evaluation.labels import check_labels
from lsurf.engine.evaluation.losses import LossFn, is_low_precision, pick_output
from lsurf.engine.evaluation.metrics import PluginMetric, bind_plugin, check_plugin
from lsurf.engine.evaluation.quantities import reserved_names
from lsurf.engine.io import make_plugin
from lsurf.engine.model.sharding import is_sharded_model, without_grad
from lsurf.errors import UserError


def check_outputs_fit(model: nn.Module, split: AnySplit, loss_fn: LossFn, device, dtype,
                      output: str | None = None, labels: dict[str, AnySplit] | None = None) -> int:
    """Run one tiny batch so a model/label mismatch is a clear error before any work starts, and
    return how many output values one sample gives (a plan sizes batches by it: a language model's
    logits are sequence length × vocabulary per sample). With ``labels``, the class labels of those
    splits are checked against the model's outputs too.

    The model must already be in eval mode: a forward in train mode would move BatchNorm statistics.
    """
    x, y = to_device(*split.rows(0, 2), torch.device(device), dtype)
    with without_grad(is_sharded_model(model)):
        raw = _first_line_of_errors(lambda: model(x), device)
        out = pick_output(raw, output)
        if labels is not None and out.dim() == 2:
            check_labels(labels, out.shape[1])
        loss = _first_line_of_errors(lambda: loss_fn(out.float() if is_low_precision(out.dtype) else out, y), device)
    if loss.shape not in ((len(x),), tuple(y.shape)):
        raise UserError(f"loss must give one value per sample (or per target token); got shape {tuple(loss.shape)} "
                        f"for targets of shape {tuple(y.shape)}")
    return out[0].numel()


def plugin_metrics(specs: Sequence[str], model: nn.Module, split: AnySplit, device, dtype,
                   output: str | None = None) -> tuple[PluginMetric, ...]:
    """The user's own metrics (``pkg.module:factory`` each, the factory called with no arguments),
    checked against the contract and bound on one probe batch of ``split``, so a plug-in that cannot
    run fails before any file is touched. The model must be in eval mode on ``device``."""
    if not specs:
        return ()
    x, y = to_device(*split.rows(0, 2), torch.device(device), dtype)
    with without_grad(is_sharded_model(model)):
        out = pick_output(model(x), output)
        out = out.float() if is_low_precision(out.dtype) else out
        taken = reserved_names()
        bound = []
        for spec in specs:
            metric = make_plugin(spec, "metric")
            check_plugin(spec, metric, taken)
            taken.add(metric.name)
            bound.append(bind_plugin(spec, metric, out, y))
    return tuple(bound)


def _first_line_of_errors(call, device):
    """``call()``, finished on the device (a CUDA error surfaces here, not later), with a shape or
    type mismatch as one line. Failures of the device itself (out of memory, no kernel for this
    GPU, a cuDNN fault) are not the data's fault: they pass with their own text."""
    try:
        result = call()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return result
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        text = str(e).strip()
        if any(word in text for word in ("CUDA", "cuDNN", "cuBLAS", "device-side")):
            raise
        msg = text.splitlines()[0] if text else type(e).__name__
        raise UserError(f"model outputs do not fit the data: {msg}") from None
