"""Speak with a CSM: the backbone steps once per frame and samples codebook 0 (or the end), the depth decoder
samples codebooks 1..K-1 of that frame; K codes per backbone step instead of K backbone steps.

The guard-rails of the flat layouts (``audiollm.tts.sampling``), per codebook: only the codebook's real codes
(never PAD, EOS only on codebook 0, so speech ends only at a frame boundary), at least one new frame, the text's
frame cap; then the same repetition penalty / temperature / top-k / top-p warpers, each codebook's penalty over
its own earlier codes.

Prompts (``build_csm_prompt``):
    context     CSM's conversation: earlier turns [(text, audio), ...], each a whole turn (its text, its frames,
                its EOS frame) before the turn to speak, as Sesame's CSM takes them
    cloning     as the flat layouts do (LLaSA): the prompt transcript before the text, the prompt's frames
                prefilled after SPEECH_START; the result is the new frames only
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from audiollm.tts.codecs import read_audio
from audiollm.tts.csm_data import CsmIds, frames_of, turn
from audiollm.tts.csm_model import frame_embeddings
from audiollm.tts.layout import text_ids
from audiollm.tts.sampling import Sampling, frame_cap, pick, warpers

Turn = tuple[str, "str | np.ndarray"]  # (text, audio path or waveform at the codec's rate)


@dataclass
class CsmPrompt:
    """input_ids (1, S) and codes (1, S, K) to start from; the cloning prompt's frames (P, K) are the last P."""

    input_ids: torch.Tensor
    codes: torch.Tensor
    prefix: torch.Tensor  # (P, K) prefilled frames of a cloning prompt
    max_frames: int  # cap on prefilled + new frames


def encode_frames(tts, audio) -> torch.Tensor:
    """(N, K) frames of an audio path or a waveform at the codec's rate."""
    is_path = isinstance(audio, (str, os.PathLike))
    wav = read_audio(audio, tts.codec.sample_rate) if is_path else np.asarray(audio, dtype=np.float32)
    return frames_of(tts.codec.encode(wav))


def build_csm_prompt(tts, text: str, prompt_audio=None, prompt_text: str | None = None,
                     turns: list[Turn] | None = None) -> CsmPrompt:
    """The context turns, then this turn's text (after the cloning transcript) and the cloning prompt's frames."""
    if (prompt_audio is None) != (prompt_text is None):
        raise ValueError("voice cloning needs both prompt_audio and prompt_text (the words of the prompt audio)")
    ids, k = CsmIds.of(tts.model.config), tts.model.config.num_codebooks
    parts_ids, parts_codes = [], []
    for number, (turn_text, audio) in enumerate(turns or []):
        turn_ids, turn_codes = turn(turn_prompt(tts, turn_text, number == 0), encode_frames(tts, audio), ids)
        parts_ids.append(turn_ids)
        parts_codes.append(turn_codes)
    prefix = encode_frames(tts, prompt_audio) if prompt_audio is not None else torch.zeros(0, k, dtype=torch.long)
    full_text = f"{prompt_text.strip()} {text}" if prompt_text is not None else text
    prompt = turn_prompt(tts, full_text, not turns)
    turn_ids = torch.tensor(prompt + [ids.audio_token] * len(prefix), dtype=torch.long)
    turn_codes = torch.full((len(turn_ids), k), ids.codebook_pad, dtype=torch.long)
    turn_codes[len(prompt):] = prefix
    input_ids, codes = torch.cat([*parts_ids, turn_ids]), torch.cat([*parts_codes, turn_codes])
    return CsmPrompt(input_ids[None], codes[None], prefix, len(prefix) + frame_cap(text, tts.codec.frame_rate))


def turn_prompt(tts, text: str, first: bool) -> list[int]:
    """A turn's text ids up to SPEECH_START; only the first turn of a conversation starts with bos."""
    ids = text_ids(tts.tokenizer, tts.vocab, text)
    return ids if first or tts.tokenizer.bos_token_id is None else ids[1:]


def first_codebook_mask(ids: CsmIds, vocab_size: int, new_frames: int, prefilled: int, max_frames: int):
    """(V,) bool: codebook 0's allowed ids: the codes, EOS once a new frame exists, only EOS at the cap."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    if prefilled + new_frames >= max_frames:
        mask[ids.codebook_eos] = True
        return mask
    mask[: ids.codebook_eos] = True
    mask[ids.codebook_eos] = new_frames > 0
    return mask


def codes_only(ids: CsmIds, vocab_size: int) -> torch.Tensor:
    """(V,) bool: a depth codebook's allowed ids: the real codes only."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[: ids.codebook_eos] = True
    return mask


class CodebookSampler:
    """Applies one codebook's mask and the warpers, and draws; keeps each codebook's history for the penalty."""

    def __init__(self, settings: Sampling, rows: int, codebooks: int, device):
        self.settings, self.warpers = settings, warpers(settings)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.history = [torch.zeros(rows, 0, dtype=torch.long, device=device) for _ in range(codebooks)]

    def __call__(self, logits: torch.Tensor, mask: torch.Tensor, codebook: int) -> torch.Tensor:
        """(rows, V) logits -> (rows,) ids."""
        scores = logits.float().masked_fill(~mask.to(logits.device), float("-inf"))
        new = pick(self.warpers(self.history[codebook], scores), self.settings, self.generator)
        self.history[codebook] = torch.cat([self.history[codebook], new[:, None]], dim=1)
        return new


def depth_frame(model, hidden: torch.Tensor, first: torch.Tensor, sampler: CodebookSampler) -> torch.Tensor:
    """Codebooks 1..K-1 after codebook 0 ``first`` (rows,), from the backbone's last hidden state (rows, D):
    the depth decoder's position 0 is that state, position k the code of codebook k-1. -> (rows, K)."""
    ids = CsmIds.of(model.config)
    mask = codes_only(ids, model.config.vocab_size)
    frame, step, cache = [first], torch.stack([torch.zeros_like(first), first], dim=1), None
    for codebook in range(1, ids.codebooks):
        out = model.depth_decoder(input_ids=step, backbone_last_hidden_state=hidden if cache is None else None,
                                  cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        frame.append(sampler(out.logits[:, -1], mask, codebook))
        step = frame[-1][:, None]
    return torch.stack(frame, dim=1)


@torch.no_grad()
def sample_frames(model, prompt: CsmPrompt, settings: Sampling, rows: int = 1) -> Iterator[torch.Tensor]:
    """Yield (rows, K) frames until every row has sampled EOS on codebook 0; a row that has ended yields EOS
    frames (to be ignored). The cap makes the loop end."""
    ids, device = CsmIds.of(model.config), next(model.parameters()).device
    sampler = CodebookSampler(settings, rows, ids.codebooks, device)
    embeds = frame_embeddings(model, prompt.input_ids.to(device), prompt.codes.to(device), ids).repeat(rows, 1, 1)
    cache, done, prefilled = None, torch.zeros(rows, dtype=torch.bool, device=device), len(prompt.prefix)
    for new_frames in range(prompt.max_frames - prefilled + 1):
        out = model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        mask = first_codebook_mask(ids, model.config.vocab_size, new_frames, prefilled, prompt.max_frames)
        first = sampler(model.lm_head(hidden), mask, 0)
        ended = done | (first == ids.codebook_eos)
        frame = depth_frame(model, hidden, torch.where(ended, 0, first), sampler)
        frame[ended] = ids.codebook_eos
        done = ended
        yield frame
        if done.all():
            return
        embeds = model.backbone_model.embed_tokens(frame[:, None, :])  # (rows, 1, K) -> (rows, 1, D)
    raise RuntimeError("csm sampling passed its frame cap without ending")  # the mask forbids this


def frames_before_end(steps: list[torch.Tensor], eos: int) -> list[torch.Tensor]:
    """Per row, the (N, K) frames before its EOS frame."""
    grid = torch.stack(steps, dim=1).cpu()  # (rows, steps, K)
    out = []
    for row in grid:
        ends = (row[:, 0] == eos).nonzero()
        out.append(row[: int(ends[0]) if len(ends) else len(row)])
    return out


def csm_candidates(tts, text: str, prompt_audio, prompt_text, sampling: Sampling, rows: int,
                   turns: list[Turn] | None) -> tuple[list[torch.Tensor], int]:
    """(candidates as layout tokens, cloning prompt first; prompt frames) for ``generate.speak``."""
    prompt = build_csm_prompt(tts, text, prompt_audio, prompt_text, turns)
    steps = list(sample_frames(tts.model, prompt, sampling, rows))
    eos = tts.model.config.codebook_eos_token_id
    layout = tts.vocab.token_layout
    candidates = [layout.codes_to_tokens(list(torch.cat([prompt.prefix, new]).T))
                  for new in frames_before_end(steps, eos)]
    return candidates, len(prompt.prefix)


def csm_stream(tts, text: str, prompt_audio, prompt_text, sampling: Sampling, turns: list[Turn] | None
               ) -> tuple[torch.Tensor, Iterator[list[torch.Tensor]]]:
    """(the cloning prompt's frames (P, K), an iterator of new frames as one (1,) code tensor per level)."""
    prompt = build_csm_prompt(tts, text, prompt_audio, prompt_text, turns)
    eos = tts.model.config.codebook_eos_token_id

    def frames():
        for frame in sample_frames(tts.model, prompt, sampling):
            if int(frame[0, 0]) == eos:
                return
            yield list(frame[0].cpu()[:, None])

    return prompt.prefix, frames()
