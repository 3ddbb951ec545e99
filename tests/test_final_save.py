"""The final save is atomic for every stage: the finished folder is written into ``.saving/final`` and its files
move into the output folder one rename each, config.json and the folder's marker last. A crash at any moment
leaves either a complete model folder or none (no config.json, no marker) beside the untouched checkpoints, and
rerunning the stage resumes and publishes it.

Each stage runs in this process for one step; the fault (an OSError where the files would move in) is patched in,
so it lands at the same place every time.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

import audiollm.crash_safety as crash_safety
from audiollm.crash_safety import FINAL_STAGING, STAGING_DIR, publish_files

# ----------------------------------------------------------------------------------- the move, cut everywhere


class Crash(Exception):
    """The process died here."""


FILES = ("model.safetensors", "config.json", "tokenizer.json", "adapter/adapter.bin", "summary.json")


def write_folder(folder: Path, version: str) -> None:
    """A model folder of ``version``: weights, config, tokenizer, an adapter/ folder and the marker."""
    (folder / "adapter").mkdir(parents=True)
    for name in FILES:
        (folder / name).write_text(f"{version} {name}")


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_publish_files_leaves_a_whole_folder_or_none_wherever_it_is_cut(tmp_path, monkeypatch):
    """Cut after every filesystem operation of the move: config.json never sits beside another save's files, the
    marker only ever marks one whole save (the older until the move starts, then the new one), and the
    checkpoints are never touched."""
    last = ("config.json", "summary.json")
    old, new = ({name: f"{version} {name}" for name in FILES} for version in ("old", "new"))
    cuts_hit, k = 0, 0
    while True:
        root = tmp_path / f"cut-{k}"
        write_folder(root / "out", "old")
        (root / "out" / "checkpoint-2").mkdir()
        (root / "out" / "checkpoint-2" / "trainer_state.json").write_text("{}")
        write_folder(root / "staged", "new")
        ops = [0]
        for name in ("replace", "remove", "rmdir"):
            original = getattr(crash_safety.os, name)

            def cut(*args, _original=original, **kwargs):
                if ops[0] == k:
                    raise Crash
                ops[0] += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(crash_safety.os, name, cut)
        try:
            publish_files(str(root / "staged"), str(root / "out"), last)
        except Crash:
            cuts_hit += 1
        else:
            break
        finally:
            monkeypatch.undo()
        found = contents(root / "out")
        assert found.pop("checkpoint-2/trainer_state.json") == "{}"
        if "config.json" in found:  # a loadable folder: one save's files, never a mix
            assert len({v.split()[0] for v in found.values()}) == 1, (k, found)
        if "summary.json" in found:  # marked finished: one whole save
            assert found in (old, new), (k, found)
        k += 1
    assert cuts_hit >= 7  # 2 removals, 5 moves (and folder cleanup): the loop really cut the move everywhere
    assert contents(root / "out") == {**new, "checkpoint-2/trainer_state.json": "{}"}
    assert not (root / "staged").exists()


# ------------------------------------------------------------------------------------ every stage, for real


def main_of(stage: str):
    __import__(f"stages.{stage}")
    return sys.modules[f"stages.{stage}"].main


def chat_stage_argv(stage: str, root: Path) -> list[str]:
    """pretrain, sft, dpo: the shipped recipe on the tiny model and 8 rows, 1 step, a checkpoint at the end."""
    from audiollm.build import build_tiny
    from tests.test_distributed import write_manifests, write_recipe

    if not (root / "init").exists():
        build_tiny(root / "init")
    data = write_manifests(root)
    write_recipe(stage, root / f"{stage}.yaml", train_files=[data[stage]], model_name_or_path=str(root / "init"),
                 max_steps=1, save_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=2,
                 preflight_rows=0)
    return ["--config", str(root / f"{stage}.yaml")]


def tts_argv(root: Path) -> list[str]:
    from audiollm.tts.tiny import tiny_codec, tiny_lm

    codec, lm = tiny_codec("snac", root / "codec"), tiny_lm(root / "lm")
    rows = []
    for i in range(4):
        wav = 0.1 * np.random.default_rng(i).standard_normal(8000).astype(np.float32)
        sf.write(root / f"c{i}.wav", wav, 16000)
        rows.append({"audio": f"c{i}.wav", "text": "one two", "words": [{"word": "one", "start": 0.0},
                                                                      {"word": "two", "start": 0.2}]})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--config", "stages/configs/tts_demo.yaml", "--model_name_or_path", str(lm), "--codec_name_or_path",
            str(codec), "--layout", "snac7", "--train_files", str(root / "m.jsonl"), "--eval_files",
            str(root / "m.jsonl"), "--cache_dir", str(root / "cache"), "--per_device_train_batch_size", "2"]


def codec_argv(root: Path) -> list[str]:
    from audiollm.tts.tiny import TINY_MELCODEC
    from tests.conftest import make_speech_like

    rows = []
    for i in range(2):
        sf.write(root / f"clip{i}.wav", make_speech_like(0.6, seed=i), 16000)
        rows.append({"audio": f"clip{i}.wav"})
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = [w for k, v in TINY_MELCODEC.items() for w in (f"--{k}", *map(str, v if isinstance(v, list) else [v]))]
    return ["--train_files", str(root / "clips.jsonl"), "--per_device_train_batch_size", "2",
            "--segment_seconds", "0.5", *sizes]


# stage -> the file that marks its output folder finished (moved in last)
MARKERS = {"pretrain": "training_summary.json", "sft": "training_summary.json", "dpo": "training_summary.json",
           "tts": "tts_config.json", "codec": "config.json"}


def stage_argv(stage: str, root: Path, out: Path) -> list[str]:
    argv = {"tts": tts_argv, "codec": codec_argv}.get(stage, lambda r: chat_stage_argv(stage, r))(root)
    return argv + ["--output_dir", str(out), "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                   "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true"]


LORA = ["--train_llm", "false", "--llm_lora_r", "4"]  # the adapter/ folder is saved and merged too


@pytest.mark.parametrize("run", [*MARKERS, "sft-lora"])
def test_a_crash_in_the_final_save_leaves_no_model_and_a_rerun_publishes_it(run, tmp_path, monkeypatch):
    stage, out = run.split("-")[0], tmp_path / "run"
    argv = stage_argv(stage, tmp_path, out) + (LORA if run.endswith("lora") else [])

    def disk_went_away(staged, final, last):
        raise OSError(f"cannot move {staged} into {final}")
    monkeypatch.setattr(crash_safety, "publish_files", disk_went_away)
    with pytest.raises(OSError, match="cannot move"):
        main_of(stage)(argv)
    staged = out / STAGING_DIR / FINAL_STAGING
    written = {p.name for p in staged.iterdir()}
    assert {MARKERS[stage], "config.json", "model.safetensors", "trainer_state.json"} <= written, written
    assert ("adapter" in written) == run.endswith("lora")
    left = {p.name for p in out.iterdir()}
    assert not left & written, f"the final save wrote {left & written} into the output folder itself"
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()  # the resume point is untouched

    first_loss = losses(staged)[1]

    monkeypatch.undo()
    main_of(stage)(argv)  # the rerun resumes from checkpoint-1 and saves again
    assert written <= {p.name for p in out.iterdir()}
    assert not staged.exists()
    assert losses(out)[1] == first_loss  # resumed, not started over (transformers then trains one step more)


def losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_the_published_sft_folder_loads_and_replaces_an_older_one(tmp_path):
    """A finished folder, trained again in place (another seed, 2 steps, from scratch), is replaced by the new
    save: its weights, its summary, and it loads as the next stage's input."""
    from safetensors.torch import load_file

    from audiollm.stage_args import ModelArguments
    from audiollm.training import load_model

    out = tmp_path / "run"
    argv = stage_argv("sft", tmp_path, out)
    main_of("sft")(argv)
    first = load_file(out / "model.safetensors")
    shutil.rmtree(out / "checkpoint-1")  # start over rather than resume
    main_of("sft")(argv + ["--max_steps", "2", "--seed", "1"])
    second = load_file(out / "model.safetensors")
    assert any(not (first[k] == second[k]).all() for k in first)
    assert json.loads((out / "training_summary.json").read_text())["stages"][-1]["steps"] == 2
    assert sorted(losses(out)) == [1, 2]
    model, _ = load_model(ModelArguments(model_name_or_path=str(out)))
    assert sum(p.numel() for p in model.parameters()) > 0
