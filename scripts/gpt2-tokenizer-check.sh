#!/usr/bin/env bash
# Check pipit's GPT-2 BPE tokenizer (engine/src/tokenizer.rs) against tiktoken's GPT-2
# encoding, token for token, without downloading GPT-2 itself: GPT-2's BPE ranks come from the
# openai-whisper package on PyPI (whisper/assets/gpt2.tiktoken), tiktoken encodes with them, and
# the same ranks are written out as a Hugging Face style vocab.json and merges.txt (each merge
# recovered as the two parts BPE makes of its token from the merges before it) for pipit.
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
"$work/venv/bin/python" - "$ranks" "$text" "$work" <<'PY'
import base64, json, sys
import tiktoken

ranks_path, text_path, work = sys.argv[1:]
ranks = {}
for line in open(ranks_path, "rb"):
    if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)

# GPT-2's printable stand-ins for bytes.
keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
extra = [b for b in range(256) if b not in keep]
char = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
show = lambda bs: "".join(char[b] for b in bs)

def parts(token, below):
    """BPE of token's bytes with the merges of rank below `below`."""
    p = [bytes([b]) for b in token]
    while True:
        best = min(((ranks.get(p[i] + p[i + 1]), i) for i in range(len(p) - 1)
                    if ranks.get(p[i] + p[i + 1]) is not None), default=None)
        if best is None or best[0] >= below:
            return p
        i = best[1]
        p = p[:i] + [p[i] + p[i + 1]] + p[i + 2:]

vocab = {show(t): r for t, r in ranks.items()} | {"<|endoftext|>": 50256}
merges = []
for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
    if len(token) > 1:
        a, b = parts(token, rank)
        merges.append(f"{show(a)} {show(b)}")
json.dump(vocab, open(f"{work}/gpt2/vocab.json", "w"), ensure_ascii=False)
open(f"{work}/gpt2/merges.txt", "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")

pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                        special_tokens={"<|endoftext|>": 50256})
text = open(text_path, encoding="utf-8", newline="").read()
json.dump(enc.encode_ordinary(text), open(f"{work}/want.json", "w"))
print(f"{len(vocab)} tokens, {len(merges)} merges; tiktoken: {len(json.load(open(f'{work}/want.json')))} tokens")
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
