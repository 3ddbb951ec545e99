"""A rank whose peer vanished must not wait forever: end the process when training makes no progress for
``ddp_timeout`` seconds.

A peer that dies with its machine (power, network) closes no connection, so nothing tells the other ranks. NCCL's
watchdog aborts a collective after the process group's timeout; gloo does not always: DeepSpeed ZeRO-3's
parameter all-gather waits on its gloo handle with no timeout at all (measured: node 0 still waiting 80 s after
node 1 froze, with ddp_timeout 20). The launcher sees a live process and waits too, and the job hangs until its
time limit. ``StallWatchdog`` ends such a process with ``STALLED_EXIT``; the launcher then stops the node.

Progress is a training or evaluation micro-step, or a checkpoint save starting or ending (``beat``). ``ddp_timeout``
is already the longest wait the run accepts in one collective, so a step or a save that takes longer would have
failed on NCCL as well.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

STALLED_EXIT = 69  # EX_UNAVAILABLE: a peer (a node) is gone; rerun to resume from the last checkpoint


class StallWatchdog:
    """A daemon thread that ends the process after ``timeout`` seconds without a ``beat``."""

    def __init__(self, timeout: float, check_every: float = 1.0):
        self.timeout, self.check_every = timeout, check_every
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        """Progress; the first beat (and the first after ``stop``) starts the watching thread."""
        self.last = time.monotonic()
        if self.thread is None and self.timeout > 0:
            self.stopped = threading.Event()  # each thread has its own: a stopped one never watches again
            self.thread = threading.Thread(target=self._watch, args=(self.stopped,), name="stall-watchdog",
                                           daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread = None

    def _watch(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.check_every):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self._give_up(idle)

    def _give_up(self, idle: float) -> None:
        message = (f"no training progress for {idle:.0f} s (ddp_timeout={self.timeout:g} s): a peer rank or node is "
                   f"probably gone and this rank waits in a collective that never ends. Exiting with {STALLED_EXIT}; "
                   "rerun the same command to resume from the last checkpoint. Where this rank waited:")
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(STALLED_EXIT)  # the main thread is blocked inside C++; no clean way out of it
