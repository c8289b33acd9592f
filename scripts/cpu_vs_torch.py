"""PyTorch eager's side of scripts/cpu-vs-torch.sh: Hugging Face GPT2LMHeadModel (or, for the
family `llama`, LlamaForCausalLM shaped as pipit's default Llama: untied head, SwiGLU width
8/3 of the model's rounded up to a multiple of 32, RMSNorm eps 1e-6) on bytes of the embedded
corpus, trained with AdamW on the CPU, printing the median tokens per second over the measured
steps as `torch WIDTH SEQ LAYERS TOKENS_PER_SEC`.

    python cpu_vs_torch.py CORPUS THREADS STEPS FAMILY WIDTHxSEQxLAYERS..."""

import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def build(family, width, seq, layers):
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=256, hidden_size=width, intermediate_size=-(-8 * width // 96) * 32,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=seq, rms_norm_eps=1e-6, tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    raise SystemExit(f"unknown family {family} (gpt2 or llama)")


def main():
    corpus, threads, steps, family = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[5:]]
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    data = torch.tensor(list(open(corpus, "rb").read()), dtype=torch.long)
    for width, seq, layers in shapes:
        model = build(family, width, seq, layers)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        batch = 16
        rates = []
        for step in range(steps):
            starts = torch.randint(0, len(data) - seq - 1, (batch,))
            x = torch.stack([data[s : s + seq] for s in starts])
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - t0
            if step >= 3:
                rates.append(batch * seq / elapsed)
        print(f"torch {width} {seq} {layers} {statistics.median(rates):.0f}", flush=True)


main()
