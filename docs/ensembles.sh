#!/usr/bin/env bash
# The README's ensemble band figure and sharpness table: two models trained on digits, eight random
# 1-D planes of each, and their average- and worst-case sharpness. Runs on 2 CPU cores in about a minute.
# Usage: bash docs/ensembles.sh [WORK_DIR]   (writes docs/ensemble_band.png and prints the table)
set -euo pipefail
. "$(dirname "$0")/setup.sh" "${1:-}"  # cd to the repository, PATH, MPI as root, $work, $ranks
for model in cnn mlp; do
    lsurf train --model "$model" --data digits --epochs 10 --out-dir "$work/$model" > /dev/null
    ckpt="$work/$model/model_10.t7"
    "${ranks[@]}" surface --model "$model" --data digits --checkpoint "$ckpt" --planes 8 --x=-1:1:41 \
        --threads 1 --no-progress --overwrite --out "$work/$model.h5" 2> /dev/null
    for kind in average worst; do
        "${ranks[@]}" sharpness --model "$model" --data digits --checkpoint "$ckpt" --kind "$kind" \
            --radius 0.05 --samples 200 --threads 1 --no-progress --overwrite --out "$work/$model.$kind.h5" > /dev/null
        "${ranks[@]}" sharpness --model "$model" --data digits --checkpoint "$ckpt" --kind "$kind" --adaptive \
            --radius 0.05 --samples 200 --threads 1 --no-progress --overwrite --out "$work/$model.$kind.adaptive.h5" \
            > /dev/null
    done
done
lsurf plot "$work/cnn.h5" --out-dir "$work" > /dev/null
cp "$work/cnn_train_loss_ensemble.png" docs/ensemble_band.png
python - "$work" <<'EOF'
import sys
import h5py
work = sys.argv[1]
print("| model | centre loss | average (ρ = 0.05) | worst (ρ = 0.05) | adaptive average | adaptive worst |")
print("|---|---|---|---|---|---|")
for model in ("cnn", "mlp"):
    cells = []
    for name in ("average", "worst", "average.adaptive", "worst.adaptive"):
        with h5py.File(f"{work}/{model}.{name}.h5") as f:
            centre, s, se = (float(f.attrs[k]) for k in ("centre_loss", "sharpness", "sharpness_stderr"))
        cells.append(f"{s:.3g} ± {se:.1g}" if name.startswith("average") else f"{s:.3g}")
    print(f"| {model} | {centre:.3g} | " + " | ".join(cells) + " |")
EOF
for model in cnn mlp; do lsurf info "$work/$model.h5" | grep -A1 '^spread\|^basin'; done
