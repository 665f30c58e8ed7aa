#!/usr/bin/env bash
# The README's projection-fidelity pair: a random plane and the Hessian plane (λ_max, λ_min) of the
# same digits CNN, each with the curvature its axes see under the title. 2 CPU cores, a few minutes.
# Usage: bash docs/fidelity.sh [WORK_DIR]   (writes docs/fidelity_planes.png and prints the info lines)
set -euo pipefail
. "$(dirname "$0")/setup.sh" "${1:-}"  # cd to the repository, PATH, MPI as root, $work, $ranks
lsurf train --model cnn --data digits --epochs 10 --out-dir "$work/cnn" > /dev/null
ckpt="$work/cnn/model_10.t7"
for plane in random hessian:max,min; do
    name="${plane%%:*}"
    "${ranks[@]}" surface --model cnn --data digits --checkpoint "$ckpt" --directions "$plane" --fidelity on \
        --x=-1:1:21 --y=-1:1:21 --threads 1 --no-progress --overwrite --out "$work/$name.h5" 2> /dev/null
    lsurf plot "$work/$name.h5" --out-dir "$work/$name" > /dev/null
    lsurf info "$work/$name.h5" | grep -E '^(curvature at|plane fidelity)'
done
python - "$work" <<'PY'
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
work = sys.argv[1]
fig, axes = plt.subplots(1, 2, figsize=(14, 6))
for ax, name in zip(axes, ("random", "hessian")):
    ax.imshow(plt.imread(f"{work}/{name}/{name}_train_loss_contour.png"))
    ax.axis("off")
fig.tight_layout()
fig.savefig("docs/fidelity_planes.png", dpi=110)
PY
