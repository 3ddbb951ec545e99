"""The demo's voice: manifests from a corpus, the codec and TTS stages at 2 steps, and every voice figure measured
by a tiny random listener (the figures' plumbing, not their values: nothing here learns)."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from audiollm.build import build_tiny
from audiollm.tts.demo import TTS_VOICES, train_voice, tts_corpus, voice_manifests
from audiollm.tts.voice_eval import EMPTY_ANSWER_SECONDS, agreement, measure_replies, measure_voice, spoken_by_espeak
from tests.conftest import build_untrained_tts

VOICES = {"train": ["en+f1", "en+m1"], "heldout": ["en+f4", "en+m7"], "validation": ["steph", "m6"]}
WORDS = ["red green", "three four", "blue seven", "dog car"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """clips.jsonl and audio like the synthesiser's: 4 English clips per split in two voices, one German clip."""
    from tests.conftest import make_speech_like

    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rows = []
    for split, voices in VOICES.items():
        for i, text in enumerate(WORDS):
            name = f"audio/{split}{i}.wav"
            sf.write(root / name, make_speech_like(0.8 + 0.1 * i, seed=len(rows)), 16000)
            rows.append({"audio": name, "split": split, "text": text, "language": "en", "voice": voices[i % 2],
                         "sex": "female" if i % 2 == 0 else "male", "word_starts": [0.0, 0.35]})
    rows.append({**rows[0], "language": "de", "text": "rot"})
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_manifests_keep_english_clips_of_each_split(corpus, tmp_path):
    manifests = voice_manifests(corpus, tmp_path)
    for split in VOICES:
        rows = [json.loads(line) for line in manifests[split].read_text().splitlines()]
        assert [r["text"] for r in rows] == WORDS  # the German clip is left out
        assert {r["voice"] for r in rows} == set(VOICES[split])
        assert rows[0]["words"] == [{"word": "red", "start": 0.0}, {"word": "green", "start": 0.35}]


def test_tts_voices_are_training_voices():
    """The TTS speaks in voices the listener trained on; none of them speaks in the splits it is measured on."""
    from audiollm.synth.voices import ACCENTS, VARIANTS

    for sex, voice in TTS_VOICES.items():
        accent, variant = voice.split("+")
        assert accent in ACCENTS["train"] and variant in VARIANTS["train"][sex]
        assert all(accent not in ACCENTS[s] and variant not in VARIANTS[s][sex] for s in ("validation", "heldout"))


def test_tts_corpus_speaks_the_training_texts_in_each_tts_voice(corpus, tmp_path):
    rows = [json.loads(line) for line in tts_corpus(corpus, tmp_path, seed=0).read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(WORDS * len(TTS_VOICES))  # training texts only, no German
    assert {(r["voice"], r["sex"]) for r in rows} == {(v, s) for s, v in TTS_VOICES.items()}
    for row in rows:
        wav, rate = sf.read(row["audio"])
        assert rate == 16000 and len(wav) > 0.3 * rate
        assert [w["word"] for w in row["words"]] == row["text"].split() and row["words"][0]["start"] >= 0.0
    again = [json.loads(line) for line in tts_corpus(corpus, tmp_path / "again", seed=0).read_text().splitlines()]
    assert [r["words"] for r in again] == [r["words"] for r in rows]  # the same plan: rate and pitch per seed


def test_agreement_compares_normalised_answers():
    assert agreement(["Female.", "male", "high"], ["female", "female", "High"]) == pytest.approx(2 / 3)


def test_an_empty_answer_is_spoken_as_silence(tmp_path):
    """A listener may answer nothing; espeak refuses an empty text, so the reply ceiling hears silence instead."""
    wavs = spoken_by_espeak(["three", " ", "four"], ["en+m1"], tmp_path)
    assert len(wavs) == 3 and wavs[0].size > 1_000 and wavs[2].size > 1_000
    assert wavs[1].shape == (int(EMPTY_ANSWER_SECONDS * 16_000),) and not wavs[1].any()
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["0000.wav", "0002.wav"]


def test_train_voice_writes_a_codec_and_a_tts(corpus, tmp_path):
    from audiollm.tts.codecs import load_codec
    from audiollm.tts.generate import load_tts

    folders = train_voice(corpus, tmp_path / "voice", max_steps=2)
    assert load_codec(folders["codec"]).name == "audiollm_melcodec"
    assert load_tts(folders["tts"]).codec.folder == folders["codec"].resolve()


def test_every_voice_figure_is_measured(corpus, tmp_path):
    tts = build_untrained_tts(tmp_path / "tts", codec="melcodec", layout="rvq")
    build_tiny(tmp_path / "listener")
    manifests = voice_manifests(corpus, tmp_path / "data")
    question = str(corpus / "audio" / "heldout0.wav")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"task": task, "audios": [question], "prediction": "seven",
                                               "reference": "seven"}) + "\n"
                                   for task in ("heldout_voice_chat", "heldout_voice_chat", "heldout_analysis")))
    figures = measure_voice(tts, tmp_path / "listener", manifests["heldout"], tmp_path / "out", texts=2)
    figures |= measure_replies(tts, tmp_path / "listener", predictions, "heldout_voice_chat", tmp_path / "out", 2,
                               list(TTS_VOICES.values()))
    for key in ("original_wer", "codec_resynthesis_wer", "tts_wer", "tts_wer_best_of_4"):
        assert figures[key] >= 0.0 and len(figures["ci95"][key]) == 2, key
    for key in ("cloning_sex_agreement", "no_prompt_sex_agreement", "cloning_pitch_agreement",
                "prompt_sex_accuracy", "spoken_reply_accuracy", "spoken_reply_accuracy_best_of_4",
                "spoken_reply_ceiling"):
        assert 0.0 <= figures[key] <= 1.0, key
    assert figures["reply_text_accuracy"] == 1.0 and figures["replies"] == 2  # the written answers were right
    assert figures["texts"] == figures["clips"] == 2 and figures["prompt_voices"] == VOICES["heldout"]
    assert (tmp_path / "out" / "sample_answer.wav").is_file() and (tmp_path / "out" / "sample_question.wav").is_file()
    quick = measure_voice(tts, tmp_path / "listener", manifests["validation"], tmp_path / "val", texts=2, full=False,
                          tts_voices=list(TTS_VOICES.values()))
    assert "tts_wer_best_of_4" not in quick and "cloning_sex_agreement" not in quick
    assert quick["tts_voice_original_wer"] >= 0.0 and quick["tts_voice_codec_wer"] >= 0.0
    assert len(list((tmp_path / "val" / "espeak_texts").glob("*.wav"))) == 2  # the texts, spoken in the TTS voices
