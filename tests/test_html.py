"""The interactive page, met the way a person meets it: Debian's Chromium opens the file from disk with
the network cut off, and the screenshot must show the 3-D surface and the contour map; the numbers
embedded in the page must equal the file's."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest
from test_plot import write_surface

from lsurf.engine.formats.surface_file import read_surface
from lsurf.errors import UserError

HAVE_PLOTLY = importlib.util.find_spec("plotly") is not None
CHROMIUM = shutil.which("chromium")
needs_plotly = pytest.mark.skipif(not HAVE_PLOTLY, reason="plotly is not installed (pip install lsurf[html])")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def _offline_prefix() -> list[str]:
    """``unshare --net`` (a network namespace with nothing in it) where this user may, else nothing:
    Chromium's own proxy flags below cut the network in any case."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net"]
    return []


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [*_offline_prefix(), CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=5000",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def embedded(page) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="lsurf-data">(.*?)</script>', text, re.S)
    assert m, "no lsurf-data block"
    return json.loads(m.group(1))


def _nulls(a) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, float).ravel()]


@pytest.fixture
def pair(tmp_path):
    x, y = np.linspace(-1, 1, 13), np.linspace(-1, 1, 11)
    X, Y = np.meshgrid(x, y)
    done = np.ones((11, 13), bool)
    done[-2:, -4:] = False  # partial: these become null in the page
    common = {"model": "cnn", "data": "digits"}
    a = write_surface(tmp_path / "A.h5", x, y, 0.1 + X**2 + 2 * Y**2, 100 - 30 * (X**2 + Y**2), done=done,
                      attrs={**common, "directions": json.dumps({"seed": 0, "norm": "filter"})})
    b = write_surface(tmp_path / "B.h5", x, y, 0.2 + 3 * X**2 + Y**2, 95 - 20 * (X**2 + Y**2),
                      attrs={**common, "directions": json.dumps({"seed": 1, "norm": "filter"})})
    return [read_surface(a), read_surface(b)]


@needs_plotly
def test_page_data_equal_the_files_and_nothing_is_fetched(pair, tmp_path):
    from lsurf.post.html import write_html

    page = write_html(pair, tmp_path / "page.html")
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", text) and "<link" not in text  # nothing to load from anywhere
    assert len(text) > 1_000_000  # plotly.js itself is inlined
    data = embedded(page)
    assert data["quantities"] == ["train_loss", "train_acc", "test_loss", "test_acc"]
    assert [s["name"] for s in data["surfaces"]] == ["A", "B"]
    for s, d in zip(pair, data["surfaces"]):
        assert d["x"] == s.x.tolist() and d["y"] == s.y.tolist()
        assert d["done"] == s.done.astype(int).tolist()
        for name, v in s.values.items():
            assert np.asarray(d["values"][name], dtype=object).shape == v.shape
            assert _nulls(np.asarray(d["values"][name], dtype=float)) == _nulls(np.where(s.done, v, np.nan))
    assert data["surfaces"][0]["values"]["train_loss"][-1][-1] is None  # not computed -> null
    assert "seed 1" in data["surfaces"][1]["provenance"]


@pytest.mark.system
@needs_plotly
@needs_chromium
def test_chromium_shows_the_surface_offline(pair, tmp_path):
    from lsurf.post.html import write_html

    page = write_html(pair, tmp_path / "page.html")
    shot = tmp_path / "page.png"
    p = chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1200,700")
    assert shot.exists(), p.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (700, 1200)
    colours = np.unique((img * 255).round().astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # not blank: shaded surface, filled contours, text
    # The 3-D surface (left, WebGL) and the contour map (right) are both drawn: coloured pixels, not the
    # page's white and plotly's grey-blue background.
    saturated = img.max(-1) - img.min(-1) > 0.25
    assert saturated[:, :600].mean() > 0.03 and saturated[:, 600:].mean() > 0.15


@pytest.mark.system
@needs_plotly
@needs_chromium
def test_selectors_switch_file_and_quantity(pair, tmp_path):
    from lsurf.post.html import write_html

    page = write_html(pair, tmp_path / "page.html")
    dom = chromium(page.as_uri() + "#surface=1&quantity=test_acc", "--dump-dom").stdout
    assert 'data-lsurf-shown="1:test_acc"' in dom  # the page's script ran to the end for that view
    assert re.search(r'<h1 id="lsurf-title">B: cnn on digits', dom)
    assert 'class="main-svg"' in dom  # plotly drew
    first = chromium(page.as_uri(), "--dump-dom").stdout
    assert 'data-lsurf-shown="0:train_loss"' in first


@pytest.mark.system
@needs_plotly
@needs_chromium
def test_curves_page(tmp_path):
    from lsurf.post.html import write_html

    x = np.linspace(-1, 1, 21)
    files = [read_surface(write_surface(tmp_path / f"c{k}.h5", x, None, 0.1 + (k + 1) * x**2, 100 - 10 * x**2))
             for k in range(2)]
    page = write_html(files, tmp_path / "curves.html", quantities=["train_loss", "test_loss"])
    data = embedded(page)
    assert data["quantities"] == ["train_loss", "test_loss"] and data["surfaces"][0]["y"] is None
    assert data["surfaces"][1]["values"]["train_loss"] == (0.1 + 2 * x**2).tolist()
    shot = tmp_path / "curves.png"
    chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1000,600")
    img = mpimg.imread(shot)[..., :3]
    assert (img.max(-1) - img.min(-1) > 0.25).mean() > 0.002  # the coloured lines are drawn
    dom = chromium(page.as_uri() + "#quantity=test_loss", "--dump-dom").stdout
    assert 'data-lsurf-shown="all:test_loss"' in dom


@needs_plotly
def test_refusals(pair, tmp_path):
    from lsurf.post.html import write_html

    line = read_surface(write_surface(tmp_path / "l.h5", np.linspace(0, 1, 3), None, np.ones(3), np.ones(3)))
    with pytest.raises(UserError, match="`surfaces` mixes 1-D and 2-D"):
        write_html([pair[0], line], tmp_path / "x.html")
    with pytest.raises(UserError, match="`quantities`: A has no 'val_loss'"):
        write_html(pair, tmp_path / "x.html", quantities=["val_loss"])
    with pytest.raises(UserError, match="`path`: folder"):
        write_html(pair, tmp_path / "nowhere" / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_without_plotly_the_error_says_how_to_get_it(pair, tmp_path, monkeypatch):
    from lsurf.post.html import write_html

    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    with pytest.raises(UserError, match=r"the HTML page needs plotly: pip install lsurf\[html\]"):
        write_html(pair, tmp_path / "x.html")
