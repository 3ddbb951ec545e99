"""A shortened demo (2 steps per stage, the tests' tiny corpus) runs end to end and writes every artefact.

The full demo's figures are measured by running `audiollm demo` (see the README); this test checks the pipeline,
not the learning.
"""

import json
import math

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from audiollm.beside import Beside, ShareCores, sharing_cores
from audiollm.demo import RESULT_KEYS, STAGES, VOICE_KEYS, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, seed=0, max_steps=2, corpus_size="tiny")


def test_results_hold_every_figure_measured(demo):
    out, results = demo
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in (*RESULT_KEYS, "wall_seconds"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]), key
    for key in ("analysis_accuracy", "voice_chat_accuracy", "typed_question_accuracy", "dpo_pref_accuracy_before",
                "dpo_pref_accuracy_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["asr_wer"] >= 0.0
    # the voice, measured by the exported listener on both splits (held-out: every figure)
    assert saved["voice"] == json.loads((out / "voice" / "voice_results.json").read_text())
    assert set(VOICE_KEYS) <= set(saved["voice"]["heldout"])
    assert {"codec_resynthesis_wer", "tts_wer"} <= set(saved["voice"]["validation"])
    assert (out / "voice" / "heldout" / "spectrograms.png").is_file()
    assert (out / "voice" / "heldout" / "sample_answer.wav").is_file()
    # the validation split (its own voices and sentences) is scored the same way, beside the held-out figures
    assert set(saved["validation"]) == {"asr_wer", "classification_accuracy", "analysis_accuracy",
                                        "voice_chat_accuracy", "typed_question_accuracy"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in saved["validation"].values())
    # The figures are the harness's own, computed from its saved per-item predictions.
    harness = json.loads((out / "eval" / "results.json").read_text())
    assert harness["tasks"]["heldout/asr"]["value"] == saved["asr_wer"]
    predictions = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == sum(t["n"] for t in harness["tasks"].values())
    # per voice: each scored item counted once, under a voice of its own split
    clips = [json.loads(line) for line in (out / "data" / "clips.jsonl").read_text().splitlines()]
    for split, task in (("heldout", "heldout_voice_chat"), ("validation", "validation_analysis"),
                        ("heldout", "heldout/asr")):
        voices = saved["per_voice"][split]
        assert set(voices) <= {c["voice"] for c in clips if c["split"] == split}
        figure = {"voice_chat": "voice_chat_accuracy", "analysis": "analysis_accuracy", "asr": "asr_wer"}[
            task.replace("/", "_").split("_", 1)[1]]
        assert sum(v["items"].get(figure, 0) for v in voices.values()) == harness["tasks"][task]["n"]
    assert "## Per voice" in (out / "report.md").read_text()
    # held-out intervals: the harness's own; DPO's change paired over the same pairs
    assert saved["ci95"]["voice_chat_accuracy"] == harness["tasks"]["heldout_voice_chat"]["ci95"]
    gain = saved["dpo_pref_gain"]
    assert gain["gain"] == pytest.approx(saved["dpo_pref_accuracy_after"] - saved["dpo_pref_accuracy_before"])
    assert gain["items"] == harness["tasks"]["preference"]["n"] and gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    codec = saved["voice"]["heldout"]
    assert codec["codec_resynthesis_gap"] == pytest.approx(codec["codec_resynthesis_wer"] - codec["original_wer"])
    typed = (out / "data" / "heldout_text.jsonl").read_text().splitlines()  # every held-out sentence, typed
    assert harness["tasks"]["heldout_typed"]["n"] == len(typed) > 0
    # the held-out rows re-spoken in training accents: the same rows, scored by the harness beside them
    swapped = saved["heldout_training_accents"]
    assert set(swapped) == {"asr_wer", "analysis_accuracy", "voice_chat_accuracy"}
    for key, task in (("asr_wer", "heldout/asr"), ("analysis_accuracy", "heldout_analysis"),
                      ("voice_chat_accuracy", "heldout_voice_chat")):
        assert harness["tasks"][f"heldout_training_accents_{task.split('/')[-1].removeprefix('heldout_')}"][
            "n"] == harness["tasks"][task]["n"], key
        assert f"| {key}, held-out rows in training accents |" in (out / "report.md").read_text()


def test_every_stage_wrote_a_model_and_its_loss_curve(demo):
    out, _ = demo
    for stage in STAGES:
        state = json.loads((out / stage / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        assert any("loss" in entry for entry in state["log_history"])
        assert (out / stage / "model.safetensors").is_file()
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    report = (out / "report.md").read_text()
    assert "asr_wer" in report and "voice_chat_accuracy" in report and "voice: tts_wer" in report
    for part in ("codec", "tts"):
        assert json.loads((out / "voice" / part / "trainer_state.json").read_text())["global_step"] == 2


def test_export_loads_in_stock_transformers(demo):
    out, _ = demo
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out / "export")
    processor = AutoProcessor.from_pretrained(out / "export")
    ids = processor.tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_beside_returns_the_value_or_the_error_of_its_process(tmp_path):
    done = Beside(math.factorial, tmp_path / "done.log", 5)
    assert done.result() == 120 and done.seconds >= 0.0
    failed = Beside(math.factorial, tmp_path / "failed.log", -1)
    with pytest.raises(RuntimeError, match="ValueError: factorial"):
        failed.result()
    assert "ValueError" in (tmp_path / "failed.log").read_text()  # the process's own output went to its log


def test_one_thread_while_the_process_beside_runs_all_once_it_ends(tmp_path):
    import time

    threads = torch.get_num_threads()
    beside = Beside(time.sleep, tmp_path / "sleep.log", 3.0)
    with sharing_cores(beside) as share:
        step = ShareCores(share).on_step_begin  # what a stage's trainer calls before every step
        step(None, None, None)
        assert torch.get_num_threads() == 1
        beside.result()
        step(None, None, None)  # mid-stage: the next step takes the core the process beside gave back
        assert torch.get_num_threads() == threads
    with sharing_cores(None) as share:
        share()
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == threads
