#!/usr/bin/env bash
# Training throughput on the CPU, side by side in one run: PyTorch eager (Hugging Face
# GPT2LMHeadModel, byte vocabulary, 4 heads, batch 16, AdamW, no dropout) against
# `pipit train --backend cpu --stages 1 --microbatches 1` on the same shapes, each with the
# machine's cores (PIPIT_THREADS / torch.set_num_threads), median tokens/s over the measured
# steps, and their ratio:
#
#     scripts/cpu-vs-torch.sh                       # widths 64, 128, 256 (see SHAPES)
#     SHAPES="128x128x4" STEPS=40 scripts/cpu-vs-torch.sh
#     HF_VENV=/tmp/hf scripts/cpu-vs-torch.sh       # reuse hf-check.sh's environment
#     FAMILY=llama scripts/cpu-vs-torch.sh          # LlamaForCausalLM against pipit's llama
#
# SHAPES: WIDTHxSEQxLAYERS each. Installs torch and transformers from PyPI into a virtual
# environment it makes (PyPI's torch wheel for Linux; its CPU code is the same as the CPU-only
# wheel's). pipit's rate is the `tokens_per_sec` of its JSON log (the step alone, without
# evaluation). A table for BENCHMARKS.md is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=${SHAPES:-"64x64x4 128x128x4 256x256x6"}
steps=${STEPS:-30}
family=${FAMILY:-gpt2}
threads=${PIPIT_THREADS:-$(nproc)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${HF_VENV:-$work/venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, transformers" 2>/dev/null ||
    "$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0
cargo build --release -q
"$venv/bin/python" scripts/cpu_vs_torch.py data/shakespeare.txt "$threads" "$steps" "$family" $shapes \
    | tee "$work/torch.txt"
echo "| shape (width, seq, layers) | PyTorch eager tok/s | pipit cpu tok/s | ratio |" > "$work/table.md"
echo "| --- | --- | --- | --- |" >> "$work/table.md"
for shape in $shapes; do
    IFS=x read -r width seq layers <<<"$shape"
    PIPIT_THREADS=$threads ./target/release/pipit train --model "$family" --backend cpu \
        --stages 1 --microbatches 1 \
        --n-embd "$width" --seq-len "$seq" --n-positions "$seq" --n-layer "$layers" \
        --steps "$steps" --eval-every 100000 --eval-tokens 1024 --no-save \
        --log-json "$work/pipit.jsonl" >/dev/null 2>&1
    ours=$(python3 -c "
import json, statistics, sys
rates = [json.loads(l)['tokens_per_sec'] for l in open('$work/pipit.jsonl')][3:]
print(round(statistics.median(rates)))")
    theirs=$(awk -v w="$width" -v s="$seq" -v l="$layers" '$2==w && $3==s && $4==l {print $5}' "$work/torch.txt")
    ratio=$(python3 -c "print(f'{$ours / $theirs:.2f}')")
    echo "| $width, $seq, $layers | $theirs | $ours | ${ratio}× |" >> "$work/table.md"
done
cat "$work/table.md"
