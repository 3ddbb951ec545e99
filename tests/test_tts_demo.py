"""The demo's voice part on the smallest synthesised corpus: it trains, and its figures are measured."""

from __future__ import annotations

import json

import pytest


def test_train_tts_demo_measures_its_figures(tmp_path):
    from audiollm.synth.corpus import synth
    from audiollm.tts.data import token_dataset
    from audiollm.tts.demo import NOTICE, token_accuracy, train_tts_demo
    from audiollm.tts.generate import load_tts

    synth(tmp_path / "corpus", seed=0, size="tiny")
    results = train_tts_demo(tmp_path / "corpus", tmp_path / "out", max_steps=4)
    assert [step for step, _ in results["loss_curve"]] == [1, 2, 3, 4]
    assert results["train_rows"] > 0 and results["heldout_rows"] > 0
    assert results["notice"] == NOTICE and "not meant to be intelligible" in NOTICE
    assert json.loads((tmp_path / "out" / "tts_results.json").read_text())["heldout_token_accuracy"] == \
        results["heldout_token_accuracy"]
    tts = load_tts(tmp_path / "out" / "tts")
    heldout = token_dataset([str(tmp_path / "out" / "data" / "tts_heldout.jsonl")], tts.tokenizer, tts.vocab,
                            tts.codec.key, lambda: tts.codec, 512, tmp_path / "out" / "cache")
    assert token_accuracy(tts.model, heldout, tts.vocab.speech_start) == pytest.approx(
        results["heldout_token_accuracy"])
    assert (tmp_path / "out" / "sample.wav").is_file()
