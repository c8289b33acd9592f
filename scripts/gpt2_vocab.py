"""Write GPT-2's tokenizer as a Hugging Face style vocab.json and merges.txt, from the BPE
ranks in tiktoken's format (the openai-whisper package ships GPT-2's as
whisper/assets/gpt2.tiktoken).

    python3 scripts/gpt2_vocab.py RANKS_FILE OUT_DIR

Each merge is recovered as the two parts BPE makes of its token from the merges before it, so
merging by line order is merging by rank. Used by gpt2-tokenizer-check.sh and hf-check.sh.
"""
import base64
import json
import sys


def load_ranks(path):
    ranks = {}
    for line in open(path, "rb"):
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_chars():
    """GPT-2's printable stand-in for each byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def main(ranks_path, out_dir):
    ranks = load_ranks(ranks_path)
    char = byte_chars()
    show = lambda bs: "".join(char[b] for b in bs)

    def parts(token, below):
        p = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(p[i] + p[i + 1]), i) for i in range(len(p) - 1)]
            best = min(((r, i) for r, i in pairs if r is not None), default=None)
            if best is None or best[0] >= below:
                return p
            i = best[1]
            p = p[:i] + [p[i] + p[i + 1]] + p[i + 2:]

    vocab = {show(t): r for t, r in ranks.items()} | {"<|endoftext|>": len(ranks)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        if len(token) > 1:
            a, b = parts(token, rank)
            merges.append(f"{show(a)} {show(b)}")
    json.dump(vocab, open(f"{out_dir}/vocab.json", "w"), ensure_ascii=False)
    open(f"{out_dir}/merges.txt", "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"{len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main(*sys.argv[1:])
