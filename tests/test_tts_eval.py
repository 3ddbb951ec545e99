"""Round-trip intelligibility (eval.tts_eval, ``audiollm eval-tts``) with a tts folder trained for nothing and a
tiny random listener: exact WER, CI and best-of-N selection through a scripted listener, the pipeline end to end,
the audio-LLM transcriber, and the CLI's errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiollm.audio import SAMPLE_RATE
from audiollm.build import build_tiny
from audiollm.cli import main as cli
from audiollm.tts.generate import load_tts
from eval import metrics
from eval.items import EvalError
from eval.speech import AudioLLMTranscriber, load_transcriber
from eval.tts_eval import codec_resynthesis_wer, read_texts, tts_intelligibility, wer_gap_entry

from tests.conftest import make_speech_like

TEXTS = ["red green blue", "cat and dog"]  # no number words: the normaliser turns "one two" into "12"


class Scripted:
    """A listener that hears nothing: call k of ``transcribe`` returns ``replies[k]`` (one string per clip)."""

    name = "scripted"

    def __init__(self, *replies: list[str]):
        self.replies, self.lengths = list(replies), []

    def transcribe(self, wavs, language="en"):
        reply = self.replies.pop(0)
        assert len(reply) == len(wavs)
        self.lengths.append([len(w) for w in wavs])
        return list(reply)


def wer_ci(stats: list[list[int]]) -> list[float]:
    return list(metrics.bootstrap_ci(stats, lambda sums, n: metrics.error_rate(sums[0], sums[1]), 1000, 0))


@pytest.fixture(scope="module")
def tts(untrained_tts_dir):
    return load_tts(untrained_tts_dir)


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    """A stock-format tiny Qwen2-Audio folder (linear projector: model_type qwen2_audio), random weights."""
    folder = tmp_path_factory.mktemp("listener") / "tiny"
    build_tiny(folder)
    return folder


def test_wer_ci_and_best_of_with_known_transcripts(tts):
    # Call order: the one-sample run transcribes all texts in one batch, then the verifier hears each text's
    # three candidates; the kept candidate's transcript is the verifier's (no fourth call).
    listener = Scripted(["red green", "cat and dog"],
                        ["red", "red green blue", "red green blue sun"],
                        ["cat and dog", "cat", "and dog"])
    results = tts_intelligibility(tts, TEXTS, listener, best_of=3, seed=5)
    single, best = results["tts_wer"], results["tts_wer_best_of_n"]
    assert (single["value"], single["errors"], single["words"], single["n"]) == (1 / 6, 1, 6, 2)
    assert single["ci95"] == wer_ci([[1, 3], [0, 3]]) and single["ci95"][0] == 0.0
    assert single["ci95"][1] == pytest.approx(1 / 3)
    assert [i["transcript"] for i in results["items"]] == ["red green", "cat and dog"]
    assert [i["chosen"] for i in results["items_best_of_n"]] == [1, 0]
    assert results["items_best_of_n"][0]["scores"] == pytest.approx([-2 / 3, 0.0, -1 / 3])
    assert (best["value"], best["ci95"]) == (0.0, [0.0, 0.0]) and best["value"] <= single["value"]
    assert listener.replies == [] and results["sampling"]["seed"] == 5 and results["best_of"] == 3
    # The listener heard 16 kHz audio: the 24 kHz samples resampled.
    for item, length in zip(results["items"], listener.lengths[0]):
        assert abs(length - item["seconds"] * SAMPLE_RATE) <= 1 and item["seconds"] > 0
    synthesis = sum(i["synthesis_s"] for i in results["items"])
    assert results["real_time_factor"] == pytest.approx(synthesis / sum(i["seconds"] for i in results["items"]))
    assert results["time_to_first_audio_s"] > 0 and results["time_to_first_audio_texts"] == 2


def test_word_lists_are_scored_and_chosen_word_by_word(tts):
    # By language, "six seven" and "six seven eight five" are each one wrong number against "6789" (a tie); word
    # by word they miss 2 and 1 of 4 words, and the verifier keeps the second.
    listener = Scripted(["six seven eight five"], ["six seven", "six seven eight five"])
    results = tts_intelligibility(tts, ["six seven eight nine"], listener, best_of=2, normalizer="words",
                                  first_audio_texts=0)
    assert (results["tts_wer"]["errors"], results["tts_wer"]["words"]) == (1, 4)
    assert results["items_best_of_n"][0]["scores"] == pytest.approx([-0.5, -0.25])
    assert results["items_best_of_n"][0]["chosen"] == 1 and results["normalizer"] == "words"


def test_codec_resynthesis_with_known_transcripts(tts, tmp_path):
    clips = [make_speech_like(0.5, 0), make_speech_like(0.8, 1)]
    texts = ["hello world", "good morning"]
    listener = Scripted(["hello world", "good"], ["hello world", "good morning"])
    results = codec_resynthesis_wer(tts.codec, clips, texts, listener, originals=True)
    assert (results["resynthesis_wer"]["value"], results["original_wer"]["value"]) == (0.25, 0.0)
    assert results["resynthesis_wer"]["ci95"] == wer_ci([[0, 2], [1, 2]])
    # Paired: a resample of both clips gives a gap of 0 (clip 0 twice), 0.25 or 0.5 (clip 1 twice).
    assert results["resynthesis_gap"] == {"value": 0.25, "ci95": [0.0, 0.5], "n": 2}
    # Decoded clips are cut back to the clip's length (the codec pads to whole frames).
    assert [i["seconds"] for i in results["items"]] == pytest.approx([0.5, 0.8], abs=1e-4)
    assert listener.lengths == [[8000, 12800]] * 2

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not a wave file")
    with pytest.raises(EvalError, match=r"clips\[1\]: .*corrupt.wav"):
        codec_resynthesis_wer(tts.codec, [clips[0], str(corrupt)], texts, Scripted(["a", "b"]))


def test_the_codec_gap_is_paired_over_clips():
    """A codec that adds one error to every 4-word clip adds 0.25 WER whichever clips a resample draws, though
    what the clips themselves are heard as (0 or 4 errors each) spreads their own WER's interval wide."""
    original = [{"errors": e, "words": 4} for e in (0, 4, 0, 4, 0, 4, 0, 4)]
    codec = [{"errors": i["errors"] + 1, "words": 4} for i in original]
    gap = wer_gap_entry(codec, original, n_resamples=200, seed=0)
    assert gap == {"value": 0.25, "ci95": [0.25, 0.25], "n": 8}
    low, high = wer_ci([[i["errors"], i["words"]] for i in original])
    assert high - low > 0.5
    with pytest.raises(EvalError, match="same references"):
        wer_gap_entry(codec[:2], [{"errors": 0, "words": 3}] * 2, n_resamples=10, seed=0)


def test_pipeline_end_to_end_with_a_tiny_listener(tts, listener):
    transcriber = AudioLLMTranscriber(str(listener), max_new_tokens=6)
    results = tts_intelligibility(tts, TEXTS, transcriber, best_of=2, n_resamples=50, first_audio_texts=1)
    for key, n in (("tts_wer", 2), ("tts_wer_best_of_n", 2)):
        entry = results[key]
        low, high = entry["ci95"]
        assert entry["n"] == n and low <= entry["value"] <= high and entry["words"] == 6
    for item in results["items"] + results["items_best_of_n"]:
        assert isinstance(item["transcript"], str) and item["seconds"] > 0 and item["synthesis_s"] > 0
    assert [len(i["scores"]) for i in results["items_best_of_n"]] == [2, 2]
    assert results["real_time_factor_best_of_n"] > 0 and results["time_to_first_audio_texts"] == 1
    assert results["transcriber"] == "tiny"


def test_load_transcriber_recognises_listener_folders(listener, tmp_path):
    assert isinstance(load_transcriber(str(listener)), AudioLLMTranscriber)  # stock Qwen2-Audio model_type
    ours = tmp_path / "stack"
    build_tiny(ours, projector="stack")
    assert json.loads((ours / "config.json").read_text())["model_type"] == "audiollm"
    transcriber = load_transcriber(str(ours))
    transcriber.max_new_tokens = 4
    wavs = [make_speech_like(0.4, 0), make_speech_like(1.1, 1), np.zeros(10, np.float32)]  # 10 samples: padded
    transcripts = transcriber.transcribe(wavs)
    assert len(transcripts) == 3 and all(isinstance(t, str) for t in transcripts)

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EvalError, match="model_type 'bert'"):
        load_transcriber(str(other))


def test_speak_best_of_with_a_listener_folder(untrained_tts_dir, listener, tmp_path, capsys):
    assert cli(["speak", "--model", str(untrained_tts_dir), "--text", "one two", "--out", str(tmp_path / "a.wav"),
                "--best-of", "2", "--verifier", str(listener), "--normalizer", "words"]) == 0
    assert "best of 2" in capsys.readouterr().out and (tmp_path / "a.wav").is_file()


def write_clips(root: Path, rows: list[dict]) -> Path:
    for i in range(2):
        sf.write(root / f"c{i}.wav", make_speech_like(0.6, i), SAMPLE_RATE)
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "clips.jsonl"


def test_cli_writes_results_and_report(untrained_tts_dir, listener, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("hello world\nred green\n\n")
    clips = write_clips(tmp_path, [{"audio": "c0.wav", "text": "hello world"},
                                   {"audio": "c1.wav", "text": "good morning"}])
    assert cli(["eval-tts", "--tts", str(untrained_tts_dir), "--texts", str(tmp_path / "texts.txt"),
                "--listener", str(listener), "--best-of", "2", "--codec-clips", str(clips), "--originals",
                "--bootstrap", "50", "--normalizer", "words", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    spoken, codec = results["tts"], results["codec_resynthesis"]
    assert spoken["normalizer"] == codec["normalizer"] == "words"
    assert [i["text"] for i in spoken["items"]] == ["hello world", "red green"]
    assert spoken["tts_wer"]["n"] == spoken["tts_wer_best_of_n"]["n"] == 2
    assert codec["resynthesis_wer"]["n"] == codec["original_wer"]["n"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    for line in ("TTS, one sample", "TTS, best of 2", "codec resynthesis (ceiling)", "original clips",
                 "codec resynthesis − original (paired)", "Real-time factor", "normaliser words"):
        assert line in report
    gap = codec["resynthesis_gap"]
    assert gap["value"] == pytest.approx(codec["resynthesis_wer"]["value"] - codec["original_wer"]["value"])
    out = capsys.readouterr().out
    assert "tts_wer_best_of_2" in out and "codec minus original" in out


@pytest.mark.parametrize("content, message", [
    (None, "texts.txt: no such texts file"),
    ("", "texts.txt: no texts in this file"),
    ("one two\n\nthree\n", "texts.txt:2: empty text"),
], ids=["missing", "empty", "blank-line"])
def test_cli_refuses_bad_texts(content, message, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        cli(["eval-tts", "--tts", str(tmp_path / "none"), "--texts", str(path), "--listener", "none.pt",
             "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1 and message in capsys.readouterr().err


def test_read_texts_jsonl(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": " one two "}\n\n{"text": "three"}\n')
    assert read_texts(path) == ["one two", "three"]
    path.write_text('{"text": "one"}\n{"id": 2}\n')
    with pytest.raises(EvalError, match='texts.jsonl:2: no "text" string'):
        read_texts(path)
    (tmp_path / "texts.csv").write_text("one\n")
    with pytest.raises(EvalError, match="pass a .txt file"):
        read_texts(tmp_path / "texts.csv")


def test_cli_refuses_bad_clips(untrained_tts_dir, listener, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("one two\n")
    run = ["eval-tts", "--tts", str(untrained_tts_dir), "--texts", str(tmp_path / "texts.txt"),
           "--listener", str(listener), "--out", str(tmp_path / "out"), "--codec-clips"]
    missing = write_clips(tmp_path, [{"audio": "c0.wav", "text": "hello"}, {"audio": "gone.wav", "text": "x"}])
    with pytest.raises(SystemExit) as exit_:
        cli(run + [str(missing)])
    assert exit_.value.code == 1 and "clips.jsonl:2: no such audio file" in capsys.readouterr().err

    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    corrupt = write_clips(tmp_path, [{"audio": "c0.wav", "text": "hello"}, {"audio": "corrupt.wav", "text": "x"}])
    with pytest.raises(SystemExit) as exit_:
        cli(run + [str(corrupt)])
    assert exit_.value.code == 1 and "corrupt.wav" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
