"""The offline speech synthesiser (libespeak-ng through ctypes) and the spoken demo corpus built with it."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import librosa
import numpy as np
import pytest

from audiollm.audio import SAMPLE_RATE
from audiollm.audio_sources import load_audio
from audiollm.chat import count_audio_markers
from audiollm.data import load_manifest, pretrain_to_chat
from audiollm.prompts import PROMPT_POOLS
from audiollm.synth import espeak
from audiollm.synth import questions
from audiollm.synth.build import check_heldout, synth
from audiollm.synth.corpus import ANALYSIS_QUESTIONS, Clip, Speaker, plan_split, read_jsonl, taught_answers
from audiollm.synth.splits import CorpusError, question_splits, text_split
from audiollm.synth.espeak import Espeak, EspeakError
from audiollm.synth.render import render
from audiollm.synth.voices import ACCENTS, PHONEME_TABLES, VARIANTS
from audiollm.synth.questions import NUMBER_WORDS, QUESTION_FORMS, spoken_question

SENTENCE = "what is three plus four"
MANIFESTS = ("pretrain", "sft", "dpo")


def median_f0(wav: np.ndarray) -> float:
    """Median YIN F0 (Hz) over the loud frames; unvoiced frames give octave errors, so quiet ones are dropped."""
    f0 = librosa.yin(wav, fmin=50, fmax=500, sr=SAMPLE_RATE, frame_length=1024, hop_length=256)
    rms = librosa.feature.rms(y=wav, frame_length=1024, hop_length=256)[0]
    n = min(len(f0), len(rms))
    return float(np.median(f0[:n][rms[:n] > 0.3 * rms.max()]))


@pytest.fixture(scope="module")
def tts():
    return Espeak()


def test_speech_is_audible_16k_float_of_plausible_length(tts):
    wav = tts.synth(SENTENCE, "en+m3")
    assert espeak.SAMPLE_RATE == SAMPLE_RATE
    assert wav.dtype == np.float32 and wav.ndim == 1
    seconds = wav.size / SAMPLE_RATE
    assert 0.8 < seconds < 3.0  # five words at 175 words per minute: about 1.7 s
    assert np.sqrt(np.mean(wav**2)) > 0.02 and np.abs(wav).max() <= 1.0


def test_resample_is_librosas_default():
    wav = np.random.default_rng(0).standard_normal(22_050).astype(np.float32)
    expected = librosa.resample(wav, orig_sr=espeak.SAMPLE_RATE_ESPEAK, target_sr=SAMPLE_RATE)
    np.testing.assert_array_equal(espeak.resample(wav), expected)


def test_female_variant_speaks_higher_than_male(tts):
    female, male = median_f0(tts.synth(SENTENCE, "en+f3")), median_f0(tts.synth(SENTENCE, "en+m3"))
    assert female > 1.5 * male, (female, male)  # measured ~215 Hz vs ~110 Hz


@pytest.mark.parametrize("voice", ["en+f4", "en+m7"])
def test_pitch_setting_moves_f0(tts, voice):
    low, high = (median_f0(tts.synth(SENTENCE, voice, pitch=p)) for p in (15, 85))
    assert high > 1.4 * low, (low, high)


def test_slow_rate_lasts_longer_than_fast(tts):
    slow, fast = (tts.synth(SENTENCE, "en+f2", rate=r).size for r in (110, 260))
    assert slow > 1.8 * fast, (slow, fast)  # 260 / 110 = 2.4 for the words; pauses scale less


@pytest.mark.parametrize(
    "voice, text, rate, pitch, message",
    [
        ("en+nope", "hello", 175, 50, "unknown voice variant 'nope'"),
        ("xx", "hello", 175, 50, "EE_NOT_FOUND"),
        ("en", "hello", 20, 50, "rate 20"),
        ("en", "  ", 175, 50, "nothing to say"),
    ],
)
def test_espeak_errors_name_voice_and_text(tts, voice, text, rate, pitch, message):
    with pytest.raises(EspeakError, match=re.escape(message)) as err:
        tts.synth(text, voice, rate, pitch)
    assert repr(voice) in str(err.value) and repr(text) in str(err.value)
    assert tts.synth("one", "en").size > 0  # a failed call leaves the synthesiser usable


def spectral_centroid(wav: np.ndarray) -> float:
    """Mean spectral centroid (Hz) over the loud frames: where the formants put the energy."""
    centroid = librosa.feature.spectral_centroid(y=wav, sr=SAMPLE_RATE, n_fft=1024, hop_length=256)[0]
    rms = librosa.feature.rms(y=wav, frame_length=1024, hop_length=256)[0]
    n = min(len(centroid), len(rms))
    return float(np.mean(centroid[:n][rms[:n] > 0.3 * rms.max()]))


@pytest.mark.parametrize("voice", ["en-US+m3", "en+klatt3", "fr+f2"])  # both synthesisers, another language
def test_formant_scale_moves_the_formants_and_keeps_the_pitch(tts, voice):
    text = SENTENCE if voice.startswith("en") else "trois plus quatre"
    wavs = {scale: tts.synth(text, voice, formant_scale=scale) for scale in (0.9, 1.0, 1.1)}
    centroids = [spectral_centroid(wavs[scale]) for scale in (0.9, 1.0, 1.1)]
    assert centroids[0] < centroids[1] < centroids[2], centroids  # measured 1957 / 2051 / 2137 Hz for en-US+m3
    f0 = {scale: median_f0(wav) for scale, wav in wavs.items()}
    assert all(abs(f0[scale] / f0[1.0] - 1) < 0.05 for scale in (0.9, 1.1)), f0
    for wav in wavs.values():
        assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0
    with pytest.raises(EspeakError, match=re.escape("formant_scale must be 0.5-2.0, got 3.0")):
        tts.synth(text, voice, formant_scale=3.0)


def test_composed_voice_is_the_language_file_then_the_variant_with_all_formants_written_out():
    text = espeak.composed_voice("en-029+m6", 1.1)
    lines = text.splitlines()
    assert lines[0] == "name English (Caribbean)" and "name male6" not in lines  # the variant's name is dropped
    formants = [line.split() for line in lines if line.startswith("formant")]
    assert [int(f[1]) for f in formants] == list(range(espeak.FORMANTS))
    assert formants[0][2:] == ["110", "90", "120"]  # m6: formant 0 100 90 120, times 1.1
    assert formants[7][2:] == ["110", "-1", "-1"]  # m6 leaves formant 7 at espeak's own: 100 %, scaled
    assert espeak.composed_voice("en-029", 1.0).count("formant 1 98 100 100") == 1  # no variant: the language's
    assert lines.index("pitch 82 117") > lines.index("phonemes en-wi")  # the variant's settings come last
    with pytest.raises(EspeakError, match="unknown language voice 'xx'"):
        espeak.composed_voice("xx+m6", 1.1)


SPEAK_ONCE = """
import ctypes, sys
from audiollm.synth import espeak
with espeak._Engine.lock:
    lib = espeak._engine().lib
how, voice, table = sys.argv[1:4]
if how == "file":
    path = espeak._voice_file(espeak.composed_voice(voice, 1.0, table), "test")
    assert lib.espeak_ng_SetVoiceByFile(path.encode()) == 0
    lib.espeak_SetVoiceByName = lambda name: 0  # synth() must not reselect the voice by name
sys.stdout.buffer.write(espeak.Espeak().synth("what is three plus four", voice).tobytes())
"""


def speak_once(how: str, voice: str, table: str = "") -> np.ndarray:
    """In a fresh process (espeak's wave generator keeps state between utterances): by name or a composed file."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SPEAK_ONCE, how, voice, table], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    return np.frombuffer(run.stdout, dtype=np.float32)


@pytest.mark.parametrize("voice", ["en-US+m1", "en-029+klatt5", "en-029+fast", "en-029"])
def test_a_voice_file_composed_at_scale_one_speaks_as_the_named_voice_sample_for_sample(voice):
    by_name, by_file = speak_once("name", voice), speak_once("file", voice)
    assert by_name.size > 8_000 and np.array_equal(by_name, by_file)


@pytest.mark.parametrize("accent", ACCENTS["train"])
def test_each_training_accent_with_its_own_phoneme_table_is_the_shipped_accent(accent):
    """PHONEME_TABLES names each training accent's own table: composed with it, the voice is espeak's own."""
    voice = f"{accent}+m3"
    assert np.array_equal(speak_once("name", voice), speak_once("file", voice, PHONEME_TABLES[accent]))


def test_new_york_english_is_american_rules_with_a_phoneme_table_of_its_own():
    """What --table-share builds on: an accent is its rules plus its table, and swapping the table alone gives
    another accent (here the held-out one, which training never hears)."""
    nyc = speak_once("name", "en-US-nyc+f1")
    assert np.array_equal(nyc, speak_once("file", "en-US+f1", "en-us-nyc"))
    assert not np.array_equal(nyc[:8_000], speak_once("name", "en-US+f1")[:8_000])
    assert {"en", "en-us", "en-us-nyc", "en-rp", "en-sc", "fr"} <= espeak.phoneme_tables()
    assert espeak.language_table("en-US-nyc") == "en-us-nyc" and espeak.language_table("en") == ""


def test_an_unknown_phoneme_table_is_refused_before_espeak_speaks_garbage(tts):
    with pytest.raises(EspeakError, match="unknown phoneme table 'en-xx'"):
        tts.synth("three", "en-US+f1", phoneme_table="en-xx")
    with pytest.raises(EspeakError, match="unknown phoneme table 'en-xx'"):
        espeak.composed_voice("en-US+f1", 1.0, "en-xx")
    wav = tts.synth("three plus four", "en-US+f1", phoneme_table="en-rp")
    assert wav.size > 8_000 and np.isfinite(wav).all() and np.abs(wav).max() <= 1.0


def test_spoken_questions_have_right_answers():
    import random

    rng = random.Random(0)
    sentences, misheard = set(), 0
    for _ in range(600):
        question, answer, wrong = spoken_question(rng)
        sentences.add(question)
        asked = [NUMBER_WORDS.index(w) for w in question.split() if w in NUMBER_WORDS]
        said = [NUMBER_WORDS.index(w) for w in answer.split() if w in NUMBER_WORDS]
        result = said[-1]
        if " plus " in question or question.startswith("add "):
            assert answer.startswith(f"{NUMBER_WORDS[asked[0]]} plus {NUMBER_WORDS[asked[1]]} is ")
            assert result == sum(asked)
        elif " minus " in question or " away from " in question:
            a, b = asked if " minus " in question else asked[::-1]  # "take b away from a"
            assert answer.startswith(f"{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]} is ") and result == a - b
        elif "after" in question or "follows" in question:
            assert answer == f"after {NUMBER_WORDS[asked[0]]} comes {NUMBER_WORDS[result]}" and result == asked[0] + 1
        elif "before" in question:
            assert answer == f"before {NUMBER_WORDS[asked[0]]} comes {NUMBER_WORDS[result]}" and result == asked[0] - 1
        else:
            assert said == list(range(asked[0], asked[1] + 1)) and 3 <= len(said) <= 5
        assert wrong and answer not in wrong
        if " is " in answer or " comes " in answer:  # wrong: the right result of a question one number away
            said_question = said[:-1]
            for w in wrong:
                numbers = [NUMBER_WORDS.index(t) for t in w.split() if t in NUMBER_WORDS]
                heard, got = numbers[:-1], numbers[-1]
                assert sum(abs(x - y) for x, y in zip(heard, said_question)) == 1, w  # one number one away
                op = next(op for op in ("plus", "minus", "after", "before") if op in w.split())
                expected = {"plus": sum(heard), "minus": heard[0] - heard[-1], "after": heard[0] + 1,
                            "before": heard[0] - 1}[op]
                assert op in answer.split() and got == expected, w
            misheard += len(wrong)
    assert misheard > 600  # number questions have one to four misheard answers
    # every kind is asked in each of its sentences
    for forms in QUESTION_FORMS.values():
        for form in forms:
            head = form.split("{")[0]
            assert any(s.startswith(head) for s in sentences), form


def test_all_facts_are_the_facts_questions_draw():
    import random

    facts, rng = questions.all_facts(), random.Random(0)
    assert len(facts) == len(set(facts)) == 25 + 15 + 20 + 20 + 51
    assert {questions.spoken_fact(rng) for _ in range(20_000)} == set(facts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_fact_keeps_a_training_sentence(seed):
    moved = 0
    for fact in questions.all_facts():
        sentences = questions.fact_sentences(*fact)
        splits = question_splits(sentences, seed)
        assert "train" in splits.values(), fact
        moved += sum(splits[t] != text_split(t, seed) for t in sentences)
        assert sum(splits[t] != text_split(t, seed) for t in sentences) <= 1  # only the anchor sentence moves
    assert moved > 0  # some fact had all its sentences out of training: the rule is exercised


def test_held_out_questions_ask_taught_facts_as_often_as_training():
    import random
    from collections import Counter

    asked = {}
    for split in ("train", "heldout"):
        speaker, rng = Speaker(split, 0), random.Random(1)
        asked[split] = Counter(speaker.question(rng)[1] for _ in range(4000))
    assert set(asked["heldout"]) <= set(asked["train"])  # every held-out answer is taught
    for counts in asked.values():  # facts drawn first: every kind asked about equally often in both splits
        kinds = Counter(kind_of(answer) for answer in counts.elements())
        assert len(kinds) == 5 and max(kinds.values()) / min(kinds.values()) < 1.3, kinds


def kind_of(answer: str) -> str:
    words = answer.split()
    return next((kind for kind in ("plus", "minus", "after", "before") if kind in words), "count")


# ---- the corpus -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "seed0"
    synth(out, seed=0, size="tiny")
    return out


def manifest_files(root: Path) -> dict[str, list[dict]]:
    names = [f"{m}.jsonl" for m in MANIFESTS] + [f"{s}_{m}.jsonl" for s in ("heldout", "validation") for m in MANIFESTS]
    return {name: read_jsonl(root / name) for name in names}


def row_audios(row: dict) -> list[str]:
    return row["audios"] if "audios" in row else [row["audio"]]


def test_manifests_have_the_project_formats(corpus):
    said = {c["audio"]: c["text"] for c in read_jsonl(corpus / "clips.jsonl")}
    for name, rows in manifest_files(corpus).items():
        assert rows, name
        for row in rows:
            if "pretrain" in name:
                assert row["task"] in PROMPT_POOLS
                if row["task"] == "asr":  # CTC on the encoder: the clips of transcription rows only
                    assert set(row) == {"audio", "task", "text", "transcript"}
                    assert row["transcript"] == said[row["audio"]]
                else:
                    assert set(row) == {"audio", "task", "text"}
                continue
            roles = [m["role"] for m in row["messages"]]
            assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:])), row
            assert count_audio_markers(row["messages"]) == len(row["audios"]) >= 1
            if "dpo" in name:
                assert set(row) == {"messages", "audios", "chosen", "rejected"} and roles[-1] == "user"
                assert row["chosen"] != row["rejected"]
            else:
                assert set(row) == {"messages", "audios", "transcripts"} and roles[-1] == "assistant"
                assert row["transcripts"] == [said[a] for a in row["audios"]]  # for a distillation teacher
    train = manifest_files(corpus)
    assert {r["task"] for r in train["pretrain.jsonl"]} == {"asr", "sex", "language", "rate", "pitch"}
    assert any(len(r["audios"]) == 2 for r in train["sft.jsonl"])  # multi-turn, one clip per spoken question
    assert any(r["messages"][0]["content"] == "<audio>" for r in train["sft.jsonl"])  # voice chat: speech only


def test_every_clip_decodes_at_16k_and_matches_its_plan(corpus):
    clips = {c["audio"]: c for c in read_jsonl(corpus / "clips.jsonl")}
    used = {a for rows in manifest_files(corpus).values() for r in rows for a in row_audios(r)}
    assert used == set(clips)  # every planned clip is used, every used clip is planned
    seconds = 0.0
    for audio in sorted(used):
        wav = load_audio(corpus / audio)
        assert 0.3 < wav.size / SAMPLE_RATE < 4.0 and np.abs(wav).max() > 0.05, audio
        seconds += wav.size / SAMPLE_RATE
    summary = json.loads((corpus / "corpus.json").read_text())
    assert sum(s["audio_seconds"] for s in summary["splits"].values()) == pytest.approx(seconds, abs=0.2)
    for name, rows in manifest_files(corpus).items():
        split = name.split("_")[0] if "_" in name else "train"
        assert sum(summary["splits"][split]["manifests"][name].values()) == len(rows)


def test_spoken_answers_are_taught_ones_only_and_carry_word_starts(corpus):
    """Training ASR rows speak taught answers, in turn; none is a reply a held-out or validation row expects."""
    taught = taught_answers(0)
    assert len(taught) > 20
    files = manifest_files(corpus)
    spoken = [r["text"] for r in files["pretrain.jsonl"] if r["task"] == "asr" and r["text"] in taught]
    assert sorted(spoken) == sorted(taught[:4])  # the tiny corpus: 4 answers
    for split in ("heldout", "validation"):
        replies = {m["content"] for r in files[f"{split}_sft.jsonl"] for m in r["messages"] if m["role"] == "assistant"}
        assert not set(taught) & replies
        assert not set(taught) & {r["text"] for r in files[f"{split}_pretrain.jsonl"]}
    for clip in read_jsonl(corpus / "clips.jsonl"):  # espeak said where each word starts
        starts = clip["word_starts"]
        assert starts == sorted(starts) and (not starts or starts[0] == 0.0), clip
        if clip["language"] == "en":
            assert len(starts) == len(clip["text"].split()), clip


def test_statements_are_random_reply_shaped_training_sentences_never_a_facts_answer():
    """Statement rows (training only) are shaped like replies, draw their numbers at random and are never a right
    answer: writing one down takes hearing it, and no held-out or validation reply is taught through them."""
    from audiollm.synth.corpus import statement_rows
    from audiollm.synth.questions import all_facts, fact_answer
    from audiollm.synth.splits import text_split

    s = Speaker("train", 0)
    rows = statement_rows(s, 400)
    facts = {fact_answer(*fact)[0] for fact in all_facts()}
    texts = [r["text"] for r in rows]
    assert len(set(texts)) > 300 and [c.text for c in s.clips] == texts
    for row, text in zip(rows, texts):
        assert row["task"] == "asr" and row["transcript"] == text and text not in facts
        assert text_split(text, 0) == "train", text
        numbers = [NUMBER_WORDS.index(w) for w in text.split() if w in NUMBER_WORDS]
        words = text.split()
        if {"plus", "minus", "after", "before"} & set(words):
            assert len(numbers) in (2, 3) and len(words) in (4, 5) and words[-2] in ("is", "comes"), text
        else:  # a counted run
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and 3 <= len(numbers) <= 6, text
    wrong_sums = [t for t in texts if " plus " in t]
    assert wrong_sums and any(NUMBER_WORDS.index(t.split()[0]) > 4 for t in wrong_sums)  # past the taught range


def test_replies_manifest_repeats_the_training_reply_rows_of_pretraining(corpus):
    """replies.jsonl is the pretraining ASR rows that speak taught answers and statements, again (SFT replays them
    at their own weight): every one is a training row of pretrain.jsonl, and no other split has such a file."""
    replies, pretrain = read_jsonl(corpus / "replies.jsonl"), read_jsonl(corpus / "pretrain.jsonl")
    summary = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))["splits"]
    assert len(replies) == sum(summary["train"]["manifests"]["replies.jsonl"].values()) == 4 + 4  # tiny: answers 4
    assert all(r in pretrain for r in replies) and all(r["task"] == "asr" for r in replies)
    assert {r["text"] for r in replies} & set(taught_answers(0))  # the taught answers are among them
    assert not list(corpus.glob("*_replies.jsonl"))


def test_sex_manifest_repeats_the_sex_rows_of_pretraining(corpus):
    """sex.jsonl (the demo's speaker phase) is exactly pretrain.jsonl's sex rows, in order; no other split has one."""
    sex, pretrain = read_jsonl(corpus / "sex.jsonl"), read_jsonl(corpus / "pretrain.jsonl")
    summary = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))["splits"]
    assert sex and sex == [r for r in pretrain if r["task"] == "sex"]
    assert summary["train"]["manifests"]["sex.jsonl"] == {"sex": len(sex)}
    assert not list(corpus.glob("*_sex.jsonl"))


def test_labels_describe_the_clips(corpus):
    clips = {c["audio"]: c for c in read_jsonl(corpus / "clips.jsonl")}
    for row in [r for s in ("", "heldout_", "validation_") for r in read_jsonl(corpus / f"{s}pretrain.jsonl")]:
        clip = clips[row["audio"]]
        expected = {
            "asr": clip["text"],
            "sex": clip["sex"],
            "language": {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}[clip["language"]],
            "rate": "slow" if clip["rate"] < 150 else "fast" if clip["rate"] > 200 else None,
            "pitch": "low" if clip["pitch"] < 40 else "high" if clip["pitch"] > 60 else None,
        }[row["task"]]
        assert row["text"] == expected, (row, clip)
    for row in read_jsonl(corpus / "sft.jsonl"):
        user = row["messages"][0]["content"]
        if user.endswith(ANALYSIS_QUESTIONS["count"]):
            words = clips[row["audios"][0]]["text"].split()
            assert row["messages"][1]["content"] == NUMBER_WORDS[len(words)]


def test_heldout_never_repeats_training_words_or_voices(corpus):
    clips = read_jsonl(corpus / "clips.jsonl")
    split_of = {c["audio"]: c["split"] for c in clips}
    for name, rows in manifest_files(corpus).items():
        expected = name.split("_")[0] if "_" in name else "train"
        assert {split_of[a] for r in rows for a in row_audios(r)} == {expected}, name
    splits = ("train", "validation", "heldout")
    texts = {s: {c["text"] for c in clips if c["split"] == s} for s in splits}
    variants = {s: {c["voice"].split("+")[1] for c in clips if c["split"] == s} for s in splits}
    assert texts["heldout"] and texts["validation"]
    assert not texts["train"] & texts["heldout"] and not texts["validation"] & (texts["train"] | texts["heldout"])
    assert variants["heldout"] and not variants["train"] & variants["heldout"]
    assert variants["validation"] and not variants["validation"] & (variants["train"] | variants["heldout"])
    assert variants["heldout"] <= set(VARIANTS["heldout"]["female"] + VARIANTS["heldout"]["male"])
    accents = {s: {c["voice"].split("+")[0] for c in clips if c["split"] == s and c["language"] == "en"}
               for s in splits}
    assert accents["heldout"] <= set(ACCENTS["heldout"]) and not accents["heldout"] & accents["train"]
    assert not any(c["vowels"] for c in clips)  # made-up accents are off by default


def test_respeak_keeps_held_out_rows_texts_and_voices_in_training_accents(corpus, tmp_path):
    from audiollm.synth.respeak import moved, respeak

    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    rows = {"asr": [r for r in read_jsonl(data / "heldout_pretrain.jsonl") if r["task"] == "asr"],
            "chat": read_jsonl(data / "heldout_sft.jsonl")}
    paths = respeak(data, rows, seed=0)
    for name, path in paths.items():  # the same rows, their clips moved
        again = read_jsonl(path)
        assert [{k: v for k, v in r.items() if k not in ("audio", "audios")} for r in again] == \
               [{k: v for k, v in r.items() if k not in ("audio", "audios")} for r in rows[name]]
        assert all(r["audio"].startswith("audio/heldout_training_accents/") for r in again if "audio" in r)
    clips = {c["audio"]: c for c in read_jsonl(data / "clips.jsonl")}
    spoken = read_jsonl(data / "heldout_training_accents_clips.jsonl")
    assert len(spoken) == len({a for r in rows["chat"] for a in r["audios"]} | {r["audio"] for r in rows["asr"]})
    for clip in spoken:
        original = clips[clip["respeaks"]]
        accent, variant = clip["voice"].split("+")
        assert accent in ACCENTS["train"] and variant == original["voice"].split("+")[1]
        assert (clip["text"], clip["rate"], clip["pitch"]) == (original["text"], original["rate"], original["pitch"])
        assert clip["audio"] == moved(clip["respeaks"])
        assert len(load_audio(data / clip["audio"])) > SAMPLE_RATE // 4
    assert (data / spoken[0]["audio"]).read_bytes() != (data / spoken[0]["respeaks"]).read_bytes()
    assert len({c["voice"].split("+")[0] for c in spoken}) > 1  # drawn per clip
    with pytest.raises(ValueError, match="not a held-out clip"):
        moved("audio/train/00001.wav")


def test_vowel_share_gives_english_training_clips_accents_of_their_own_and_changes_nothing_else(tmp_path):
    _, clips = plan_split("train", 0, "small")
    _, moved = plan_split("train", 0, "small", vowel_share=0.5)
    assert [c for c in moved if c.vowels] == [c for c in moved if c.language == "en"] != []
    assert [replace(c, vowels={}) for c in moved] == clips  # the same utterances, voices, rates, pitches
    for split in ("heldout", "validation"):  # never in the splits that measure
        assert not any(c.vowels for c in plan_split(split, 0, "small", vowel_share=0.5)[1])
    with pytest.raises(CorpusError, match="vowel_share must be within 0-1"):
        synth(tmp_path / "corpus", vowel_share=1.5)
    assert not (tmp_path / "corpus").exists()


def test_formant_range_gives_each_training_clip_a_vocal_tract_of_its_own_and_changes_nothing_else(tmp_path):
    _, clips = plan_split("train", 0, "small", formant_range=(1.0, 1.0))
    _, scaled = plan_split("train", 0, "small", formant_range=(0.9, 1.1))
    scales = [c.formant_scale for c in scaled]
    assert all(0.9 <= x <= 1.1 for x in scales) and len(set(scales)) > 150  # drawn per clip (0.001 steps)
    assert [replace(c, formant_scale=1.0) for c in scaled] == clips  # the same utterances, voices, rates, pitches
    for split in ("heldout", "validation"):  # the shipped voices in the splits that measure
        assert all(c.formant_scale == 1.0 for c in plan_split(split, 0, "small", formant_range=(0.9, 1.1))[1])
    with pytest.raises(CorpusError, match="formant_range must be"):
        synth(tmp_path / "corpus", formant_range=(1.1, 0.9))
    assert not (tmp_path / "corpus").exists()


def test_table_share_mixes_two_training_accents_in_training_clips_only_and_changes_nothing_else(tmp_path):
    _, clips = plan_split("train", 0, "small")
    _, mixed = plan_split("train", 0, "small", table_share=0.5)
    assert [replace(c, phoneme_table="") for c in mixed] == clips  # the same utterances, voices, rates, pitches
    english = [c for c in mixed if c.language == "en"]
    tabled = [c for c in english if c.phoneme_table]
    assert 0.4 < len(tabled) / len(english) < 0.6 and not any(c.phoneme_table for c in mixed if c.language != "en")
    accents = {table: accent for accent, table in PHONEME_TABLES.items()}
    assert all(accents[c.phoneme_table] != c.voice.partition("+")[0] for c in tabled)  # another accent's table
    assert len({(c.voice.partition("+")[0], c.phoneme_table) for c in tabled}) == 20  # every pair of the five
    for split in ("heldout", "validation"):  # the shipped accents in the splits that measure
        assert not any(c.phoneme_table for c in plan_split(split, 0, "small", table_share=0.5)[1])
    with pytest.raises(CorpusError, match="table_share must be within 0-1"):
        synth(tmp_path / "corpus", table_share=-0.1)
    assert not (tmp_path / "corpus").exists()


def test_data_synth_command_passes_its_options_and_refuses_a_reversed_formant_range(tmp_path, monkeypatch, capsys):
    from audiollm import cli
    from audiollm.synth import build

    seen = {}

    def fake_synth(out, **kwargs):  # the command's plumbing only; synth itself is tested above
        seen.update(kwargs)
        return {"splits": {}}

    monkeypatch.setattr(build, "synth", fake_synth)
    assert cli.main(["data", "synth", "--out", str(tmp_path / "c"), "--formant-range", "0.9", "1.1",
                     "--table-share", "0.5"]) == 0
    assert seen["formant_range"] == (0.9, 1.1) and seen["table_share"] == 0.5
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stop:
        cli.main(["data", "synth", "--out", str(tmp_path / "c"), "--formant-range", "1.1", "0.9"])
    assert stop.value.code == 1 and "formant_range must be" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_check_heldout_refuses_shared_words_or_voices():
    def clip(split, text, voice):
        return Clip(f"audio/{split}/{text}.wav", split, text, "en", voice, "female", 175, 50)

    validation = clip("validation", "four", "en-GB-scotland+steph")
    check_heldout([clip("train", "one two", "en+f1"), validation, clip("heldout", "three", "en-029+f4")])
    with pytest.raises(CorpusError, match="utterances"):
        check_heldout([clip("train", "one two", "en+f1"), validation, clip("heldout", "one two", "en-029+f4")])
    with pytest.raises(CorpusError, match="heldout voice variants"):
        check_heldout([clip("train", "one two", "en-029+f4"), validation, clip("heldout", "three", "fr+f4")])
    with pytest.raises(CorpusError, match="validation voice variants"):
        check_heldout([clip("train", "one two", "en-GB-scotland+steph"), validation,
                       clip("heldout", "three", "en-029+f4")])
    with pytest.raises(CorpusError, match="heldout English accents"):
        check_heldout([clip("train", "one two", "en-029+f1"), validation, clip("heldout", "three", "en-029+f4")])
    with pytest.raises(CorpusError, match="validation and heldout"):
        check_heldout([clip("train", "one", "en+f1"), clip("validation", "two", "en-GB-scotland+steph"),
                       clip("heldout", "two", "en-029+f4")])
    with pytest.raises(CorpusError, match="train and heldout"):  # a typed question is a training utterance
        check_heldout([clip("train", "one two", "en+f1"), validation, clip("heldout", "three", "en-029+f4")],
                      typed=("three",))
    heldout = clip("heldout", "three", "en-029+f4")
    check_heldout([replace(clip("train", "one two", "en+f1"), phoneme_table="en-us"), validation, heldout])
    with pytest.raises(CorpusError, match="phoneme tables of other accents"):  # New York's table, in training
        check_heldout([replace(clip("train", "one two", "en-US+f1"), phoneme_table="en-us-nyc"), validation, heldout])
    with pytest.raises(CorpusError, match="phoneme tables of other accents"):
        check_heldout([clip("train", "one two", "en+f1"), replace(validation, phoneme_table="en"), heldout])


def test_full_corpus_evaluates_on_the_same_rows_whatever_its_training_size(monkeypatch):
    """"full" trains on more clips than 10 x "small"; its held-out and validation rows stay those of 10 x "small"."""
    from audiollm.synth import splits as c
    from audiollm.synth.corpus import plan_split

    def plans():
        return {split: plan_split(split, 0, "full") for split in ("validation", "heldout")}

    now = plans()
    assert c.SIZES["full"]["pretrain"]["asr"] > 10 * c.SMALL["pretrain"]["asr"]
    monkeypatch.setitem(c.SIZES, "full", c.scaled(c.SMALL, {"pretrain": 10, "sft": 10, "dpo": 10}))
    assert plans() == now
    assert len(now["heldout"][0]["pretrain"]) == sum(round(0.15 * 10 * n) for k, n in c.SMALL["pretrain"].items()
                                                     if k not in c.TRAIN_ONLY)


def test_typed_questions_are_every_fact_in_each_splits_own_sentences(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    asked = {}
    for split, name in (("train", "text.jsonl"), ("validation", "validation_text.jsonl"),
                        ("heldout", "heldout_text.jsonl")):
        rows = read_jsonl(corpus / name)
        assert summary["splits"][split]["manifests"][name] == {"typed_question": len(rows)}
        for row in rows:
            assert row["audios"] == [] and [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert row["messages"][0]["content"] not in asked  # no sentence twice, nor in two splits
            asked[row["messages"][0]["content"]] = (split, row["messages"][1]["content"])
    spoken = {c["text"]: c["split"] for c in read_jsonl(corpus / "clips.jsonl")}
    assert all(spoken.get(t, split) == split for t, (split, _) in asked.items())  # typed in its own split only
    for fact in questions.all_facts():  # every sentence of every fact, in its split, with the spoken answer
        splits = question_splits(questions.fact_sentences(*fact), 0)
        answer = questions.fact_answer(*fact)[0]
        assert {t: asked[t] for t in splits} == {t: (split, answer) for t, split in splits.items()}
    assert len(asked) == 3 * len(questions.all_facts())


def test_manifests_load_through_datasets(corpus):
    ds = load_manifest(str(corpus / "pretrain.jsonl"))
    chat = pretrain_to_chat(ds[0])
    assert Path(chat["audios"][0]).is_file() and chat["messages"][1]["content"] == ds[0]["text"]
    sft = load_manifest(str(corpus / "sft.jsonl"))
    assert all(Path(a).is_file() for row in sft for a in row["audios"])


def test_same_seed_same_bytes_other_seed_other_corpus(corpus, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    synth(again, seed=0, size="tiny")
    synth(other, seed=1, size="tiny")
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file() and p.name != "corpus.json")
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name != "corpus.json") == files
    for rel in files:  # manifests and audio alike
        assert (again / rel).read_bytes() == (corpus / rel).read_bytes(), rel
    assert (other / "pretrain.jsonl").read_bytes() != (corpus / "pretrain.jsonl").read_bytes()
    assert (other / "clips.jsonl").read_bytes() != (corpus / "clips.jsonl").read_bytes()


def test_refuses_a_non_empty_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not an empty folder"):
        synth(out, size="tiny")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(CorpusError, match="unknown corpus size"):
        synth(tmp_path / "new", size="huge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no partial build left


def test_synthesis_workers_import_this_audiollm_whatever_the_working_folder(tmp_path, monkeypatch):
    """A worker runs `python -m audiollm.synth.render`; another audiollm in the caller's folder must not win, and a
    relative output folder still means the caller's."""
    (tmp_path / "audiollm").mkdir()
    (tmp_path / "audiollm" / "__init__.py").write_text("raise ImportError('the audiollm of the working folder')\n")
    monkeypatch.chdir(tmp_path)
    samples, _, starts = render([("a.wav", "one two", "en+m3", 175, 50)], Path("out"))
    assert (tmp_path / "out" / "a.wav").is_file() and samples[0] > 0 and len(starts[0]) == 2
