"""Property tests: random manifest lines and random chat rows give a valid row / batch or a clear, classified
error; never a crash of another kind and never a batch whose audio and placeholders disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiollm.audio import AudioError, SAMPLE_RATE, clip_token_count
from audiollm.bad_rows import BadRowLog
from audiollm.collator import IGNORE_INDEX, ChatCollator
from audiollm.data_check import KINDS, read_rows
from audiollm.row_checks import RowError
from audiollm.tiny import tiny_tokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PIECE = st.sampled_from(["a", "b", " ", "<", ">", "audio", "<audio>", " hello ", "é", "\n", "<|AUDIO|>"])
TEXT = st.lists(PIECE, max_size=12).map("".join)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "bogus"]),
    "content": st.one_of(TEXT, st.none(), st.integers()),
})
CLIP = st.one_of(
    st.integers(min_value=0, max_value=2 * SAMPLE_RATE).map(
        lambda n: (0.1 * np.sin(np.arange(n) / 7.0)).astype(np.float32)),
    st.just("missing.wav"),
)
RANDOM_ROW = st.fixed_dictionaries({
    "messages": st.one_of(st.lists(MESSAGE, max_size=5), st.none(), TEXT),
    "audios": st.one_of(st.lists(CLIP, max_size=3), st.none()),
})


@st.composite
def near_valid_row(draw):
    """A well-formed row (k markers, k clips, an answer), then maybe one extra or one missing clip."""
    clips = draw(st.lists(CLIP, max_size=3))
    question = "".join(f"{draw(TEXT)}<audio>" for _ in clips) + draw(TEXT)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "ok " + draw(TEXT)}]
    clips = clips + draw(st.lists(CLIP, max_size=1)) if draw(st.booleans()) else clips
    return {"messages": messages, "audios": clips}


ROW = st.one_of(near_valid_row(), near_valid_row(), RANDOM_ROW)  # two thirds start valid: batches get built


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def audio_tokens_expected(rows: list[dict]) -> int:
    return sum(clip_token_count(len(c)) for row in rows for c in row["audios"] or [])


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=4), max_length=st.sampled_from([16, 64, 4096]))
def test_collator_gives_a_consistent_batch_or_a_classified_error(tokenizer, rows, max_length):
    collator = ChatCollator(tokenizer, max_length=max_length)
    try:
        batch = collator(rows)
    except (RowError, AudioError, FileNotFoundError) as err:
        assert str(err)  # a message a user can act on
        assert getattr(err, "kind", "missing") in KINDS
        return
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] <= len(rows)
    assert ((labels == IGNORE_INDEX) | (mask == 1)).all()  # no label on padding
    audio_slots = int((ids == collator.audio_token_id).sum())
    if "input_features" in batch:
        assert batch["input_features"].shape[0] == batch["feature_attention_mask"].shape[0]
    assert audio_slots <= audio_tokens_expected(rows)  # over-long rows may be dropped, never cut inside audio
    assert audio_slots == 0 or "input_features" in batch


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_training_collator_never_raises_on_bad_rows(tokenizer, rows):
    """With a BadRowLog (training) every bad row is skipped and counted; an all-bad batch trains nothing."""
    log = BadRowLog(max_fraction=1.0)
    batch = ChatCollator(tokenizer, bad_rows=log, return_row_ids=True)(rows)
    assert log.seen == len(rows)
    assert len(batch["row_ids"]) + log.total_bad == len(rows)
    assert set(log.counts) <= set(KINDS)
    if not batch["row_ids"]:
        assert (batch["labels"] == IGNORE_INDEX).all()


LINE = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda row: json.dumps(row).encode(), ROW.map(lambda r: {**r, "audios": None})),
    st.builds(lambda text: json.dumps(text).encode(), TEXT),
)


@SETTINGS
@given(lines=st.lists(LINE, min_size=1, max_size=8))
def test_manifest_reader_classifies_every_line(tmp_path, lines):
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    reports = read_rows(str(manifest))
    assert len(reports) == sum(1 for line in lines if line.replace(b"\n", b" ").strip())
    for report in reports:
        assert (report.row is None) == bool(report.problems)
        assert all(kind in ("non_utf8", "bad_json", "bad_row") for kind, _ in report.problems)
