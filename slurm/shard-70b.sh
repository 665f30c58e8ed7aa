#!/usr/bin/env bash
# Example: a 70 B language model's loss surface on 2 nodes x 4 GPUs, the model sharded 8 ways over
# one rank group spanning both nodes (FSDP2 over NCCL; README "A model larger than one GPU" has the
# memory arithmetic). Edit the paths, then run this file: it submits slurm/gpu.sbatch, which runs
# `lsurf surface` under srun with these options; resubmitting it resumes the file.
#   --ranks-per-point 8 --shard fsdp  each GPU holds 1/8 of the weights, of θ* and of the directions,
#                                     read by rows from the folder's safetensors files
#   --dtype bfloat16 --regenerate     weights as shipped; directions drawn again per point (2-D fits 80 GB)
#   --split test                      the corpus's val.bin (held-out tokens)
#   --batch-size 1                    one 2,048-token sequence per forward and GPU
set -euo pipefail
cd "$(dirname "$0")/.."
sbatch -N 2 --ntasks-per-node=4 --time=24:00:00 slurm/gpu.sbatch \
    --model hf:/models/Llama-3.1-70B --data tokens:/data/fineweb:uint32 --split test --seq-len 2048 --subset 64 \
    --batch-size 1 --dtype bfloat16 --regenerate --ranks-per-point 8 --shard fsdp \
    --x -1:1:21 --y -1:1:21 --out llama70b.h5
