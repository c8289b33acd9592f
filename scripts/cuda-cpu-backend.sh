#!/usr/bin/env bash
# Run pipit's CUDA backend end to end without a GPU. cuda/cpu-check/libraries.cpp emulates on
# the host the CUDA driver, NVRTC, cuBLAS and NCCL calls the backend makes (kernels run
# through cuda/cpu-check/emulate.h); this builds it as libcuda.so, libnvrtc.so, libcublas.so
# and libnccl.so under target/emulated-cuda and runs, with those on LD_LIBRARY_PATH and
# PIPIT_REQUIRE_CUDA set (so no CUDA case skips), the CUDA cases of the test suites: the
# backend's own tests and the NCCL transport, backend conformance, the fused ops Llama adds,
# pipeline equivalence (GPT-2 and Llama), and
# the launched multi-process run (on one emulated GPU, where NCCL must refuse two ranks, and on
# two, where the ranks' tensors go over NCCL). Needs g++ with C++20 and about 2 minutes on 2
# cores. PIPIT_EMULATED_GPUS=N makes the emulation show N GPUs; PIPIT_EMULATED_CUDA_ORDER=reverse
# or shuffle runs the kernels' blocks and threads in another order (cuda/cpu-check/emulate.h).
#
#     scripts/cuda-cpu-backend.sh                 # every CUDA case
#     scripts/cuda-cpu-backend.sh -- CMD [ARG..]  # any command on the emulated libraries, e.g.
#     scripts/cuda-cpu-backend.sh -- cargo run --release -- train --backend cuda --steps 20
#
# What it checks: the host code's calls, launch shapes, buffer sizes and copies, and the
# numbers the suites compare. Every copy and GEMM operand must lie inside a live allocation,
# a kernel touching past the end of its buffer (beyond its size rounded up to 16 bytes), or a
# buffer already freed, faults and is named, and fresh memory reads as NaN. Each stream is a thread of its own, so work ordered only by
# the host's timing can go wrong as on a GPU (PIPIT_EMULATED_CUDA_JITTER=1 makes that likelier).
# What it cannot check: speed, the memory model, and the hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=target/emulated-cuda
mkdir -p "$lib"
# Built again only when libraries.cpp changed (the kernels are rebuilt, and cached there, by
# the emulated NVRTC whenever the program or emulate.h change).
# It holds this checkout's path (to find emulate.h), so a moved checkout builds it again too.
if [ ! "$lib/libcuda.so" -nt cuda/cpu-check/libraries.cpp ] ||
    [ "$(cat "$lib/built-in" 2>/dev/null)" != "$PWD" ]; then
    g++ -std=c++20 -O1 -fPIC -shared -pthread -Wall -Werror \
        -DPIPIT_EMULATE_DIR="\"$PWD/cuda/cpu-check\"" \
        -o "$lib/libcuda.so.$$" cuda/cpu-check/libraries.cpp -ldl
    mv "$lib/libcuda.so.$$" "$lib/libcuda.so"
    echo "$PWD" >"$lib/built-in"
fi
for name in nvrtc cublas nccl; do
    ln -sfn libcuda.so "$lib/lib$name.so"
done
export LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPIT_REQUIRE_CUDA=1 XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
if [ "${1:-}" = "--" ]; then
    shift
    exec "$@"
fi
cargo test -p pipit-cuda
cargo test --test backend_conformance cuda
cargo test --test fused_ops cuda
cargo test --test pipeline_equivalence cuda
cargo test --test multiprocess cuda
# Two emulated GPUs: the launched ranks move tensors over NCCL between processes.
PIPIT_EMULATED_GPUS=2 cargo test --test multiprocess cuda
echo "every CUDA case passed on the emulated libraries"
