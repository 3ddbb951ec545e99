"""Preemption: SIGTERM or SIGUSR1 makes every rank finish its step, write a checkpoint and exit 75; the rerun
resumes to the uninterrupted run's losses. A signal during a save lets it finish and stops right after it.
launch/slurm.sbatch passes SLURM's signal on to the ranks and requeues the job.

Signals come from outside (to torchrun, as srun / scancel deliver them) or from a driver that patches the stage in
its own process, so that a signal reaches one rank only, at a known step or inside a save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from audiollm.preemption import PREEMPTED_EXIT
from tests.test_crash_safety import SAVE_EVERY, STEPS, setup, stage_cmd, start  # noqa: F401 -- setup: a fixture
from tests.test_crash_safety import stop_messages
from tests.test_distributed import LOSS_ATOL, REPO_ROOT, RUN_TIMEOUT_S, free_port, run, run_env, step_values
from tests.test_distributed import stubs  # noqa: F401 -- a fixture

STOP_BOUND_S = 60  # signal -> every process gone: one step, one checkpoint, the process group closed

# Run in each driver process before the stage: SIGNAL reaches this process (rank SIGNAL_RANK only) during step
# SIGNAL_STEP, or inside the save of checkpoint-SIGNAL_SAVE; every micro-step sleeps STEP_SLEEP seconds.
DRIVER = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
import stages.sft
from transformers import Trainer
from audiollm.crash_safety import CrashSafeTrainerMixin

here = os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0")
sig = getattr(signal, "SIG" + os.environ.get("SIGNAL", "USR1"))
training_step, save_rng_state = CrashSafeTrainerMixin.training_step, Trainer._save_rng_state

def slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    if here and self.state.global_step + 1 == int(os.environ.get("SIGNAL_STEP", "0")):
        os.kill(os.getpid(), sig)
    return training_step(self, *args, **kwargs)

def signal_in_save(self, output_dir):
    if here and self.state.global_step == int(os.environ.get("SIGNAL_SAVE", "0")):
        os.kill(os.getpid(), sig)  # the weights are written, the optimizer states and RNG not yet
    return save_rng_state(self, output_dir)

CrashSafeTrainerMixin.training_step, Trainer._save_rng_state = slow_step, signal_in_save
stages.sft.main(sys.argv[1:])
"""


def argv(recipe: Path, out: Path) -> list[str]:
    return stage_cmd("stages/sft.py", recipe, out, 1)[2:]


@pytest.fixture(scope="module")
def reference(setup):  # noqa: F811
    from stages.sft import main

    root, recipe = setup
    main(argv(recipe, root / "reference-single"))
    return step_values(root / "reference-single")


def assert_losses_match(out: Path, expected: dict[int, float], atol: float) -> None:
    got = step_values(out)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=atol), (step, got, expected)


def newest(out: Path) -> int:
    from audiollm.training import latest_checkpoint

    return int(latest_checkpoint(str(out)).rsplit("-", 1)[1])


def test_one_process_stops_after_its_step_with_a_checkpoint_and_resumes(setup, reference, monkeypatch):
    """SIGUSR1 during step 3 (not a save step): checkpoint-3 is written, the stage exits 75 without a final save,
    and the rerun continues from step 3 to the same losses, bit for bit."""
    from audiollm.crash_safety import CrashSafeTrainerMixin
    from stages.sft import main

    root, recipe = setup
    out = root / "signalled-single"
    original = CrashSafeTrainerMixin.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(CrashSafeTrainerMixin, "training_step", training_step)
    before = signal.getsignal(signal.SIGUSR1)  # whatever the process had (a test run in-process may have set one)
    with pytest.raises(SystemExit) as stopped:
        main(argv(recipe, out))
    assert stopped.value.code == PREEMPTED_EXIT
    assert newest(out) == 3 and not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGUSR1) is before  # the stage's handlers are gone again

    monkeypatch.undo()
    main(argv(recipe, out))
    assert_losses_match(out, reference, 1e-6)


def test_handlers_are_put_back_when_training_returns_and_held_again_by_the_final_save(setup, monkeypatch):
    """Code that trains and goes on to other work dies of a signal as usual; the stage's final save notes one
    (SIGUSR1 while its files are moved in) and finishes, the folder published, the handlers put back after it."""
    import stages.sft
    from audiollm import crash_safety

    root, recipe = setup
    out, seen = root / "handlers", {}
    save_final, publish_files = stages.sft.save_final, crash_safety.publish_files

    def before(signum, frame):  # the process's own handler: a signal that reaches it was not held
        seen["leaked"] = signum

    def final_save_after_training(trainer, *args):
        seen["trainer"], seen["after train"] = trainer, signal.getsignal(signal.SIGUSR1)
        save_final(trainer, *args)

    def publish_signalled(staged, final, last):
        os.kill(os.getpid(), signal.SIGUSR1)
        seen["noted"] = seen["trainer"].preemption.received
        publish_files(staged, final, last)
    monkeypatch.setattr(stages.sft, "save_final", final_save_after_training)
    monkeypatch.setattr(crash_safety, "publish_files", publish_signalled)
    outer = signal.signal(signal.SIGUSR1, before)
    try:
        stages.sft.main(argv(recipe, out) + ["--max_steps", "1", "--save_strategy", "no"])
        assert seen["after train"] is before and seen["noted"] == signal.SIGUSR1 and "leaked" not in seen
        assert (out / "training_summary.json").is_file() and signal.getsignal(signal.SIGUSR1) is before
    finally:
        signal.signal(signal.SIGUSR1, outer)


def test_sigusr1_to_torchrun_mid_run_stops_both_ranks_and_the_rerun_resumes(setup, reference):
    """torchrun as launch/slurm.sbatch starts it, signalled from outside once checkpoint-2 is on disk: it forwards
    the signal, both ranks finish the step they are in and save it, and the rerun picks up from there."""
    root, recipe = setup
    out, driver = root / "torchrun", root / "driver.py"
    driver.write_text(DRIVER)
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "--signals-to-handle",
           "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", str(STOP_BOUND_S),
           *stage_cmd(str(driver), recipe, out, 2)[5:]]  # the deepspeed launcher's part left out
    proc = start(cmd, root / "logs" / "torchrun.log", dict(run_env(), STEP_SLEEP="0.3", SIGNAL_RANK="none"))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / f"checkpoint-{SAVE_EVERY}").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    try:
        proc.wait(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"torchrun and both ranks stopped {time.monotonic() - sent:.1f} s after SIGUSR1")
    log = (root / "logs" / "torchrun.log").read_text(errors="replace")
    stops = stop_messages(log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]
    step = newest(out)
    assert f"after step {step} of {STEPS}" in stops[0] and SAVE_EVERY <= step < STEPS
    assert not (out / "model.safetensors").exists()

    run(stage_cmd("stages/sft.py", recipe, out, 2), root / "logs" / "torchrun-resumed.log")
    assert_losses_match(out, reference, LOSS_ATOL)  # 2 ranks vs 1 process: tests/test_distributed.py's bound


def test_a_signal_to_one_rank_during_a_save_stops_both_right_after_it(setup):
    """SIGTERM reaches rank 1 alone, in the middle of writing checkpoint-2: the save completes, both ranks stop
    there without another step, and the deepspeed launcher exits with the ranks' 75."""
    root, recipe = setup
    out, driver = root / "in-save", root / "driver.py"
    driver.write_text(DRIVER)
    env = dict(run_env(), SIGNAL="TERM", SIGNAL_RANK="1", SIGNAL_SAVE=str(SAVE_EVERY))
    proc = start(stage_cmd(str(driver), recipe, out, 2), root / "logs" / "in-save.log", env)
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (root / "logs" / "in-save.log").read_text(errors="replace")
    assert returncode == PREEMPTED_EXIT, log[-3000:]
    assert log.count(f"stopped by a signal after step {SAVE_EVERY} of {STEPS}") == 2, log[-3000:]
    assert newest(out) == SAVE_EVERY and not (out / ".saving" / f"checkpoint-{SAVE_EVERY}").exists()
    state = json.loads((out / f"checkpoint-{SAVE_EVERY}" / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_EVERY and (out / f"checkpoint-{SAVE_EVERY}" / "rng_state_1.pth").is_file()


# ------------------------------------------------------------------------------------------ launch/slurm.sbatch

WAITING_TORCHRUN = """#!/usr/bin/env bash
# Like torchrun while its ranks train: waits; a stop signal ends it with status 1, as torchrun reports one.
echo $$ > "$STUB_LOG/torchrun.pid"
trap 'echo USR1 >> "$STUB_LOG/torchrun.signals"; exit 1' USR1
[[ -z ${STUB_EXIT:-} ]] || exit "$STUB_EXIT"
while :; do sleep 0.05; done
"""
SCANCEL = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG/scancel"
kill -USR1 "$(cat "$STUB_LOG/torchrun.pid")"
"""
SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") printf 'gpu-node-07\\ngpu-node-08\\n' ;;
    "show job") echo "   Command=$SUBMITTED_SCRIPT sft stages/configs/sft.yaml" ;;
    "requeue "*) echo "$2" > "$STUB_LOG/requeue" ;;
esac
"""


@pytest.mark.parametrize("sent", ["USR1", "TERM", None])
def test_slurm_sbatch_passes_a_stop_signal_on_and_requeues(stubs, sent):  # noqa: F811
    """SLURM's --signal=B:USR1 (or a preemption's SIGTERM) reaches the batch script: it signals the steps'
    processes, waits for them, and requeues the job. Without a signal, the step's status is passed on."""
    for name, text in (("torchrun", WAITING_TORCHRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (stubs.root / "bin" / name).write_text(text)
        (stubs.root / "bin" / name).chmod(0o755)
    spool = stubs.root / "spool"
    spool.mkdir()
    shutil.copy(REPO_ROOT / "launch" / "slurm.sbatch", spool / "slurm_script")
    env = dict(stubs.env, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(stubs.root),
               SUBMITTED_SCRIPT=str(REPO_ROOT / "launch" / "slurm.sbatch"), STUB_EXIT="" if sent else "3")
    calls = stubs.root / "calls"
    proc = subprocess.Popen(["bash", str(spool / "slurm_script"), "sft", "stages/configs/sft.yaml"], env=env,
                            cwd=spool, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while sent and not (calls / "torchrun.pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        if sent:
            proc.send_signal(getattr(signal, f"SIG{sent}"))
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sent is None:
        assert proc.returncode == 3 and not (calls / "requeue").exists() and not (calls / "scancel").exists()
        return
    assert proc.returncode == 0, stderr
    assert (calls / "scancel").read_text().split() == ["--signal=USR1", "4242"]
    assert (calls / "torchrun.signals").read_text().split() == ["USR1"]  # the ranks' launcher got it
    assert (calls / "requeue").read_text().strip() == "4242"
    assert f"stopped by SIG{sent}" in stderr and "requeueing job 4242" in stderr

