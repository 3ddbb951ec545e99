"""Preemption: on SIGTERM, or SLURM's early-warning SIGUSR1 (``--signal``), every rank finishes the step it is in,
one checkpoint is written (atomically, as every checkpoint is), and the process exits with ``PREEMPTED_EXIT``.

A signal reaches the ranks at different moments (or only some of them: torchrun forwards it, SLURM may signal
every process of the step itself), so no rank acts on its own. The handler only notes the signal; the ranks learn
of it in the all-reduce they already make every micro-step (``CrashSafeTrainerMixin``), so all of them stop after
the same optimizer step. A signal that comes while a checkpoint is being written lets the save finish; the ranks
compare notes once more after it, and stop there without training another step.

The exit status 75 is EX_TEMPFAIL ("try again later"): launch/slurm.sbatch requeues the job on it, and a rerun of
the same command resumes from the checkpoint. The handlers are put back whenever ``train`` returns or raises, so
that code which trains and goes on to other work dies of a signal as usual; the final save installs them again
for its duration (``audiollm.crash_safety.final_save``): a signal then lets the save finish and the stage exits 0,
the run complete.
"""

from __future__ import annotations

import logging
import signal
import threading

from transformers import TrainerCallback

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: launch/slurm.sbatch requeues the job
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Stopped by a signal after a checkpoint; exits the process with PREEMPTED_EXIT."""


class Preemption(TrainerCallback):
    """Notes SIGTERM / SIGUSR1 in this process; stops training once the ranks agree that one came (``agree``)."""

    def __init__(self):
        self.received: int | None = None  # the signal this process got, if any
        self.agreed = False  # some rank got one: the same on every rank, from an all-reduce
        self.previous: dict[int, object] = {}  # the handlers to put back

    def on_train_begin(self, args, state, control, **kwargs):
        self.hold()

    def hold(self) -> None:
        """Note SIGTERM / SIGUSR1 from now on instead of dying of them: while training, and during the final save."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("running outside the main thread: SIGTERM / SIGUSR1 stop it at once, without a checkpoint")
            return
        for signum in SIGNALS:
            self.previous.setdefault(signum, signal.signal(signum, self._note))

    def release(self) -> None:
        """Put the previous handlers back: whenever training ends, and after the final save."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _note(self, signum, frame) -> None:
        self.received = signum  # nothing else here: the ranks act on it together, between steps

    def agree(self, ranks_signalled: int) -> None:
        """The all-reduced count of ranks that got a signal; the same value on every rank."""
        if ranks_signalled and not self.agreed:
            self.agreed = True
            log.warning("a stop signal reached %d rank(s): finishing this step, then a checkpoint", ranks_signalled)

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
        return control

    def stopped_early(self, state) -> bool:
        return self.agreed and state.global_step < state.max_steps
