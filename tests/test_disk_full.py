"""A full disk during a checkpoint stops the run with a message that says so and what to do; the partial folder is
removed (its space freed), no ``checkpoint-N`` appears, the previous checkpoint stays the newest, and a rerun
resumes from it to the uninterrupted run's losses. On two DeepSpeed ranks the rank whose write fails stops its
peer through the launcher: no hang.

The full disk is simulated (an OSError ENOSPC raised by a patched writer at a known step); how a really full disk
shows in torch, safetensors and plain writes was measured on a 2 MB tmpfs and is checked in the first test.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from audiollm.crash_safety import DiskFullError, disk_full
from tests.test_crash_safety import SAVE_EVERY, assert_same_losses, sft_run, stage_cmd, start
from tests.test_distributed import RUN_TIMEOUT_S, run_env

FULL_AT = 2 * SAVE_EVERY  # the checkpoint whose save meets the full disk
STOP_BOUND_S = 60  # failed write -> launcher exit; the launcher polls its ranks every second or so

# In each driver process before the stage: writes of checkpoint-FULL_AT fail with ENOSPC (on RANK, if set).
NO_SPACE = f"""
import errno, os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import stages.sft

def no_space(path):
    if "checkpoint-{FULL_AT}" in str(path) and os.environ.get("RANK", "0") == os.environ.get("FULL_ON_RANK", "0"):
        with open(os.environ["FULL_MARK"], "w") as f:
            f.write(str(time.time()))  # when the disk filled up, for the time the other rank takes to stop
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
"""
IN_SHARD_SAVE = NO_SPACE + """
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
original = TorchCheckpointEngine.save
def save(self, state_dict, path):
    no_space(path)  # this rank's ZeRO shard: the model states are written, its optimizer states are not
    return original(self, state_dict, path)
TorchCheckpointEngine.save = save
stages.sft.main(sys.argv[1:])
"""


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    """The errors a full 2 MB tmpfs gave, and errors that are not a full disk."""
    from safetensors import SafetensorError

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path), str(tmp_path))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), str(tmp_path), str(tmp_path))
    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                     str(tmp_path), str(tmp_path))
    assert not disk_full(PermissionError(errno.EACCES, "Permission denied"), str(tmp_path), str(tmp_path))
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 1000)
    assert not disk_full(torch_error, str(tmp_path), str(tmp_path / "checkpoint-2"))  # room left: another fault
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 999, 999))
    assert disk_full(torch_error, str(tmp_path), str(tmp_path / "checkpoint-2"))  # less room than a checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sft_run(tmp_path_factory.mktemp("full"))


def argv(recipe: Path, out: Path) -> list[str]:
    return stage_cmd("stages/sft.py", recipe, out, 1)[2:]  # the single-process command's stage arguments


def test_disk_full_in_a_checkpoint_stops_cleanly_and_resumes(setup, monkeypatch):
    from transformers import Trainer

    from audiollm.training import latest_checkpoint
    from stages.sft import main

    root, recipe = setup
    reference, full = root / "reference", root / "full"
    main(argv(recipe, reference))

    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == FULL_AT:  # weights and optimizer are written, the save is not finished
            raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/rng_state.pth")
        return original(self, output_dir)
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    with pytest.raises(DiskFullError, match=rf"disk full while writing checkpoint-{FULL_AT} .*No space left.*"
                                            rf"newest complete checkpoint is .*checkpoint-{SAVE_EVERY}: free space"):
        main(argv(recipe, full))
    assert not (full / f"checkpoint-{FULL_AT}").exists()
    assert not (full / ".saving" / f"checkpoint-{FULL_AT}").exists()  # its space is freed
    assert latest_checkpoint(str(full)) == str(full / f"checkpoint-{SAVE_EVERY}")
    assert not (full / "model.safetensors").exists()  # stopped: no final model either

    monkeypatch.undo()
    main(argv(recipe, full))
    assert_same_losses(full, reference)


def test_disk_full_on_one_of_two_ranks_stops_both(setup):
    """Rank 1's ZeRO-2 shard meets the full disk; rank 0 waits at the barrier before the rename until the launcher
    stops it. STOP_BOUND_S bounds the time from the failed write to the launcher's exit."""
    from audiollm.training import latest_checkpoint

    root, recipe = setup
    out, log, mark = root / "full-zero2", root / "logs" / "full-zero2.log", root / "full-zero2.mark"
    driver = root / "no_space_in_shard.py"
    driver.write_text(IN_SHARD_SAVE)
    proc = start(stage_cmd(str(driver), recipe, out, 2), log, dict(run_env(), FULL_ON_RANK="1", FULL_MARK=str(mark)))
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
        stopped = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert returncode != 0 and mark.is_file(), text[-3000:]
    assert f"DiskFullError: [Errno {errno.ENOSPC}] disk full while writing checkpoint-{FULL_AT}" in text, text[-3000:]
    print(f"two ranks stopped {stopped - float(mark.read_text()):.1f} s after the full disk")
    assert stopped - float(mark.read_text()) < STOP_BOUND_S
    assert not (out / f"checkpoint-{FULL_AT}").exists()
    assert latest_checkpoint(str(out)) == str(out / f"checkpoint-{SAVE_EVERY}")
    assert not (out / "model.safetensors").exists()
