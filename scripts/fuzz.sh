#!/usr/bin/env bash
# Fuzz every parser of outside data with libFuzzer (cargo-fuzz), each target for SECONDS
# (default 20), starting from the committed seeds in fuzz/corpus/TARGET:
#
#     scripts/fuzz.sh                 # every target, 20 s each
#     scripts/fuzz.sh 600             # every target, 10 minutes each
#     scripts/fuzz.sh 600 safetensors # one target
#
# Targets (fuzz/fuzz_targets/): safetensors (whole files and a rank's share), config_json (each
# family's config.json), tokenizer (tokenizer.json; vocab.json + merges.txt), schedule_file
# (--schedule-file, then the deadlock check), train_toml (--config FILE, then the plan),
# tensor_frame (the TCP frames ranks exchange) and rendezvous (a joining rank's request, the
# store's roster). A panic, a hang (over 10 s on one input) or an allocation beyond 2 GB is a
# failure: libFuzzer stops, leaves the input under
# target/fuzz/artifacts/TARGET, and the script exits non-zero. Inputs found interesting go to
# target/fuzz/corpus/TARGET (the committed seeds stay as they are). Installs cargo-fuzz if it
# is missing; the fuzz build uses the stable toolchain's nightly features
# (RUSTC_BOOTSTRAP=1), its own target directory under target/fuzz, and no sanitizer beyond
# libFuzzer's own checks.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(safetensors config_json tokenizer schedule_file train_toml tensor_frame rendezvous)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
    mkdir -p "target/fuzz/corpus/$t" "target/fuzz/artifacts/$t"
    echo "== $t: $seconds s"
    log="target/fuzz/$t.log"
    status=0
    cargo fuzz run --fuzz-dir fuzz --sanitizer none --target-dir target/fuzz/build "$t" \
        "target/fuzz/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -artifact_prefix="target/fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 ||
        status=$?
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked|^error" "$log" || true
    if [ "$status" -ne 0 ] || compgen -G "target/fuzz/artifacts/$t/*" >/dev/null; then
        echo "FAIL $t (status $status; $log): $(ls "target/fuzz/artifacts/$t")" >&2
        exit 1
    fi
done
echo "every target ran $seconds s without a failure"
