#!/usr/bin/env bash
# Print the CUDA program the CUDA backend compiles with NVRTC: the files of cuda/ in the order
# backends/cuda/src/kernels.rs joins them, each behind a #line marker. Used by
# cuda-cpu-check.sh and cuda-compile-check.sh, so both check exactly that text.
set -euo pipefail
cd "$(dirname "$0")/.."
for f in $(grep -oE '"[a-z_]+\.cu",' backends/cuda/src/kernels.rs | tr -d '",'); do
    printf '#line 1 "%s"\n' "$f"
    cat "cuda/$f"
    echo
done
