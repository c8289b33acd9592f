"""The Python package against the command line: the same plan, the same losses, the same
greedy sample, and pipit's errors as ValueError with the interpreter going on.

Run: ``pip install ./python pytest`` then ``pytest python/tests``. The command line is
``$PIPIT_BIN``, else the repository's ``target/release/pipit`` or ``target/debug/pipit``.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pipit

ROOT = Path(__file__).resolve().parents[2]

# A tiny run: two stages of a 2-block GPT-2 of width 32, on the CPU backend.
RUN = dict(
    backend="cpu",
    n_layer=2,
    n_embd=32,
    n_head=2,
    n_positions=32,
    seq_len=32,
    batch_size=4,
    stages=2,
    microbatches=2,
    steps=6,
    lr=0.003,
    warmup_steps=0,
    eval_every=3,
    eval_tokens=512,
)


def _binary() -> str:
    given = os.environ.get("PIPIT_BIN")
    if given:
        return given
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / "pipit"
        if path.exists():
            return str(path)
    pytest.skip("no pipit binary: build it (cargo build) or set PIPIT_BIN")


def cli(*args: str) -> str:
    """Run the pipit command line; its standard output."""
    out = subprocess.run([_binary(), *args], capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": "/tmp"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def flags(options: dict) -> list:
    return [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]


def test_plan_is_the_command_lines_json():
    got = pipit.plan(schedule="1f1b", stages=4, microbatches=8)
    want = json.loads(cli("plan", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--format", "json"))
    assert got == want
    assert got["efficiency"] == pytest.approx(8 / 11)
    # Lists as lists or as the command line's comma-separated text.
    costs = dict(schedule="gpipe", stages=2, microbatches=4)
    assert pipit.plan(fwd=[1, 3], **costs) == pipit.plan(fwd="1,3", **costs)
    compared = pipit.plan(compare=True, stages=4, microbatches=8)
    assert {row["schedule"] for row in compared} >= {"gpipe", "1f1b", "zb-h1"}


def test_trainer_steps_give_the_command_lines_losses(tmp_path):
    log = tmp_path / "cli.jsonl"
    cli("train", *flags(RUN), "--no-save", f"--log-json={log}")
    want = [json.loads(line) for line in log.read_text().splitlines()]
    run = pipit.Trainer(**RUN)
    got = run.train()
    assert len(got) == len(want) == 6
    for mine, theirs in zip(got, want):
        for key in ("step", "loss", "lr", "val_loss"):
            assert mine.get(key) == theirs.get(key), key
    assert got[-1]["loss"] < got[0]["loss"] - 0.1
    assert run.steps_done == 6
    assert run.evaluate() == pytest.approx(want[-1]["val_loss"], abs=1e-9)
    assert run.config["n_embd" if "n_embd" in run.config else "model"]
    with pytest.raises(ValueError, match="has done its 6 steps"):
        run.step()


def test_calls_print_nothing_unless_verbose(capfd):
    pipit.Trainer(**RUN).step()
    assert capfd.readouterr().err == ""
    pipit.Trainer(verbose=True, **RUN)
    err = capfd.readouterr().err
    assert "backend: cpu" in err and "rank 1:" in err, err
    with pytest.raises(ValueError, match="option `verbose` is a switch"):
        pipit.plan(schedule="1f1b", stages=2, microbatches=4, verbose="loud")


def test_a_callback_stops_the_run():
    run = pipit.Trainer(**RUN)
    seen = run.train(lambda line: line["step"] < 2)
    assert [line["step"] for line in seen] == [1, 2]
    assert run.steps_done == 2
    assert run.step()["step"] == 3


def test_generate_is_the_command_lines_greedy_sample_and_logits_agree(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = pipit.Trainer(**RUN)
    run.train()
    run.save(ckpt)
    options = dict(max_tokens=12, temperature=0, stages=2, backend="cpu")
    text = pipit.generate(ckpt, "ROMEO:", **options)
    report = json.loads(cli("generate", f"--checkpoint={ckpt}", "--prompt=ROMEO:", *flags(options), "--format=json"))
    assert text == report["samples"][0]["text"]
    assert pipit.generate_report(ckpt, "ROMEO:", **options)["samples"] == report["samples"]
    # The greedy first token is the arg-max of the trainer's logits after the prompt.
    logits = run.logits("ROMEO:")
    assert logits.dtype == np.float32 and logits.shape == (256,) and np.isfinite(logits).all()
    assert int(np.argmax(logits)) == report["samples"][0]["ids"][0]
    scored = pipit.evaluate(ckpt, backend="cpu", stages=2)
    assert scored == json.loads(cli("eval", f"--checkpoint={ckpt}", "--backend=cpu", "--stages=2", "--format=json"))


def test_bad_input_raises_value_error_with_pipits_message_and_the_interpreter_lives_on():
    with pytest.raises(ValueError, match=r"^--stages must be at least 1, got 0$"):
        pipit.Trainer(stages=0)
    with pytest.raises(ValueError, match="unknown option `microbatchez`"):
        pipit.plan(schedule="1f1b", stages=2, microbatchez=4)
    with pytest.raises(ValueError, match="invalid value 'sideways'"):
        pipit.plan(schedule="sideways", stages=2, microbatches=4)
    with pytest.raises(ValueError, match="option `save` is the command line's"):
        pipit.Trainer(save="somewhere", **RUN)
    with pytest.raises(ValueError, match="option `format` is set by this call itself"):
        pipit.plan(schedule="1f1b", stages=2, microbatches=4, format="text")
    with pytest.raises(ValueError, match="not-a-checkpoint"):
        pipit.generate("not-a-checkpoint")
    assert pipit.plan(schedule="gpipe", stages=2, microbatches=2)["microbatches"] == 2


def test_the_gil_is_released_while_pipit_computes():
    # An evaluation over the whole held-out tenth (about 156,000 tokens) of a width-128 model
    # takes a second or more; while a thread is inside it, this one must still run Python.
    run = pipit.Trainer(**{**RUN, "n_embd": 128, "n_head": 4, "eval_tokens": 0})
    inside = threading.Event()
    done = []

    def evaluate():
        inside.set()
        done.append(run.evaluate())

    worker = threading.Thread(target=evaluate)
    started = time.perf_counter()
    worker.start()
    inside.wait()
    time.sleep(0.05)
    woke = time.perf_counter() - started
    still_running = not done
    worker.join()
    took = time.perf_counter() - started
    # Held through the call, the GIL would keep this thread asleep until the call returned.
    assert still_running, f"woke after {woke:.3f} s, the evaluation took {took:.3f} s"
    assert took > 3 * woke, f"woke after {woke:.3f} s, the evaluation took {took:.3f} s"


def test_the_example_runs(tmp_path):
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/python/train.py"), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1F1B, p = 2, m = 4: efficiency 0.800, bubble 0.200"
    losses = [float(line.split("val loss ")[1]) for line in lines if line.startswith("step ")]
    assert len(losses) == 3 and losses[2] < losses[0] - 0.3, losses
    assert lines[-1] == "refused: --stages must be at least 1, got 0"
