#!/usr/bin/env bash
# Idempotent set-up for a Debian machine (root or sudo): Open MPI + parallel HDF5 from apt,
# a virtual environment at .venv with torch (pinned CPU build), mpi4py and an MPI-enabled h5py.
# Safe to run again: every step checks whether it is already done.
# Sourced by jobs/demo.sh and jobs/test.sh; run it alone with `bash jobs/setup.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LSURF_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
dpkg -s libhdf5-openmpi-dev >/dev/null 2>&1 || need_apt+=(libhdf5-openmpi-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
pip() { "$VPY" -m pip --disable-pip-version-check -q "$@"; }

# torch is pinned here (never unpinned: that would pull a multi-GB CUDA build); setup.cfg keeps a range.
if ! "$VPY" -c "import torch, mpi4py, numpy, Cython, pkgconfig" 2>/dev/null; then
  echo "[setup] pip: build tools, numpy, mpi4py, torch"
  pip install -U pip "setuptools>=77" wheel "cython>=3" pkgconfig
  pip install numpy mpi4py==4.1.2 torch==2.13.0
fi

# h5py built against the system's parallel HDF5. --no-build-isolation is essential: with isolation
# pip compiles mpi4py from source inside the build env (21 GB RAM, 40+ min). See ../shared/ENVIRONMENT.md.
if ! "$VPY" -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)" 2>/dev/null; then
  echo "[setup] building h5py 3.16.0 against parallel HDF5 (about 3 minutes, once)"
  CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
    pip install --force-reinstall --no-binary=h5py --no-build-isolation --no-deps h5py==3.16.0
fi

# lsurf itself (editable) with its test extras; h5py is already satisfied so the parallel build stays.
# Reinstalled too when the `lsurf` script no longer starts (an entry point moved since it was made).
if ! { "$VPY" -c "import lsurf, pytest, xdist, vtk, xarray, h5netcdf, sklearn, tqdm, plotly, importlinter, mypy, transformers" \
       && "$VENV/bin/lsurf" --version; } >/dev/null 2>&1; then
  echo "[setup] pip: lsurf and its test dependencies"
  pip install -e "$ROOT[test]" torch==2.13.0 h5py==3.16.0
fi
"$VPY" -c "import h5py; assert h5py.get_config().mpi, 'h5py lost its MPI build'"
echo "[setup] ready: $VENV (torch $("$VPY" -c 'import torch; print(torch.__version__)'), parallel h5py)"
