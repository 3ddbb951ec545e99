"""One bad-row ceiling for the whole run: each batch carries its rows' tally from whichever dataloader worker made
it, the ranks sum the tallies every micro-step, and all ranks stop at the same step; the count survives a resume.
Streamed manifests get a preflight over their first rows."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from audiollm.bad_rows import MIN_ROWS_FOR_CEILING, TALLY_KEY, BadRowLog, TooManyBadRows
from audiollm.crash_safety import RunBadRows
from tests.test_crash_safety import stage_cmd, start
from tests.test_distributed import RUN_TIMEOUT_S, WORDS, write_manifests, write_recipe

ROWS = 64  # 2 ranks x 2 rows x 2 accumulation = 8 rows a step; 8 steps
BAD_EVERY = 4  # every 4th row names a missing file: 25 % bad, over the 10 % ceiling


def test_a_log_tallies_what_each_batch_added_and_leaves_the_ceiling_to_the_trainer(tmp_path):
    log = BadRowLog(str(tmp_path / "bad.jsonl"), max_fraction=0.01, check=False)
    for i in range(MIN_ROWS_FOR_CEILING):
        log.bad(f"m.jsonl:{i}", "missing", "gone")  # all bad, and no raise: the trainer decides
    log.good()
    assert log.take_tally() == [MIN_ROWS_FOR_CEILING + 1, MIN_ROWS_FOR_CEILING]
    log.good()
    assert log.take_tally() == [1, 0] and log.take_tally() == [0, 0]
    checking = BadRowLog(max_fraction=0.01)
    with pytest.raises(TooManyBadRows):
        for i in range(MIN_ROWS_FOR_CEILING):
            checking.bad(f"m.jsonl:{i}", "missing", "gone")


def test_the_run_count_goes_on_from_a_checkpoint():
    from transformers import TrainerControl, TrainerState

    run = RunBadRows(max_fraction=0.1, path="bad_rows.jsonl")
    state = TrainerState(stateful_callbacks=[run])
    run.on_train_begin(None, state, TrainerControl())
    run.add(40, 4)  # 10 %: not over
    saved = json.loads(json.dumps(run.state()))  # what a checkpoint's trainer_state.json keeps

    resumed = RunBadRows(max_fraction=0.1, path="bad_rows.jsonl")
    resumed.on_train_begin(None, TrainerState(stateful_callbacks={"RunBadRows": saved}), TrainerControl())
    assert (resumed.seen, resumed.bad) == (40, 4)
    with pytest.raises(TooManyBadRows, match=r"7 of 50 rows met by all ranks and workers \(14.0%\)"):
        resumed.add(10, 3)
    fresh = RunBadRows(max_fraction=0.1)
    fresh.on_train_begin(None, TrainerState(stateful_callbacks={}), TrainerControl())  # an older checkpoint
    assert (fresh.seen, fresh.bad) == (0, 0)


def chat(clip: str, i: int) -> dict:
    text = " ".join(WORDS[i % 8:i % 8 + 3])
    return {"messages": [{"role": "user", "content": "<audio>What does the speaker say?"},
                         {"role": "assistant", "content": text}], "audios": [clip]}


def write_rows(root: Path, bad_at) -> Path:
    """ROWS chat rows over the 8 test clips; the rows at ``bad_at(i)`` name a missing file."""
    write_manifests(root)  # the clips
    rows = [chat("missing.wav" if bad_at(i) else f"clip{i % 8}.wav", i) for i in range(ROWS)]
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("bad_first", [True, False])
def test_streamed_manifests_get_a_preflight_over_their_first_rows(tmp_path, bad_first):
    from transformers import TrainingArguments

    from audiollm.build import build_tiny
    from audiollm.stage_args import DataArguments, ModelArguments
    from audiollm.training import load_datasets, load_model, make_collator, preflight

    build_tiny(tmp_path / "init")
    model, tokenizer = load_model(ModelArguments(model_name_or_path=str(tmp_path / "init")))
    manifest = write_rows(tmp_path, (lambda i: i < 16) if bad_first else (lambda i: i >= 48))
    data_args = DataArguments(train_files=[str(manifest)], streaming=True, preflight_rows=32, max_bad_fraction=0.1,
                              data_root=str(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    train, _ = load_datasets(data_args, args)
    assert not hasattr(train, "__len__")  # streamed
    collator = make_collator(tokenizer, model, data_args, args.output_dir)
    if bad_first:
        with pytest.raises(TooManyBadRows, match=r"16 of 32 rows first streamed before training \(50.0%\)"):
            preflight(train, collator, data_args)
    else:
        preflight(train, collator, data_args)  # the bad rows come after the first 32


def test_the_ceiling_is_one_for_all_ranks_and_workers(tmp_path):
    """Each of the 2 ranks' dataloader workers meets 32 rows in all, fewer than the ceiling's minimum of 50 rows:
    only their sum can stop the run. Both ranks stop at the same step with the same counts."""
    from audiollm.build import build_tiny

    build_tiny(tmp_path / "init")
    manifest = write_rows(tmp_path, lambda i: i % BAD_EVERY == 0)
    recipe = tmp_path / "sft.yaml"
    write_recipe("sft", recipe, train_files=[str(manifest)], model_name_or_path=str(tmp_path / "init"),
                 max_steps=ROWS // 8, save_steps=100, preflight_rows=0, max_bad_fraction=0.1,
                 dataloader_num_workers=1, data_root=str(tmp_path))
    log = tmp_path / "logs" / "ceiling.log"
    proc = start(stage_cmd("stages/sft.py", recipe, tmp_path / "run", 2), log)
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    stops = re.findall(r"TooManyBadRows: (\d+) of (\d+) rows met by all ranks and workers", text)
    assert returncode != 0 and len(stops) == 2, text[-3000:]
    assert stops[0] == stops[1]  # the same sums on both ranks
    bad, seen = map(int, stops[0])
    assert MIN_ROWS_FOR_CEILING <= seen < ROWS and bad > 0.1 * seen
    assert not (tmp_path / "run" / "model.safetensors").exists()
