"""Benchmark loaders on fixtures written in each format (and the real MMAU test-mini metadata), source specs, and
how each kind turns an item into a prompt."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiollm.audio import SAMPLE_RATE
from audiollm.audio_sources import load_audio_source
from audiollm.prompts import PROMPT_POOLS
from eval.items import EvalError
from eval.loaders import Source, detect_format, load_source, parse_task
from eval.tasks import AIRBENCH_PROMPT, ASR_PROMPT, build_messages

# shared/ sits beside the checkout
MMAU_JSON = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mmau-test-mini.json"


def write_wav(path: Path, seconds: float = 0.3, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))
    sf.write(path, noise.astype(np.float32), SAMPLE_RATE)
    return path


def wav_bytes(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(int(seconds * SAMPLE_RATE), 0.1, np.float32), SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ source specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mmau=/data/mmau-test-mini.json", Source("mmau", "/data/mmau-test-mini.json")),
        ("zh=asr@zh:hf:/data/aishell", Source("zh", "/data/aishell", "asr", "hf", "zh")),
        ("m=mmau:/data/x.json", Source("m", "/data/x.json", format="mmau")),
        ("st=translation@de:st.jsonl", Source("st", "st.jsonl", "translation", None, "de")),
        ("odd=/data/a:b/c.json", Source("odd", "/data/a:b/c.json")),  # an unknown prefix is part of the path
        ("w=norm=words:asr:manifest:w.jsonl", Source("w", "w.jsonl", "asr", "manifest", normalizer="words")),
    ],
)
def test_parse_task(spec, expected):
    assert parse_task(spec) == expected


@pytest.mark.parametrize("spec", ["no-equals-sign", "=path", "name="])
def test_parse_task_refuses_malformed_specs(spec):
    with pytest.raises(EvalError, match="NAME=SOURCE"):
        parse_task(spec)


def test_parse_task_refuses_an_unknown_normaliser():
    with pytest.raises(EvalError, match="unknown normaliser 'word'.*english, words, basic"):
        parse_task("w=norm=word:w.jsonl")


# ----------------------------------------------------------------------------------------------- our manifests


@pytest.fixture
def manifest(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav"):
        write_wav(tmp_path / "clips" / name)
    rows = [
        {"audio": "clips/a.wav", "task": "asr", "text": "hello world", "lang": "en"},
        {"audio": "clips/b.wav", "task": "sex", "text": "male", "prompt": "Male or female?"},
        {"id": "chat-1", "audios": ["clips/a.wav", "clips/b.wav"], "messages": [
            {"role": "user", "content": "<audio>What is three plus four?"},
            {"role": "assistant", "content": "seven"},
            {"role": "user", "content": "<audio>And this one?"},
            {"role": "assistant", "content": "nine"},
        ]},
        {"id": "pref-1", "audios": ["clips/c.wav"], "messages": [{"role": "user", "content": "<audio>Sound?"}],
         "chosen": "a dog", "rejected_response": [{"role": "assistant", "content": "a cat"}]},
    ]
    return write_jsonl(tmp_path / "eval.jsonl", rows)


def test_manifest_rows(manifest):
    assert detect_format(str(manifest)) == "manifest"
    asr, sex, chat, pref = load_source(parse_task(f"m={manifest}"))
    folder = manifest.parent / "clips"
    assert (asr.kind, asr.reference, asr.language, asr.audios) == ("asr", "hello world", "en", [str(folder / "a.wav")])
    assert asr.question in PROMPT_POOLS["asr"]  # drawn from the stage-1 pool, fixed per row id
    assert (sex.kind, sex.reference, sex.question) == ("short", "male", "Male or female?")
    assert sex.language is None  # only asr/translation carry a language
    assert chat.kind == "short" and chat.id == "chat-1" and chat.reference == "nine"
    assert [m["content"] for m in chat.messages] == ["<audio>What is three plus four?", "seven", "<audio>And this one?"]
    assert build_messages(chat) == chat.messages  # chat prompts are sent as written
    assert (pref.kind, pref.chosen, pref.rejected, pref.reference) == ("preference", "a dog", "a cat", "a dog")
    assert asr.id == "eval.jsonl:1"  # rows without an id are named file:line
    assert asr.normalizer is None  # by language


def test_a_source_normaliser_reaches_its_asr_items_only(manifest):
    asr, sex, *_ = load_source(parse_task(f"m=norm=words:{manifest}"))
    assert (asr.normalizer, sex.normalizer) == ("words", None)


def test_manifest_kind_override_and_mismatch(manifest, tmp_path):
    chat_only = write_jsonl(tmp_path / "chat.jsonl", [json.loads(manifest.read_text().splitlines()[2])])
    (item,) = load_source(parse_task(f"c=open:manifest:{chat_only}"))
    assert item.kind == "open"
    with pytest.raises(EvalError, match="cannot be preference"):
        load_source(parse_task(f"c=preference:{chat_only}"))


def test_manifest_bad_row_names_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"audio": "x.wav", "task": "asr", "text": "hi"}, {"foo": 1}])
    with pytest.raises(EvalError, match=r"bad\.jsonl:2"):
        load_source(parse_task(f"b={bad}"))


def test_translation_items_take_the_target_language(tmp_path):
    write_wav(tmp_path / "a.wav")
    rows = [{"audios": ["a.wav"], "messages": [{"role": "user", "content": "<audio>"},
                                               {"role": "assistant", "content": "Guten Morgen"}]}]
    (item,) = load_source(parse_task(f"st=translation@de:{write_jsonl(tmp_path / 'st.jsonl', rows)}"))
    assert (item.kind, item.language, item.reference) == ("translation", "de", "Guten Morgen")


# ---------------------------------------------------------------------------------------------------------- MMAU


def test_mmau_real_metadata_loads_all_items(tmp_path):
    assert detect_format(str(MMAU_JSON)) == "mmau"
    items = load_source(parse_task(f"mmau={MMAU_JSON}"), audio_root=str(tmp_path))
    raw = json.loads(MMAU_JSON.read_text())
    assert len(items) == len(raw) == 1000
    first = items[0]
    assert first.kind == "mcq" and first.id == raw[0]["id"] and first.reference == raw[0]["answer"]
    assert first.choices == raw[0]["choices"] and first.question == raw[0]["question"]
    # audio_id is "./test-mini-audios/<id>.wav", relative to the audio root
    assert first.audios == [str(tmp_path / "test-mini-audios" / f"{raw[0]['id']}.wav")]
    assert {i.group for i in items} == {"sound", "music", "speech"}
    text = build_messages(first)[0]["content"]
    assert text.startswith("<audio>" + raw[0]["question"]) and all(c in text for c in raw[0]["choices"])


def test_mmau_default_audio_root_is_the_json_folder():
    items = load_source(parse_task(f"mmau={MMAU_JSON}"), limit=2)
    assert len(items) == 2
    assert items[0].audios[0] == os.path.normpath(MMAU_JSON.parent / "test-mini-audios" / f"{items[0].id}.wav")


# ----------------------------------------------------------------------------------------------------- AIR-Bench


@pytest.fixture
def airbench(tmp_path):
    foundation = [
        {"path": "x1.wav", "question": "What animal is this?", "choice_a": "cat", "choice_b": "dog",
         "choice_c": "cow", "choice_d": "bird", "answer_gt": "dog", "task_name": "Sound_AQA",
         "dataset_name": "clotho", "uniq_id": 11},
        {"path": "x2.wav", "question": "Male or female?", "choice_a": "male", "choice_b": "female",
         "answer_gt": "female", "task_name": "Speaker_Gender_Recognition", "dataset_name": "common_voice",
         "uniq_id": 12},
        {"path": "x3.wav", "question": "When does it start?", "choice_a": "[0.0, 1.0]", "choice_b": "[1.0, 2.0]",
         "choice_c": "[2.0, 3.0]", "choice_d": "[3.0, 4.0]", "answer_gt": "[2.0, 3.0]",
         "task_name": "Audio_Grounding", "dataset_name": "AudioGrounding", "uniq_id": 13},
    ]
    chat = [{"meta_info": "A dog barks twice.", "question": "What happens?", "answer_gt": "A dog barks.",
             "path": "y1.wav", "task_name": "sound_QA", "dataset_name": "clotho", "uniq_id": 0}]
    (tmp_path / "Foundation_meta.json").write_text(json.dumps(foundation))
    (tmp_path / "Chat_meta.json").write_text(json.dumps(chat))
    return tmp_path


def test_airbench_foundation(airbench):
    path = airbench / "Foundation_meta.json"
    assert detect_format(str(path)) == "airbench_foundation"
    animal, gender, grounding = load_source(parse_task(f"air={path}"))
    assert (animal.kind, animal.id, animal.reference, animal.group) == ("mcq_letter", "11", "B", "Sound_AQA_clotho")
    assert animal.audios == [str(airbench / "Sound_AQA_clotho" / "x1.wav")]
    assert (gender.reference, gender.choices) == ("B", ["male", "female"])  # two choices only
    assert grounding.reference == "C"
    assert grounding.audios == [str(airbench / "Audio_Grounding_AudioGrounding" / "x3.flac")]  # shipped as flac
    text = build_messages(animal)[0]["content"]
    assert text == f"<audio>{AIRBENCH_PROMPT}\nWhat animal is this?\nA. cat\nB. dog\nC. cow\nD. bird"


def test_airbench_foundation_answer_must_be_a_choice(airbench):
    path = airbench / "Foundation_meta.json"
    rows = json.loads(path.read_text())
    rows[0]["answer_gt"] = "horse"
    path.write_text(json.dumps(rows))
    with pytest.raises(EvalError, match="horse"):
        load_source(parse_task(f"air={path}"))


def test_airbench_chat(airbench):
    path = airbench / "Chat_meta.json"
    assert detect_format(str(path)) == "airbench_chat"
    (item,) = load_source(parse_task(f"chat={path}"), audio_root="/data/Chat")
    assert (item.kind, item.reference, item.context, item.id) == ("open", "A dog barks.", "A dog barks twice.", "0")
    assert item.audios == [str(Path("/data/Chat/sound_QA_clotho/y1.wav"))]
    assert build_messages(item) == [{"role": "user", "content": "<audio>What happens?"}]


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([{"id": "1", "audio_id": "a.wav", "question": "q", "choices": ["a"]}]))
    with pytest.raises(EvalError, match="answer"):
        load_source(parse_task(f"m=mmau:{path}"))


# -------------------------------------------------------------------------------------- HF save_to_disk folders


def save_audio_dataset(folder: Path, columns: dict, split: str | None = None) -> Path:
    """A dataset with a real ``Audio`` feature, built without torchcodec (cast from a {bytes, path} struct)."""
    import datasets

    n = len(next(iter(columns.values())))
    audio = [{"bytes": wav_bytes(0.25 + 0.25 * i), "path": f"clip{i}.wav"} for i in range(n)]
    features = datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                  **{name: datasets.Value("string") for name in columns}})
    ds = datasets.Dataset.from_dict({"audio": audio, **columns}, features=features)
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE))
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(folder))
    return folder


def test_voicebench_items_are_spoken_questions(tmp_path):
    folder = save_audio_dataset(tmp_path / "sd-qa", {"prompt": ["Who wrote Hamlet?", "What is two plus two?"],
                                                     "reference": ["Shakespeare", "four"]}, split="test")
    assert detect_format(str(folder)) == "hf"
    first, second = load_source(parse_task(f"sdqa={folder}"))
    assert (first.kind, first.spoken, first.question, first.reference) == ("open", True, "Who wrote Hamlet?",
                                                                           "Shakespeare")
    assert build_messages(first) == [{"role": "user", "content": "<audio>"}]  # voice chat: no text prompt
    assert len(load_audio_source(second.audios[0])) == int(0.5 * SAMPLE_RATE)  # undecoded bytes, read by soundfile


def test_audiobench_items_carry_their_instruction(tmp_path):
    folder = save_audio_dataset(tmp_path / "clotho_aqa", {"instruction": ["Is there rain?"], "answer": ["yes"]})
    (item,) = load_source(parse_task(f"aqa=short:{folder}"))
    assert (item.kind, item.spoken, item.question, item.reference) == ("short", False, "Is there rain?", "yes")
    assert build_messages(item) == [{"role": "user", "content": "<audio>Is there rain?"}]


# ----------------------------------------------------------------------------------------------------- LibriSpeech


def test_librispeech_folder(tmp_path):
    for speaker, chapter, lines in (("84", "121123", ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"]),
                                    ("174", "50561", ["FOREGOING TRADITIONS"])):
        folder = tmp_path / "test-clean" / speaker / chapter
        folder.mkdir(parents=True)
        rows = [f"{speaker}-{chapter}-{i:04d} {text}" for i, text in enumerate(lines)]
        for row in rows:
            sf.write(folder / f"{row.split()[0]}.flac", np.zeros(1600, np.float32), SAMPLE_RATE)
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(rows) + "\n")
    root = tmp_path / "test-clean"
    assert detect_format(str(root)) == "librispeech"
    items = load_source(parse_task(f"ls={root}"))
    assert [i.id for i in items] == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    assert items[2].reference == "BUT IN LESS THAN FIVE MINUTES" and items[2].kind == "asr"
    assert items[2].audios == [str(root / "84" / "121123" / "84-121123-0001.flac")]
    assert build_messages(items[0]) == [{"role": "user", "content": f"<audio>{ASR_PROMPT}"}]


def test_librispeech_missing_audio_is_named(tmp_path):
    folder = tmp_path / "1" / "2"
    folder.mkdir(parents=True)
    (folder / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    with pytest.raises(EvalError, match="1-2-0000.flac"):
        load_source(parse_task(f"ls={tmp_path}"))
