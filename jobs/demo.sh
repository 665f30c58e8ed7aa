#!/usr/bin/env bash
# The main job on the embedded default: install what is missing, train the digits CNN, sample a
# 31x31 surface with MPI (one rank per core), then plot it and write a VTK file for ParaView.
# Safe to run again: training is skipped when its checkpoint exists and the surface resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/jobs/setup.sh"
cd "$ROOT"
. .venv/bin/activate
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=out/demo
NP="${LSURF_NP:-$(nproc)}"
mkdir -p "$OUT"
[ -f "$OUT/runs/model_10.t7" ] || lsurf train --model cnn --data digits --epochs 10 --out-dir "$OUT/runs"
mpirun -n "$NP" --oversubscribe python -m lsurf surface --config jobs/demo.toml
lsurf info "$OUT/surface.h5"
lsurf plot "$OUT/surface.h5" --quantity train_loss --out-dir "$OUT/plots"
lsurf plot "$OUT/surface.h5" --quantity test_acc --kind filled --out-dir "$OUT/plots"
lsurf vtk "$OUT/surface.h5" --quantity train_loss --out "$OUT/surface.vts"
echo "demo finished: plots in $OUT/plots/, ParaView file $OUT/surface.vts, data $OUT/surface.h5"
