"""Manifest rows -> model tensors: chat rendering, placeholder expansion, labels, padding, lazy audio features.

A row is LLaMA-Factory / ms-swift style::

    {"messages": [{"role": "user", "content": "<audio>What is this sound?"},
                  {"role": "assistant", "content": "A dog barking."}],
     "audios": ["clip.wav"]}

Audio is decoded here, per batch, never cached as features. Each ``<audio>`` marker becomes one
``<|audio_bos|><|AUDIO|>...<|AUDIO|><|audio_eos|>`` run with exactly ``clip_token_count`` placeholders (clips over
30 s: the chunks' tokens follow each other in that one run). A row longer than ``max_length`` is never cut inside
its audio: it is dropped and counted, or (``overflow="trim_text"``) its text is cut after the last audio token with
a warning.

With a ``BadRowLog`` (training), a row that cannot be used (missing or corrupt audio, a marker/audio count
mismatch, no answer, over-long...) is skipped and recorded by kind instead of raising; a batch whose rows are all
bad becomes a one-token batch without labels, which trains nothing but keeps every rank stepping together.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from audiollm.audio import AudioError, clip_token_count, featurize
from audiollm.audio_sources import load_audio_source
from audiollm.augment import Augmentation
from audiollm.bad_rows import TALLY_KEY, BadRowLog
from audiollm.chat import AUDIO_TOKEN, DEFAULT_SYSTEM_PROMPT, render_segments
from audiollm.ctc import ctc_batch
from audiollm.distill import spoken_turns, teacher_batch, text_version
from audiollm.row_checks import RowError, check_chat_row

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label value the cross-entropy skips


@dataclass
class Encoded:
    """One tokenized row: ids and labels of equal length, and its clips as 16 kHz waveforms."""

    row_id: str
    input_ids: list[int]
    labels: list[int]
    clips: list[np.ndarray]
    teacher: Encoded | None = None  # distillation: the row as text, each audio replaced by its transcript
    transcripts: list | None = None  # what each clip says (the row's "transcripts"), for the CTC loss


@dataclass
class ChatCollator:
    """Turns a list of manifest rows into a padded batch for ``AudioLLMForConditionalGeneration``.

    generation=True renders the prompt with ``<|im_start|>assistant\\n`` appended (after the conversation; put only
    the turns before the answer in ``messages``), pads on the left and returns no labels.
    """

    tokenizer: object
    max_length: int = 4096
    stack: int = 1  # the projector's frame stacking; token counts depend on it
    train_on: str = "all"  # "all" assistant turns or only the "last"
    overflow: str = "drop"  # "drop" the row, or "trim_text" after its last audio token
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    generation: bool = False
    data_root: str | None = None  # when set, audio paths outside it are refused
    max_audio_seconds: float | None = None  # longer files are refused before they are decoded
    bad_rows: BadRowLog | None = None  # training: skip and record bad rows instead of raising
    return_row_ids: bool = False  # add the batch's row ids ("row_ids": list[str]), for reports on a bad step
    augment: Augmentation | None = None  # training: each clip transformed (audiollm.augment)
    teacher_rows: str | None = None  # distillation: add the text version of these rows for the teacher, "spoken"
                                     # or "all" with transcripts (DistillArguments.kd_rows); None: no teacher
    ctc: bool = False  # add each clip's transcript as CTC targets (audiollm.ctc)
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.overflow not in ("drop", "trim_text"):
            raise ValueError(f"overflow must be 'drop' or 'trim_text', got {self.overflow!r}")
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if self.audio_token_id is None or self.audio_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {AUDIO_TOKEN} token: build the model folder with `audiollm init`")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [e for i, row in enumerate(rows) if (e := self.usable(row, i)) is not None]
        if not encoded:
            if self.bad_rows is None:
                raise RowError(f"every row of this batch was dropped as longer than max_length={self.max_length}")
            return self.tallied(self.empty_batch())
        batch = self.pad(encoded)
        if self.teacher_rows and not self.generation:
            batch.update(teacher_batch(encoded, batch["labels"], self.tokenizer.pad_token_id))
        clips = [clip for e in encoded for clip in e.clips]
        if clips:
            names = [f"{e.row_id} audio {k}" for e in encoded for k in range(len(e.clips))]
            audio = featurize(clips, names, stack=self.stack)
            batch["input_features"] = audio.input_features
            batch["feature_attention_mask"] = audio.feature_attention_mask
            if self.ctc and not self.generation:
                said = [t for e in encoded for t in (e.transcripts or [None] * len(e.clips))]
                batch.update(ctc_batch(said, audio.chunks_per_clip))
        if self.return_row_ids:
            batch["row_ids"] = [e.row_id for e in encoded]
        return self.tallied(batch)

    def tallied(self, batch: dict) -> dict:
        """``batch`` with what its rows added to the bad-row counts (``TALLY_KEY``), when the run-wide ceiling is
        the trainer's (a log with ``check=False``): the counts of a worker process reach the trainer this way."""
        if self.bad_rows is not None and not self.bad_rows.check:
            batch[TALLY_KEY] = self.bad_rows.take_tally()
        return batch

    def usable(self, row: dict, index: int) -> Encoded | None:
        """The encoded row, or None when it was dropped; without a BadRowLog a bad row raises."""
        return self.guarded(lambda: self.fit(self.encode(row, index)), row_id_of(row, index))

    def guarded(self, make, row_id: str):
        """``make()`` (an encoded row or pair; None when dropped as over-long), with a bad row recorded in the
        BadRowLog and None returned, or (no BadRowLog) raised."""
        try:
            made = make()
        except (RowError, AudioError, FileNotFoundError) as err:
            if self.bad_rows is None:
                raise
            self.bad_rows.bad(row_id, getattr(err, "kind", "missing"), str(err))
            return None
        if self.bad_rows is not None:
            if made is None:
                self.bad_rows.bad(row_id, "over_length", f"over max_length={self.max_length}")
            else:
                self.bad_rows.good()
        return made

    def empty_batch(self) -> dict:
        """One pad token, no labels: the model returns a zero loss that still touches every trainable weight."""
        one = torch.tensor([[self.tokenizer.pad_token_id]])
        batch = {"input_ids": one, "attention_mask": torch.ones_like(one),
                 "labels": torch.full_like(one, IGNORE_INDEX)}
        if self.return_row_ids:
            batch["row_ids"] = []
        return batch

    def encode(self, row: dict, index: int, with_teacher: bool = True) -> Encoded:
        """Render, tokenize and expand one row. Raises RowError for a marker/audio count mismatch (and, with
        ``teacher_rows``, for transcripts that do not match the audios)."""
        row_id = row_id_of(row, index)
        check_chat_row(row, row_id, self.data_root, self.generation)
        teacher = None
        if self.teacher_rows and with_teacher and (text_row := text_version(row, row_id)) is not None \
                and (self.teacher_rows == "all" or spoken_turns(row)):
            teacher = self.encode(text_row, index, with_teacher=False)
        messages, audios = row["messages"], list(row.get("audios") or [])
        clips = [load_audio_source(a, f"{row_id} audio {k}", self.max_audio_seconds) for k, a in enumerate(audios)]
        if self.augment is not None:
            clips = [self.augment.augment(c, row_id, k, row.get("task")) for k, c in enumerate(clips)]
        counts = [clip_token_count(len(c), self.stack) for c in clips]
        segments = render_segments(messages, self.system_prompt, self.generation, self.train_on)
        ids, labels, clip = [], [], 0
        # One call for the row's segments: a call per segment cost a third of collating a batch.
        pieces = self.tokenizer([seg.text for seg in segments], add_special_tokens=False)["input_ids"]
        for seg, piece in zip(segments, pieces):
            for tok in piece:
                if tok != self.audio_token_id:
                    ids.append(tok)
                    labels.append(tok if seg.train else IGNORE_INDEX)
                    continue
                if clip == len(counts):
                    raise RowError(f"{row_id}: the text itself contains {AUDIO_TOKEN}; mark audio with <audio> only")
                ids += [tok] * counts[clip]
                labels += [IGNORE_INDEX] * counts[clip]
                clip += 1
        said = row.get("transcripts")
        said = said if isinstance(said, list) and len(said) == len(clips) else None
        return Encoded(row_id, ids, labels, clips, teacher, said)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch, which the augmentation's draws follow (``audiollm.augment.CollatorEpochs``)."""
        if self.augment is not None:
            self.augment.epoch = epoch

    def fit(self, row: Encoded) -> Encoded | None:
        """Apply ``max_length``: keep, trim the text after the last audio token, or drop (counted, logged)."""
        if len(row.input_ids) <= self.max_length:
            return row
        audio_positions = [i for i, t in enumerate(row.input_ids) if t == self.audio_token_id]
        audio_end = audio_positions[-1] + 1 if audio_positions else 0
        keeps_labels = any(lab != IGNORE_INDEX for lab in row.labels[: self.max_length])
        if self.overflow == "trim_text" and audio_end < self.max_length and (keeps_labels or self.generation):
            log.warning("%s: %d tokens > max_length=%d, text trimmed", row.row_id, len(row.input_ids), self.max_length)
            self.skipped["trimmed_over_max_length"] += 1
            return Encoded(row.row_id, row.input_ids[: self.max_length], row.labels[: self.max_length], row.clips,
                           row.teacher, row.transcripts)
        self.skipped["dropped_over_max_length"] += 1
        log.warning(
            "%s: %d tokens > max_length=%d, row dropped (%d dropped so far)",
            row.row_id, len(row.input_ids), self.max_length, self.skipped["dropped_over_max_length"],
        )
        return None

    def pad(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        """Pad ids with the pad token and labels with -100, on the right (training) or left (generation)."""
        width = max(len(r.input_ids) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r.input_ids), width) if self.generation else slice(0, len(r.input_ids))
            ids[i, span] = torch.tensor(r.input_ids)
            labels[i, span] = torch.tensor(r.labels)
            mask[i, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if not self.generation:
            batch["labels"] = labels
        return batch


def row_id_of(row: dict, index: int) -> str:
    """The row's ``id`` (``manifest:line`` from ``load_manifest``), or its place in the batch."""
    return str(row.get("id") or f"row {index}")
