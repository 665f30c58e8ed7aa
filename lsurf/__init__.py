"""lsurf: loss surfaces of PyTorch models, sampled with MPI into one HDF5 file.

The public API, in the order data flows::

    import lsurf
    data = lsurf.load_data("digits", splits=("train",))
    model = lsurf.load_model("cnn", (1, 8, 8), 10, checkpoint="runs/model_10.t7")
    dirs = lsurf.random_directions(model, seed=0)            # filter-normalised
    grid = lsurf.Grid.parse("-1:1:31", "-1:1:31")
    surface = lsurf.sample_surface(model, data, dirs, grid, "surface.h5")
    surface.values["train_loss"]                              # (ny, nx), [j, i] at (x[i], y[j])
"""

__version__ = "0.1.0"

from .data import load_data  # noqa: E402
from .directions import Directions, load_directions, random_directions, save_directions  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluate import Evaluator  # noqa: E402
from .grid import Grid  # noqa: E402
from .models import build_model, load_checkpoint, load_model  # noqa: E402
from .sampler import sample_surface  # noqa: E402
from .surface_file import Surface, read_surface  # noqa: E402

__all__ = [
    "Directions", "Evaluator", "Grid", "Surface", "UserError", "build_model", "load_checkpoint", "load_data",
    "load_directions", "load_model", "random_directions", "read_surface", "sample_surface", "save_directions",
]
