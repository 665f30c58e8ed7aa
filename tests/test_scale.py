"""Scale: streamed data equals resident data, rank groups equal one process, memory stays bounded.

Every comparison is float64 against an independent run of the same surface by another path.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import _env, lsurf, mpirun, requires_mpi

import lsurf as api
from lsurf.engine.data.stores import save_store
from lsurf.engine.geometry.grid import Grid

CURVE = ["--x", "-1:1:5"]
PLANE = ["--x", "-1:1:4", "--y", "-1:1:3"]


@pytest.fixture(scope="module")
def f64(digits_checkpoint) -> list:
    """A trained digits CNN evaluated in float64 (a fresh model's weights would differ per run)."""
    return ["--model", "cnn", "--checkpoint", digits_checkpoint, "--dtype", "float64", "--no-progress", "--seed", "3"]


def _values(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        assert f["done"][()].all()
        return {k: f[k][()] for k in f if k.startswith(("train_", "test_"))}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory):
    """The digits splits as an ``npy:`` store and an ``hdf5:`` store (same rows, same order)."""
    d = tmp_path_factory.mktemp("stores")
    data = api.load_data("digits", ("train", "test"))
    arrays = {s: (split.x.numpy(), split.y.numpy()) for s, split in data.items()}
    save_store(f"npy:{d / 'npy'}", arrays)
    save_store(f"hdf5:{d / 'digits.h5'}", arrays, chunk_rows=100)
    return d


@pytest.fixture(scope="module")
def reference(digits_npy, f64):
    """The surface of the resident built-in digits, one process."""
    out = digits_npy / "ref.h5"
    lsurf("surface", *f64, "--data", "digits", "--split", "train,test", "--subset", "300", *PLANE,
          "--out", out, check=True)
    return _values(out)


@pytest.mark.cli
@pytest.mark.parametrize("data,extra", [
    ("digits", ["--resident", "never", "--workers", "0"]),
    ("digits", ["--resident", "never", "--workers", "2", "--batch-size", "64"]),
    ("npy", ["--resident", "never"]),
    ("hdf5", ["--resident", "never", "--workers", "2"]),
    ("npy", ["--resident", "auto"]),
], ids=["stream-in-process", "stream-2-workers", "npy-streamed", "hdf5-streamed", "npy-auto-resident"])
def test_streamed_and_stored_data_give_the_resident_numbers(data, extra, digits_npy, reference, tmp_path, f64):
    spec = {"digits": "digits", "npy": f"npy:{digits_npy / 'npy'}", "hdf5": f"hdf5:{digits_npy / 'digits.h5'}"}[data]
    out = tmp_path / "s.h5"
    p = lsurf("surface", *f64, "--data", spec, "--split", "train,test", "--subset", "300", *PLANE, *extra,
              "--out", out, check=True)
    _same(_values(out), reference)
    streamed = "none" if extra[1] == "auto" else "train, test"
    assert f"{streamed} streamed" in p.stderr
    with h5py.File(out) as f:
        assert f.attrs["streamed"] == ("" if extra[1] == "auto" else "train,test")


PLUGINS = textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
    import lsurf

    def _tensors():
        s = lsurf.load_data("digits", ("train",), subset=300)["train"]
        return s.x, s.y

    class Items(Dataset):
        def __init__(self):
            self.x, self.y = _tensors()
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    class Stream(IterableDataset):
        def __iter__(self):
            x, y = _tensors()
            return iter(zip(x, y))

    def map_style():
        return Items(), None

    def iterable():
        return Stream(), None

    def loader_factory():
        x, y = _tensors()
        return (lambda batch_size: DataLoader(TensorDataset(x, y), batch_size=batch_size)), None
""")


@pytest.mark.cli
@pytest.mark.parametrize("factory", ["map_style", "iterable", "loader_factory"])
@pytest.mark.parametrize("resident", ["never", "always"])
def test_plugin_datasets_iterables_and_loader_factories(factory, resident, tmp_path, f64):
    """A plug-in may return any of the three; streamed or held, each gives the numbers of the tensors."""
    (tmp_path / "feeds.py").write_text(PLUGINS)
    env = {"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"}
    ref, out = tmp_path / "ref.h5", tmp_path / "s.h5"
    lsurf("surface", *f64, "--data", "digits", "--subset", "300", *CURVE, "--out", ref, check=True)
    lsurf("surface", *f64, "--data", f"feeds:{factory}", "--resident", resident, *CURVE, "--out", out,
          env=env, check=True)
    _same(_values(out), _values(ref))


@pytest.mark.mpi
@requires_mpi
@pytest.mark.parametrize("g,writer", [(2, "root"), (4, "mpio")])  # G = 1: test_mpi's 4 ranks
def test_rank_groups_equal_one_process(g, writer, reference, tmp_path, f64):
    """N=4 ranks in groups of G: each rank holds 1/G of every split, the group adds its sums."""
    out = tmp_path / "s.h5"
    p = mpirun(4, "surface", *f64, "--data", "digits", "--split", "train,test", "--subset", "300", *PLANE,
               "--ranks-per-point", g, "--writer", writer, "--out", out, check=True)
    _same(_values(out), reference)
    with h5py.File(out) as f:
        assert f.attrs["rank_points"].sum() == 12  # every point once, counted by its group's leader
        assert (f.attrs["rank_points"][[r for r in range(4) if r % g]] == 0).all()
    info = lsurf("info", out, check=True).stdout
    assert f"in {4 // g} groups of {g}" in info, p.stderr


@pytest.mark.mpi
@requires_mpi
def test_a_curve_with_fewer_points_than_ranks_uses_them_all(tmp_path, f64):
    """A 3-point curve on 4 ranks: two groups of two, streamed, both writers' file equal to one process."""
    ref, out = tmp_path / "ref.h5", tmp_path / "s.h5"
    lsurf("surface", *f64, "--data", "digits", "--subset", "301", "--x", "-1:1:3", "--out", ref, check=True)
    mpirun(4, "surface", *f64, "--data", "digits", "--subset", "301", "--x", "-1:1:3", "--ranks-per-point", 2,
           "--resident", "never", "--workers", "1", "--out", out, check=True)
    _same(_values(out), _values(ref))


@pytest.mark.mpi
@requires_mpi
@pytest.mark.parametrize("case", ["g-does-not-divide", "split-smaller-than-g"])
def test_bad_group_layouts_are_one_line(case, tmp_path):
    args = {"g-does-not-divide": ["--ranks-per-point", "3"],
            "split-smaller-than-g": ["--ranks-per-point", "2", "--subset", "1"]}[case]
    p = mpirun(2, "surface", "--model", "cnn", "--data", "digits", "--no-progress", *CURVE, *args,
               "--out", tmp_path / "s.h5")
    want = {"g-does-not-divide": "--ranks-per-point 3 does not divide the 2 ranks",
            "split-smaller-than-g": "has 1 samples, fewer than --ranks-per-point 2"}[case]
    assert p.returncode == 2 and want in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "s.h5").exists()


@pytest.mark.cli
def test_a_budget_too_small_for_one_batch_is_refused(tmp_path):
    p = lsurf("surface", "--model", "cnn", "--data", "digits", "--no-progress", *CURVE, "--memory-budget", "4K",
              "--out", tmp_path / "s.h5")
    assert p.returncode == 2 and "--memory-budget 4.0 KiB cannot hold the train split's stream" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


def _peak_rss_kib(args: list) -> tuple[int, str]:
    """Peak resident memory (KiB, as the kernel counts it) of the largest process of a run."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lsurf", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)), p.stderr


@pytest.mark.system
def test_streaming_a_split_far_larger_than_the_budget_keeps_memory_bounded(tmp_path):
    """1 GiB of float32 on disk, a 256 MiB budget: the peak stays within the tiny run's plus the budget
    and the prefetch queue (4 batches of 4 MiB)."""
    rows, width = 262_144, 1024
    big, tiny = tmp_path / "big", tmp_path / "tiny"
    big.mkdir()
    x = np.lib.format.open_memmap(big / "train_x.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    g = np.random.default_rng(0)
    for i in range(0, rows, 16384):  # written in pieces, so the test itself never holds 1 GiB
        x[i : i + 16384] = g.standard_normal((16384, width), dtype=np.float32)
    x.flush()
    del x
    y = g.integers(0, 10, rows)
    np.save(big / "train_y.npy", y)
    small = np.load(big / "train_x.npy", mmap_mode="r")[:4096]
    save_store(f"npy:{tiny}", {"train": (np.array(small), y[:4096])})
    assert (big / "train_x.npy").stat().st_size >= 2**30
    torch.save(api.load_model("mlp", (width,), 10).state_dict(), tmp_path / "mlp.t7")
    run = ["surface", "--model", "mlp", "--checkpoint", tmp_path / "mlp.t7", "--x", "0:1:1", "--no-progress",
           "--memory-budget", "256M", "--batch-size", "1024", "--workers", "1"]
    peak_tiny, _ = _peak_rss_kib([*run, "--data", f"npy:{tiny}", "--out", tmp_path / "t.h5"])
    peak_big, log = _peak_rss_kib([*run, "--data", f"npy:{big}", "--out", tmp_path / "b.h5"])
    assert "train streamed" in log
    assert peak_big < peak_tiny + (256 + 16) * 1024, (peak_big, peak_tiny)
    with h5py.File(tmp_path / "b.h5") as f:
        assert np.isfinite(f["train_loss"][()]).all()


def test_library_streaming_leaves_the_model_as_it_was(tmp_path):
    data = api.load_data("digits", ("train",), subset=80)
    model = api.load_model("cnn", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = api.random_directions(model, seed=1, two=False)
    held = api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), tmp_path / "a.h5", progress=False,
                              dtype="float64")
    streamed = api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), tmp_path / "b.h5", progress=False,
                                  dtype="float64", resident="never", workers=1)
    _same(held.values, streamed.values)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
