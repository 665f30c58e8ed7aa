"""Every process of a job imports the command line first: what it imports is paid once per rank,
per command, per test. Libraries only some commands need are imported where they are used."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import _env

LATE = ("matplotlib", "torch.distributed.fsdp", "torch.distributed.tensor", "transformers", "sklearn")


@pytest.mark.cli
def test_the_command_line_imports_no_plotting_sharding_or_optional_library():
    code = f"import sys, lsurf.cli.main, lsurf.run.sampler; print([m for m in {LATE!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
