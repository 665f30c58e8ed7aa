"""A user's own geometry (``geometry`` ``pkg.module:factory``, or the object through
``sample_geometry``): its points through the one runner against closed forms and independent
evaluations, the same on every path and rank count, recorded and resumed, and every way a
geometry can be wrong refused in one line before any file is written."""

from __future__ import annotations

import json
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, D, lsurf, mpirun, requires_mpi

import lsurf as api
from lsurf.errors import UserError
from lsurf.post.plot import figures


class Plane:
    """The plane of ``dirs`` as a geometry: offset = a·d₁ + b·d₂ on axes named a and b."""

    def __init__(self, dirs, xs, ys=None):
        self.dirs = dirs
        self.axes = {"a": xs} if ys is None else {"a": xs, "b": ys}

    def offset(self, index):
        a = self.axes["a"][index[0]]
        if len(index) == 1:
            return [a * d for d in self.dirs.x]
        b = self.axes["b"][index[1]]
        return [a * d + b * e for d, e in zip(self.dirs.x, self.dirs.y)]

    def identity(self):
        return {"seed": 5}


def _linear(regression, two=True):
    data = api.load_data("regdata:make")
    model = api.load_model("linear", (D,), 1, regression["dir"] / "lin.pt", dtype=torch.float64)
    return model, data, api.random_directions(model, seed=5, two=two, ignore="none")


def closed_form(r, dx, dy, xs, ys):
    out = np.empty((len(ys), len(xs)))
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            w = r["w0"] + a * dx[0] + b * dy[0]
            out[j, i] = np.mean((r["x"] @ w.T + r["b0"] + a * dx[1] + b * dy[1] - r["y"][:, None]) ** 2)
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_a_plane_given_as_a_geometry_is_its_closed_form(k, regression, tmp_path):
    model, data, dirs = _linear(regression)
    xs, ys = np.array([-1.0, -0.2, 0.5, 1.5]), np.array([-0.5, 0.0, 0.7])  # not evenly spaced
    surface = api.sample_geometry(model, data, Plane(dirs, xs, ys), tmp_path / "g.h5", loss="mse",
                                  dtype=torch.float64, points_per_pass=k, progress=False)
    dx, dy = [t.numpy() for t in dirs.x], [t.numpy() for t in dirs.y]
    np.testing.assert_allclose(surface.values["train_loss"], closed_form(regression, dx, dy, xs, ys),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(surface.x, xs)
    np.testing.assert_array_equal(surface.y, ys)
    assert json.loads(surface.attrs["axis_names"]) == ["a", "b"]
    identity = json.loads(surface.attrs["identity"])["geometry"]
    assert identity == {"name": "test_geometry.Plane", "axes": ["a", "b"], "identity": {"seed": 5}}
    np.testing.assert_array_equal(model.net[0].weight.detach().numpy(), regression["w0"])  # θ* back


def test_a_geometry_equals_the_plane_it_describes(regression, tmp_path):
    """The same plane sampled as a plane (fused α·d₁ + β·d₂) and as offsets: equal to 1e-12."""
    model, data, dirs = _linear(regression)
    grid = api.Grid.parse("-1:1:5", "-1:1:3")
    plane = api.sample_surface(model, data, dirs, grid, tmp_path / "p.h5", loss="mse", dtype=torch.float64,
                               progress=False)
    geo = api.sample_geometry(model, data, Plane(dirs, grid.x, grid.y), tmp_path / "g.h5", loss="mse",
                              dtype=torch.float64, progress=False)
    for name in ("train_loss", "train_loss_stderr"):
        np.testing.assert_allclose(geo.values[name], plane.values[name], rtol=1e-12, atol=1e-14)


def test_a_geometry_resumes_and_refuses_another(regression, tmp_path):
    model, data, dirs = _linear(regression, two=False)
    out, xs = tmp_path / "g.h5", np.linspace(-1, 1, 4)
    run = lambda g: api.sample_geometry(model, data, g, out, loss="mse", dtype=torch.float64,  # noqa: E731
                                        progress=False)
    first = run(Plane(dirs, xs))
    with h5py.File(out, "r+") as f:  # as if the run had stopped after two points
        f["done"][2:] = 0
        f["train_loss"][2:] = np.nan
    resumed = run(Plane(dirs, xs))
    np.testing.assert_array_equal(resumed.values["train_loss"], first.values["train_loss"])
    other = Plane(dirs, xs)
    other.identity = lambda: {"seed": 6}
    before = out.read_bytes()
    with pytest.raises(UserError, match="another geometry"):
        run(other)
    assert out.read_bytes() == before


class Broken(Plane):
    pass


def _broken(dirs, case):
    g = Broken(dirs, np.linspace(-1, 1, 3))
    if case == "no-axes":
        del g.axes
    elif case == "empty":
        g.axes = {}
    elif case == "four-axes":
        g.axes = {n: np.arange(2.0) for n in "pqrs"}
    elif case == "decreasing":
        g.axes = {"a": np.array([1.0, 0.0])}
    elif case == "count":
        g.offset = lambda index: [dirs.x[0]]
    elif case == "shape":
        g.offset = lambda index: [d.reshape(d.shape[::-1]) for d in dirs.x]
    elif case == "raises":
        g.offset = lambda index: 1 / 0
    elif case == "identity":
        g.identity = lambda: {"when": object()}
    return g


BAD = {
    "no-axes": "has no 'axes'",
    "empty": "axes must be a dict of 1 to 3 named axes; it has 0",
    "four-axes": "axes must be a dict of 1 to 3 named axes; it has 4",
    "decreasing": "axis 'a' must be a non-empty, finite, increasing 1-D sequence",
    "count": "offset(0,) gave 1 tensors; the model has 2 parameters",
    "shape": "offset(0,) tensor 0 is (5, 1) torch.float64; parameter 0 is (1, 5) floating point",
    "raises": "offset raised ZeroDivisionError: division by zero",
    "identity": "identity() must return a JSON-able dict",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_geometry_is_one_line_before_any_file(case, regression, tmp_path):
    model, data, dirs = _linear(regression, two=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        api.sample_geometry(model, data, _broken(dirs, case), tmp_path / "g.h5", loss="mse", dtype=torch.float64,
                            progress=False)
    assert BAD[case] in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "test_geometry.Broken" in str(e.value)
    assert not list(tmp_path.glob("g*"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Cube(Plane):
    """Three axes: a·d₁ + b·d₂ + c·d₃ (a third random direction)."""

    def __init__(self, dirs, third, xs, ys, zs):
        super().__init__(dirs, xs, ys)
        self.third = third
        self.axes = {**self.axes, "c": zs}

    def offset(self, index):
        c = self.axes["c"][index[2]]
        return [d + c * e for d, e in zip(super().offset(index[:2]), self.third.x)]


def test_three_axes_are_planes_of_the_third_and_slice(regression, tmp_path):
    model, data, dirs = _linear(regression)
    third = api.random_directions(model, seed=9, two=False, ignore="none")
    xs, ys, zs = np.linspace(-1, 1, 3), np.array([-0.5, 0.5]), np.array([0.0, 0.3, 1.0, 2.5])
    out = tmp_path / "g.h5"
    surface = api.sample_geometry(model, data, Cube(dirs, third, xs, ys, zs), out, loss="mse", dtype=torch.float64,
                                  points_per_pass=2, progress=False)
    dx, dy, dz = ([t.numpy() for t in d] for d in (dirs.x, dirs.y, third.x))
    assert surface.values["train_loss"].shape == (4, 2, 3)
    for k, c in enumerate(zs):
        shifted = {**regression, "w0": regression["w0"] + c * dz[0], "b0": regression["b0"] + c * dz[1]}
        np.testing.assert_allclose(surface.values["train_loss"][k], closed_form(shifted, dx, dy, xs, ys),
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(surface.z, zs)
    cut = api.read_surface(out).slice("c=1.1")  # the nearest: c = 1
    assert cut.axis_names == ["a", "b"] and cut.third_axis is None
    np.testing.assert_array_equal(cut.values["train_loss"], surface.values["train_loss"][2])
    assert list(figures(cut, "train_loss", ("contour",)))  # a slice draws as any plane; the whole grid does not
    with pytest.raises(UserError, match="a picture takes one plane: pick one with `slice` c=VALUE"):
        figures(surface, "train_loss")
    with pytest.raises(UserError, match="expected c=VALUE"):
        surface.slice("z=1")
    with pytest.raises(UserError, match="pick one with `slice` c=VALUE"):
        surface.view("export")
    other = Cube(dirs, third, xs, ys, zs + 1)
    with pytest.raises(UserError, match="another grid"):
        api.sample_geometry(model, data, other, out, loss="mse", dtype=torch.float64, progress=False)


def test_a_geometry_with_options_that_make_directions_is_refused():
    with pytest.raises(UserError, match="`geometry` m:f gives the points and their axes: it cannot be combined "
                                        "with `model2`"):
        api.Options(geometry="m:f", model2="b.pt")
    with pytest.raises(UserError, match="cannot be combined with `y`"):
        api.Options(geometry="m:f", y="-1:1:3")


def _readme_circle(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text().split("<!-- geometry-example -->")[1]
    (tmp_path / "circle.py").write_text(textwrap.dedent(text.split("```python\n")[1].split("```")[0]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "circle", raising=False)


def test_the_readme_circle_against_an_evaluation_by_hand(tmp_path, monkeypatch):
    """The README's circle.py through the plug-in loader; one point re-evaluated by hand."""
    _readme_circle(tmp_path, monkeypatch)
    options = api.Options(model="cnn", data="digits", subset=64, dtype="float64", geometry="circle:circle",
                          points_per_pass=1, out=str(tmp_path / "c.h5"), progress=False)
    surface = api.run_surface(options)
    assert surface is not None and surface.y is None and len(surface.x) == 48
    import circle

    model, data = api.load_inputs(options)  # the same model and data, loaded again
    model = model.double().eval()
    geometry = circle.circle(api.model_params(model))
    with torch.no_grad():
        for p, d in zip(model.parameters(), geometry.offset((7,))):
            p.add_(d)
        x, y = data["train"].rows(0, len(data["train"]))
        loss = torch.nn.functional.cross_entropy(model(x.double()), y).item()
    assert surface.values["train_loss"][7] == pytest.approx(loss, rel=1e-10)
    assert surface.values["train_loss"][0] == pytest.approx(surface.values["train_loss"][-1], rel=1e-9)  # 0 = 2π


@pytest.mark.cli
def test_the_flag_info_plot_and_a_bad_factory(tmp_path, monkeypatch):
    _readme_circle(tmp_path, monkeypatch)
    env = {"PYTHONPATH": str(tmp_path)}
    out = tmp_path / "c.h5"
    lsurf("surface", "--data", "digits", "--subset", "64", "--geometry", "circle:circle", "--out", out,
          "--no-progress", env=env, check=True)
    info = lsurf("info", out, check=True).stdout
    assert "angle [0, 6.28319]" in info and '"name": "circle:circle"' in info
    lsurf("plot", out, cwd=tmp_path, check=True)
    assert list(tmp_path.glob("c*.png"))
    p = lsurf("plot", out, "--slice", "angle=1")
    assert p.returncode == 2 and "has no third axis to slice (its axes: angle)" in p.stderr, p.stderr
    p = lsurf("surface", "--data", "digits", "--geometry", "circle:nothing", "--out", tmp_path / "d.h5", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "circle has no callable 'nothing'" in p.stderr
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.mpi
@requires_mpi
def test_two_ranks_and_rank_groups_equal_one_process(tmp_path, monkeypatch):
    _readme_circle(tmp_path, monkeypatch)
    args = ["surface", "--data", "digits", "--subset", "64", "--dtype", "float64", "--geometry", "circle:circle",
            "--points-per-pass", "1", "--no-progress"]
    env = {"PYTHONPATH": str(tmp_path)}
    lsurf(*args, "--out", tmp_path / "one.h5", env=env, check=True)
    mpirun(2, *args, "--out", tmp_path / "two.h5", env=env, check=True)
    mpirun(2, *args, "--ranks-per-point", "2", "--out", tmp_path / "group.h5", env=env, check=True)
    one = api.read_surface(tmp_path / "one.h5").values
    for name in ("two", "group"):
        other = api.read_surface(tmp_path / f"{name}.h5").values
        for q in ("train_loss", "train_acc"):
            np.testing.assert_allclose(other[q], one[q], rtol=1e-12, atol=1e-12)
