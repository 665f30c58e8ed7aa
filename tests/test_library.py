"""The library's seams, fast: options, run plan, grid geometry and tiles, the tile queue in one
process, the model handed back after failures, and the CLI's flag/job-file merge."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import lsurf

import lsurf as api
from lsurf.engine.evaluation.plan import Plan
from lsurf.engine.geometry.grid import Grid, Tile
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
                covered[t.rows, t.cols] += 1
                assert t.size >= min(k, grid.num_points) or at_block_edge(t, grid)
            assert (covered == 1).all()  # every point in exactly one tile
    assert min(t.size for t in Grid.parse("0:1:51").tiles(None, 8, 4, "contiguous")[:-1]) >= 4  # a stacked pass


def at_block_edge(t: Tile, grid: Grid) -> bool:
    """Is the tile the last of its coarse-first block's lattice along a row or a column (where a
    tile may end in a smaller pass)?"""
    ny, nx = grid.plane_shape
    return t.i1 - 1 + t.di >= nx or t.j1 - 1 + t.dj >= ny


def slowest(tiles: list[Tile], ranks: int, k: int) -> int:
    """Passes of ``k`` points of the last rank to finish when each of ``ranks`` takes the next tile
    as soon as it has finished its last (every pass taking the same time)."""
    ends = [0] * ranks
    for t in tiles:
        ends[ends.index(min(ends))] += -(-t.size // k)
    return max(ends)


def quarters(points: list[tuple[int, int]], grid: Grid) -> set[tuple[int, int]]:
    """Which quarters of the plane (halves of rows by halves of columns; of a curve, quarters of
    its columns) hold one of ``points``."""
    ny, nx = grid.plane_shape
    if grid.ndim == 1:
        return {(0, 4 * i // nx) for _, i in points}
    return {(2 * j // ny, 2 * i // nx) for j, i in points}


@pytest.mark.parametrize("x,y,planes", [("0:1:31", "0:1:31", None), ("0:1:51", "0:1:51", None),
                                        ("0:1:17", "0:1:9", None), ("0:1:200", None, None), ("0:1:11", "0:1:13", 3)])
def test_coarse_first_tiles_cover_each_plane_within_its_first_sixteenth(x, y, planes):
    """Issue 34: the first tiles of a plane whose points add up to 1/16 of it, and no fewer than the
    ranks (dynamic scheduling hands those out at once), hold points in every quarter of it; tiles
    never span two planes and come plane after plane, and every point is in exactly one."""
    grid = Grid.parse(x, y, planes)
    ny, nx = grid.plane_shape
    for ranks in (1, 2, 4, 8, 32):
        tiles = grid.tiles(None, ranks)
        assert [t.index for t in tiles] == list(range(len(tiles)))
        assert [t.plane for t in tiles] == sorted(t.plane for t in tiles)
        covered = np.zeros(grid.stack_shape, int)
        for t in tiles:
            covered[t.index_in_stack] += 1
        assert (covered == 1).all()
        for k in range(grid.num_planes):
            first, total = [], 0
            for n, t in enumerate(t for t in tiles if t.plane == k):
                first += [t.point(a, b) for a, b in np.ndindex(*t.shape)]
                total += t.size
                if 16 * total >= ny * nx and n + 1 >= ranks:
                    break
            assert quarters(first, grid) == quarters([(j, i) for j in range(ny) for i in range(nx)], grid), ranks
        lattice = np.zeros(grid.plane_shape, bool)  # one rank: the first tile is every 4th row and column
        lattice[:: 4 if y else 1, :: 4 if y else 16] = True  # (every 16th point of a curve)
        in_first = np.zeros(grid.plane_shape, bool)
        in_first[tiles[0].rows, tiles[0].cols] = True
        assert ranks > 1 or np.array_equal(in_first, lattice)
        # about as many as contiguous tiles (4 a rank), more only where small ones end the ranks together
        assert len(tiles) <= 4 * len(grid.tiles(None, ranks, order="contiguous")) + 6 * grid.num_planes


def test_coarse_first_tiles_are_strided_lattices_of_whole_stacked_passes():
    """Each tile is a lattice of power-of-2 steps (a hyperslab); tiles hold whole passes of K except at
    their block's edge; the run takes at most 2 % longer than with contiguous tiles (passes of the
    slowest of equal ranks taking tiles in order), else a coarser start (or none) is taken; an explicit
    shape counts lattice rows and columns; contiguous is the old order."""
    for x, y in [("0:1:51", "0:1:51"), ("0:1:31", "0:1:31"), ("0:1:21", "0:1:21"), ("0:1:201", None)]:
        grid = Grid.parse(x, y)
        for ranks in (1, 3, 8):
            for k in (1, 2, 4, 8, 16, 32, 64):
                tiles = grid.tiles(None, ranks, k)
                assert all(t.dj in (1, 2, 4) and t.di in (1, 2, 4, 8, 16) for t in tiles)
                assert all(t.size % k == 0 for t in tiles if not at_block_edge(t, grid)), (x, y, ranks, k)
                assert slowest(tiles, ranks, k) <= 1.02 * slowest(grid.tiles(None, ranks, k, "contiguous"), ranks, k)
                assert k > 1 or tiles[0].di == (4 if y else 16)  # one point a pass: always from the coarsest
    grid = Grid.parse("0:1:9", "0:1:7")
    assert all(t.shape[0] <= 2 and t.shape[1] <= 3 for t in grid.tiles((2, 3)))
    assert [(t.j0, t.j1, t.dj, t.i0, t.i1, t.di) for t in grid.tiles((2, 3))[:2]] == [
        (0, 5, 4, 0, 9, 4), (0, 5, 4, 2, 7, 4)]
    assert [(t.j0, t.j1, t.i0, t.i1, t.dj, t.di) for t in grid.tiles((2, 9), order="contiguous")] == [
        (j, min(j + 2, 7), 0, 9, 1, 1) for j in range(0, 7, 2)]


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
    assert whole.finished_at is not None and np.isfinite(whole.finished_at).all()
    with h5py.File(path, "r+") as f:  # as if the job died half-way (with contiguous tiles: row 0 done)
        f["done"][1:] = 0
        f["train_loss"][1:] = np.nan
        f["finished_at"][1:] = np.nan
    resumed = api.sample_surface(model, data, dirs, grid, path, progress=False)
    assert Plan.from_json(resumed.attrs["plan"]) == plan
    np.testing.assert_array_equal(resumed.values["train_loss"], whole.values["train_loss"])
    assert resumed.finished_at is not None
    np.testing.assert_array_equal(resumed.finished_at[0], whole.finished_at[0])  # kept: not computed again
    assert (resumed.finished_at[1:] >= whole.finished_at.max()).all()
    with pytest.raises(UserError, match="`batch_size` 7"):
        api.sample_surface(model, data, dirs, grid, path, progress=False, batch_size=7)


def test_a_file_from_before_finished_at_and_coarse_first_tiles_resumes(tmp_path):
    data = api.load_data("digits", ("train",), subset=40)
    model = api.load_model("cnn", (1, 8, 8), 10)
    dirs = api.random_directions(model, seed=2)
    grid = Grid.parse("-1:1:5", "-1:1:3")
    path = tmp_path / "old.h5"
    whole = api.sample_surface(model, data, dirs, grid, path, progress=False)
    with h5py.File(path, "r+") as f:  # no finished_at, and killed after the first 2 of 5 columns
        del f["finished_at"]
        f["done"][:, 2:] = 0
    old = api.sample_surface(model, data, dirs, grid, path, progress=False)
    assert old.finished_at is None and old.done.all()
    np.testing.assert_array_equal(old.values["train_loss"], whole.values["train_loss"])


def test_coarse_first_order_gives_the_values_of_contiguous_tiles(tmp_path):
    """The order points are dealt in changes no value: bit for bit one point a pass, to 1e-6 stacked."""
    data = api.load_data("digits", ("train",), subset=40)
    model = api.load_model("mlp", (1, 8, 8), 10)
    dirs = api.random_directions(model, seed=4)
    grid = Grid.parse("-1:1:6", "-1:1:5")
    for k in (1, 4):
        runs = [api.sample_surface(model, data, dirs, grid, tmp_path / f"{order}{k}.h5", progress=False,
                                   dtype="float64", points_per_pass=k, layout="contiguous",  # one plan for both
                                   fidelity="off", tile_order=order).values["train_loss"]
                for order in ("coarse", "contiguous")]
        assert np.isfinite(runs[0]).all()
        if k == 1:
            np.testing.assert_array_equal(runs[0], runs[1])
        np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=0)


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
