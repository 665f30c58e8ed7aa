"""The library's seams, fast: options, run plan, grid geometry and tiles, the tile queue in one
process, the model handed back after failures, and the CLI's flag/job-file merge."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import lsurf

import lsurf as api
from lsurf.engine.grid import Grid
from lsurf.engine.plan import Plan
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.transport import TileQueue
from lsurf.run.world import World


def test_options_validate_once_and_name_the_parameter():
    assert Options(split="train,test").split == ("train", "test")
    assert Options(dtype=torch.float64).dtype == "float64"
    for bad, param in [({"dtype": "float16"}, "dtype"), ({"batch_size": 0}, "batch_size"),
                       ({"layout": "nhwc"}, "layout"), ({"split": "validation"}, "split"),
                       ({"overwrite": "yes"}, "overwrite"), ({"seed": 1.5}, "seed"),
                       ({"amp": "bf16", "dtype": "float64"}, "amp"),
                       ({"bn": "recalibrate", "points_per_pass": 4}, "points_per_pass")]:
        with pytest.raises(UserError) as e:
            Options(**bad)
        assert e.value.params[0] == param and isinstance(e.value, ValueError)
    with pytest.raises(UserError, match="did you mean 'batch-size'"):
        Options.from_mapping({"batchsize": 3})
    assert Options.from_mapping({"batch-size": 3, "split": ["test"]}) == Options(batch_size=3, split=("test",))


def test_error_messages_render_as_flags():
    e = UserError("`batch_size` 0: must be at least 1; see `hessian_iters`")
    assert e.as_flags() == "--batch-size 0: must be at least 1; see --hessian-iters"
    assert e.as_flags({"hessian_iters": "--hessian"}).endswith("see --hessian")


def test_plan_round_trips_and_names_conflicts():
    plan = Plan("cpu", 64, True, 2, 1)
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.conflicts({"batch_size": None, "channels_last": True}) is None
    assert "`batch_size` 32" in plan.conflicts({"batch_size": 32})


def test_a_curve_is_one_row_of_a_plane():
    curve, plane = Grid.parse("-1:1:7"), Grid.parse("-1:1:5", "0:1:3")
    assert curve.plane_shape == (1, 7) and curve.shape == (7,) and plane.plane_shape == plane.shape == (3, 5)
    assert curve.as_plane(np.arange(7.0)).shape == (1, 7) and curve.coords(0, 2) == (pytest.approx(-1 / 3), 0.0)
    for grid in (curve, plane):
        for ranks, k in [(1, 1), (4, 1), (8, 4)]:
            tiles = grid.tiles(None, ranks, k)
            covered = np.zeros(grid.plane_shape, int)
            for t in tiles:
                covered[t.j0:t.j1, t.i0:t.i1] += 1
                assert t.size >= min(k, grid.num_points) or t.i1 == grid.plane_shape[1] or t.j1 == grid.plane_shape[0]
            assert (covered == 1).all()  # every point in exactly one tile
    assert min(t.size for t in Grid.parse("0:1:51").tiles(None, 8, 4)[:-1]) >= 4  # tiles hold a stacked pass


def test_tile_queue_alone_hands_out_every_tile_once():
    """One process without a communicator takes every tile itself, whatever the schedule (so one is
    tested here); the schedules part ways under ``mpirun`` (test_mpi's static schedule test)."""
    q = TileQueue(World(), 5, "dynamic")
    got = []
    while (k := q.next()) is not None:
        got.append(k)
        q.add_done(2)
    assert got == [0, 1, 2, 3, 4] and q.points_done() == 10
    q.close()
    with pytest.raises(UserError, match="`schedule`"):
        TileQueue(World(), 1, "random")


class Exploding(torch.nn.Module):
    """A small MLP that raises on its ``fail_at``-th forward."""

    def __init__(self, fail_at: int, exc: type[BaseException] = RuntimeError):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                       torch.nn.ReLU(), torch.nn.Linear(16, 10))
        self.calls, self.fail_at, self.exc = 0, fail_at, exc

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("boom at this point")
        return self.net(x)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_model_comes_back_unchanged_after_a_failure_at_the_third_point(tmp_path, exc):
    data = api.load_data("digits", ("train",), subset=64)
    model = Exploding(fail_at=0, exc=exc)
    model.net[2].running_mean.uniform_()  # non-trivial buffers
    model.train()
    model.net[4].eval()  # a mixed train/eval state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    param_ids = [id(p) for p in model.parameters()]
    dirs = api.random_directions(model, seed=0)
    # The pre-flight check makes 1 forward, then one forward per point (64 samples, batch 64), one
    # point per tile: the third point's forward is call 4.
    model.fail_at = 4
    with pytest.raises(exc):
        api.sample_surface(model, data, dirs, Grid.parse("-1:1:5", "-1:1:3"), tmp_path / "s.h5", dtype="float64",
                           batch_size=64, points_per_pass=1, layout="contiguous", tile="1x1", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device and torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == modes and [id(p) for p in model.parameters()] == param_ids
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["done"][()].sum() == 2  # the two points before the failure were kept


def test_calls_leave_the_caller_model_on_success_too(tmp_path):
    data = api.load_data("digits", ("train",), subset=40)
    model = api.load_model("cnn", (1, 8, 8), 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = api.random_directions(model, seed=1, two=False)
    api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), tmp_path / "c.h5", layout="channels-last",
                       dtype="float64", progress=False)
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.conv1.weight.dtype == torch.float32 and model.conv1.weight.is_contiguous()


def test_resume_reuses_the_recorded_plan_bit_for_bit(tmp_path):
    data = api.load_data("digits", ("train",), subset=150)
    model = api.load_model("cnn", (1, 8, 8), 10)
    dirs = api.random_directions(model, seed=2)
    grid = Grid.parse("-1:1:4", "-1:1:3")
    path = tmp_path / "r.h5"
    whole = api.sample_surface(model, data, dirs, grid, path, progress=False)
    plan = Plan.from_json(whole.attrs["plan"])
    with h5py.File(path, "r+") as f:  # as if the job died half-way
        f["done"][1:] = 0
        f["train_loss"][1:] = np.nan
    resumed = api.sample_surface(model, data, dirs, grid, path, progress=False)
    assert Plan.from_json(resumed.attrs["plan"]) == plan
    np.testing.assert_array_equal(resumed.values["train_loss"], whole.values["train_loss"])
    with pytest.raises(UserError, match="`batch_size` 7"):
        api.sample_surface(model, data, dirs, grid, path, progress=False, batch_size=7)


def test_a_reader_watching_the_file_does_not_stop_the_run(tmp_path):
    """`lsurf info` or a plot holds HDF5's shared lock while it reads; the run's own opens must not care."""
    import subprocess
    import sys

    data = api.load_data("digits", ("train",), subset=40)
    model = api.load_model("cnn", (1, 8, 8), 10)
    dirs = api.random_directions(model, seed=3, two=False)
    path = tmp_path / "w.h5"
    api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), path, progress=False)
    with h5py.File(path, "r+") as f:
        f["done"][1:] = 0
    reader = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(path)!r}, 'r'); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        resumed = api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), path, progress=False)
    finally:
        reader.kill()
        reader.wait()
    assert resumed.done.all()


@pytest.mark.cli
def test_cli_flags_win_over_the_job_file_and_abbreviations_are_refused(tmp_path):
    (tmp_path / "job.toml").write_text('model = "cnn"\ndata = "digits"\nsubset = 60\nbatch_size = 32\n'
                                       'x = "-1:1:3"\nno-progress = true\n')
    lsurf("surface", "--config", tmp_path / "job.toml", "--batch-size", "16", "--out", tmp_path / "a.h5", check=True)
    with h5py.File(tmp_path / "a.h5") as f:
        assert Plan.from_json(f.attrs["plan"]).batch_size == 16
    p = lsurf("surface", "--config", tmp_path / "job.toml", "--batch", "64", "--out", tmp_path / "b.h5")
    assert p.returncode == 2 and "unrecognized arguments: --batch 64" in p.stderr
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.cli
def test_hessian_takes_device_and_job_file(tmp_path):
    (tmp_path / "h.toml").write_text('model = "mlp"\ndata = "digits"\nsubset = 80\ntop_k = 2\ntrace_samples = 0\n'
                                     'iters = 20\ndtype = "float64"\n')
    p = lsurf("hessian", "--config", tmp_path / "h.toml", "--device", "cpu", "--out", tmp_path / "h.h5", check=True)
    assert "top eigenvalues" in p.stdout
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["eigenvalues"].shape == (2,) and '"dtype": "float64"' in f.attrs["config"]
    p = lsurf("hessian", "--config", tmp_path / "h.toml", "--device", "tpu")
    assert p.returncode == 2 and "--device 'tpu'" in p.stderr


def test_no_import_circle_and_nothing_imports_the_package_root():
    """Modules import downwards only: no circle among lsurf's modules (grimp, import-linter's graph,
    counts imports inside functions too), and none imports the public API module ``lsurf`` itself."""
    import re
    from pathlib import Path

    import grimp

    graph = grimp.build_graph("lsurf")
    modules = sorted(m for m in graph.modules if m != "lsurf")
    circles = [(a, b) for i, a in enumerate(modules) for b in modules[i + 1:]
               if graph.find_shortest_chain(a, b) and graph.find_shortest_chain(b, a)]
    assert circles == []
    root = Path(api.__file__).parent
    upward = [str(p) for p in root.rglob("*.py") if p != root / "__init__.py"
              and re.search(r"^\s*(from lsurf import|import lsurf\s*$)", p.read_text(), re.M)]
    assert upward == []
