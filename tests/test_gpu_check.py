"""jobs/gpu_check.sh, the first run on a GPU node, checked here without one: its ``--cpu`` mode runs
every step that can run on the CPU and reports each; without ``--cpu`` (or with a Python that lacks
torch) it stops at once with one line; a skipped CUDA test is a failed step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, _env

pytestmark = pytest.mark.system
SCRIPT = REPO / "jobs" / "gpu_check.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a node without CUDA is told")


def gpu_check(*args, python: str = sys.executable, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_env({"LSURF_PYTHON": python}))


def steps() -> dict[str, bool]:
    """{step: needs CUDA}, as ``--list`` gives them."""
    lines = gpu_check("--list", timeout=60).stdout.splitlines()
    return {line.split()[0]: "(CUDA)" in line for line in lines}


def summary(out) -> dict[str, tuple[str, str]]:
    rows = [line.split(maxsplit=2) + [""] for line in (out / "summary.txt").read_text().splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows}


def test_cpu_mode_runs_every_step_it_can_and_reports_each(tmp_path):
    p = gpu_check("--cpu", "--out", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    got, expected = summary(tmp_path), steps()
    assert list(got) == list(expected)
    for name, cuda_only in expected.items():
        assert got[name][0] == ("skipped" if cuda_only else "ok"), (name, got[name])
    assert all(why == "(--cpu): needs CUDA" for name, (_, why) in got.items() if expected[name])
    figures = json.loads((tmp_path / "numbers.json").read_text())
    assert figures["mode"] == "cpu" and set(figures["steps"]) == set(expected)
    head = figures["steps"]["headline_ieee"]["numbers"]
    assert head["images"] == 128 + 25 and head["seconds_per_point"] > 0 and head["K"] >= 1 and head["peak_gib"] > 0
    assert max(figures["steps"]["stacked"]["numbers"]["rel_loss"].values()) < 2e-2
    assert figures["steps"]["cli"]["numbers"]["checks"]["resident never = always"] == "ok (bit for bit)"
    assert all((tmp_path / "logs" / f"{name}.log").exists() for name, cuda in expected.items() if not cuda)


@no_cuda
def test_without_cuda_the_check_stops_in_one_line(tmp_path):
    p = gpu_check("--out", tmp_path, timeout=90)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: no CUDA device") and "--cpu" in lines[0], lines
    got = summary(tmp_path)
    assert got["preflight"][0] == "FAILED"
    assert all(status == "skipped" and why == "not run: the preflight failed"
               for name, (status, why) in got.items() if name != "preflight")


def test_a_python_without_torch_is_one_line(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True, timeout=120)
    p = gpu_check("--cpu", "--out", tmp_path / "out", python=tmp_path / "bare" / "bin" / "python", timeout=90)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import" in lines[0] and "LSURF_PYTHON" in lines[0], lines
    p = gpu_check("--cpu", python="/nonexistent/python", timeout=30)
    assert p.returncode == 2 and p.stderr.strip() == \
        "gpu_check: error: LSURF_PYTHON=/nonexistent/python is not a Python 3.10 or later", p.stderr


@no_cuda
def test_a_skipped_cuda_test_fails_the_step(tmp_path):
    subprocess.run([sys.executable, REPO / "jobs" / "gpu_check.py", "--step", "cuda_tests", "--out", tmp_path],
                   check=True, timeout=300, env=_env(), capture_output=True)
    result = json.loads((tmp_path / "steps" / "cuda_tests.json").read_text())
    assert result["status"] == "FAILED", result
    assert result["numbers"]["skipped"] and all("needs a CUDA device" in s for s in result["numbers"]["skipped"])
    assert "did not run on the GPU" in result["why"]


def test_junit_counts_tell_a_skipped_test_from_a_module_not_collected(tmp_path):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        from gpu_check_steps import junit_counts
    finally:
        sys.path.remove(str(REPO / "jobs"))
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="" name="tests.test_vtk"><skipped message="collection skipped">no vtk</skipped></testcase>'
        '<testcase classname="tests.test_g" name="test_a"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="tests.test_g" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_g" name="test_c"><error message="fixture"/></testcase>'
        '<testcase classname="tests.test_g" name="test_d"/></testsuite></testsuites>')
    assert junit_counts(tmp_path / "r.xml") == {"passed": 1, "failed": ["test_b", "test_c"],
                                                "skipped": ["test_a: needs a CUDA device"],
                                                "not_collected": ["tests.test_vtk"]}
