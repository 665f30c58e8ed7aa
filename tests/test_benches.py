"""Every bench script runs: ``bench/*.py --smoke`` (tiny sizes, every code path, seconds) ends with rc 0
and prints its figures, its last line a JSON object or list. Benches are not timed in CI, so without
this a renamed import or option breaks them unseen; a new script is picked up by the glob.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, _env

BENCHES = sorted((REPO / "bench").glob("*.py"))


def test_benches_are_found() -> None:
    assert len(BENCHES) >= 7, BENCHES  # the glob still looks where the scripts are


@pytest.mark.system
@pytest.mark.mpi
@pytest.mark.parametrize("script", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_smoke(script, tmp_path) -> None:
    text = script.read_text()
    if "mpirun" in text and shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    if "import transformers" in text:
        pytest.importorskip("transformers")  # the optional lsurf[hf] extra
    p = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}))
    assert p.returncode == 0, f"{script.name} --smoke -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert len(lines) >= 2, p.stdout  # a table or summary, then the JSON line
    figures = json.loads(lines[-1])
    assert figures and isinstance(figures, (dict, list)), lines[-1]
