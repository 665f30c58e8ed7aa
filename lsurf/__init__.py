"""lsurf: loss surfaces of PyTorch models, sampled with MPI into one HDF5 file.

The public API, in the order data flows (options -> model/data/directions -> plan -> tiles ->
evaluator -> file -> plots)::

    import lsurf
    lsurf.configure_process()                                 # threads and malloc, as the CLI sets them
    data = lsurf.load_data("digits", splits=("train",))
    model = lsurf.load_model("cnn", (1, 8, 8), 10, checkpoint="runs/model_10.t7")
    dirs = lsurf.random_directions(model, seed=0)            # filter-normalised
    grid = lsurf.Grid.parse("-1:1:31", "-1:1:31")
    surface = lsurf.sample_surface(model, data, dirs, grid, "surface.h5", batch_size=256)
    surface.values["train_loss"]                              # (ny, nx), [j, i] at (x[i], y[j])

or, exactly what ``lsurf surface`` does, from options: ``lsurf.run_surface(lsurf.Options(...), comm)``.
The packages by layer: ``lsurf.engine`` (models, data, directions, evaluator, metrics, plan, file),
``lsurf.run`` (options, MPI world and transport, sampler), ``lsurf.post`` (plots, VTK),
``lsurf.cli`` (the command's skin).
"""

from lsurf._version import __version__
from lsurf.engine.curvature.hessian import SpectrumSpec
from lsurf.engine.data.splits import load_data
from lsurf.engine.evaluation.evaluate import Evaluator, evaluator
from lsurf.engine.evaluation.plan import Plan
from lsurf.engine.evaluation.sharpness import SharpnessSpec
from lsurf.engine.formats.curve_file import read_curve
from lsurf.engine.formats.surface_file import Surface, read_surface
from lsurf.engine.geometry.curve import Curve
from lsurf.engine.geometry.directions import Directions, load_directions, random_directions, save_directions
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.geometry.plugin import model_params
from lsurf.engine.model.models import build_model, load_checkpoint, load_model
from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError
from lsurf.post.info import describe
from lsurf.post.plot import plot_curve, plot_surface
from lsurf.post.vtkfile import write_vtk
from lsurf.run.curvature import hessian_spectrum
from lsurf.run.curve import CurveEval, CurveSpec, eval_curve_job, train_curve_job, with_curve_inputs
from lsurf.run.options import Options
from lsurf.run.provenance import Provenance
from lsurf.run.runtime import configure_process
from lsurf.run.sampler import run_surface, sample_geometry, sample_surface
from lsurf.run.sharpness import sharpness
from lsurf.run.sources import directions_for, load_inputs

__all__ = [
    "__version__", "Curve", "CurveEval", "CurveSpec", "Directions", "Evaluator", "Grid", "Options", "Plan",
    "Provenance", "SharpnessSpec", "SpectrumSpec", "Surface", "UserError", "build_model", "configure_process",
    "describe", "directions_for", "eval_curve_job", "evaluator", "hessian_spectrum", "load_checkpoint", "load_data",
    "load_directions", "load_inputs", "load_model", "model_params", "plot_curve", "plot_surface", "preserved",
    "random_directions", "read_curve", "read_surface", "run_surface", "sample_geometry", "sample_surface",
    "save_directions", "sharpness", "train_curve_job", "with_curve_inputs", "write_vtk",
]
