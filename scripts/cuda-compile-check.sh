#!/usr/bin/env bash
# Compile pipit's CUDA program on a machine without a GPU or a CUDA toolkit, as the CUDA backend
# does at run time: NVRTC (the program text of scripts/cuda-program.sh, no headers) to PTX for
# compute_90, then ptxas to machine code for sm_90 (H100/H200), which also checks the inline
# PTX (mma.sync). Prints every kernel's registers, spills and shared memory.
#
#     scripts/cuda-compile-check.sh [ARCH]        # ARCH: 90 (default), 80, ...
#
# NVRTC and ptxas come from NVIDIA's Python wheels on PyPI (nvidia-cuda-nvrtc-cu12 and
# nvidia-cuda-nvcc-cu12, version below, about 130 MB), downloaded once into
# ${PIPIT_NVIDIA_CACHE:-$HOME/.cache/pipit-nvidia}. The GPU machine compiles with its own CUDA 13
# NVRTC; this one is CUDA 12.9, the same language for a program that includes no header.
# Needs python3 and pip. Exit status 0 when both steps succeed.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:-90}"
VERSION=12.9.86
CACHE="${PIPIT_NVIDIA_CACHE:-$HOME/.cache/pipit-nvidia}/$VERSION"
NVRTC="$CACHE/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
PTXAS="$CACHE/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$PTXAS" ] || [ ! -f "$NVRTC" ]; then
    mkdir -p "$CACHE"
    echo "downloading NVRTC and ptxas $VERSION from PyPI into $CACHE"
    python3 -m pip download --quiet --no-deps -d "$CACHE/wheels" \
        "nvidia-cuda-nvrtc-cu12==$VERSION" "nvidia-cuda-nvcc-cu12==$VERSION"
    python3 - "$CACHE" <<'PY'
import glob, sys, zipfile
for wheel in glob.glob(sys.argv[1] + "/wheels/*.whl"):
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
    chmod +x "$PTXAS"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
scripts/cuda-program.sh >"$work/pipit.cu"
# NVRTC through its C API, with the options the backend passes (the architecture only).
python3 - "$NVRTC" "$work/pipit.cu" "compute_$ARCH" "$work/pipit.ptx" <<'PY'
import ctypes, sys
lib_path, src_path, arch, out_path = sys.argv[1:]
nvrtc = ctypes.CDLL(lib_path)
prog = ctypes.c_void_p()
src = open(src_path, "rb").read()
if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"pipit.cu", 0, None, None) != 0:
    sys.exit("nvrtcCreateProgram failed")
opts = (ctypes.c_char_p * 1)(("--gpu-architecture=" + arch).encode())
rc = nvrtc.nvrtcCompileProgram(prog, 1, opts)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode(errors="replace"))
if rc != 0:
    sys.exit(f"NVRTC failed to compile the program for {arch} (code {rc})")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(prog, ptx)
open(out_path, "wb").write(ptx.value)
print(f"NVRTC: {arch} PTX, {size.value:,} bytes")
PY
"$PTXAS" -arch="sm_$ARCH" -v "$work/pipit.ptx" -o "$work/pipit.cubin" 2>"$work/ptxas.log" || {
    cat "$work/ptxas.log"
    echo "ptxas failed for sm_$ARCH" >&2
    exit 1
}
# One line per kernel: registers, spill bytes, shared memory.
python3 - "$work/ptxas.log" "$ARCH" <<'PY'
import re, sys
kernel, rows = None, []
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        kernel, spill = m.group(1), "0"
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and kernel:
        spill = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and kernel:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((kernel, int(m.group(1)), int(spill), int(smem.group(1)) if smem else 0))
        kernel = None
print(f"ptxas: sm_{sys.argv[2]}, {len(rows)} kernels")
print(f"{'kernel':<34} {'registers':>9} {'spill B':>8} {'smem B':>7}")
for name, regs, spill, smem in sorted(rows):
    print(f"{name:<34} {regs:>9} {spill:>8} {smem:>7}")
PY
