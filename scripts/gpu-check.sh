#!/usr/bin/env bash
# pipit on an NVIDIA GPU machine, in one run: the CUDA backend's conformance suite and the
# pipeline-equivalence test on CUDA, the NCCL transport (a one-rank communicator sending to
# itself; a communicator short of a rank giving up), launched CUDA ranks against one process
# (the cuda test of tests/multiprocess.rs), GPT-2 124M training steps (bf16 on one stage and
# on four, bf16 on one stage with eight micro-batches, bf16 with attention through cuBLAS, a
# profile of GPU time by op, f32 on CUDA and on wgpu through NVIDIA's Vulkan driver, zero
# bubble on four stages) beside the PyTorch baseline, and the default model in f32 and bf16,
# with a table last. Each training row shows its measured peak memory beside what
# `pipit train --dry-run` of the same command predicts.
#
# The GPU machine has no Rust toolchain, so the binaries are built on the development machine
# (Debian 12, x86-64) first, from the repository root:
#
#     scripts/gpu-check.sh prepare
#
# which compiles the CUDA kernels for sm_90 with NVRTC and ptxas (scripts/cuda-compile-check.sh),
# runs `cargo build --release` and `cargo test --release --no-run`, copies the pipit
# binary and the backend_conformance, pipeline_equivalence, multiprocess and (pipit-cuda's)
# nccl_transport test binaries (stripped of debug information, to keep them small) into
# .gpu/, copies the PyTorch baseline script named by TORCH_BASELINE=path (a GPT-2 124M
# training step) when given, and downloads Debian's libvulkan1 into .gl/ (the GPU machine has
# no Vulkan loader). Both folders are listed in .git/info/exclude, so they have to be carried
# to the GPU machine along with the working tree. Then, there, from the repository root:
#
#     scripts/gpu-check.sh
#
# Every step has its own timeout and the whole run stays within GPU_CHECK_BUDGET seconds
# (default 540): a step that would start too late is reported as skipped. Full logs go to
# $OUT/gpu-check/ when OUT is set, else to .gpu/logs/. PIPIT_REQUIRE_CUDA=1 makes the CUDA
# tests fail, rather than skip, when CUDA is not usable. Exit status: 0 when every step that
# ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

BINARIES=(.gpu/pipit .gpu/backend_conformance .gpu/pipeline_equivalence .gpu/nccl_transport
    .gpu/multiprocess)

exclude() {
    local pattern
    for pattern in /.gpu/ /.gl/; do
        grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >>.git/info/exclude
    done
}

prepare() {
    set -e
    exclude
    mkdir -p .gpu .gl
    # The kernels must compile for the GPU before device time is spent finding out they don't.
    # (Its whole output goes to a file: a pipe closed early would fail the step.)
    scripts/cuda-compile-check.sh 90 >.gpu/cuda-compile-check.log
    head -2 .gpu/cuda-compile-check.log
    cargo build --release -p pipit --bin pipit
    cp target/release/pipit .gpu/pipit
    # Test executables carry a hash in their names: take the paths from cargo's messages.
    {
        cargo test --release --no-run -p pipit --test backend_conformance \
            --test pipeline_equivalence --test multiprocess --message-format=json-render-diagnostics
        cargo test --release --no-run -p pipit-cuda --test nccl_transport \
            --message-format=json-render-diagnostics
    } | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" ".gpu/$name"; done
    for f in "${BINARIES[@]}"; do
        [ -x "$f" ] || { echo "prepare: $f is missing" >&2; exit 1; }
        strip --strip-debug "$f"
    done
    local torch="${TORCH_BASELINE:-}"
    if [ -n "$torch" ]; then cp "$torch" .gpu/torch_gpt2.py; else echo "prepare: TORCH_BASELINE is not set; the PyTorch baseline will be skipped"; fi
    local apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    mkdir -p /tmp/amd64/partial
    apt-get "${apt_opts[@]}" update -qq
    rm -f .gl/*.deb
    (cd .gl && apt-get "${apt_opts[@]}" download libvulkan1)
    du -sh .gpu .gl
    echo "prepared: carry .gpu and .gl to the GPU machine and run scripts/gpu-check.sh there"
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit $?
fi
if [ $# -gt 0 ]; then
    echo "usage: scripts/gpu-check.sh [prepare]" >&2
    exit 2
fi

# ---- On the GPU machine ----------------------------------------------------------------

for f in "${BINARIES[@]}"; do
    [ -x "$f" ] || { echo "gpu-check: $f is missing: run scripts/gpu-check.sh prepare on the build machine" >&2; exit 2; }
done
LOGS="${OUT:+$OUT/gpu-check}"
LOGS="${LOGS:-.gpu/logs}"
mkdir -p "$LOGS"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export PIPIT_REQUIRE_CUDA="${PIPIT_REQUIRE_CUDA:-1}"
export RUST_BACKTRACE=1
if ! ldconfig -p | grep -q 'libvulkan.so.1' && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
BUDGET="${GPU_CHECK_BUDGET:-540}"
START=$SECONDS
ROWS=()
FAILED=0
LAST_STATUS=

echo "== machine"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not available"
ls /usr/local/cuda/lib64/libnvrtc.so* /usr/local/cuda/lib64/libcublas.so* 2>/dev/null | head -4

# One line about a finished test binary: its result counts, and the first failures.
tests_summary() {
    local log=$1 result failures
    result=$(grep -E '^test result:' "$log" | tail -1 | sed -E 's/^test result: ([A-Za-z]+)\. ([0-9]+ passed; [0-9]+ failed).*/\1: \2/')
    failures=$(grep -E '^test .* FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | head -3 | paste -sd, -)
    echo "${result:-no result line}${failures:+ (failed: $failures)}"
}

# One line about a training run from its --log-json ($LOGS/NAME.jsonl): median tokens/s after
# the first step (and ms per 16 x 1024 tokens), the largest per-rank peak memory beside what a
# dry run of the same command predicts (`--dry-run`, no device time), the last loss, and the
# last validation loss its output printed.
train_summary() {
    python3 - "$LOGS/$2.jsonl" "$1" "$LOGS/$2.cmd" <<'PY' 2>/dev/null || echo "no --log-json lines"
import json, re, statistics, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
later = rows[1:] or rows
tps = statistics.median(r["tokens_per_sec"] for r in later)
peak = max(max(r["peak_bytes"]) for r in rows) / 2**30
val = re.findall(r"val loss ([0-9.]+)", open(sys.argv[2], errors="replace").read())
ms = 16 * 1024 / tps * 1e3 if tps else 0
predicted = ""
try:
    cmd = open(sys.argv[3], "rb").read().decode().split("\0")[:-1]
    dry = sys.argv[1] + ".dry"
    cmd[cmd.index("--log-json") + 1] = dry
    subprocess.run(cmd + ["--dry-run"], capture_output=True, timeout=15, check=True)
    ranks = json.load(open(dry))["ranks"]
    predicted = f" (dry run {max(r['peak_bytes'] for r in ranks) / 2**30:.2f})"
except Exception as e:
    predicted = f" (no dry run: {type(e).__name__})"
print(f"{len(rows)} steps, {tps:,.0f} tokens/s (median after step 1; {ms:.1f} ms per 16x1024), peak {peak:.2f}{predicted} GiB/rank, last loss {rows[-1]['loss']:.4f}" + (f", val {val[-1]}" if val else ""))
PY
}

# tests_summary, with the NCCL send-to-self figure the transport test prints.
nccl_summary() {
    local figure
    figure=$(grep -oE 'NCCL send to self of [0-9]+ MiB: [0-9.]+ ms \([0-9.]+ GB/s' "$1" | head -1)
    echo "$(tests_summary "$1")${figure:+; $figure)}"
}

# The largest entries of the GPU-time-per-op table a PIPIT_CUDA_PROFILE=1 run prints.
profile_summary() {
    awk '/^cuda profile/ {on = 1; next} on && NR > 0 && $1 != "op" && $1 != "total" && n < 6 {printf "%s%s %s", (n ? ", " : "by op: "), $1, $4; n++} END {if (!n) print "no profile table"; else print ""}' "$1"
}

torch_summary() {
    grep -E '^torch ' "$1" | sed -E 's/^torch [^ ]+ ([a-z0-9-]+) GPT-2 124M B=16 T=1024: /\1 /; s/, peak mem/ peak/' | paste -sd';' - | sed 's/;/; /g'
}

# The samples and rate of a `pipit generate --format json` run (its last line).
generate_summary() {
    tail -n 1 "$1" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("%d samples, %d tokens in %.2f s (%.0f tokens/s)" % (len(r["samples"]), r["tokens"], r["seconds"], r["tokens_per_sec"]))' 2>/dev/null || echo "no JSON report"
}

# step NAME TIMEOUT SUMMARY -- COMMAND...: run COMMAND with a timeout (cut to what is left of
# the budget), log its output to $LOGS/NAME.log, and add a table row summarised by SUMMARY (a
# function given the log and NAME).
step() {
    local name=$1 limit=$2 summary=$3
    shift 4
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        ROWS+=("$name|skipped|0|the run's time budget is spent")
        return
    fi
    ((limit > left)) && limit=$left
    local log="$LOGS/$name.log" t0=$SECONDS rc status detail
    echo "== $name (timeout ${limit}s): $*"
    # The command, for a summary that reruns it otherwise (train_summary's dry run).
    printf '%s\0' "$@" >"$LOGS/$name.cmd"
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    tail -n 12 "$log"
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout; FAILED=1 ;;
        *) status="FAIL($rc)"; FAILED=1 ;;
    esac
    detail=$("$summary" "$log" "$name")
    ROWS+=("$name|$status|$((SECONDS - t0))|$detail")
    LAST_STATUS=$status
}

# In order of what matters most, so a run cut short by the budget loses the least.
step conformance-cuda 120 tests_summary -- \
    .gpu/backend_conformance cuda --test-threads=1
# Should the suite fail, try it with bf16 attention through cuBLAS instead of the tensor-core
# kernels (the newest code); if that passes, the rest of the run uses it too.
if [ "$LAST_STATUS" != ok ]; then
    step conformance-cuda-materialized 120 tests_summary -- \
        env PIPIT_CUDA_ATTENTION=materialized .gpu/backend_conformance cuda --test-threads=1
    if [ "$LAST_STATUS" = ok ]; then
        export PIPIT_CUDA_ATTENTION=materialized
        ROWS+=("note|-|0|the rest of this run has PIPIT_CUDA_ATTENTION=materialized")
    fi
fi
step pipeline-equivalence-cuda 150 tests_summary -- \
    .gpu/pipeline_equivalence every_schedule_trains_like_one_device_on_cuda
step nccl-one-rank 60 nccl_summary -- \
    .gpu/nccl_transport one_rank ranks_and_ids --test-threads=1 --nocapture
# GPT-2 124M's shape (12 layers, d=768, 12 heads, T=1024, vocabulary 50304; the tokens are
# bytes, so the extra vocabulary rows are never targets), batch 16 x 1024, AdamW.
GPT2=(train --n-layer 12 --n-head 12 --n-embd 768 --n-positions 1024 --vocab-size 50304
    --seq-len 1024 --batch-size 16 --no-save --eval-every 0 --eval-tokens 1024)
GPT2_CUDA_BF16=("${GPT2[@]}" --backend cuda --dtype bf16)
step cuda-124m-bf16-p1 90 train_summary -- .gpu/pipit "${GPT2_CUDA_BF16[@]}" \
    --stages 1 --microbatches 1 --steps 8 --log-json "$LOGS/cuda-124m-bf16-p1.jsonl"
if [ -f .gpu/torch_gpt2.py ]; then
    step torch-baseline 150 torch_summary -- python3 .gpu/torch_gpt2.py
else
    ROWS+=("torch-baseline|skipped|0|no .gpu/torch_gpt2.py")
fi
step cuda-124m-bf16-p4 90 train_summary -- .gpu/pipit "${GPT2_CUDA_BF16[@]}" \
    --stages 4 --schedule 1f1b --microbatches 8 --steps 8 \
    --log-json "$LOGS/cuda-124m-bf16-p4.jsonl"
step wgpu-124m-f32-p1 90 train_summary -- .gpu/pipit "${GPT2[@]}" --backend wgpu \
    --stages 1 --microbatches 2 --steps 3 --log-json "$LOGS/wgpu-124m-f32-p1.jsonl"
step multiprocess-cuda 150 tests_summary -- \
    env PIPIT_BIN="$PWD/.gpu/pipit" .gpu/multiprocess cuda --test-threads=1
# Its own process: the communicator it gives up on stays blocked in NCCL until the process ends.
step nccl-setup-gives-up 40 tests_summary -- \
    .gpu/nccl_transport never_joins --test-threads=1
# The default model (pipit train's defaults) in f32 and in bf16: validation losses to compare.
step train-cuda-default-f32 120 train_summary -- \
    .gpu/pipit train --no-save --backend cuda --log-json "$LOGS/train-cuda-default-f32.jsonl"
step train-cuda-default-bf16 120 train_summary -- .gpu/pipit train --no-save --backend cuda \
    --dtype bf16 --log-json "$LOGS/train-cuda-default-bf16.jsonl"
step train-wgpu-default 90 train_summary -- .gpu/pipit train --steps 30 --no-save \
    --eval-every 0 --eval-tokens 4096 --backend wgpu --log-json "$LOGS/train-wgpu-default.jsonl"

# Diagnostics, after every must-show: what the speed figures are made of.
# The same p=1 step with attention through cuBLAS (T×T matrices in memory) instead of the
# tensor-core kernels: what those are worth, and a fallback figure should they fail.
step cuda-124m-bf16-p1-materialized 60 train_summary -- env PIPIT_CUDA_ATTENTION=materialized \
    .gpu/pipit "${GPT2_CUDA_BF16[@]}" --stages 1 --microbatches 1 --steps 6 \
    --log-json "$LOGS/cuda-124m-bf16-p1-materialized.jsonl"
# One stage with the p=4 run's 8 micro-batches: separates what micro-batching costs from
# what pipelining costs.
step cuda-124m-bf16-p1-m8 60 train_summary -- .gpu/pipit "${GPT2_CUDA_BF16[@]}" \
    --stages 1 --microbatches 8 --steps 6 --log-json "$LOGS/cuda-124m-bf16-p1-m8.jsonl"
# Where a p=1 step's GPU time goes, op by op (CUDA events around every op).
step cuda-124m-bf16-p1-profile 60 profile_summary -- env PIPIT_CUDA_PROFILE=1 \
    .gpu/pipit "${GPT2_CUDA_BF16[@]}" --stages 1 --microbatches 1 --steps 4
step cuda-124m-f32-p1 60 train_summary -- .gpu/pipit "${GPT2[@]}" --backend cuda \
    --stages 1 --microbatches 1 --steps 4 --log-json "$LOGS/cuda-124m-f32-p1.jsonl"
# Zero bubble against the 1F1B p=4 row: the same stages with the weight gradients delayed.
step cuda-124m-bf16-p4-zb 60 train_summary -- .gpu/pipit "${GPT2_CUDA_BF16[@]}" \
    --stages 4 --schedule zb-h1 --microbatches 8 --steps 6 \
    --log-json "$LOGS/cuda-124m-bf16-p4-zb.jsonl"
# Zero bubble on a V: two stages per rank, cut so each rank's pair costs alike.
step cuda-124m-bf16-p4-zbv 60 train_summary -- .gpu/pipit "${GPT2_CUDA_BF16[@]}" \
    --stages 4 --schedule zb-v --partition balanced --microbatches 8 --steps 6 \
    --log-json "$LOGS/cuda-124m-bf16-p4-zbv.jsonl"
# wgpu timed by the host clock, waiting at every action, against wgpu-124m-f32-p1's device
# timestamps: what timing used to cost.
step wgpu-124m-f32-p1-host-timing 60 train_summary -- env PIPIT_WGPU_HOST_TIMING=1 \
    .gpu/pipit "${GPT2[@]}" --backend wgpu --stages 1 --microbatches 2 --steps 3 \
    --log-json "$LOGS/wgpu-124m-f32-p1-host-timing.jsonl"
# Generation with key/value caches on the GPU (attention_decode and the decoding embedding):
# eight samples of 200 tokens from the default model after 20 steps, in four passes of two.
step generate-cuda 60 generate_summary -- bash -c ".gpu/pipit train --backend cuda --steps 20 \
    --eval-every 0 --save '$LOGS/generate-ckpt' && .gpu/pipit generate --backend cuda \
    --checkpoint '$LOGS/generate-ckpt' --samples 8 --max-tokens 200 --format json"

echo
echo "== gpu-check: $((SECONDS - START)) s in all; logs in $LOGS"
printf '%-32s %-10s %6s  %s\n' step status seconds detail
for row in "${ROWS[@]}"; do
    IFS='|' read -r name status secs detail <<<"$row"
    printf '%-32s %-10s %6s  %s\n' "$name" "$status" "$secs" "$detail"
done
exit $FAILED
