"""The surface file: re-read, xarray, info, resume and refusal, NaN for points not done."""

from __future__ import annotations

import os
import signal
import time

import h5py
import numpy as np
import pytest
from conftest import lsurf

COMMON = ["--model", "cnn", "--data", "digits", "--subset", "200", "--no-progress"]


@pytest.fixture
def surface(tmp_path, digits_checkpoint):
    out = tmp_path / "s.h5"
    lsurf("surface", *COMMON, "--checkpoint", digits_checkpoint, "--x", "-1:1:5", "--y", "-0.5:0.5:3",
          "--split", "train,test", "--out", out, check=True)
    return out


@pytest.mark.cli
def test_layout_and_provenance(surface, digits_checkpoint):
    with h5py.File(surface) as f:
        for split in ("train", "test"):
            for q in ("loss", "acc", "loss_stderr", "acc_stderr"):
                assert f[f"{split}_{q}"].shape == (3, 5)
                assert np.isfinite(f[f"{split}_{q}"][()]).all()
        assert f["done"][()].all()
        np.testing.assert_array_equal(f["xcoordinates"][()], np.linspace(-1, 1, 5))
        np.testing.assert_array_equal(f["ycoordinates"][()], np.linspace(-0.5, 0.5, 3))
        assert (0 <= f["train_acc"][()]).all() and (f["train_acc"][()] <= 100).all()
        import hashlib
        assert f.attrs["checkpoint_sha256"] == hashlib.sha256(digits_checkpoint.read_bytes()).hexdigest()
        for key in ("config", "versions", "created", "dir_file_sha256", "eval_seconds_total",
                    "eval_seconds_per_point", "rank_points"):
            assert key in f.attrs, key
        # value [j, i] is at (x[i], y[j]): the centre of the grid is the checkpoint itself.
        centre = f["train_loss"][1, 2]
        assert centre == pytest.approx(f["train_loss"][()].min(), abs=0.5)


@pytest.mark.cli
def test_xarray_sees_named_coordinates(surface):
    xr = pytest.importorskip("xarray")
    ds = xr.open_dataset(surface, engine="h5netcdf")
    assert ds["train_loss"].dims == ("y", "x")
    np.testing.assert_array_equal(ds["x"].values, np.linspace(-1, 1, 5))
    assert float(ds["train_loss"].sel(x=0.0, y=0.0)) == pytest.approx(float(ds["train_loss"][1, 2]))


@pytest.mark.cli
def test_info_reports(surface):
    p = lsurf("info", surface, check=True)
    assert "15/15 points done" in p.stdout and "5 x 3 points" in p.stdout
    assert "checkpoint_sha256" in p.stdout and "test_loss" in p.stdout


@pytest.mark.cli
def test_rerun_resumes_nothing_and_other_grid_is_refused(surface, digits_checkpoint):
    before = surface.read_bytes()
    p = lsurf("surface", *COMMON, "--checkpoint", digits_checkpoint, "--x", "-1:1:5", "--y", "-0.5:0.5:3",
              "--split", "train,test", "--out", surface, check=True)
    assert "15/15" in p.stdout
    with h5py.File(surface) as f:
        assert f.attrs["rank_points"].sum() == 0  # everything was already done
    for other in (["--x", "-1:1:7", "--y", "-0.5:0.5:3"], ["--x", "-1:1:5", "--y", "-0.5:0.5:3", "--seed", "4"]):
        before = surface.read_bytes()
        p = lsurf("surface", *COMMON, "--checkpoint", digits_checkpoint, "--split", "train,test", *other,
                  "--out", surface)
        assert p.returncode == 2, p.stderr
        assert "use --overwrite" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert surface.read_bytes() == before
    p = lsurf("surface", *COMMON, "--checkpoint", digits_checkpoint, "--x", "-1:1:7", "--y", "-0.5:0.5:3",
              "--out", surface, "--overwrite", check=True)
    with h5py.File(surface) as f:
        assert f["train_loss"].shape == (3, 7)


def test_partial_file_has_nan_where_not_done(tmp_path):
    from lsurf.engine.formats.surface_file import TileWriter, create, read_surface
    from lsurf.engine.geometry.grid import Grid, Tile

    grid = Grid(np.linspace(0, 1, 4), np.linspace(0, 1, 3))
    create(tmp_path / "p.h5", grid, ["train_loss", "train_acc"], {}, {})
    w = TileWriter(tmp_path / "p.h5", grid)
    t0 = time.time()
    w.write(Tile(0, 0, 1, 0, 4), {"train_loss": np.arange(4.0)[None], "train_acc": np.ones((1, 4))})
    # a coarse-first tile: rows 1:3:2 (row 1), columns 1:4:2 (1 and 3); column 3 not held; column 1
    # finished before, at the time given
    w.write(Tile(1, 1, 3, 1, 4, dj=2, di=2), {"train_loss": np.array([[7.0, 8.0]]), "train_acc": np.ones((1, 2)),
                                             "finished_at": np.array([[5.0, np.nan]])}, np.array([[True, False]]))
    w.close()
    s = read_surface(tmp_path / "p.h5")
    assert s.done[0].all() and s.done[1].tolist() == [False, True, False, False] and not s.done[2].any()
    np.testing.assert_array_equal(s.values["train_loss"][0], np.arange(4.0))
    assert s.values["train_loss"][1, 1] == 7.0 and np.isnan(s.values["train_loss"][2]).all()
    assert s.finished_at is not None and (t0 <= s.finished_at[0]).all() and (s.finished_at[0] <= time.time()).all()
    assert s.finished_at[1, 1] == 5.0 and np.isnan(s.finished_at[~s.done]).all()  # NaN exactly where not done
    with h5py.File(tmp_path / "p.h5", "r+") as f:  # a file from before finished_at
        del f["finished_at"]
    old = read_surface(tmp_path / "p.h5")
    assert old.finished_at is None and old.done.sum() == 5
    w = TileWriter(tmp_path / "p.h5", grid)  # still written: values and done
    w.write(Tile(2, 2, 3, 0, 4), {"train_loss": np.ones((1, 4)), "train_acc": np.ones((1, 4))})
    w.close()
    assert read_surface(tmp_path / "p.h5").done[2].all()


class _SignalsMidWrite(dict):
    """Tile values that send this process a real signal once the first quantity is written."""

    def __init__(self, sig, **values):
        super().__init__(**values)
        self.sig = sig

    def items(self):
        for k, item in enumerate(super().items()):
            if k == 1:
                os.kill(os.getpid(), self.sig)
            yield item


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_mid_tile_lands_after_the_whole_tile(sig, tmp_path):
    """Ctrl-C or mpirun's SIGTERM during a write: the tile is written whole, done included, and the
    interrupt then reaches the caller's handler (which is back in place)."""
    from lsurf.engine.formats.surface_file import TileWriter, create, read_surface
    from lsurf.engine.geometry.grid import Grid, Tile

    grid = Grid(np.linspace(0, 1, 4), np.linspace(0, 1, 3))
    create(tmp_path / "p.h5", grid, ["train_loss", "train_acc"], {}, {})
    w = TileWriter(tmp_path / "p.h5", grid)
    got: list[tuple[int, bool]] = []

    def mine(number, _frame):
        got.append((number, bool(w.f["done"][0].all())))  # was the tile whole when the signal arrived?

    before = signal.signal(sig, mine)
    try:
        w.write(Tile(0, 0, 1, 0, 4), _SignalsMidWrite(sig, train_loss=np.arange(4.0)[None], train_acc=np.ones((1, 4))))
        assert got == [(sig, True)] and signal.getsignal(sig) is mine  # delivered once, after, to the caller's handler
    finally:
        signal.signal(sig, before)
        w.close()
    s = read_surface(tmp_path / "p.h5")
    assert s.done[0].all() and np.isfinite(s.values["train_acc"][0]).all()
