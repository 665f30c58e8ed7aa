#!/usr/bin/env bash
# One command for the first GPU node: proves lsurf's CUDA path in minutes and ends with a summary.
#   bash jobs/gpu_check.sh            (on a node with 1+ GPUs; inside an allocation: srun -N1 --gpus=2 ...)
# Steps: the GPU each rank binds (UUIDs: two ranks must never share one), the CUDA tests (stacked =
# per-point with and without --amp, CPU vs GPU in IEEE float32, no host syncs inside a pass, Hessian
# start vectors, CUDA fingerprints), the speed bench on CUDA, and a 2-rank surface checked complete.
# Set-up as for the tests (jobs/setup.sh: idempotent). Every step runs even if one before failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/jobs/setup.sh" || exit 1
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
OUT="${LSURF_GPU_CHECK_DIR:-$ROOT/gpu_check}"
mkdir -p "$OUT"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
RANKS=$(( GPUS >= 2 ? 2 : 1 ))
declare -A RESULT

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember pass/fail
    local name=$1; shift
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then RESULT[$name]=ok; else RESULT[$name]="FAILED (see $OUT/$name.log)"; fi
    tail -n 15 "$OUT/$name.log"
}

step binding mpirun -n "$RANKS" --oversubscribe python -c "
import socket, torch
from lsurf.run.runtime import configure_process, launcher_comm, check_device_binding
from lsurf.run.world import World
w = World.of(launcher_comm())
dev = configure_process(w, 'cuda')
p = torch.cuda.get_device_properties(dev)
print(f'rank {w.rank} on {socket.gethostname()}: {dev} {p.name} uuid {p.uuid} cc {p.major}.{p.minor}', flush=True)
check_device_binding(w, dev)
"
step cuda_tests python -m pytest -q -rs tests/test_gpu_readiness.py tests/test_lm.py -k "cuda or regenerate or bfloat16"
step speed python bench/bench_speed.py --device cuda --quick
step surface mpirun -n "$RANKS" --oversubscribe python -m lsurf surface --device cuda --model resnet20 \
    --data synthetic:shape=3x32x32,n=4096 --x -1:1:9 --y -1:1:9 --out "$OUT/surface.h5" --overwrite --no-progress
step verify python -m lsurf surface --verify --out "$OUT/surface.h5"

echo
echo "== summary ($GPUS GPU(s) visible, $RANKS rank(s); logs in $OUT)"
for name in binding cuda_tests speed surface verify; do printf '%-11s %s\n' "$name" "${RESULT[$name]}"; done
python -m lsurf info "$OUT/surface.h5" 2>/dev/null | grep -E "plan|versions|eval_seconds_per_point|rank_layout"
grep -E "MISSED|met" "$OUT/speed.log" | head -n 12
for name in binding cuda_tests speed surface verify; do [ "${RESULT[$name]}" = ok ] || exit 1; done
