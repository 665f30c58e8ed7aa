"""``lsurf train``: train a small model with SGD, saving a checkpoint per epoch."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.training.train import train
from lsurf.errors import UserError
from lsurf.run.runtime import configure_process
from lsurf.run.sources import load_inputs
from lsurf.run.world import World

HELP = "train a small model with SGD, saving a checkpoint per epoch"

_DEFAULTS = common.keyword_defaults(train, ("epochs", "lr", "batch_size"))  # the library's, not a copy

def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p)
    common.add_device(p)
    p.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=_DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the shuffling order (default 0)")
    p.add_argument("--out-dir", required=True)


def run(args: argparse.Namespace) -> int:
    values = common.merged_values(args, extra=("epochs", "lr", "out_dir"))
    epochs, lr, out_dir = values.pop("epochs"), values.pop("lr"), values.pop("out_dir")
    options = common.options_from(values, split=("train", "test"))
    device = configure_process(World.of(None), options.device, options.threads, options.tf32)
    model, data = load_inputs(options, seed=options.seed)
    if data is None:
        raise UserError("`data` is needed to train")
    paths = train(model, data, out_dir, epochs=epochs, lr=lr, batch_size=options.batch_size or _DEFAULTS["batch_size"],
                  seed=options.seed, loss=options.loss, device=device)
    print(f"wrote {len(paths)} checkpoints to {out_dir} (last: {paths[-1]})")
    return 0
