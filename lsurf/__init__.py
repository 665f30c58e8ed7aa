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

from lsurf._version import __version__
from lsurf.engine.data import load_data
from lsurf.engine.directions import Directions, load_directions, random_directions, save_directions
from lsurf.engine.evaluate import Evaluator
from lsurf.engine.grid import Grid
from lsurf.engine.models import build_model, load_checkpoint, load_model
from lsurf.engine.surface_file import Surface, read_surface
from lsurf.errors import UserError
from lsurf.run.sampler import sample_surface

__all__ = [
    "__version__", "Directions", "Evaluator", "Grid", "Surface", "UserError", "build_model", "load_checkpoint",
    "load_data", "load_directions", "load_model", "random_directions", "read_surface", "sample_surface",
    "save_directions",
]
