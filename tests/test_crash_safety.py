"""Crashes lose nothing: kill -9 in the middle of a 2-rank DeepSpeed run, or in the middle of a checkpoint save,
then resume, and the loss sequence is the uninterrupted run's; a NaN loss on one rank stops every rank at that
step with the batch's rows on disk and the last checkpoint intact; pickles that would run code are refused.

The faults are injected by small driver scripts that patch the stage in their own process (a SIGKILL from inside
the save, a NaN on one rank), so each fault lands at a known step every time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import (
    REPO_ROOT,
    RUN_TIMEOUT_S,
    free_port,
    run,
    run_env,
    step_values,
    write_manifests,
    write_recipe,
)

STEPS = 6  # optimizer steps per run; checkpoints every SAVE_EVERY
SAVE_EVERY = 2

# Run in each driver process before the stage: the stage's own main, with one fault patched in.
DRIVER_PREAMBLE = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
import stages.sft
"""
KILL_IN_SAVE = DRIVER_PREAMBLE + """
from transformers import Trainer
original = Trainer._save_rng_state
def save_rng_state(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the weights and optimizer are written, the save is not finished
    return original(self, output_dir)
Trainer._save_rng_state = save_rng_state
stages.sft.main(sys.argv[1:])
"""
NAN_ON_ONE_RANK = DRIVER_PREAMBLE + """
from audiollm.model.modeling import AudioLLMForConditionalGeneration as Model
original, calls = Model.forward, [0]
def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if self.training and int(os.environ.get("RANK", "0")) == 1:
        calls[0] += 1
        if calls[0] == int(os.environ["NAN_AT_FORWARD"]):
            out.loss = out.loss * float("nan")
    return out
Model.forward = forward
stages.sft.main(sys.argv[1:])
"""


def sft_run(root: Path) -> tuple[Path, Path]:
    """A tiny model, manifests and an SFT recipe of STEPS steps with a checkpoint every SAVE_EVERY, in ``root``."""
    from audiollm.build import build_tiny

    build_tiny(root / "init")
    data = write_manifests(root)
    recipe = root / "sft.yaml"
    write_recipe("sft", recipe, train_files=[data["sft"]], max_steps=STEPS, save_steps=SAVE_EVERY,
                 model_name_or_path=str(root / "init"))
    return root, recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sft_run(tmp_path_factory.mktemp("crash"))


def stage_cmd(script: str, recipe: Path, out: Path, ranks: int) -> list[str]:
    args = [script, "--config", str(recipe), "--output_dir", str(out), "--per_device_train_batch_size",
            str(4 // ranks)]
    if ranks == 1:
        return [sys.executable, *args]
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args,
            "--deepspeed", "deepspeed_configs/zero2.json"]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or run_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def mark_resume_point(out: Path) -> Path:
    """Tag the checkpoint a rerun must resume from (the newest complete one) with a log-history marker, which the
    rerun carries on only if it really continued from there."""
    from audiollm.training import latest_checkpoint

    checkpoint = Path(latest_checkpoint(str(out)))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"].insert(0, {"resumed_from_here": True, "step": 0})
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return checkpoint


def resumed(out: Path) -> bool:
    from tests.test_distributed import log_history

    return log_history(out)[0] == {"resumed_from_here": True, "step": 0}


STOPPED = "stopped by a signal after step"  # what each rank logs when a signal stops it (audiollm/crash_safety.py)


def stop_messages(log: str) -> list[str]:
    """Each rank's "stopped by a signal ..." message in a log. A progress bar's frame ends without a newline, so the
    other rank's message can land on the same line after it (seen in CI): the frame is cut off."""
    return [line[line.index(STOPPED):] for line in log.splitlines() if STOPPED in line]


def assert_same_losses(got: Path, expected: Path) -> None:
    """Every step's loss equals the uninterrupted run's (same ops in the same order: bit-identical measured)."""
    a, b = step_values(got), step_values(expected)
    assert sorted(a) == list(range(1, STEPS + 1)), a
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a, b)


def test_kill_9_during_two_rank_training_then_resume(setup):
    root, recipe = setup
    reference, killed = root / "reference-zero2", root / "killed-zero2"
    run(stage_cmd("stages/sft.py", recipe, reference, 2), root / "logs" / "reference-zero2.log")

    proc = start(stage_cmd("stages/sft.py", recipe, killed, 2), root / "logs" / "killed-zero2.log")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (killed / f"checkpoint-{SAVE_EVERY}").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert (killed / f"checkpoint-{SAVE_EVERY}").is_dir(), "the run never reached its first checkpoint"
    assert not (killed / f"checkpoint-{STEPS}").exists(), "the run finished before it was killed"

    mark_resume_point(killed)
    run(stage_cmd("stages/sft.py", recipe, killed, 2), root / "logs" / "killed-zero2-resumed.log")
    assert resumed(killed), "the rerun started over"
    assert_same_losses(killed, reference)


def test_kill_9_inside_a_checkpoint_save_then_resume(setup):
    root, recipe = setup
    reference, killed = root / "reference-single", root / "killed-in-save"
    run(stage_cmd("stages/sft.py", recipe, reference, 1), root / "logs" / "reference-single.log")
    driver = root / "kill_in_save.py"
    driver.write_text(KILL_IN_SAVE)
    env = dict(run_env(), KILL_AT_STEP=str(2 * SAVE_EVERY))
    proc = start(stage_cmd(str(driver), recipe, killed, 1), root / "logs" / "killed-in-save.log", env)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == -signal.SIGKILL
    partial = killed / ".saving" / f"checkpoint-{2 * SAVE_EVERY}"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists(), "the save was not cut short"
    assert not (killed / f"checkpoint-{2 * SAVE_EVERY}").exists()  # never published: resume cannot pick it
    assert (killed / f"checkpoint-{SAVE_EVERY}" / "trainer_state.json").is_file()

    assert mark_resume_point(killed).name == f"checkpoint-{SAVE_EVERY}"
    run(stage_cmd("stages/sft.py", recipe, killed, 1), root / "logs" / "killed-in-save-resumed.log")
    assert resumed(killed), "the rerun started over"
    assert_same_losses(killed, reference)
    assert not partial.exists()  # the rerun's save replaced what the killed one left


@pytest.mark.parametrize("batching", [[], ["--batch_tokens", "300"]], ids=["rows", "token-budget"])
def test_a_rerun_of_a_finished_run_trains_no_more_steps(setup, batching):
    """The last checkpoint is the last step: a rerun (a requeued job, or a crash in the final save) resumes there
    and saves it again as the final model, without training another step. The run ends inside an epoch, where a
    resumed loop would go on unless the Trainer's restored state stops it."""
    from tests.test_distributed import weights

    root, recipe = setup
    done, steps = root / f"finished{len(batching)}", 5  # 2 steps an epoch with rows: it ends in its third epoch
    cmd = [*stage_cmd("stages/sft.py", recipe, done, 1), "--max_steps", str(steps), "--save_steps", str(steps),
           *batching]
    run(cmd, root / "logs" / f"{done.name}.log")
    last = done / f"checkpoint-{steps}"
    assert last.is_dir() and json.loads((done / "trainer_state.json").read_text())["global_step"] == steps
    run(cmd, root / "logs" / f"{done.name}-rerun.log")
    state = json.loads((done / "trainer_state.json").read_text())
    assert state["global_step"] == steps and max(e["step"] for e in state["log_history"]) == steps
    final, saved = weights(done), weights(last)
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_nonfinite_loss_on_one_rank_stops_every_rank(setup):
    root, recipe = setup
    out = root / "nan-zero2"
    driver = root / "nan_on_one_rank.py"
    driver.write_text(NAN_ON_ONE_RANK)
    accumulation = 2  # the recipe's gradient_accumulation_steps
    env = dict(run_env(), NAN_AT_FORWARD=str(SAVE_EVERY * accumulation + 1))  # first micro-step of step 3
    cmd = stage_cmd(str(driver), recipe, out, 2) + ["--save_total_limit", "1"]
    proc = start(cmd, root / "logs" / "nan.log", env)
    assert proc.wait(timeout=RUN_TIMEOUT_S) != 0
    log = (root / "logs" / "nan.log").read_text()
    step = SAVE_EVERY + 1
    assert log.count(f"NonFiniteLossError: step {step}: the loss is not finite on 1 rank(s)") == 2, log[-3000:]
    report = json.loads((out / f"nonfinite-step-{step}-rank-1.json").read_text())
    assert report["step"] == step and report["row_ids"] and all(":" in r for r in report["row_ids"])
    assert not (out / f"nonfinite-step-{step}-rank-0.json").exists()  # rank 0's own loss was finite
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{SAVE_EVERY}"]  # rotation kept it
    assert (out / f"checkpoint-{SAVE_EVERY}" / "trainer_state.json").is_file()


class RunsCode:
    """Unpickling this touches a file: what any pickle can do with os.system instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_that_run_code_are_refused(tmp_path):
    from audiollm.build import BuildError, build_tiny, encoder_from_openai_pt
    from audiollm.stage_args import ModelArguments
    from audiollm.training import load_model

    marker = tmp_path / "code-ran"
    evil_pt = tmp_path / "whisper.pt"
    torch.save({"dims": {}, "model_state_dict": RunsCode(marker)}, evil_pt)
    with pytest.raises(BuildError, match="weights_only=True"):
        encoder_from_openai_pt(evil_pt)

    folder = tmp_path / "model"
    build_tiny(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(ModelArguments(model_name_or_path=str(folder)))
    assert not marker.exists()
    assert ModelArguments(model_name_or_path=str(folder)).trust_remote_code is False


def test_evaluation_batches_use_the_evaluation_collator(tmp_path):
    from transformers import TrainingArguments

    from audiollm.crash_safety import CrashSafeTrainer

    def train_collator(rows):
        return {"which": "train"}

    def eval_collator(rows):
        return {"which": "eval"}

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False,
                             use_cpu=True, per_device_eval_batch_size=1)
    rows = [{"x": 1}, {"x": 2}]
    kwargs = dict(model=torch.nn.Linear(1, 1), args=args, train_dataset=rows, eval_dataset=rows,
                  data_collator=train_collator)
    trainer = CrashSafeTrainer(**kwargs, eval_data_collator=eval_collator)
    assert next(iter(trainer.get_eval_dataloader()))["which"] == "eval"
    assert next(iter(trainer.get_train_dataloader()))["which"] == "train"
    assert next(iter(CrashSafeTrainer(**kwargs).get_eval_dataloader()))["which"] == "train"
