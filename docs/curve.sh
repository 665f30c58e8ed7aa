#!/usr/bin/env bash
# Mode connectivity (#16) on two digits CNNs from different seeds: the train-loss barrier of the
# straight line between them and of a trained 1-bend Bezier curve, and their ratio (target: the
# curve's at most 20 % of the line's), then the plane through A, the bend and B with the curve drawn
# on it (docs/curve_plane.png); eval and the plane take the models and data the curve file recorded.
# 2 CPU cores, about two minutes.
# Usage: bash docs/curve.sh [WORK_DIR] [CURVE_EPOCHS] [LR]
set -euo pipefail
. "$(dirname "$0")/setup.sh" "${1:-}"  # cd to the repository, PATH, MPI as root, $work, $ranks
epochs="${2:-10}"
lr="${3:-0.05}"
for seed in 0 1; do
    [ -f "$work/s$seed/model_8.t7" ] || lsurf train --model cnn --data digits --epochs 8 --seed "$seed" \
        --out-dir "$work/s$seed" > /dev/null
done
ends=(--model cnn --data digits --checkpoint "$work/s0/model_8.t7" --model2 "$work/s1/model_8.t7" --threads 1)
"${ranks[@]}" curve train "${ends[@]}" --epochs "$epochs" --lr "$lr" --overwrite --out "$work/curve.h5" 2> /dev/null
"${ranks[@]}" curve eval "$work/curve.h5" --threads 1 --points 21 --overwrite --out "$work/along.h5" 2> /dev/null
lsurf plot "$work/along.h5" --out-dir "$work" > /dev/null
echo "curve plot: $work/along_curve.png"
"${ranks[@]}" surface --curve-plane "$work/curve.h5" --x=-0.3:1.3:25 --y=-0.4:1.4:25 --threads 1 --no-progress \
    --overwrite --out "$work/plane.h5" 2> /dev/null
lsurf plot "$work/plane.h5" --curve "$work/curve.h5" --kind contour --out-dir "$work" > /dev/null
cp "$work/plane_train_loss_contour.png" docs/curve_plane.png
echo "plane plot: docs/curve_plane.png"
