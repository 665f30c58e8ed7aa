"""``lsurf hessian`` as a library call: the Hessian of the options' model and split, on the
options' device and dtype, and its spectrum."""

from __future__ import annotations

import numpy as np
import torch

from lsurf.engine.batches import resident_batches
from lsurf.engine.evaluate import resolve_loss
from lsurf.engine.hessian import Hessian, spectrum
from lsurf.engine.plan import default_batch_size
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.sources import load_inputs


def hessian_spectrum(options: Options, device: torch.device, *, top_k: int = 5, iters: int = 100,
                     trace_samples: int = 50, density: bool = False) -> dict[str, np.ndarray]:
    """Top eigenvalues, trace and (optionally) density of the mean loss over ``options.split`` (one
    split) at the checkpoint; the seed of the Lanczos and Hutchinson vectors is ``options.seed``."""
    if len(options.split) != 1:
        raise UserError(f"`split` {','.join(options.split)!r}: the Hessian is of one split, train or test")
    model, data = load_inputs(options)
    if data is None:
        raise UserError("`data` is needed for the Hessian")
    split = data[options.split[0]].materialise()
    model.to(device).eval()
    batches = resident_batches(split, options.batch_size or default_batch_size(device), device, options.torch_dtype)
    h = Hessian(model, batches, resolve_loss(options.loss))
    return spectrum(h, top_k, iters, trace_samples, density, options.seed)
