"""Work in a second process beside this one, and sharing two cores with it: the demo trains its voice beside the
listening stages (``Beside``, ``sharing_cores``, ``ShareCores``) and measures the voice's two splits side by side."""

from __future__ import annotations

import multiprocessing
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback


class Beside:
    """``fn(*args)`` in a second process, started now: the demo trains the voice (one thread) while the listening
    stages train here. Spawned, so it shares no state with this process; its output goes to ``log``.
    ``result()`` waits and returns fn's value or raises its error; ``stop()`` ends it."""

    def __init__(self, fn, log: Path, *args):
        context = multiprocessing.get_context("spawn")
        self.receive, send = context.Pipe(duplex=False)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.process = context.Process(target=_run_logged, args=(send, str(log), fn, args), daemon=True)
        self.process.start()
        send.close()
        self.log, self.seconds = log, None

    def result(self):
        try:
            status, value, self.seconds = self.receive.recv()
        except EOFError:  # the process died without a word (killed, out of memory)
            status, value = "error", f"it exited with status {self.process.exitcode} without a result"
        self.process.join()
        if status == "error":
            raise RuntimeError(f"the process beside the listening stages failed (log: {self.log}):\n{value}")
        return value

    def running(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


def _run_logged(send, log: str, fn, args) -> None:
    """The second process: stdout and stderr (C level too) into ``log``, then fn(*args) through the pipe."""
    import os
    import sys
    import traceback

    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = open(log, "a", encoding="utf-8", buffering=1)
    start = time.perf_counter()
    try:
        value = fn(*args)
        send.send(("ok", value, round(time.perf_counter() - start, 1)))
    except BaseException:
        send.send(("error", traceback.format_exc(), round(time.perf_counter() - start, 1)))
        raise


@contextmanager
def stop_on_error(beside: Beside | None):
    """Ends the process beside if the block fails, so that a failed demo does not leave it training."""
    try:
        yield
    except BaseException:
        if beside is not None:
            beside.stop()
        raise


@contextmanager
def sharing_cores(beside: Beside | None):
    """Yields ``share()``, which sets this process's intra-op threads: one while the process beside trains on the
    other core (two processes at two threads each oversubscribe 2 cores, and OpenMP's waits then cost more than the
    second thread gains), all of them again once it has finished (a pretraining step ran 1.34x faster on 2 threads
    than on 1, alone on 2 cores: 20.0 s against 26.9 s for 60 steps). The stages call it before every step
    (``ShareCores``), so a stage takes the second core the moment the voice beside it finishes."""
    import torch

    threads = torch.get_num_threads()

    def share() -> None:
        wanted = 1 if beside is not None and beside.running() else threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    try:
        yield share
    finally:
        torch.set_num_threads(threads)


class ShareCores(TrainerCallback):
    """Calls ``share`` (``sharing_cores``) before every training step."""

    def __init__(self, share):
        self.share = share

    def on_step_begin(self, args, state, control, **kwargs):
        self.share()
