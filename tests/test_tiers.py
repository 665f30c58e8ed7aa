"""The fast tier's own check, run on a throwaway suite with this conftest: an unmarked test over
the limit of CPU time fails, one that only waits (a loaded machine's wall clock) does not, and a
tier marker lets a slow test through."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, _env

pytestmark = pytest.mark.system

SUITE = '''
import time
import pytest

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def test_waits():
    time.sleep(1.5)

def test_burns():
    burn(1.0)

@pytest.mark.cli
def test_burns_in_its_tier():
    burn(1.0)
'''


def test_the_limit_counts_cpu_not_waiting(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = _env({"LSURF_FAST_TIER_LIMIT_S": "0.5", "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"})
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "", "-p", "no:cacheprovider", "-rf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert "1 failed, 2 passed" in p.stdout, p.stdout + p.stderr
    assert "test_burns: its call took 1.0 s of CPU, over the fast tier's 0.5 s" in p.stdout, p.stdout
