"""On-disk stores (``hdf5:PATH``, ``npy:DIR``): exact round trips, fork- and spawn-safe reading in
DataLoader workers, sampled fingerprints, one-line errors, and resident memory bounded by a batch
rather than by the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, Batches
from torch.utils.data import DataLoader

from lsurf import UserError
from lsurf.engine.data.stores import STORE_KINDS, open_store, save_store


def _spec(kind: str, tmp_path, name: str = "store") -> str:
    return f"hdf5:{tmp_path / (name + '.h5')}" if kind == "hdf5" else f"npy:{tmp_path / name}"


def _arrays(n: int, x_shape, x_dtype, y_shape, y_dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    if np.dtype(x_dtype).kind == "f":
        x = rng.standard_normal((n, *x_shape)).astype(x_dtype)
    else:
        x = rng.integers(0, 256, size=(n, *x_shape)).astype(x_dtype)
    y = (rng.integers(0, 10, size=(n, *y_shape)) if np.dtype(y_dtype).kind in "iu"
         else rng.standard_normal((n, *y_shape))).astype(y_dtype)
    return x, y


DTYPES = [((3, 8, 8), np.uint8, (), np.int32),      # images as bytes, int32 labels (come back int64)
          ((5,), np.float32, (), np.int64),
          ((4, 2), np.float16, (3,), np.float32),   # 2-D regression targets
          ((6,), ">f8", (), np.uint8)]              # big-endian floats, byte labels


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("x_shape,x_dtype,y_shape,y_dtype", DTYPES)
def test_round_trip_is_exact(tmp_path, kind, x_shape, x_dtype, y_shape, y_dtype):
    x, y = _arrays(300, x_shape, x_dtype, y_shape, y_dtype)
    xt, yt = _arrays(40, x_shape, x_dtype, y_shape, y_dtype, seed=1)
    spec = _spec(kind, tmp_path)
    save_store(spec, {"train": (x, y), "test": (xt, yt)}, chunk_rows=7)
    data = open_store(spec)
    assert set(data) == {"train", "test"} and len(data["train"]) == 300 and len(data["test"]) == 40
    ds = data["train"]
    y_out = np.int64 if np.dtype(y_dtype).kind in "iu" else np.dtype(y_dtype)
    assert ds.x_dtype == np.dtype(x_dtype).newbyteorder("=") and ds.y_dtype == y_out
    assert ds.x_shape == x.shape and ds.y_shape == y.shape
    assert ds.sample_nbytes == x[0].nbytes + np.dtype(y_out).itemsize * int(np.prod(y_shape))
    assert ds.nbytes == 300 * ds.sample_nbytes

    def same(pair, rows):
        assert pair[0].dtype == torch.from_numpy(np.zeros(0, ds.x_dtype)).dtype
        assert pair[1].dtype == torch.from_numpy(np.zeros(0, ds.y_dtype)).dtype
        np.testing.assert_array_equal(pair[0].numpy(), x[rows])
        np.testing.assert_array_equal(pair[1].numpy(), y[rows])

    same(ds.read(0, 300), slice(0, 300))
    same(ds.read(13, 101), slice(13, 101))         # crosses chunk boundaries
    same(ds.read(290, 10_000), slice(290, 300))    # slice semantics at the end
    assert ds.read(50, 50)[0].shape == (0, *x_shape)
    for idx in ([0], [1, 2, 3, 299], np.arange(0, 300, 3), np.arange(5, 300, 41), [7, 3, 3]):
        same(ds.read_rows(np.asarray(idx)), np.asarray(idx))
    same([t.unsqueeze(0) for t in ds[17]], slice(17, 18))
    same([t.unsqueeze(0) for t in ds[-1]], slice(299, 300))
    with pytest.raises(IndexError):
        ds[300]
    np.testing.assert_array_equal(ds.labels().numpy(), y)
    np.testing.assert_array_equal(data["test"].read(0, 40)[0].numpy(), xt)


def test_only_present_splits_and_scattered_reads(tmp_path):
    """A store of one split opens as that split; index sets past the piece limits (sparse ones as
    point selections, dense ones as covering slices) read exactly."""
    x = np.arange(20_000 * 4, dtype=np.float32).reshape(20_000, 4)
    y = np.arange(20_000) % 7
    for kind in STORE_KINDS:
        spec = _spec(kind, tmp_path, kind)
        save_store(spec, {"test": (x, y)})
        data = open_store(spec)
        assert list(data) == ["test"]
        rng = np.random.default_rng(3)
        for idx in (np.arange(0, 20_000, 10), np.sort(rng.choice(20_000, 9_000, replace=False)),
                    np.array([0, 19_999])):
            xr, yr = data["test"].read_rows(idx)
            np.testing.assert_array_equal(xr.numpy(), x[idx])
            np.testing.assert_array_equal(yr.numpy(), y[idx])


def test_hdf5_written_elsewhere_contiguous_and_compressed(tmp_path):
    """Stores written by other tools: one split contiguous, one gzip-chunked across rows."""
    x, y = _arrays(500, (10,), np.float32, (), np.int64)
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f["train/x"], f["train/y"] = x, y
        f.create_dataset("test/x", data=x, chunks=(64, 10), compression="gzip")
        f.create_dataset("test/y", data=y, chunks=(100,), compression="gzip")
    data = open_store(f"hdf5:{path}")
    for split in ("train", "test"):
        xr, yr = data[split].read(33, 471)
        np.testing.assert_array_equal(xr.numpy(), x[33:471])
        np.testing.assert_array_equal(yr.numpy(), y[33:471])


# spawn: each worker starts an interpreter and imports torch (seconds): the system tier
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.system)])
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_dataloader_workers_read_the_same_bytes(tmp_path, kind, context):
    x, y = _arrays(1000, (3, 4, 4), np.uint8, (), np.int64)
    spec = _spec(kind, tmp_path)
    save_store(spec, {"train": (x, y)}, chunk_rows=64)
    ds = open_store(spec)["train"]
    expected = [ds.read(k * 37, (k + 1) * 37) for k in range(len(Batches(ds, 37, "_x._pid")))]  # parent holds a handle
    loader = DataLoader(Batches(ds, 37, "_x._pid"), batch_size=None, num_workers=2, multiprocessing_context=context)
    got = list(loader)
    assert len(got) == len(expected) == 28
    for (gx, gy, pid, handle_pid), (ex, ey) in zip(got, expected):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)
        assert pid != os.getpid() and handle_pid == pid  # each worker opened its own handle
    assert len({g[2] for g in got}) == 2
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.read(0, 1000)[0], torch.from_numpy(x)) and clone.fingerprint() == ds.fingerprint()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_fingerprint_samples_rows(tmp_path, kind):
    x, y = _arrays(1000, (6,), np.float32, (), np.int64)
    fp = {}
    for name, (xs, ys) in {"a": (x, y), "b": (x, y)}.items():
        save_store(_spec(kind, tmp_path, name), {"train": (xs, ys)})
        fp[name] = open_store(_spec(kind, tmp_path, name))["train"].fingerprint()
    assert fp["a"] == fp["b"] and len(fp["a"]) == 64

    def changed(name, row, target="x"):
        xs, ys = x.copy(), y.copy()
        if target == "x":
            xs[row, 2] += 1
        else:
            ys[row] += 1
        save_store(_spec(kind, tmp_path, name), {"train": (xs, ys)})
        return open_store(_spec(kind, tmp_path, name))["train"].fingerprint()

    assert changed("first", 0) != fp["a"]
    assert changed("last", 999) != fp["a"]
    assert changed("middle", 16) != fp["a"]          # an evenly spaced sample row (999 * 1/63, rounded)
    assert changed("label", 999, "y") != fp["a"]
    assert changed("unsampled", 1) == fp["a"]        # documented: not a hash of every byte
    assert changed("more", 0) == changed("more2", 0)
    xs = x[:999]
    save_store(_spec(kind, tmp_path, "shorter"), {"train": (xs, y[:999])})
    assert open_store(_spec(kind, tmp_path, "shorter"))["train"].fingerprint() != fp["a"]


# --- bad input: every case one UserError line naming the path --------------------------------------


def _h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key.replace("__", "/")] = value
    return f"hdf5:{path}"


def _npy(folder, **arrays):
    folder.mkdir(exist_ok=True)
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", value, allow_pickle=True)
    return f"npy:{folder}"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


X, Y = np.zeros((10, 3), np.float32), np.zeros(10, np.int64)
HEADER = b"\x93NUMPY\x01\x00"


def _truncated_h5(p):
    _h5(p, train__x=np.zeros((2000, 50)), train__y=np.zeros(2000))
    p.write_bytes(p.read_bytes()[:3000])
    return f"hdf5:{p}"


def _truncated_npy(p):
    _npy(p, train_x=X, train_y=Y)
    (p / "train_x.npy").write_bytes((p / "train_x.npy").read_bytes()[:-8])
    return f"npy:{p}"


BAD = [
    ("h5-missing", lambda p: f"hdf5:{p / 'nope.h5'}", "does not exist"),
    ("h5-not-hdf5", lambda p: f"hdf5:{_write(p / 'a.h5', b'hello, not hdf5')}", "not an HDF5 file"),
    ("h5-directory", lambda p: f"hdf5:{p}", "is a directory"),
    ("h5-truncated", lambda p: _truncated_h5(p / "t.h5"), "cannot read"),
    ("h5-no-groups", lambda p: _h5(p / "a.h5", other__x=X, other__y=Y), "no train or test group"),
    ("h5-not-group", lambda p: _h5(p / "a.h5", train=X), "/train is not a group"),
    ("h5-no-y", lambda p: _h5(p / "a.h5", train__x=X), "no dataset 'y'"),
    ("h5-no-x", lambda p: _h5(p / "a.h5", test__y=Y), "no dataset 'x'"),
    ("h5-lengths", lambda p: _h5(p / "a.h5", train__x=X, train__y=Y[:9]), "x has 10 rows but y has 9"),
    ("h5-empty", lambda p: _h5(p / "a.h5", train__x=X[:0], train__y=Y[:0]), "empty (0 rows)"),
    ("h5-y-3d", lambda p: _h5(p / "a.h5", train__x=X, train__y=np.zeros((10, 2, 2))), "1-D (labels) or 2-D"),
    ("h5-scalar", lambda p: _h5(p / "a.h5", train__x=np.float32(1), train__y=Y), "scalar"),
    ("h5-strings", lambda p: _h5(p / "a.h5", train__x=X, train__y=np.array(["a"] * 10, dtype=object)),
     "object dtype"),
    ("npy-missing", lambda p: f"npy:{p / 'nope'}", "does not exist"),
    ("npy-file", lambda p: f"npy:{_write(p / 'x.npy', b'')}", "is not a directory"),
    ("npy-no-files", lambda p: _npy(p / "d"), "no train_x.npy"),
    ("npy-no-y", lambda p: _npy(p / "d", train_x=X), "train_y.npy is missing"),
    ("npy-no-x", lambda p: _npy(p / "d", test_y=Y), "test_x.npy is missing"),
    ("npy-not-npy", lambda p: _write_pair(p, b"PK\x03\x04 a zip"), "train_x.npy: not a valid .npy file"),
    ("npy-bad-header", lambda p: _write_pair(p, HEADER + b"\x10\x00{'descr': '<f4', 'shape': (}  \n"),
     "train_x.npy: not a valid .npy file"),
    ("npy-short-header", lambda p: _write_pair(p, HEADER), "train_x.npy: not a valid .npy file"),
    ("npy-version", lambda p: _write_pair(p, b"\x93NUMPY\x03\x00" + b"\x00" * 64), "version (3, 0)"),
    ("npy-fortran", lambda p: _npy(p / "d", train_x=np.asfortranarray(np.zeros((10, 3))), train_y=Y),
     "train_x.npy: Fortran"),
    ("npy-object", lambda p: _npy(p / "d", train_x=np.array([{}] * 10, dtype=object), train_y=Y),
     "train_x.npy: object arrays"),
    ("npy-truncated", lambda p: _truncated_npy(p / "d"), "train_x.npy: truncated"),
    ("npy-lengths", lambda p: _npy(p / "d", train_x=X[:4], train_y=Y), "x has 4 rows but y has 10"),
    ("npy-empty", lambda p: _npy(p / "d", test_x=X[:0], test_y=Y[:0]), "test split is empty"),
    ("npy-y-3d", lambda p: _npy(p / "d", train_x=X, train_y=np.zeros((10, 1, 1))), "must be 1-D"),
    ("npy-strings", lambda p: _npy(p / "d", train_x=np.array(["ab"] * 10), train_y=Y), "torch cannot hold"),
    ("bad-kind", lambda p: f"zip:{p}", "expected hdf5:PATH or npy:DIR"),
]


def _write_pair(p, x_bytes: bytes) -> str:
    (p / "d").mkdir()
    _write(p / "d" / "train_x.npy", x_bytes)
    np.save(p / "d" / "train_y.npy", Y)
    return f"npy:{p / 'd'}"


@pytest.mark.parametrize("case,build,needle", BAD, ids=[c[0] for c in BAD])
def test_bad_store_is_one_line_user_error(tmp_path, case, build, needle):
    spec = build(tmp_path)
    with pytest.raises(UserError) as info:
        open_store(spec)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg and str(tmp_path) in msg, msg


def test_save_store_refuses_bad_splits(tmp_path):
    with pytest.raises(UserError, match="unknown split 'val'"):
        save_store(f"npy:{tmp_path}", {"val": (X, Y)})
    with pytest.raises(UserError, match="x has 10 rows but y has 9"):
        save_store(f"hdf5:{tmp_path / 'a.h5'}", {"train": (X, Y[:9])})
    assert not list(tmp_path.iterdir())  # nothing half-written


# --- memory: a 1 GiB store read whole in batches keeps resident memory near one batch ----------------

BIG_ROWS, WIDTH, CHUNK, BATCH = 262_144, 1024, 16_384, 4096  # 1 GiB of float32 x

READER = """
import json, sys
import numpy as np
import torch
from lsurf.engine.data.stores import open_store
kind, target, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "control":  # the naive memory map, to prove the measurement sees mapped pages
    x, y = np.load(target + "/train_x.npy", mmap_mode="r"), np.load(target + "/train_y.npy", mmap_mode="r")
    read, n = (lambda s, e: (torch.from_numpy(np.array(x[s:e])), torch.from_numpy(np.array(y[s:e])))), len(x)
else:
    ds = open_store(target)["train"]
    read, n = ds.read, len(ds)
total, labels = 0.0, 0
for s in range(0, n, batch):
    xb, yb = read(s, s + batch)
    total += float(xb.numpy().sum(dtype=np.float64))
    labels += int(yb.sum())
# VmHWM, the peak of this process image: ru_maxrss would carry the forking parent's peak across exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"sum": total, "labels": labels, "maxrss_kib": hwm}))
"""


def _write_big(folder, h5_path, rows: int) -> tuple[float, int]:
    """Both formats, CHUNK rows at a time (the writer never holds the whole array either): x small
    integers as float32, so the float64 sum is exact in any order; returns the sums of x and y."""
    folder.mkdir()
    fmt = np.lib.format
    fmt.open_memmap(folder / "train_x.npy", mode="w+", dtype=np.float32, shape=(rows, WIDTH))  # header, sized file
    y = np.arange(rows, dtype=np.int64) % 10
    np.save(folder / "train_y.npy", y)
    rng, total = np.random.default_rng(0), 0.0
    with h5py.File(h5_path, "w") as f:
        f["train/y"] = y
        dx = f.create_dataset("train/x", shape=(rows, WIDTH), dtype=np.float32, chunks=(1024, WIDTH))
        for s in range(0, rows, CHUNK):
            chunk = rng.integers(-8, 8, size=(min(CHUNK, rows - s), WIDTH), dtype=np.int8).astype(np.float32)
            total += float(chunk.sum(dtype=np.float64))
            mm = fmt.open_memmap(folder / "train_x.npy", mode="r+")  # mapped per chunk, unmapped after
            mm[s : s + len(chunk)] = chunk
            mm.flush()
            del mm
            dx[s : s + len(chunk)] = chunk
    return total, int(y.sum())


def _peak(kind: str, target) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", READER, kind, str(target), str(BATCH)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.system
def test_reading_a_1gib_store_keeps_memory_near_one_batch(tmp_path):
    if shutil.disk_usage(tmp_path).free < 4 << 30:
        pytest.skip("needs 4 GiB free under the temporary directory")
    try:
        _measure(tmp_path)
    finally:  # pytest keeps recent temporary directories: do not leave 2 GiB behind
        shutil.rmtree(tmp_path / "big", ignore_errors=True)
        (tmp_path / "big.h5").unlink(missing_ok=True)


def _measure(tmp_path) -> None:
    t0 = time.time()
    sums = {"tiny": _write_big(tmp_path / "tiny", tmp_path / "tiny.h5", BATCH),
            "big": _write_big(tmp_path / "big", tmp_path / "big.h5", BIG_ROWS)}
    assert (tmp_path / "big" / "train_x.npy").stat().st_size > 1 << 30
    peaks = {}
    for size in ("tiny", "big"):
        for kind, target in (("npy", f"npy:{tmp_path / size}"), ("hdf5", f"hdf5:{tmp_path / size}.h5")):
            out = _peak(kind, target)
            assert (out["sum"], out["labels"]) == sums[size], (kind, size)
            peaks[kind, size] = out["maxrss_kib"] // 1024
    control = _peak("control", tmp_path / "big")["maxrss_kib"] // 1024
    print(f"peak RSS MiB {peaks}, naive mmap {control}, {time.time() - t0:.1f} s")
    for kind in STORE_KINDS:
        assert peaks[kind, "big"] < peaks[kind, "tiny"] + 200, peaks
    assert control > peaks["npy", "tiny"] + 700, (control, peaks)  # the measurement does see mapped pages
