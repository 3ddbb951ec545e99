"""(text, audio) rows -> CSM training sequences, and the labels that train the backbone and the depth decoder.

A row (K codebooks, N frames, T prompt tokens; S = T + N + 1 positions):

    input_ids  (S,)    [bos] TEXT_START text TEXT_END SPEECH_START  AUDIO_FRAME x N  SPEECH_END
    codes      (S, K)  PAD ...                                      the N frames      EOS x K
    text_labels (S,)   the text tokens (for the optional text loss), -100 elsewhere

The collator draws the depth decoder's frames ("compute amortization", Sesame's CSM: a random 1/16 of the
frames) and writes the stock 2-D labels: ``audio_token_id`` on a frame the depth decoder trains on, ``-101`` on a
frame the backbone alone trains on (its codebook 0), ``-100`` elsewhere; ``expand_labels`` turns them into the
(B, S, K) labels ``CsmForConditionalGeneration`` takes with ``inputs_embeds``.

Codes come from the flat architecture's code cache (``data.CodeCache``: each clip encoded once per codec).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from audiollm.tts.codecs import CodecError
from audiollm.tts.data import IGNORE_INDEX, CodeCache, Skips, read_manifest
from audiollm.tts.layout import TTSVocab, text_ids

log = logging.getLogger(__name__)

BACKBONE_ONLY = -101  # stock label: this frame trains codebook 0 (backbone) only, not the depth decoder


@dataclass(frozen=True)
class CsmIds:
    """The ids a CSM sequence needs, from its config."""

    audio_token: int  # input_ids placeholder of a frame
    audio_eos: int  # input_ids of the EOS frame (SPEECH_END)
    codebook_eos: int  # each codebook's EOS id (= codebook_size)
    codebook_pad: int  # each codebook's PAD id (= codebook_size + 1)
    codebooks: int

    @classmethod
    def of(cls, config) -> CsmIds:
        return cls(config.audio_token_id, config.audio_eos_token_id, config.codebook_eos_token_id,
                   config.codebook_pad_token_id, config.num_codebooks)


def turn(prompt: list[int], frames: torch.Tensor, ids: CsmIds) -> tuple[torch.Tensor, torch.Tensor]:
    """One spoken turn: (input_ids (S,), codes (S, K)) for prompt ids + (N, K) frames + the EOS frame."""
    n = len(frames)
    input_ids = torch.tensor([*prompt, *[ids.audio_token] * n, ids.audio_eos], dtype=torch.long)
    codes = torch.full((len(input_ids), ids.codebooks), ids.codebook_pad, dtype=torch.long)
    codes[len(prompt) : len(prompt) + n] = frames
    codes[-1] = ids.codebook_eos
    return input_ids, codes


def frames_of(codes: list[torch.Tensor]) -> torch.Tensor:
    """One (N,) code tensor per level -> (N, K) frames."""
    return torch.stack([c.long() for c in codes], dim=1)


def row_sequence(text: str, codes: list[torch.Tensor], tokenizer, vocab: TTSVocab, ids: CsmIds) -> dict:
    """A training row: input_ids, codes and text_labels (the text tokens after bos)."""
    prompt = text_ids(tokenizer, vocab, text)
    input_ids, frame_codes = turn(prompt, frames_of(codes), ids)
    text_labels = torch.full_like(input_ids, IGNORE_INDEX)
    first = 1 if tokenizer.bos_token_id is not None else 0
    text_labels[first : len(prompt)] = input_ids[first : len(prompt)]
    return {"input_ids": input_ids, "codes": frame_codes, "text_labels": text_labels}


def csm_rows(manifests: list[str], tokenizer, vocab: TTSVocab, ids: CsmIds, cache: CodeCache,
             max_length: int) -> list[dict]:
    """Every usable row of ``manifests``; unreadable audio and rows over ``max_length`` positions are skipped
    (logged and counted), never cut."""
    skips, rows = Skips(Counter()), []
    for row in (r for m in manifests for r in read_manifest(m)):
        try:
            codes = cache.codes(row["audio"])
        except CodecError as err:
            skips.add("unreadable_audio", row["where"], str(err))
            continue
        sequence = row_sequence(row["text"], codes[: ids.codebooks], tokenizer, vocab, ids)
        if len(sequence["input_ids"]) > max_length:
            skips.add("too_long", row["where"], f"{len(sequence['input_ids'])} positions > max_length {max_length}"
                      f" ({row['audio']}); raise max_length or split the clip")
            continue
        rows.append(sequence)
    log.info("csm data: %d rows kept, skipped %s", len(rows), dict(skips.counts) or "none")
    return rows


def depth_frames(frame_mask: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, S) bool: a random ``fraction`` of the frames of ``frame_mask`` (at least one), drawn over the batch."""
    if not 0 < fraction <= 1:
        raise ValueError(f"depth_frame_fraction {fraction}: expected a fraction in (0, 1]")
    where = frame_mask.nonzero()
    keep = max(1, round(fraction * len(where)))
    chosen = where[torch.randperm(len(where), generator=generator)[:keep]]
    mask = torch.zeros_like(frame_mask)
    mask[chosen[:, 0], chosen[:, 1]] = True
    return mask


def frame_labels(input_ids: torch.Tensor, ids: CsmIds, depth: torch.Tensor) -> torch.Tensor:
    """(B, S) stock labels: audio_token_id on ``depth`` frames, -101 on other frames and the EOS frame, -100
    elsewhere (text, padding)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[(input_ids == ids.audio_token) | (input_ids == ids.audio_eos)] = BACKBONE_ONLY
    labels[depth] = ids.audio_token
    return labels


def expand_labels(labels: torch.Tensor, codes: torch.Tensor, ids: CsmIds) -> torch.Tensor:
    """(B, S) stock labels + (B, S, K) codes -> (B, S, K) labels, as ``CsmForConditionalGeneration`` expands them
    from ``input_values``: a labelled frame's codes, its codebooks 1..K-1 ignored (-100) where it is -101.
    Positions labelled -100 stay ignored (the stock expansion labels every audio position)."""
    out = torch.full_like(codes, IGNORE_INDEX)
    audio = (labels == ids.audio_token) | (labels == BACKBONE_ONLY)
    out[audio] = codes[audio]
    out[..., 1:][labels == BACKBONE_ONLY] = IGNORE_INDEX
    return out


@dataclass
class CsmCollator:
    """Right-pads CSM rows and draws the depth decoder's frames: input_ids, codes, labels (B, S, K),
    text_labels, attention_mask."""

    pad_id: int
    ids: CsmIds
    depth_frame_fraction: float = 1 / 16
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
                 "codes": torch.full((len(rows), width, self.ids.codebooks), self.ids.codebook_pad, dtype=torch.long),
                 "text_labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
                 "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            for key in ("input_ids", "codes", "text_labels"):
                batch[key][i, :n] = r[key]
            batch["attention_mask"][i, :n] = 1
        depth = depth_frames(batch["input_ids"] == self.ids.audio_token, self.depth_frame_fraction, self.generator)
        batch["labels"] = expand_labels(frame_labels(batch["input_ids"], self.ids, depth), batch["codes"], self.ids)
        return batch


class CsmDataset(torch.utils.data.Dataset):
    """Rows kept as int32 numpy arrays (half the memory of int64 tensors), tensors made per item."""

    def __init__(self, rows: list[dict]):
        self.rows = [{k: v.numpy().astype(np.int32) for k, v in r.items()} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in self.rows[i].items()}
