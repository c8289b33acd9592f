"""pipit from Python: plan a pipeline, train a tiny GPT-2 cut into two stages, save it, score
it and sample from it.

    pip install ./python
    python examples/python/train.py [CHECKPOINT_DIR]

Keyword arguments are pipit's command-line flags with ``_`` for ``-``; results are dicts.
"""

import sys
import tempfile

import pipit


def main() -> None:
    planned = pipit.plan(schedule="1f1b", stages=2, microbatches=4)
    print(f"1F1B, p = 2, m = 4: efficiency {planned['efficiency']:.3f}, bubble {planned['bubble_fraction']:.3f}")

    run = pipit.Trainer(
        backend="cpu", n_layer=2, n_embd=32, n_head=2, n_positions=32, seq_len=32,
        batch_size=4, stages=2, microbatches=2, steps=30, lr=0.003, warmup_steps=0,
        eval_every=10, eval_tokens=2048,
    )
    for line in run.train():
        if "val_loss" in line:
            print(f"step {line['step']}: loss {line['loss']:.4f}, val loss {line['val_loss']:.4f}")

    checkpoint = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="pipit-")
    run.save(checkpoint)
    scored = pipit.evaluate(checkpoint, backend="cpu", stages=2)
    print(f"saved {checkpoint}: {scored['loss']:.4f} nats/{scored['per']} over {scored['tokens']} tokens")
    logits = run.logits("ROMEO:")
    print(f"most likely after 'ROMEO:': {bytes([int(logits.argmax())])!r}")
    print(repr(pipit.generate(checkpoint, "ROMEO:", max_tokens=24, temperature=0, stages=2, backend="cpu")))

    try:
        pipit.Trainer(stages=0)
    except ValueError as e:
        print(f"refused: {e}")


if __name__ == "__main__":
    main()
