"""Constrained sampling of speech tokens: only codes valid for the current slot, end of speech only at a frame
boundary, a frame cap, then repetition penalty, temperature, top-k and top-p, in that order.

The loop is written out (rather than ``model.generate``) so that the slot mask is applied before any warper (a
top-k taken over text ids could leave no valid code) and so that streaming can take tokens one step at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from audiollm.tts.layout import TTSVocab

# Length cap from the text: 0.2 s per character is ~3x slower than slow speech (~15 characters/s), plus 2 s.
MAX_SECONDS_PER_CHAR = 0.2
MIN_CAP_SECONDS = 2.0


@dataclass
class Sampling:
    """Sampling settings; temperature 0 is greedy. top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


# Per layout, as the reference models ship them: LLaSA samples at T 0.8; Orpheus needs a repetition penalty >= 1.1
# to avoid loops (T 0.6, top-p 0.95); CSM samples Mimi codes at T 0.9 with top-k 50.
LAYOUT_DEFAULTS = {
    "single": Sampling(temperature=0.8, top_p=1.0),
    "snac7": Sampling(temperature=0.6, top_p=0.95, repetition_penalty=1.1),
    "rvq": Sampling(temperature=0.9, top_k=50),
}


def default_sampling(layout: str, **changes) -> Sampling:
    """The layout's defaults with ``changes`` (None values ignored)."""
    return replace(LAYOUT_DEFAULTS[layout], **{k: v for k, v in changes.items() if v is not None})


def frame_cap(text: str, frame_rate: float) -> int:
    """Most frames a text may take: MAX_SECONDS_PER_CHAR per character plus MIN_CAP_SECONDS."""
    return math.ceil((MIN_CAP_SECONDS + MAX_SECONDS_PER_CHAR * len(text)) * frame_rate)


class SpeechConstraint:
    """Masks logits (B, V) to the ids allowed after ``emitted`` speech tokens (prefilled prompt tokens included).

    Slot s = emitted % per_frame allows only slot s's code range. At a frame boundary (s == 0) SPEECH_END is also
    allowed, and once ``max_frames`` frames exist it is the only choice.
    """

    def __init__(self, vocab: TTSVocab, max_frames: int):
        self.vocab, self.max_frames = vocab, max_frames
        self.per_frame = vocab.token_layout.per_frame

    def allowed(self, emitted: int, vocab_size: int) -> torch.Tensor:
        slot, frames = emitted % self.per_frame, emitted // self.per_frame
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        if slot == 0 and frames >= self.max_frames:
            mask[self.vocab.speech_end] = True
            return mask
        lo, hi = self.vocab.slot_range(slot)
        mask[lo:hi] = True
        if slot == 0 and frames > 0:
            mask[self.vocab.speech_end] = True
        return mask

    def __call__(self, scores: torch.Tensor, emitted: int) -> torch.Tensor:
        mask = self.allowed(emitted, scores.shape[-1]).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))


def warpers(settings: Sampling) -> LogitsProcessorList:
    """Repetition penalty, temperature, top-k, top-p (each only when it changes anything)."""
    steps = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        steps.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        steps.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        steps.append(TopPLogitsWarper(settings.top_p))
    return steps


def pick(scores: torch.Tensor, settings: Sampling, generator: torch.Generator) -> torch.Tensor:
    """(B, V) processed scores -> (B,) ids: argmax when greedy, else one draw from the softmax."""
    if settings.temperature <= 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(scores.device)


def cache_keyword(model) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_speech(model, prompt: list[int], vocab: TTSVocab, settings: Sampling, max_frames: int, rows: int = 1,
                  prefilled: int = 0) -> Iterator[torch.Tensor]:
    """Yield (rows,) new speech-token ids per step until every row has emitted SPEECH_END.

    ``prompt`` ends with SPEECH_START and ``prefilled`` speech tokens (a cloning prompt's codes). A row that has
    ended keeps receiving SPEECH_END (its later steps are to be ignored); the cap guarantees the loop ends.
    """
    device = next(model.parameters()).device
    constraint, steps = SpeechConstraint(vocab, max_frames), warpers(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.tensor([prompt] * rows, device=device)
    history, past, done = ids, None, torch.zeros(rows, dtype=torch.bool, device=device)
    cache_arg = cache_keyword(model)
    for emitted in range(prefilled, prefilled + (max_frames + 1) * constraint.per_frame):
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
        past = out[cache_arg]
        scores = constraint(out.logits[:, -1].float(), emitted)
        new = pick(steps(history, scores), settings, generator)
        new = torch.where(done, torch.full_like(new, vocab.speech_end), new)
        done |= new == vocab.speech_end
        yield new
        if done.all():
            return
        ids, history = new[:, None], torch.cat([history, new[:, None]], dim=1)
    raise RuntimeError("speech sampling passed its frame cap without ending")  # the constraint forbids this


def speech_tokens(steps: list[torch.Tensor], vocab: TTSVocab) -> list[torch.Tensor]:
    """Per row, the speech tokens (layout indices, code_offset removed) before its SPEECH_END."""
    grid = torch.stack(steps, dim=1).cpu()  # (rows, steps)
    rows = []
    for row in grid:
        ends = (row == vocab.speech_end).nonzero()
        rows.append(row[: int(ends[0]) if len(ends) else len(row)] - vocab.code_offset)
    return rows
