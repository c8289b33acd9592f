#!/usr/bin/env bash
# pipit serve against offline waves: the same mixed-length requests (examples/loadgen.rs,
# 256 requests, seed 0) sent to `pipit serve` at 1, 8, 32 and 64 in flight, and run through
# `pipit generate --prompts` (waves of --batch-size samples, each run to the longest output
# asked for), for --stages 1 and 2 on the CPU backend. Offline "useful" tokens/s counts each
# request's own output tokens, as the server generates them.
#
#   CKPT=runs/latest scripts/serve-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt="${CKPT:-runs/latest}"
requests="${REQUESTS:-256}"
port="${PORT:-8311}"
cargo build --release -q -p pipit --example loadgen
pipit=target/release/pipit loadgen=target/release/examples/loadgen
prompts="$(mktemp)"
printf "%-7s %-22s %12s %10s %10s %10s %10s\n" stages run "tokens/s" "ttft p50" "ttft p99" "tpot p50" "tpot p99"
for p in 1 2; do
    "$pipit" serve --checkpoint "$ckpt" --backend cpu --stages "$p" --port "$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.1; done
    for c in 1 8 32 64; do
        r=$("$loadgen" --url "http://127.0.0.1:$port" --requests "$requests" --concurrency "$c" --write-prompts "$prompts")
        python3 -c "import json,sys; r=json.loads(sys.argv[1]); print('%-7s %-22s %12.1f %10.2f %10.2f %10.2f %10.2f' % ($p, 'serve, %d in flight' % r['concurrency'], r['output_tokens_per_s'], r['ttft_ms_p50'], r['ttft_ms_p99'], r['tpot_ms_p50'], r['tpot_ms_p99']))" "$r"
        longest=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['longest_output'])" "$r")
        asked=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['asked_tokens'])" "$r")
    done
    kill -TERM "$server"; wait "$server" || true
    for b in 16 32; do
        g=$("$pipit" generate --checkpoint "$ckpt" --backend cpu --stages "$p" --prompts "$prompts" \
            --max-tokens "$longest" --batch-size "$b" --format json 2>/dev/null)
        python3 -c "import json,sys; r=json.loads(sys.argv[1]); print('%-7s %-22s %12.1f   (%d generated, %.1f/s)' % ($p, 'generate, waves of %d' % $b, $asked / r['seconds'], r['tokens'], r['tokens_per_sec']))" "$g"
    done
done
rm -f "$prompts"
