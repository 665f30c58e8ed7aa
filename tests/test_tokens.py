"""Flat token files (``tokens:PATH``): windows equal to an independent numpy slicing, reads in
DataLoader workers and after pickling, sampled fingerprints, max_token, one-line errors, and
resident memory that does not grow with the file."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import Batches
from torch.utils.data import DataLoader

from lsurf import UserError
from lsurf.engine.data import tokens as tokens_mod
from lsurf.engine.data.tokens import TOKEN_DTYPES, open_tokens


def _write(path, values, dtype=np.uint16) -> np.ndarray:
    a = np.asarray(values).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    a.tofile(path)
    return a.astype(np.int64)


def _expected(tok: np.ndarray, t: int, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows, computed independently: x = tok[i*T:(i+1)*T], y the same shifted by one."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    x = np.stack([tok[i * t : (i + 1) * t] for i in idx]) if len(idx) else np.zeros((0, t), np.int64)
    y = np.stack([tok[i * t + 1 : (i + 1) * t + 1] for i in idx]) if len(idx) else np.zeros((0, t), np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _same(got, want) -> None:
    for g, w in zip(got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("n, t", [(1001, 10), (1000, 10), (11, 10), (2, 1), (5000, 7)])
def test_windows_match_numpy(tmp_path, n, t):
    rng = np.random.default_rng(n + t)
    tok = _write(tmp_path / "d" / "train.bin", rng.integers(0, 50_000, n))
    ds = open_tokens(f"tokens:{tmp_path / 'd'}", t)["train"]
    assert set(open_tokens(f"tokens:{tmp_path / 'd'}", t)) == {"train"}
    assert len(ds) == (n - 1) // t
    m = len(ds)
    _same(ds.read(0, m), _expected(tok, t, range(m)))
    _same(ds.read(m // 3, m // 2 + 1), _expected(tok, t, range(m // 3, m // 2 + 1)))
    _same(ds.read(m - 1, m + 50), _expected(tok, t, [m - 1]))  # slice semantics past the end
    _same(ds.read(3, 3), _expected(tok, t, []))
    idx = np.unique(rng.integers(0, m, max(1, m // 4)))
    _same(ds.read_rows(idx), _expected(tok, t, idx))
    _same(ds.read_rows(idx[::-1]), _expected(tok, t, idx[::-1]))  # any order and repeats work too
    _same(ds.read_rows(np.array([0, 0, m - 1])), _expected(tok, t, [0, 0, m - 1]))
    for i in {0, m // 2, m - 1}:
        _same(ds[i], tuple(e[0] for e in _expected(tok, t, [i])))
    _same(ds[-1], tuple(e[0] for e in _expected(tok, t, [m - 1])))
    with pytest.raises(IndexError):
        ds[m]
    with pytest.raises(IndexError):
        ds.read_rows(np.array([m]))


def test_read_rows_in_small_pieces(tmp_path, monkeypatch):
    """Scattered reads split into many pieces (a tiny budget) still gather the right windows."""
    monkeypatch.setattr(tokens_mod, "_BUDGET", 1)
    tok = _write(tmp_path / "one.bin", np.arange(100_000) % 65_536)
    ds = open_tokens(f"tokens:{tmp_path / 'one.bin'}", 33)["train"]
    idx = np.sort(np.random.default_rng(0).choice(len(ds), 500, replace=False))
    _same(ds.read_rows(idx), _expected(tok, 33, idx))


def test_uint32_val_and_test_names_and_single_file(tmp_path):
    d = tmp_path / "corpus"
    train = _write(d / "train.bin", np.arange(70_000, 70_000 + 4097), np.uint32)
    val = _write(d / "val.bin", np.arange(100_000, 100_000 + 257) * 3, np.uint32)
    _write(d / "test.bin", np.arange(300), np.uint32)
    splits = open_tokens(f"tokens:{d}:uint32", 64)
    assert set(splits) == {"train", "test"}
    assert splits["test"].path.name == "val.bin"  # nanoGPT's name is preferred
    _same(splits["train"].read(0, 64), _expected(train, 64, range(64)))
    _same(splits["test"].read(0, 4), _expected(val, 64, range(4)))
    assert int(splits["train"].read(0, 1)[0].max()) > 65_535
    assert splits["train"].max_token() == 70_000 + 4096

    (d / "val.bin").unlink()
    only_test = open_tokens(f"tokens:{d}:uint32", 64)
    assert only_test["test"].path.name == "test.bin" and len(only_test["test"]) == 299 // 64
    (d / "train.bin").unlink()
    assert set(open_tokens(f"tokens:{d}:uint32", 64)) == {"test"}

    single = tmp_path / "tok.bin"
    tok = _write(single, np.arange(1000) * 7)
    assert set(open_tokens(f"tokens:{single}", 16)) == {"train"}
    assert set(open_tokens(f"tokens:{single}:uint16", 16)) == {"train"}
    _same(open_tokens(f"tokens:{single}", 16)["train"].read(0, 62), _expected(tok, 16, range(62)))
    # uint16 bytes read as uint32: half as many tokens, each two ids glued together
    assert open_tokens(f"tokens:{single}:uint32", 16)["train"].n_tokens == 500
    assert TOKEN_DTYPES == ("uint16", "uint32")


def test_colons_in_the_path(tmp_path):
    d = tmp_path / "a:b"
    tok = _write(d / "train.bin", np.arange(50))
    _same(open_tokens(f"tokens:{d}", 7)["train"].read(0, 7), _expected(tok, 7, range(7)))
    _same(open_tokens(f"tokens:{d}:uint16", 7)["train"].read(0, 7), _expected(tok, 7, range(7)))


# spawn: each worker starts an interpreter and imports torch (seconds): the system tier
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.system)])
def test_dataloader_workers_and_pickle(tmp_path, context):
    _write(tmp_path / "train.bin", np.arange(20_001) % 50_257)
    ds = open_tokens(f"tokens:{tmp_path / 'train.bin'}", 50)["train"]
    expected = [ds.read(k * 37, (k + 1) * 37) for k in range(len(Batches(ds, 37, "_pid")))]  # parent holds a map
    loader = DataLoader(Batches(ds, 37, "_pid"), batch_size=None, num_workers=2, multiprocessing_context=context)
    got = list(loader)
    assert len(got) == len(expected) == 11
    for (gx, gy, pid, map_pid), (ex, ey) in zip(got, expected):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)
        assert pid != os.getpid() and map_pid == pid  # each worker mapped the file itself
    assert len({g[2] for g in got}) == 2

    items = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    x, y = map(torch.cat, zip(*items))
    _same((x, y), ds.read(0, len(ds)))

    ds.max_token()
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handle is None
    _same(clone.read(0, len(ds)), ds.read(0, len(ds)))
    assert clone.fingerprint() == ds.fingerprint() and clone.max_token() == ds.max_token()


def test_fingerprint_samples_windows(tmp_path):
    base = np.random.default_rng(1).integers(0, 50_000, 100_001)

    def fp(name, values, t=128, dtype=np.uint16):
        _write(tmp_path / name, values, dtype)
        return open_tokens(f"tokens:{tmp_path / name}{':uint32' if dtype == np.uint32 else ''}", t)["train"]

    a = fp("a.bin", base)
    assert a.fingerprint() == fp("b.bin", base).fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 64
    assert fp("b.bin", base, t=64).fingerprint() != a.fingerprint()
    last = 128 * len(a)  # the last window's last target token
    for pos, differs in ((0, True), (5, True), (128 * 384 + 17, True), (last, True),
                         (128 * 390 + 17, False), (last + 1, False)):
        changed = base.copy()
        changed[pos] += 1
        # sampled windows (384 is one, 390 not: the file is never read whole) and never the tail past the last window
        assert (fp("c.bin", changed).fingerprint() != a.fingerprint()) == differs, pos
    assert fp("d.bin", base[:-1]).fingerprint() != a.fingerprint()  # one token fewer
    assert fp("e.bin", base, dtype=np.uint32).fingerprint() != a.fingerprint()


def test_max_token_scans_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "_SCAN_BYTES", 4096)
    values = np.arange(50_000) % 1000
    values[-3] = 65_000
    ds = open_tokens(f"tokens:{_path(tmp_path, 'big.bin', values)}", 16)["train"]
    assert ds.max_token() == 65_000
    (tmp_path / "big.bin").unlink()  # cached: no second scan
    assert ds.max_token() == 65_000
    small = open_tokens(f"tokens:{_path(tmp_path, 'small.bin', [3, 1, 2])}", 1)["train"]
    assert small.max_token() == 3


def _path(tmp_path, name, values, dtype=np.uint16):
    _write(tmp_path / name, values, dtype)
    return tmp_path / name


def _bad_cases(tmp_path):
    """(spec, seq_len, message fragment) for each bad input."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty").mkdir()
    (d / "odd.bin").write_bytes(b"\0" * 1001)
    (d / "six.bin").write_bytes(b"\0" * 6)
    (d / "one.bin").write_bytes(b"\0\0")
    (d / "none.bin").write_bytes(b"")
    (d / "short").mkdir()
    _write(d / "short" / "train.bin", np.arange(300))
    _write(d / "valshort" / "train.bin", np.arange(3000))
    _write(d / "valshort" / "val.bin", np.arange(100))
    _write(d / "ok.bin", np.arange(300))
    return [
        (f"tokens:{d / 'missing'}", 8, "does not exist"),
        (f"tokens:{d / 'missing'}:uint32", 8, "does not exist"),
        (f"tokens:{d / 'ok.bin'}:int64", 8, "does not exist"),  # not a dtype: part of the path
        (f"tokens:{d / 'empty'}", 8, "has no train.bin, val.bin or test.bin"),
        (f"tokens:{d / 'odd.bin'}", 8, "is 1001 bytes, not a whole number of uint16 tokens \\(2 bytes each\\)"),
        (f"tokens:{d / 'six.bin'}:uint32", 8, "is 6 bytes, not a whole number of uint32 tokens \\(4 bytes each\\)"),
        (f"tokens:{d / 'one.bin'}", 1, "holds 1 uint16 token; it needs at least 2"),
        (f"tokens:{d / 'none.bin'}", 1, "holds 0 uint16 tokens; it needs at least 2"),
        (f"tokens:{d / 'ok.bin'}", None, "needs `seq_len` \\(the window length in tokens\\)"),
        (f"tokens:{d / 'ok.bin'}", 0, "`seq_len` 0 must be at least 1"),
        (f"tokens:{d / 'ok.bin'}", -3, "`seq_len` -3 must be at least 1"),
        (f"tokens:{d / 'ok.bin'}", 2.5, "`seq_len` 2.5 must be a whole number"),
        (f"tokens:{d / 'ok.bin'}", True, "`seq_len` True must be a whole number"),
        (f"tokens:{d / 'ok.bin'}", 300, "`seq_len` 300 is longer than the train split of .* \\(300 tokens"),
        (f"tokens:{d / 'short'}", 512, "`seq_len` 512 is longer than the train split of .* \\(300 tokens"),
        (f"tokens:{d / 'valshort'}", 100, "`seq_len` 100 is longer than the test split of .* \\(100 tokens"),
        ("tokens:", 8, "expected tokens:PATH"),
        ("tokens::uint32", 8, "no path before :uint32"),
        ("npy:/x", 8, "expected tokens:PATH"),
    ]


def test_bad_input_is_one_line_user_error(tmp_path):
    for spec, seq_len, needle in _bad_cases(tmp_path):
        with pytest.raises(UserError, match=needle) as info:
            open_tokens(spec, seq_len)
        msg = str(info.value)
        assert "\n" not in msg and spec in msg, (spec, msg)
        if "`seq_len`" in msg:
            assert info.value.params[0] == "seq_len"
    assert len(open_tokens(f"tokens:{tmp_path / 'bad' / 'ok.bin'}", 299)["train"]) == 1  # the longest that fits


def test_file_shrunk_after_open_is_user_error(tmp_path):
    path = _path(tmp_path, "t.bin", np.arange(1000))
    ds = open_tokens(f"tokens:{path}", 10)["train"]
    _write(path, np.arange(10))
    with pytest.raises(UserError, match="shrank to 20 bytes"):
        ds.read(0, 1)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_reading_a_64mb_file_keeps_resident_memory_flat(tmp_path):
    """Every window of a 64 MiB file, in batches and as a scattered subset: resident memory grows by
    far less than the file (the naive memory map, the control, grows by about the whole file)."""
    path = tmp_path / "big.bin"
    n = 32 << 20  # uint16 tokens: 64 MiB
    chunk = 1 << 22
    with open(path, "wb") as f:
        for s in range(0, n, chunk):
            (np.arange(s, s + chunk) % 50_000).astype(np.uint16).tofile(f)
    t, batch = 1024, 256
    ds = open_tokens(f"tokens:{path}", t)["train"]
    ds.read(0, batch)  # warm up allocator and torch before the baseline
    before = _rss_kib()
    total = 0
    for s in range(0, len(ds), batch):
        x, y = ds.read(s, s + batch)
        total += int(x[:, 0].sum())
    x, y = ds.read_rows(np.arange(0, len(ds), 16))
    del x, y
    assert ds.max_token() == 49_999
    grown = (_rss_kib() - before) >> 10
    assert total == sum((i * t) % 50_000 for i in range(len(ds)))
    print(f"resident memory grew by {grown} MiB")
    assert grown < 16, f"resident memory grew by {grown} MiB reading a 64 MiB file"

    control = np.memmap(path, dtype=np.uint16, mode="r")
    before = _rss_kib()
    for s in range(0, n, batch * t):
        np.array(control[s : s + batch * t])
    assert (_rss_kib() - before) >> 10 > 48  # the measurement does see mapped pages
    del control
