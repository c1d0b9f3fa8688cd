"""Run ``dmlkd ARGS`` and SIGKILL this process at one phase of a training run (for the lifecycle tests).

``FAULT=<phase>[:<n>]`` picks where the process dies, at the ``n``-th (default first) time it gets there:
``step`` after an optimiser step, ``state-write`` inside a state write (tensors written, folder not yet
renamed into place), ``eval`` at the start of an evaluation, ``before-best`` after ``last/`` was published
and before ``best/``. No fault: a plain run. The patches wrap the library's own functions; nothing in dmlkd
knows about them.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _countdown(n: int):
    left = {"n": n}

    def hit() -> bool:
        left["n"] -= 1
        return left["n"] == 0

    return hit


def install(phase: str, n: int) -> None:
    from dmlkd.engine import bookkeeping, loop, state

    hit = _countdown(n)
    if phase == "step":
        real_step = loop.train_step

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            if hit():
                _die()
            return result

        loop.train_step = step
    elif phase == "state-write":
        real_save = state.save_tensor_file

        def save_tensor_file(tensors, path, *args, **kwargs):
            real_save(tensors, path, *args, **kwargs)
            if hit():  # the tensors are written into the temporary folder, which is not renamed yet
                _die()

        state.save_tensor_file = save_tensor_file
    elif phase == "eval":
        real_evaluate = bookkeeping.evaluate_model

        def evaluate_model(*args, **kwargs):
            if hit():
                _die()
            return real_evaluate(*args, **kwargs)

        bookkeeping.evaluate_model = evaluate_model
    elif phase == "before-best":
        real_write = bookkeeping.FitBookkeeping._write

        def write(self, name, *args, **kwargs):
            if name == "best" and hit():
                _die()
            return real_write(self, name, *args, **kwargs)

        bookkeeping.FitBookkeeping._write = write
    else:
        raise SystemExit(f"unknown FAULT phase {phase!r}")


if __name__ == "__main__":
    fault = os.environ.get("FAULT")
    if fault:
        phase, _, count = fault.partition(":")
        install(phase, int(count or 1))
    from dmlkd.cli import main

    main(sys.argv[1:])
