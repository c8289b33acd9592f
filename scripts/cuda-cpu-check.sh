#!/usr/bin/env bash
# Check pipit's CUDA kernels (cuda/*.cu) on the CPU, without a GPU: the same program the CUDA
# backend compiles with NVRTC (scripts/cuda-program.sh) is compiled as C++ against a host
# emulation of the CUDA features it uses (cuda/cpu-check/emulate.h), including mma.sync, and
# every kernel runs against float64 oracles: f32 kernels, bf16 kernels, and attention
# composed as ops.rs composes it, in three orders of blocks and threads (see below). Needs g++
# with C++20; about 12 s on 2 cores (a block's CUDA threads are fibers). `cargo test --test
# cuda_emulated` runs it too.
#
#     scripts/cuda-cpu-check.sh
#
# Exit status 0 when every check passed. It says nothing about speed or about cuBLAS/NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{
    echo '#include "emulate.h"'
    scripts/cuda-program.sh
} >"$work/program.inc"
g++ -std=c++20 -O1 -pthread -Icuda/cpu-check -include "$work/program.inc" \
    -o "$work/kernels" cuda/cpu-check/kernels.cpp
# Three times: blocks, and the threads of a block between barriers, first to last, last to
# first, and shuffled. A kernel missing a barrier reads another thread's value before it is
# written in one of them, and fails there.
for order in forward reverse shuffle; do
    echo "== order of blocks and threads: $order"
    PIPIT_EMULATED_CUDA_ORDER=$order "$work/kernels"
done
