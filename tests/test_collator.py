"""Chat template, placeholder expansion, labels, overflow policy and padding of the collator."""

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE, clip_token_count
from audiollm.chat import AUDIO_TOKEN, render_segments
from audiollm.collator import IGNORE_INDEX, ChatCollator, RowError
from audiollm.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def clip(seconds, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def chat_row(**extra):
    return {
        "messages": [
            {"role": "user", "content": "<audio>What is three plus four?"},
            {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "And <audio> this one?"},
            {"role": "assistant", "content": "Twenty one."},
        ],
        "audios": [clip(2.0), clip(65.0, seed=1)],
        **extra,
    }


def test_ids_equal_whole_string_tokenization_with_expanded_placeholders(tok):
    row = chat_row()
    batch = ChatCollator(tok)([row])
    text = "".join(s.text for s in render_segments(row["messages"]))
    counts = [clip_token_count(len(a)) for a in row["audios"]]
    assert counts == [50, 1625]  # 2 s; 65 s = 30 s + 30 s + 5 s chunks, one run
    first, rest = text.split(AUDIO_TOKEN, 1)
    expanded = first + AUDIO_TOKEN * counts[0] + rest.replace(AUDIO_TOKEN, AUDIO_TOKEN * counts[1])
    assert batch["input_ids"][0].tolist() == tok(expanded, add_special_tokens=False)["input_ids"]
    assert batch["input_features"].shape[0] == 4  # 1 chunk + 3 chunks


def test_labels_cover_assistant_answers_and_their_end_token_only(tok):
    for train_on, expected in [("all", "Seven.<|im_end|>Twenty one.<|im_end|>"), ("last", "Twenty one.<|im_end|>")]:
        batch = ChatCollator(tok, train_on=train_on)([chat_row()])
        labels = batch["labels"][0]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == expected
        audio = batch["input_ids"][0] == tok.convert_tokens_to_ids(AUDIO_TOKEN)
        assert (labels[audio] == IGNORE_INDEX).all()


def test_right_padding_for_training_left_for_generation(tok):
    short = {"messages": [{"role": "user", "content": "<audio>Hi"}], "audios": [clip(1.0)]}
    answered = dict(short, messages=short["messages"] + [{"role": "assistant", "content": "Hello."}])
    train = ChatCollator(tok)([chat_row(), answered])
    assert train["attention_mask"][1, 0] == 1 and train["attention_mask"][1, -1] == 0
    assert (train["labels"][1][train["attention_mask"][1] == 0] == IGNORE_INDEX).all()
    rows = [chat_row(), short]
    gen = ChatCollator(tok, generation=True)(rows)
    assert "labels" not in gen
    assert gen["attention_mask"][1, 0] == 0 and gen["attention_mask"][1, -1] == 1
    assert tok.decode(gen["input_ids"][1, -3:]) == "<|im_start|>assistant\n"


def test_marker_count_mismatch_names_the_row(tok):
    row = chat_row(id="train.jsonl:17")
    row["audios"] = row["audios"][:1]
    with pytest.raises(RowError, match=r"train.jsonl:17: 2 <audio> marker\(s\) .* but 1 file"):
        ChatCollator(tok)([row])
    literal = {"id": "r9", "messages": [{"role": "user", "content": f"{AUDIO_TOKEN} hi"}], "audios": []}
    with pytest.raises(RowError, match="r9"):
        ChatCollator(tok)([literal])


def test_overflow_drops_and_counts_never_cuts_audio(tok, caplog):
    short = {"id": "short", "messages": [{"role": "user", "content": "<audio>Hi"}, {"role": "assistant", "content": "yes"}],
             "audios": [clip(1.0)]}
    collator = ChatCollator(tok, max_length=200)
    with caplog.at_level("WARNING"):
        batch = collator([chat_row(id="long"), short])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped["dropped_over_max_length"] == 1
    assert "long" in caplog.text
    with pytest.raises(RowError, match="every row"):
        collator([chat_row(id="long")])
    # trim_text cuts text after the audio, never inside it; a row whose audio itself overflows is still dropped.
    long_answer = {"id": "chatty", "audios": [clip(1.0)], "messages": [
        {"role": "user", "content": "<audio>Count."}, {"role": "assistant", "content": " one two" * 200}]}
    trimmer = ChatCollator(tok, max_length=120, overflow="trim_text")
    batch = trimmer([long_answer, chat_row(id="long")])
    assert batch["input_ids"].shape == (1, 120)
    assert trimmer.skipped == {"trimmed_over_max_length": 1, "dropped_over_max_length": 1}
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_audio_paths_are_decoded_lazily(tok, tmp_path):
    path = tmp_path / "q.flac"
    sf.write(path, clip(1.5), SAMPLE_RATE)
    row = {"messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "ok"}],
           "audios": [str(path)]}
    batch = ChatCollator(tok)([row])
    assert (batch["input_ids"] == tok.convert_tokens_to_ids(AUDIO_TOKEN)).sum() == clip_token_count(24000)
    assert batch["feature_attention_mask"].sum() == 150


def test_stack_projector_changes_counts(tok):
    batch = ChatCollator(tok, stack=4)([chat_row()])
    assert (batch["input_ids"] == tok.convert_tokens_to_ids(AUDIO_TOKEN)).sum() == 13 + (188 + 188 + 32)
    assert torch.is_tensor(batch["input_features"])


def test_change_speed_scales_length_and_pitch():
    from audiollm.audio import change_speed

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * 200.0 * t).astype(np.float32)  # 1 s at 200 Hz
    for factor in (0.8, 1.25):
        fast = change_speed(tone, factor)
        assert abs(len(fast) - SAMPLE_RATE / factor) <= 2
        peak_hz = np.argmax(np.abs(np.fft.rfft(fast))) * SAMPLE_RATE / len(fast)
        assert abs(peak_hz - 200.0 * factor) < 3.0
