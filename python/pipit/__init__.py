"""pipit: pipeline-parallel training and inference for GPT-2 and Llama models.

The calls here are pipit's subcommands, and their keyword arguments are the subcommand's
flags with ``_`` for ``-``: ``pipit.plan(schedule="1f1b", stages=4, microbatches=8)`` is
``pipit plan --schedule 1f1b --stages 4 --microbatches 8``, parsed by the command line's own
parser, so the defaults, the checks and the results are the command line's (see
``pipit <command> --help`` for every option). A switch takes ``True``; a flag that takes a
list takes a list or a comma-separated string. ``verbose=True`` keeps the messages the command
line prints on stderr (the device, the stages, progress); by default a call prints nothing.
Input pipit refuses raises ``ValueError``
with pipit's one-line message; other failures raise ``RuntimeError``. pipit releases the
GIL while it computes.

    >>> import pipit
    >>> pipit.plan(schedule="1f1b", stages=4, microbatches=8)["efficiency"]
    0.7272727272727273
    >>> run = pipit.Trainer(n_embd=32, n_layer=2, stages=2, steps=20, backend="cpu")
    >>> run.step()["loss"]          # the step's `pipit train --log-json` line, as a dict
    >>> run.save("runs/tiny")
    >>> pipit.generate("runs/tiny", "ROMEO:", max_tokens=40, temperature=0)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _pipit

__version__: str = _pipit.__version__

__all__ = ["plan", "Trainer", "generate", "generate_report", "evaluate", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


def _options(options: Dict[str, Any]) -> str:
    """Keyword arguments as the JSON object pipit reads: paths as strings, None left out."""
    clean = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in options.items() if v is not None}
    return json.dumps(clean)


def plan(**options: Any) -> Dict[str, Any]:
    """Plan a pipeline step: ``pipit plan --format json`` for these flags.

    Generates the schedule (``schedule``: naive, gpipe, 1f1b, interleaved, zb-h1, zb-v), with
    ``stages`` ranks and ``microbatches`` per step, lowers it to sends and receives, proves it
    cannot deadlock, and simulates it under the costs given (``fwd``, ``bwd``, ``comm`` in ms,
    ...). Returns the same dict as the command line's JSON: ``makespan``, ``efficiency``,
    ``bubble_fraction``, per-rank peaks, advice. With ``compare=True``, a list with one entry
    per schedule.
    """
    return json.loads(_pipit.plan(_options(options)))


def generate(checkpoint: PathLike, prompt: str = "ROMEO:\n", **options: Any) -> str:
    """The text of one sample from ``checkpoint``: the prompt and what the model continued.

    Options are ``pipit generate``'s flags: ``max_tokens`` (400), ``temperature`` (0.8; 0 is
    greedy), ``top_k``, ``top_p``, ``seed``, ``stages``, ``backend``. See
    :func:`generate_report` for several samples, their token ids and the rate.
    """
    if options.get("samples", 1) != 1:
        raise ValueError("generate gives one sample; use generate_report for samples > 1")
    report = generate_report(checkpoint, prompt, **options)
    return report["samples"][0]["text"]


def generate_report(checkpoint: PathLike, prompt: str = "ROMEO:\n", **options: Any) -> Dict[str, Any]:
    """``pipit generate --format json``: ``{"samples": [{"prompt", "seed", "text", "ids",
    "end"}], "tokens", "seconds", "tokens_per_sec"}``."""
    return json.loads(_pipit.generate(_options({"checkpoint": checkpoint, "prompt": prompt, **options})))


def evaluate(checkpoint: PathLike, **options: Any) -> Dict[str, Any]:
    """``pipit eval --format json``: ``{"loss", "tokens", "per"}``, the mean cross-entropy of
    ``checkpoint`` on ``data`` (default: the embedded corpus's held-out tenth)."""
    return json.loads(_pipit.evaluate(_options({"checkpoint": checkpoint, **options})))


class Trainer:
    """A ``pipit train`` run in this process, a step at a time.

    The keyword arguments are ``pipit train``'s flags: the model (``model``, ``n_layer``,
    ``n_embd``, ...), the pipeline (``stages``, ``microbatches``, ``schedule``), the
    optimizer (``steps``, ``lr``, ...), ``backend``, ``data``, ``init`` or ``resume``. With
    none, the main job of ``pipit train``. Nothing is saved unless :meth:`save` is called.
    """

    def __init__(self, **config: Any) -> None:
        self._run = _pipit.Training(_options(config))

    def step(self) -> Dict[str, Any]:
        """Train one step, and evaluate where ``pipit train`` would (every ``eval_every``
        steps and after the last): the step's ``--log-json`` line, ``step``, ``loss``,
        ``lr``, ``tokens_per_sec``, ``bubble_fraction``, ``peak_bytes``, and ``val_loss``
        after an evaluation."""
        return json.loads(self._run.step())

    def train(self, callback: Optional[Callable[[Dict[str, Any]], Any]] = None) -> List[Dict[str, Any]]:
        """Train to the last step; ``callback`` (if given) gets each step's line and stops the
        run by returning ``False``. The lines of the steps run."""
        lines = []
        done, steps = self._run.progress()
        while done < steps:
            line = self.step()
            lines.append(line)
            done += 1
            if callback is not None and callback(line) is False:
                break
        return lines

    @property
    def steps_done(self) -> int:
        """Steps trained so far."""
        return self._run.progress()[0]

    @property
    def config(self) -> Dict[str, Any]:
        """The run's settings, as ``pipit train --show-config`` gives them."""
        return json.loads(self._run.config())

    def evaluate(self) -> float:
        """The validation loss now (nats per token) over the run's ``eval_tokens``."""
        return self._run.evaluate()

    def save(self, path: PathLike) -> None:
        """Save a checkpoint to the directory ``path`` (``pipit train --resume`` continues it;
        ``pipit generate`` and :func:`generate` sample from it)."""
        self._run.save(os.fspath(path))

    def logits(self, tokens: Union[Sequence[int], bytes, str]) -> np.ndarray:
        """The next-token logits after ``tokens`` (token ids; or bytes or text for the
        byte-level models pipit trains from scratch): a float32 array of ``vocab_size``."""
        if isinstance(tokens, str):
            tokens = tokens.encode()
        ids = list(tokens)
        return np.frombuffer(self._run.logits(ids), dtype=np.float32).copy()
