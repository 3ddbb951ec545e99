"""A crash costs minutes, not days: atomic checkpoints and final save, a clean stop on a full disk, a stop signal,
a lost peer, too many bad rows or the first non-finite loss, with every rank stopping at the same step.

``CrashSafeTrainerMixin`` goes in front of any transformers Trainer (the stages use ``CrashSafeTrainer`` and the
DPO stage mixes it into its TRL trainer):

* **Atomic checkpoints.** The Trainer writes ``checkpoint-N`` file by file (weights, DeepSpeed shards of every rank,
  optimizer, RNG states, trainer state). Here it writes them into ``.saving/checkpoint-N``; once every rank is
  done, the folder is renamed to ``checkpoint-N`` in one step, by one process (``should_save``: one for a
  shared disk, one per node with ``save_on_each_node``). A kill during a save leaves only an unfinished
  ``.saving/`` folder, which nothing resumes from; the previous checkpoint is untouched.
* **Atomic final save.** ``final_save`` has the stage write its finished model folder into ``.saving/final``;
  once every rank is done, the files move into the output folder one rename each, the folder's marker last (the
  marker goes first when an older final model is replaced). The output folder also holds the checkpoints, so it
  cannot be renamed whole; instead a folder whose marker is missing is unfinished (launch/pipeline.sh reruns the
  stage, which resumes from its last checkpoint and saves again), and no file in it is ever half-written.
* **Full disk.** A save that fails removes its partial folder; a full disk stops the run with ``DiskFullError``,
  which names the newest complete checkpoint (still the newest) and says to free space and rerun.
* **One bad-row ceiling.** Each training batch carries what its rows added to the bad-row counts; the ranks sum
  them with the non-finite flag below (one all-reduce per micro-step), and every rank raises ``TooManyBadRows``
  at the same step once the run's fraction passes ``max_bad_fraction`` (``RunBadRows``; ``audiollm.bad_rows``).
* **Preemption.** SIGTERM or SIGUSR1: every rank finishes its step, a checkpoint is written and the process exits
  with 75 (``audiollm.preemption``).
* **No endless wait.** With several ranks, ``StallWatchdog`` ends a rank that makes no progress for ``ddp_timeout``
  seconds: a peer whose machine died closes no connection, and gloo can wait on it forever (``audiollm.watchdog``).
* **Non-finite loss.** After each micro-step every rank's loss is checked, and the ranks agree (in the same
  all-reduce), so all stop together at the same step. The batch's row ids go to ``nonfinite-step-N-rank-R.json``. The
  run stops before the optimizer applies the step and before any later save, so the last checkpoint is healthy
  and checkpoint rotation cannot remove it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from audiollm.bad_rows import BAD_ROWS_FILE, TALLY_KEY, check_ceiling
from audiollm.preemption import PREEMPTED_EXIT, Preempted, Preemption
from audiollm.ranks import summed_over_ranks
from audiollm.watchdog import StallWatchdog

log = logging.getLogger(__name__)

STAGING_DIR = ".saving"  # inside the output folder; checkpoints are written here, then renamed into place
FINAL_STAGING = "final"  # .saving/final: the finished model folder before its files move into the output folder


class NonFiniteLossError(FloatingPointError):
    """A rank computed a NaN or Inf loss; the message names the step and where the batch's row ids are."""


class RunBadRows(TrainerCallback, ExportableState):
    """Rows seen and skipped by the training collators of every rank and dataloader worker since the run began,
    and the one ceiling on their ratio (``max_fraction``; None: counted only). The counts go into each checkpoint's
    trainer state, so a resumed run goes on counting from there."""

    def __init__(self, max_fraction: float | None = None, path: str | None = None):
        self.max_fraction, self.path = max_fraction, path
        self.seen = self.bad = 0

    def state(self) -> dict:
        return {"args": {"max_fraction": self.max_fraction, "path": self.path},
                "attributes": {"seen": self.seen, "bad": self.bad}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict):  # resumed: the counts up to the checkpoint
            self.seen, self.bad = saved["attributes"]["seen"], saved["attributes"]["bad"]
        state.stateful_callbacks[type(self).__name__] = self.state()  # a checkpoint from before the count had none

    def add(self, seen: int, bad: int) -> None:
        self.seen, self.bad = self.seen + seen, self.bad + bad
        if self.max_fraction is not None:
            check_ceiling(self.seen, self.bad, self.max_fraction, path=self.path, where=" met by all ranks and workers")


class CrashSafeTrainerMixin:
    """Atomic ``checkpoint-N`` folders, a synchronous stop on NaN/Inf loss and one bad-row ceiling for all ranks
    and workers (``max_bad_fraction``), for a ``transformers.Trainer``."""

    def __init__(self, *args, max_bad_fraction: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_bad_rows = RunBadRows(max_bad_fraction, os.path.join(self.args.output_dir, BAD_ROWS_FILE))
        self.preemption = Preemption()
        self.add_callback(self.run_bad_rows)
        self.add_callback(self.preemption)
        # Several ranks: a peer that vanished silently must not leave this one waiting forever (watchdog.py).
        self.watchdog = StallWatchdog(self.args.ddp_timeout if self.args.world_size > 1 else 0)

    def train(self, *args, **kwargs):
        """The Trainer's train; after a stop signal (``audiollm.preemption``) the checkpoint is written and the
        process exits with PREEMPTED_EXIT instead of returning to the stage's final save. However it ends, the
        signal handlers are put back and the watchdog stops: what the caller does next (``final_save`` holds both
        again) is not training."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.preemption.release()
            self.watchdog.stop()
        if self.preemption.stopped_early(self.state):
            step = self.state.global_step
            log.warning("stopped by a signal after step %d of %d; %s is saved. Exiting with %d: rerun the same "
                        "command (launch/slurm.sbatch requeues the job) to resume", step, self.state.max_steps,
                        os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), PREEMPTED_EXIT)
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()  # all ranks close the process group together (no gloo abort)
            raise Preempted(PREEMPTED_EXIT)
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.watchdog.beat()
        # A collated batch carries its row ids and bad-row tally; GRPO's batches are lists of raw prompt rows.
        row_ids = inputs.pop("row_ids", None) if isinstance(inputs, dict) else None
        tally = (inputs.pop(TALLY_KEY, None) if isinstance(inputs, dict) else None) or [0, 0]  # [seen, skipped]
        loss = super().training_step(model, inputs, num_items_in_batch)
        nonfinite_ranks, seen, bad, signalled = self._sum_over_ranks(
            loss, [*tally, int(self.preemption.received is not None)])
        self._stop_if_nonfinite(loss, row_ids, nonfinite_ranks)
        self.run_bad_rows.add(seen, bad)  # the same sums on every rank: all stop at this step, or none
        self.preemption.agree(signalled)  # likewise: all save and stop after this optimizer step
        self.watchdog.beat()
        return loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        self.watchdog.beat()
        if isinstance(inputs, dict):
            inputs.pop("row_ids", None)
            inputs.pop(TALLY_KEY, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    @staticmethod
    def _sum_over_ranks(loss: torch.Tensor, counts: list[int]) -> list[int]:
        """[ranks whose loss is not finite, *counts] of this micro-step summed over all ranks, in one all-reduce per
        micro-step: every rank learns whether any rank's loss went bad, the run's row counts and who got a signal."""
        bad_here = not math.isfinite(float(loss.detach().float().sum()))
        return [int(total) for total in summed_over_ranks([int(bad_here), *counts], loss.device)]

    def _stop_if_signalled_during_save(self) -> None:
        """A signal that came while the checkpoint was written: stop now, on every rank, with that checkpoint."""
        if self.preemption.agreed:  # the same on every rank, so all of them skip this all-reduce or make it
            return
        [signalled] = summed_over_ranks([int(self.preemption.received is not None)], self.args.device)
        self.preemption.agree(int(signalled))
        if self.preemption.agreed:
            self.control.should_training_stop = True

    def _stop_if_nonfinite(self, loss: torch.Tensor, row_ids: list[str] | None, nonfinite_ranks: int) -> None:
        if nonfinite_ranks == 0:
            return
        bad_here = not math.isfinite(float(loss.detach().float().sum()))
        step = self.state.global_step + 1  # the optimizer step in progress
        report = os.path.join(self.args.output_dir, f"nonfinite-step-{step}-rank-{self.args.process_index}.json")
        if bad_here:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(report, "w") as f:
                json.dump({"step": step, "loss": float(loss.detach().float().sum()), "row_ids": row_ids}, f)
        where = f"this rank's batch rows are in {report}" if bad_here else "another rank's loss is not finite"
        raise NonFiniteLossError(
            f"step {step}: the loss is not finite on {nonfinite_ranks} rank(s); {where}. Stopped before the "
            f"update; resume from the last checkpoint in {self.args.output_dir} (lower the learning rate, or "
            "drop the rows)")

    def _save_checkpoint(self, model, trial) -> None:
        self.watchdog.beat()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging  # the Trainer writes checkpoint-N under args.output_dir
        try:
            with removed_on_error(os.path.join(staging, name), run_dir, name):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        # One process renames: world process zero on a shared disk (two nodes renaming one folder race, and the
        # loser would delete the winner's checkpoint), or one per node with save_on_each_node (disks not shared).
        if self.args.should_save:
            publish(os.path.join(staging, name), os.path.join(run_dir, name))
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(best) == staging:
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self._stop_if_signalled_during_save()
        self.watchdog.beat()


class DiskFullError(OSError):
    """The disk filled up (or a quota was reached) while a checkpoint or the final model was written."""


# How a full disk shows while a checkpoint is written (measured on a full tmpfs): open()/write() raise OSError 28;
# safetensors raises SafetensorError "... No space left on device (os error 28)"; torch.save raises RuntimeError
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", which names no cause at all.
DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


@contextmanager
def removed_on_error(staged: str, run_dir: str, what: str):
    """Remove ``staged`` when writing it fails (a full disk, mostly), so its space is freed and nothing half-written
    stays, and say what to do. A failing rank stops here; the launcher stops its peers (they wait at the barrier
    before the rename, which this rank never reaches), so no ``checkpoint-N`` appears and the previous stays newest.
    """
    try:
        yield
    except Exception as err:
        newest = newest_checkpoint(run_dir)
        full = disk_full(err, run_dir, newest or staged)
        shutil.rmtree(staged, ignore_errors=True)
        if not full:
            raise
        free_mb = shutil.disk_usage(run_dir).free / 1e6
        raise DiskFullError(
            errno.ENOSPC, f"disk full while writing {what} into {staged} ({type(err).__name__}: {err}); the partial "
            f"folder is removed ({free_mb:,.0f} MB free now). The newest complete checkpoint is "
            f"{newest or 'none'}: free space on {run_dir} (a lower save_total_limit keeps fewer checkpoints) and rerun "
            "the same command to resume from it") from err


def disk_full(err: BaseException, run_dir: str, sized: str) -> bool:
    """Whether ``err`` means the disk is full: its errno or message says so, or (torch.save's message says
    nothing) the disk has less room left than ``sized``, a checkpoint folder, takes."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(words in str(err) for words in DISK_FULL_WORDS):
        return True
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(sized) for f in files)
    return isinstance(err, RuntimeError) and shutil.disk_usage(run_dir).free < size


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder in ``run_dir`` (checkpoints appear whole, by rename), or None."""
    names = [n for n in os.listdir(run_dir) if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", n)]
    return os.path.join(run_dir, max(names, key=lambda n: int(n.rsplit("-", 1)[1]))) if names else None


def publish(staged: str, final: str) -> None:
    """Move a finished checkpoint folder into place in one rename; an older folder of that name goes first."""
    if not os.path.isdir(staged):  # a shared disk: another node's process renamed it already
        return
    replace(staged, final)
    log.info("checkpoint saved: %s", final)


def replace(src: str, dst: str) -> None:
    """``os.replace`` that also replaces a folder: an existing ``dst`` folder is moved aside first, then removed."""
    if os.path.isdir(dst):
        old = f"{src}.old"
        os.replace(dst, old)
        shutil.rmtree(old)
    os.replace(src, dst)


@contextmanager
def final_save(trainer, last: tuple[str, ...] = ("config.json",)):
    """Stage the final model folder: yields ``.saving/final``, where the stage writes everything it saves. On a
    clean exit, once every rank's part is written (ZeRO-3 gathers the weights from all of them), the writing
    process moves the files into the output folder with ``publish_files``; ``last`` ends with the folder's
    marker. An exception publishes nothing.
    """
    run_dir = trainer.args.output_dir
    staging = os.path.join(run_dir, STAGING_DIR, FINAL_STAGING)
    crash_safe = isinstance(trainer, CrashSafeTrainerMixin)
    if crash_safe:
        trainer.preemption.hold()  # a stop signal now lets the save finish
        trainer.watchdog.beat()  # a peer lost while the weights are gathered must not hang the save
    try:
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what an interrupted final save left
            os.makedirs(staging)
        trainer.accelerator.wait_for_everyone()
        with removed_on_error(staging, run_dir, "the final model"):
            yield staging
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save and os.path.isdir(staging):  # a shared disk: another node may have moved them
            publish_files(staging, run_dir, last)
        trainer.accelerator.wait_for_everyone()
    finally:
        if crash_safe:
            trainer.preemption.release()
            trainer.watchdog.stop()


def save_trainer_state(trainer, folder: str) -> None:
    """``trainer_state.json`` (the loss curve, metrics) into ``folder``: ``Trainer.save_state`` writes only into
    ``args.output_dir``."""
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))


def publish_files(staged: str, final: str, last: tuple[str, ...]) -> None:
    """Move every entry of ``staged`` into ``final`` (one ``os.replace`` each), the names in ``last`` last and in
    that order, then remove ``staged``.

    The names in ``last`` (config.json, then the marker) are removed from ``final`` first, in reverse order, so at
    every moment of the move: the marker exists only once all files are new, and config.json (what loaders look
    for) never sits beside an older save's weights. A loader meets a complete folder or no model folder at all.
    """
    for name in reversed(last):
        if os.path.exists(os.path.join(final, name)):
            os.remove(os.path.join(final, name))
    rest = sorted(set(os.listdir(staged)) - set(last))
    for name in rest + [n for n in last if os.path.exists(os.path.join(staged, n))]:
        replace(os.path.join(staged, name), os.path.join(final, name))  # a folder too: a LoRA run's adapter/
    os.rmdir(staged)
    log.info("final model saved: %s", final)


class CrashSafeTrainer(CrashSafeTrainerMixin, Trainer):
    """The transformers Trainer with atomic checkpoints and a stop on NaN/Inf loss; evaluation batches go through
    ``eval_data_collator`` when one is given (the training collator may perturb audio)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator
