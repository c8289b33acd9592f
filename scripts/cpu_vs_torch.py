"""PyTorch eager's side of scripts/cpu-vs-torch.sh: Hugging Face GPT2LMHeadModel on bytes of
the embedded corpus, trained with AdamW on the CPU, printing the median tokens per second
over the measured steps as `torch WIDTH SEQ LAYERS TOKENS_PER_SEC`."""

import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    corpus, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[4:]]
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    data = torch.tensor(list(open(corpus, "rb").read()), dtype=torch.long)
    for width, seq, layers in shapes:
        config = GPT2Config(
            vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
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
