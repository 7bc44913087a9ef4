"""Exit codes of the command-line programs (`train/`, `eval/`, `python -m specdiff_jax.convert`), in one place.

    0  done (also: a training run interrupted by a signal, saved and resumable)
    1  a run that stopped (e.g. a NaN loss; TrainingError)
    2  an input a user can fix (config, paths, tokenizer, corpus, checkpoints)

Every error is printed as one line `error: <message>` on stderr; the message names the input and the fix.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from specdiff_jax.checkpoint import CheckpointError
from specdiff_jax.config import ConfigError
from specdiff_jax.data.corpus import CorpusError
from specdiff_jax.rundir import TrainingError
from specdiff_jax.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, TokenizerError, CorpusError, CheckpointError)


def fail(e: BaseException | str, status: int = 2) -> int:
    """Print `error: e` on stderr and return `status`."""
    print(f"error: {e}", file=sys.stderr)
    return status


def run_program(body: Callable[[], Any]) -> tuple[int | None, Any]:
    """Run the body of a program with one-line errors.

    Returns (exit status, None) when it failed: 2 for inputs a user can fix, 1 for a run that stopped; otherwise
    (None, body's value).
    """
    try:
        return None, body()
    except USER_ERRORS as e:
        return fail(e, 2), None
    except TrainingError as e:
        return fail(e, 1), None


def interrupted_message(result) -> str:
    """What a program prints when its training run (a `training.TrainResult`) was interrupted and saved."""
    return f"interrupted at step {result.step}; checkpoint {result.checkpoint}; rerun the same command to resume"
