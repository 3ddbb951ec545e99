"""Preference rows -> one batch of chosen then rejected sequences, for DPO on audio (stage 3).

A preference row is a chat row whose ``messages`` hold the prompt (ending with a user turn) plus two answers::

    {"messages": [{"role": "user", "content": "<audio>What is this sound?"}],
     "audios": ["clip.wav"],
     "chosen": "A dog barking.",
     "rejected": "A cat."}

An answer is a string, an assistant message (``{"role": "assistant", "content": ...}``) or a list holding one
assistant message (LLaMA-Factory / ms-swift styles); LLaMA-Factory's ``rejected_response`` is read as ``rejected``.

Both sequences of a pair are the prompt followed by one answer, tokenized exactly as ``ChatCollator`` tokenizes a
chat row, with labels on the answer and its ``<|im_end|>`` only. The batch stacks every chosen sequence, then every
rejected one, so the policy (and the reference) score both halves in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from audiollm.audio import featurize
from audiollm.audio_sources import load_audio_source
from audiollm.collator import ChatCollator, Encoded, RowError, row_id_of
from audiollm.row_checks import check_inside_root

CHOSEN_KEYS = ("chosen",)
REJECTED_KEYS = ("rejected", "rejected_response")  # LLaMA-Factory writes rejected_response
# Columns TRL's DPOTrainer adds to the dataset when it precomputes the reference log-probs.
REF_LOGP_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def answer_text(row: dict, keys: tuple[str, ...], row_id: str) -> str:
    """The answer under the first of ``keys`` the row has: a string, an assistant message, or a list of one."""
    value = next((row[k] for k in keys if row.get(k) is not None), None)
    if value is None:
        raise RowError(f"{row_id}: no {' / '.join(repr(k) for k in keys)} answer; a preference row needs "
                       "'chosen' and 'rejected' (or 'rejected_response')", "empty_assistant")
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"{row_id}: {keys[0]!r} is a list of {len(value)} messages; give one assistant message")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise RowError(f"{row_id}: the {keys[0]!r} message has role {value.get('role')!r}; it must be 'assistant'")
        value = value.get("content")
    if not isinstance(value, str):
        raise RowError(f"{row_id}: {keys[0]!r} must be a string or an assistant message, got {type(value).__name__}")
    return value


@dataclass
class PreferenceCollator(ChatCollator):
    """Turns preference rows into one padded batch: chosen sequences in rows 0..B-1, rejected in rows B..2B-1.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` of shape (2B, S); ``input_features`` (2C, n_mels, T) and
    ``feature_attention_mask`` (2C, T): the C chunks of the chosen rows, then the same chunks again for the rejected
    rows, matching the order of the ``<|AUDIO|>`` runs; ``kept`` (len(rows),) bool, which input rows made it into
    the batch (a caller lines up per-row results with it); and ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,)
    when every row carries them (TRL's precomputed reference).

    A pair is kept or dropped as a whole: if either sequence is longer than ``max_length`` the ``overflow`` policy
    of ``ChatCollator`` applies to it, and a dropped side drops the pair (counted once in ``skipped``).
    """

    # Labels go on the answer only: earlier assistant turns in ``messages`` are part of the prompt.
    train_on: str = field(default="last", init=False)
    generation: bool = field(default=False, init=False)
    # Packed DPO: the batch stays padded (TRL's loss reads it row by row) and carries ``pack_rows``, the tokens per
    # packed sequence (0: one), so the model runs its LLM on the rows packed (AudioLLM.forward). None: padded.
    pack_rows: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [self.guarded(lambda: self.fit_pair(self.encode_pair(row, i)), row_id_of(row, i))
                 for i, row in enumerate(rows)]
        kept = [pair for pair in pairs if pair is not None]
        if not kept:
            if self.bad_rows is None:
                raise RowError(f"every pair of this batch was dropped as longer than max_length={self.max_length}")
            return self.tallied(self.empty_pair_batch(len(rows)))
        chosen, rejected = [c for c, _ in kept], [r for _, r in kept]
        batch = self.pad(chosen + rejected)  # (2B, S), both halves padded to one width
        batch.update(self.features(chosen))
        batch["kept"] = torch.tensor([pair is not None for pair in pairs])
        for key in REF_LOGP_KEYS:
            if all(row.get(key) is not None for row in rows):
                batch[key] = torch.tensor([float(row[key]) for row, p in zip(rows, pairs) if p is not None])
        if self.return_row_ids:
            batch["row_ids"] = [c.row_id for c in chosen]
        if self.pack_rows is not None:
            batch["pack_rows"] = self.pack_rows
        return self.tallied(batch)

    def empty_pair_batch(self, rows: int) -> dict:
        """Every pair was bad: one chosen and one rejected pad token without labels, so the step trains nothing
        but every rank still runs it."""
        batch = self.empty_batch()
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = batch[key].repeat(2, 1)
        batch["kept"] = torch.zeros(rows, dtype=torch.bool)
        if self.pack_rows is not None:
            batch["pack_rows"] = self.pack_rows
        return batch

    def encode_pair(self, row: dict, index: int) -> tuple[Encoded, Encoded]:
        """(chosen, rejected) sequences of one row; its audio is decoded once and shared by both."""
        row_id = row_id_of(row, index)
        messages = list(row.get("messages") or [])
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise RowError(f"{row_id}: 'messages' must hold the prompt and end with a user turn; put the answers "
                           "in 'chosen' and 'rejected'")
        audios = row.get("audios") or []
        for path in audios:
            if isinstance(path, str):
                check_inside_root(path, self.data_root, row_id)
        clips = [load_audio_source(a, f"{row_id} audio {k}", self.max_audio_seconds) for k, a in enumerate(audios)]
        answers = (answer_text(row, CHOSEN_KEYS, row_id), answer_text(row, REJECTED_KEYS, row_id))
        chat_rows = [
            {"id": row_id, "messages": messages + [{"role": "assistant", "content": answer}], "audios": clips}
            for answer in answers
        ]
        chosen, rejected = (self.encode(chat_row, index) for chat_row in chat_rows)
        return chosen, rejected

    def fit_pair(self, pair: tuple[Encoded, Encoded]) -> tuple[Encoded, Encoded] | None:
        """Apply ``max_length`` to both sides; None when either side is dropped (one count per pair)."""
        chosen = self.fit(pair[0])
        rejected = self.fit(pair[1]) if chosen is not None else None
        return (chosen, rejected) if rejected is not None else None

    def features(self, chosen: list[Encoded]) -> dict[str, torch.Tensor]:
        """Log-mel of the kept rows' clips, computed once and repeated for the rejected half: (2C, n_mels, T)."""
        clips: list[np.ndarray] = [clip for e in chosen for clip in e.clips]
        if not clips:
            return {}
        names = [f"{e.row_id} audio {k}" for e in chosen for k in range(len(e.clips))]
        audio = featurize(clips, names, stack=self.stack)
        return {
            "input_features": torch.cat([audio.input_features, audio.input_features]),
            "feature_attention_mask": torch.cat([audio.feature_attention_mask, audio.feature_attention_mask]),
        }
