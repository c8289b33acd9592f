#!/usr/bin/env bash
# Check pipit against Hugging Face transformers (PyTorch, on the CPU), both ways, without
# downloading any model:
#
# 1. A randomly initialised GPT-2 made and saved by transformers (safetensors, with GPT-2's
#    tokenizer as vocab.json and merges.txt, built by scripts/gpt2_vocab.py from the ranks the
#    openai-whisper package ships). pipit loads the directory and must give transformers'
#    greedy continuation of a prompt token for token (`pipit generate --temperature 0`, cut
#    into 2 stages, through the key/value caches; transformers' `generate` caches too), and
#    its evaluation loss over BPE windows (`pipit eval`). The same directory with only the
#    fast tokenizer's tokenizer.json must score the same.
# 2. A byte-level model trained by pipit: `GPT2LMHeadModel.from_pretrained` loads its
#    checkpoint and must give pipit's evaluation loss and greedy continuation.
# 3. The GPT-2 of 1 fine-tuned by pipit on BPE tokens (`pipit train --init`): transformers
#    loads the new directory with the tokenizer pipit saved there and gives pipit's loss.
# 4. A randomly initialised Llama made and saved by transformers (grouped-query attention,
#    4 query heads on 2 key/value heads, rope θ = 500,000, an untied head), as one file and
#    sharded with an index, with GPT-2's BPE beside it: pipit's loss over BPE windows from each
#    within 1e-5 of transformers', and its greedy continuation through 2 stages with caches
#    token for token.
# 5. A byte-level Llama trained by pipit: `LlamaForCausalLM.from_pretrained` loads it and
#    gives pipit's loss and greedy continuation.
# 6. Two tokenizer.json files trained by the Python `tokenizers` package on the corpus — a
#    byte-level BPE (GPT-2's and Llama 3's kind) and a SentencePiece-style BPE with byte
#    fallback (Llama 2's and Mistral's kind) — give pipit the ids they give Python, token for
#    token over the whole corpus.
# 7. A randomly initialised Qwen2 (its q, k, v biases drawn non-zero) and Mistral made by
#    transformers: pipit's loss within 1e-5 and greedy tokens through 2 stages; a Qwen2
#    trained by pipit loads in transformers as Qwen2ForCausalLM with pipit's loss.
#
#     scripts/hf-check.sh [BACKEND]          # reference (default) or wgpu
#     HF_VENV=/tmp/hf scripts/hf-check.sh    # keep the Python environment for the next run
#
# Needs python3 with venv and pip, network access to PyPI, and some 6 GB of disk for torch.
# Exit status 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-reference}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
# HF_VENV=DIR keeps the virtual environment (and its torch) between runs.
venv=${HF_VENV:-$work/venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0 safetensors
"$venv/bin/pip" download -q --no-deps --no-binary :all: -d "$work" openai-whisper
tar -xzf "$work"/openai_whisper-*.tar.gz -C "$work"
cargo build -q --release
# pipit ARGS...: run the release binary, its stderr kept in $work/pipit.log and shown if it
# fails (the temporary folder goes with the script's exit).
pipit() {
    "$PWD/target/release/pipit" "$@" 2>"$work/pipit.log" || {
        echo "pipit $1 failed:" >&2
        cat "$work/pipit.log" >&2
        return 1
    }
}
head -c 20000 data/shakespeare.txt >"$work/text.txt"
prompt=$'ROMEO:\nBut, soft! what light'

# 1. transformers' GPT-2 in pipit.
mkdir -p "$work/hf"
python3 scripts/gpt2_vocab.py "$(find "$work" -name gpt2.tiktoken | head -1)" "$work/hf"
"$venv/bin/python" - "$work" <<'PY'
import sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel

work = sys.argv[1]
torch.manual_seed(0)
# A wide initialisation makes the logits decisive, so greedy choices are not near-ties.
config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                    initializer_range=0.3)
model = GPT2LMHeadModel(config).eval()
model.save_pretrained(f"{work}/hf", safe_serialization=True)
# The same model with only the fast tokenizer's tokenizer.json beside it.
import os, shutil
from transformers import GPT2TokenizerFast
GPT2TokenizerFast.from_pretrained(f"{work}/hf").save_pretrained(f"{work}/hf-fast")
for f in ("vocab.json", "merges.txt"):
    if os.path.exists(f"{work}/hf-fast/{f}"):
        os.remove(f"{work}/hf-fast/{f}")
for f in ("model.safetensors", "config.json"):
    shutil.copy(f"{work}/hf/{f}", f"{work}/hf-fast/{f}")
PY
pipit generate --checkpoint "$work/hf" --backend "$backend" --stages 2 --prompt "$prompt" \
    --temperature 0 --max-tokens 40 --format json >"$work/hf-generate.json"
pipit eval --checkpoint "$work/hf" --backend "$backend" --stages 2 --seq-len 128 \
    --data "$work/text.txt" --format json >"$work/hf-eval.json"
pipit eval --checkpoint "$work/hf-fast" --backend "$backend" --stages 2 --seq-len 128 \
    --data "$work/text.txt" --format json >"$work/hf-fast-eval.json"

pipit train --init "$work/hf" --backend "$backend" --data "$work/text.txt" --seq-len 128 \
    --batch-size 4 --microbatches 2 --stages 2 --steps 20 --eval-every 0 --eval-tokens 512 \
    --save "$work/tuned" >/dev/null
pipit eval --checkpoint "$work/tuned" --backend "$backend" --stages 2 --seq-len 128 \
    --data "$work/text.txt" --format json >"$work/tuned-eval.json"

# 2. pipit's checkpoint in transformers.
pipit train --backend "$backend" --steps 200 --eval-every 0 --save "$work/pipit" >/dev/null
# 30 bytes after the 28-byte prompt stay inside the default model's 64 positions, which
# transformers' GPT-2 cannot go past.
pipit generate --checkpoint "$work/pipit" --backend "$backend" --prompt "$prompt" \
    --temperature 0 --max-tokens 30 --format json >"$work/pipit-generate.json"
pipit eval --checkpoint "$work/pipit" --backend "$backend" --data "$work/text.txt" \
    --format json >"$work/pipit-eval.json"

# 4. transformers' Llama in pipit, one file and sharded.
"$venv/bin/python" - "$work" <<'PY'
import shutil, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

work = sys.argv[1]
torch.manual_seed(0)
sizes = dict(vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3)
try:
    config = LlamaConfig(**sizes, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
except TypeError:
    config = LlamaConfig(**sizes, rope_theta=500000.0)
model = LlamaForCausalLM(config).eval()
model.save_pretrained(f"{work}/llama", safe_serialization=True)
model.save_pretrained(f"{work}/llama-sharded", safe_serialization=True, max_shard_size="8MB")
for d in ("llama", "llama-sharded"):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(f"{work}/hf/{f}", f"{work}/{d}/{f}")
PY
test -f "$work/llama-sharded/model.safetensors.index.json"
test ! -f "$work/llama-sharded/model.safetensors"
pipit generate --checkpoint "$work/llama" --backend "$backend" --stages 2 --prompt "$prompt" \
    --temperature 0 --max-tokens 40 --format json >"$work/llama-generate.json"
for d in llama llama-sharded; do
    pipit eval --checkpoint "$work/$d" --backend "$backend" --stages 2 --seq-len 128 \
        --data "$work/text.txt" --format json >"$work/$d-eval.json"
done

# 5. pipit's Llama in transformers.
pipit train --model llama --n-kv-head 2 --rope-theta 500000 --backend "$backend" --steps 200 \
    --eval-every 0 --save "$work/pipit-llama" >/dev/null
pipit generate --checkpoint "$work/pipit-llama" --backend "$backend" --prompt "$prompt" \
    --temperature 0 --max-tokens 30 --format json >"$work/pipit-llama-generate.json"
pipit eval --checkpoint "$work/pipit-llama" --backend "$backend" --data "$work/text.txt" \
    --format json >"$work/pipit-llama-eval.json"

# 7. transformers' Qwen2 (q, k, v biases, made non-zero here) and Mistral in pipit, and
#    pipit's Qwen2 in transformers.
"$venv/bin/python" - "$work" <<'PY'
import shutil, sys
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

work = sys.argv[1]
sizes = dict(vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3)
for name, Config, Model, extra in (
        ("qwen2", Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=False)),
        ("mistral", MistralConfig, MistralForCausalLM, dict(sliding_window=None))):
    torch.manual_seed(0)
    try:
        config = Config(**sizes, **extra, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    except TypeError:
        config = Config(**sizes, **extra, rope_theta=1000000.0)
    model = Model(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.3)
    model.save_pretrained(f"{work}/{name}", safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(f"{work}/hf/{f}", f"{work}/{name}/{f}")
PY
for d in qwen2 mistral; do
    pipit generate --checkpoint "$work/$d" --backend "$backend" --stages 2 --prompt "$prompt" \
        --temperature 0 --max-tokens 40 --format json >"$work/$d-generate.json"
    pipit eval --checkpoint "$work/$d" --backend "$backend" --stages 2 --seq-len 128 \
        --data "$work/text.txt" --format json >"$work/$d-eval.json"
done
pipit train --model qwen2 --n-kv-head 2 --backend "$backend" --steps 100 --eval-every 0 \
    --save "$work/pipit-qwen2" >/dev/null
pipit eval --checkpoint "$work/pipit-qwen2" --backend "$backend" --data "$work/text.txt" \
    --format json >"$work/pipit-qwen2-eval.json"

# 6. tokenizer.json of each kind, trained here, in pipit.
"$venv/bin/python" - "$work" data/shakespeare.txt <<'PY'
import json, os, sys
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

work, corpus = sys.argv[1:]
byte_level = Tokenizer(models.BPE())
byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
byte_level.decoder = decoders.ByteLevel()
byte_level.train([corpus], trainers.BpeTrainer(
    vocab_size=2000, special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
pieces = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
pieces.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
pieces.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                    decoders.ByteFallback(), decoders.Fuse()])
# No byte of the alphabet beyond ASCII letters: the rest must fall back to bytes.
pieces.train([corpus], trainers.BpeTrainer(
    vocab_size=1500, limit_alphabet=60, show_progress=False,
    special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]))
text = open(corpus, encoding="utf-8", newline="").read()
for name, tok in (("tok-byte-level", byte_level), ("tok-byte-fallback", pieces)):
    os.makedirs(f"{work}/{name}")
    tok.save(f"{work}/{name}/tokenizer.json")
    json.dump(tok.encode(text).ids, open(f"{work}/{name}/want.json", "w"))
PY
for d in tok-byte-level tok-byte-fallback; do
    cargo run -q --release --example tokenize -- "$work/$d" <data/shakespeare.txt >"$work/$d/got.json"
done

"$venv/bin/python" - "$work" "$prompt" <<'PY'
import json, sys
import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

work, prompt = sys.argv[1:]
failures = 0

def check(what, ok, detail):
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")

def window_loss(model, tokens, T):
    """Mean cross-entropy over the windows [kT, (k+1)T) of `tokens`, and the tokens scored."""
    windows = (len(tokens) - 1) // T
    total = 0.0
    with torch.no_grad():
        for k in range(windows):
            x = torch.tensor([tokens[k * T:(k + 1) * T]])
            y = torch.tensor(tokens[k * T + 1:(k + 1) * T + 1])
            logits = model(x).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    return total / (windows * T), windows * T

def greedy(model, ids, n, pad):
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()

def same_ids(what, got, want):
    same = sum(a == b for a, b in zip(got, want))
    check(what, got == want, f"{same} of {len(want)} the same")

def same_loss(what, ev, loss, tokens):
    rel = abs(ev["loss"] - loss) / loss
    check(what, rel < 1e-5 and ev["tokens"] == tokens,
          f"pipit {ev['loss']:.9f} ({ev['tokens']} tokens), transformers {loss:.9f} "
          f"({tokens}), relative difference {rel:.1e}")

text = open(f"{work}/text.txt", encoding="utf-8", newline="").read()

model = GPT2LMHeadModel.from_pretrained(f"{work}/hf").eval()
tok = GPT2TokenizerFast.from_pretrained(f"{work}/hf")
got = json.load(open(f"{work}/hf-generate.json"))["samples"][0]["ids"]
same_ids("transformers' GPT-2, greedy tokens", got,
         greedy(model, tok(prompt).input_ids, 40, 50256))
ev = json.load(open(f"{work}/hf-eval.json"))
check("transformers' GPT-2, pipit counts BPE tokens", ev["per"] == "token", ev["per"])
fast = json.load(open(f"{work}/hf-fast-eval.json"))
check("transformers' GPT-2 with only tokenizer.json, the same evaluation", fast == ev,
      f"{fast} against {ev}")
same_loss("transformers' GPT-2, loss over BPE windows", ev,
          *window_loss(model, tok(text).input_ids, 128))

tuned = GPT2LMHeadModel.from_pretrained(f"{work}/tuned").eval()
tuned_tok = GPT2TokenizerFast.from_pretrained(f"{work}/tuned")
ev = json.load(open(f"{work}/tuned-eval.json"))
base = window_loss(model, tok(text).input_ids, 128)[0]
check("pipit's fine-tuning moved the loss", ev["loss"] < base, f"{base:.4f} -> {ev['loss']:.4f}")
same_loss("pipit's fine-tuned GPT-2 in transformers, with the tokenizer pipit saved", ev,
          *window_loss(tuned, tuned_tok(text).input_ids, 128))

model = GPT2LMHeadModel.from_pretrained(f"{work}/pipit").eval()
ev = json.load(open(f"{work}/pipit-eval.json"))
same_loss("pipit's checkpoint in transformers, loss over byte windows", ev,
          *window_loss(model, list(text.encode()), model.config.n_positions))
got = json.load(open(f"{work}/pipit-generate.json"))["samples"][0]["ids"]
same_ids("pipit's checkpoint in transformers, greedy bytes", got,
         greedy(model, list(prompt.encode()), 30, 0))

from transformers import LlamaForCausalLM
llama = LlamaForCausalLM.from_pretrained(f"{work}/llama").eval()
got = json.load(open(f"{work}/llama-generate.json"))["samples"][0]["ids"]
same_ids("transformers' Llama (GQA, rope theta 500000, untied), greedy tokens", got,
         greedy(llama, tok(prompt).input_ids, 40, 50256))
want = window_loss(llama, tok(text).input_ids, 128)
for d in ("llama", "llama-sharded"):
    same_loss(f"transformers' Llama from {d}, loss over BPE windows",
              json.load(open(f"{work}/{d}-eval.json")), *want)

llama = LlamaForCausalLM.from_pretrained(f"{work}/pipit-llama").eval()
ev = json.load(open(f"{work}/pipit-llama-eval.json"))
same_loss("pipit's Llama in transformers, loss over byte windows", ev,
          *window_loss(llama, list(text.encode()), llama.config.max_position_embeddings))
got = json.load(open(f"{work}/pipit-llama-generate.json"))["samples"][0]["ids"]
same_ids("pipit's Llama in transformers, greedy bytes", got,
         greedy(llama, list(prompt.encode()), 30, 0))

from transformers import AutoModelForCausalLM
for d, what in (("qwen2", "Qwen2 (q, k, v biases)"), ("mistral", "Mistral")):
    model = AutoModelForCausalLM.from_pretrained(f"{work}/{d}").eval()
    got = json.load(open(f"{work}/{d}-generate.json"))["samples"][0]["ids"]
    same_ids(f"transformers' {what}, greedy tokens", got, greedy(model, tok(prompt).input_ids, 40, 50256))
    same_loss(f"transformers' {what}, loss over BPE windows",
              json.load(open(f"{work}/{d}-eval.json")), *window_loss(model, tok(text).input_ids, 128))
qwen = AutoModelForCausalLM.from_pretrained(f"{work}/pipit-qwen2").eval()
check("pipit's Qwen2 loads as transformers' Qwen2", type(qwen).__name__ == "Qwen2ForCausalLM", type(qwen).__name__)
same_loss("pipit's Qwen2 in transformers, loss over byte windows",
          json.load(open(f"{work}/pipit-qwen2-eval.json")),
          *window_loss(qwen, list(text.encode()), qwen.config.max_position_embeddings))

for d, kind in (("tok-byte-level", "byte-level BPE"), ("tok-byte-fallback", "BPE with byte fallback")):
    want = json.load(open(f"{work}/{d}/want.json"))
    got = json.load(open(f"{work}/{d}/got.json"))
    fallback = sum(1 for i in want if 3 <= i < 259) if d == "tok-byte-fallback" else 0
    same_ids(f"a {kind} tokenizer.json over the whole corpus ({len(want)} tokens"
             + (f", {fallback} of them bytes)" if fallback else ")"), got, want)
    if d == "tok-byte-fallback":
        check("the byte-fallback tokenizer fell back to bytes", fallback > 0, fallback)
sys.exit(1 if failures else 0)
PY
