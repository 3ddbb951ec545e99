"""Constrained sampling of speech tokens: only codes valid for the current slot, end of speech only at a frame
boundary, a frame cap (and, for a vocab that interleaves words, each word's tokens given in turn), then repetition
penalty, temperature, top-k and top-p, in that order.

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
WORD_PAUSE_SECONDS = 0.5  # interleaving words: a word's cap adds room for the pause after it


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
    """The ids each row may take next, from what it has emitted (``update``); prefilled prompt codes count as said.

    Codes only of the current slot (slot = codes emitted % per_frame). At a frame boundary, after at least one
    frame: SPEECH_END, or, while ``words`` (an interleaving vocab's per-word token lists) remain, TEXT_START, which
    ends the current word; the next word's tokens are then forced, one per step. A word that runs past
    ``word_cap`` frames gets TEXT_START (or SPEECH_END) forced; once ``max_frames`` exist, SPEECH_END is the only
    choice. Without a cloning prompt the first word is forced at once.
    """

    def __init__(self, vocab: TTSVocab, max_frames: int, rows: int = 1, words: list[list[int]] | None = None,
                 prefilled: int = 0):
        self.vocab, self.max_frames = vocab, max_frames
        self.per_frame = vocab.token_layout.per_frame
        self.words = words or []
        self.caps = [word_cap(len(w), vocab.frame_rate) for w in self.words]
        self.codes, self.since = [prefilled] * rows, [prefilled] * rows  # since: codes of the current word
        self.next_word = [0] * rows
        self.pending = [[vocab.text_start] if self.words and not prefilled else [] for _ in range(rows)]

    @property
    def steps(self) -> int:
        """Most steps a row can take: every frame up to the cap, one SPEECH_END, and every word's tokens."""
        return (self.max_frames + 1) * self.per_frame + sum(len(w) + 1 for w in self.words)

    def allowed(self, row: int, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        if self.pending[row]:
            mask[self.pending[row][0]] = True
            return mask
        slot, frames, since = self.codes[row] % self.per_frame, self.codes[row] // self.per_frame, self.since[row]
        boundary = self.vocab.text_start if self.next_word[row] < len(self.words) else self.vocab.speech_end
        word = self.next_word[row] - 1
        over = word >= 0 and since // self.per_frame >= self.caps[word]
        if slot == 0 and (frames >= self.max_frames or over):
            mask[self.vocab.speech_end if frames >= self.max_frames else boundary] = True
            return mask
        lo, hi = self.vocab.slot_range(slot)
        mask[lo:hi] = True
        if slot == 0 and since > 0:
            mask[boundary] = True
        return mask

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, V) logits -> the same with every id a row may not take at -inf."""
        mask = torch.stack([self.allowed(r, scores.shape[-1]) for r in range(scores.shape[0])]).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))

    def update(self, new: torch.Tensor) -> None:
        """Note each row's new id (rows that have ended are not read again)."""
        for row, token in enumerate(new.tolist()):
            if self.pending[row]:
                self.pending[row].pop(0)
            if token >= self.vocab.code_offset:
                self.codes[row] += 1
                self.since[row] += 1
            elif token == self.vocab.text_start and self.next_word[row] < len(self.words):
                self.pending[row] += self.words[self.next_word[row]]
                self.next_word[row] += 1
                self.since[row] = 0


def word_cap(characters: int, frame_rate: float) -> int:
    """Most frames one word may take: MAX_SECONDS_PER_CHAR per character plus WORD_PAUSE_SECONDS."""
    return math.ceil((WORD_PAUSE_SECONDS + MAX_SECONDS_PER_CHAR * characters) * frame_rate)


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
                  prefilled: int = 0, words: list[list[int]] | None = None) -> Iterator[torch.Tensor]:
    """Yield (rows,) new ids per step (speech tokens, and for an interleaving vocab the words' TEXT_START and
    tokens) until every row has emitted SPEECH_END.

    ``prompt`` ends with SPEECH_START and ``prefilled`` speech tokens (a cloning prompt's codes); ``words``: the
    per-word token lists of the text, for a vocab that interleaves words. A row that has ended keeps receiving
    SPEECH_END (its later steps are to be ignored); the caps guarantee the loop ends.
    """
    device = next(model.parameters()).device
    constraint, steps = SpeechConstraint(vocab, max_frames, rows, words, prefilled), warpers(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.tensor([prompt] * rows, device=device)
    history, past, done = ids, None, torch.zeros(rows, dtype=torch.bool, device=device)
    cache_arg = cache_keyword(model)
    for _ in range(constraint.steps):
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
        past = out[cache_arg]
        new = pick(steps(history, constraint(out.logits[:, -1].float())), settings, generator)
        new = torch.where(done, torch.full_like(new, vocab.speech_end), new)
        done |= new == vocab.speech_end
        constraint.update(new)
        yield new
        if done.all():
            return
        ids, history = new[:, None], torch.cat([history, new[:, None]], dim=1)
    raise RuntimeError("speech sampling passed its frame cap without ending")  # the constraint forbids this


def speech_tokens(steps: list[torch.Tensor], vocab: TTSVocab) -> list[torch.Tensor]:
    """Per row, the speech tokens (layout indices, code_offset removed) before its SPEECH_END; interleaved words
    are dropped."""
    grid = torch.stack(steps, dim=1).cpu()  # (rows, steps)
    rows = []
    for row in grid:
        ends = (row == vocab.speech_end).nonzero()
        row = row[: int(ends[0]) if len(ends) else len(row)]
        rows.append(row[row >= vocab.code_offset] - vocab.code_offset)
    return rows
