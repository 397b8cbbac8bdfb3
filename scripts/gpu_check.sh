#!/usr/bin/env bash
# The one-time check of the GPU path, on a machine with CUDA (docs/gpu.md); under 8 minutes on one GPU:
#   1. the tests marked `gpu` (pytest -m gpu --require-gpu),
#   2. a short amp_bf16 training of the PTB-XL recipe on synthetic shards, torchrun over NCCL,
#   3. the benchmarks with --device cuda,
# then prints the ECG tower's fraction of the GPU's bf16 peak and the share of each step spent waiting
# for data. Without CUDA it stops at once: exit status 1 and one line "gpu_check: FAILED: ...".
#
#   scripts/gpu_check.sh [--out DIR] [--peak-tflops TFLOPS] [--compile]   (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
