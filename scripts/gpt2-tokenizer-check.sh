#!/usr/bin/env bash
# Check pipit's GPT-2 BPE tokenizer (engine/src/tokenizer.rs) against tiktoken's GPT-2
# encoding, token for token, without downloading GPT-2 itself: GPT-2's BPE ranks come from the
# openai-whisper package on PyPI (whisper/assets/gpt2.tiktoken), tiktoken encodes with them, and
# scripts/gpt2_vocab.py writes the same ranks out as a Hugging Face style vocab.json and
# merges.txt for pipit.
#
#     scripts/gpt2-tokenizer-check.sh [TEXT_FILE]    # default: data/shakespeare.txt
#
# Needs python3 with pip and network access to PyPI. Exit status 0 when every token agrees.
set -euo pipefail
cd "$(dirname "$0")/.."
text=${1:-data/shakespeare.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q tiktoken
"$work/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$work" openai-whisper
tar -xzf "$work"/openai_whisper-*.tar.gz -C "$work"
ranks=$(find "$work" -name gpt2.tiktoken | head -1)
mkdir -p "$work/gpt2"
python3 scripts/gpt2_vocab.py "$ranks" "$work/gpt2"
"$work/venv/bin/python" - "$ranks" "$text" "$work" <<'PY'
import json, sys
import tiktoken
sys.path.insert(0, "scripts")
from gpt2_vocab import load_ranks

ranks_path, text_path, work = sys.argv[1:]
pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=load_ranks(ranks_path),
                        special_tokens={"<|endoftext|>": 50256})
text = open(text_path, encoding="utf-8", newline="").read()
ids = enc.encode_ordinary(text)
json.dump(ids, open(f"{work}/want.json", "w"))
print(f"tiktoken: {len(ids)} tokens")
PY
cargo run -q --release --example tokenize -- "$work/gpt2" <"$text" >"$work/got.json"
"$work/venv/bin/python" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
got, want = json.load(open(f"{work}/got.json")), json.load(open(f"{work}/want.json"))
first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
if first is None and len(got) == len(want):
    print(f"pipit and tiktoken agree on all {len(got)} tokens")
    sys.exit(0)
at = first if first is not None else min(len(got), len(want))
print(f"FAIL: {len(got)} tokens against {len(want)}; first difference at {at}: "
      f"{got[max(at - 3, 0):at + 3]} against {want[max(at - 3, 0):at + 3]}")
sys.exit(1)
PY
