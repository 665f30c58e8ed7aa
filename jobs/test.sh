#!/usr/bin/env bash
# Install what is missing (idempotent) and run the whole test suite, MPI and Slurm tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/jobs/setup.sh"
# A real single-node Slurm for tests/test_slurm.py (nothing starts until a test starts it).
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "[test] apt: installing Slurm and munge for the Slurm tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
# Debian's Chromium for tests/test_html.py (opens the HTML page from disk, offline, headless).
if ! command -v chromium >/dev/null; then
  echo "[test] apt: installing chromium for the HTML page tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH:/usr/sbin:/sbin"  # the venv for subprocesses; Slurm daemons live in sbin
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$ROOT/.venv/bin/python" -m ruff check .
"$ROOT/.venv/bin/lint-imports" --no-cache   # layer contracts: .importlinter
"$ROOT/.venv/bin/python" -m mypy             # type check of lsurf/ (setup.cfg [mypy])
# Two pytest workers (pytest-xdist) share the machine's cores; the Slurm tests share one worker
# (tests/conftest.py's ONE_WORKER). The fast tier's 5 s limit counts CPU time, which sharing the cores
# does not grow.
exec "$ROOT/.venv/bin/python" -m pytest -q --timeout=900 --durations=25 -m "" \
  -n "${LSURF_TEST_WORKERS:-2}" --dist loadgroup "$@"
