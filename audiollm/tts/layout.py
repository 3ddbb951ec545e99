"""How codec codes become LM tokens, and the control tokens that frame a TTS sequence.

A sequence the decoder LM trains on and generates:

    [bos] <|TEXT_START|> text tokens <|TEXT_END|> <|SPEECH_START|> speech tokens <|SPEECH_END|>

Speech tokens follow the text vocabulary: id = code_offset + slot * codebook_size + code, where a frame is written
as ``slots`` tokens and each slot reads one level of the codec at one position:

    single  LLaSA (XCodec2)   1 token per frame:  l0
    snac7   Orpheus (SNAC)    7 tokens per frame: l0, l1a, l2a, l2b, l1b, l2c, l2d  (slot offsets k * 4096)
    rvq     CSM/Moshi (Mimi)  k tokens per frame: c0, c1, ..., c(k-1)              (codebook offsets k * size)
            DAC               the same: one token per RVQ level (any codec whose levels all run per frame)

With ``interleave: words`` (rows whose manifest gives word start times), each word's text comes again inside the
speech, just before the frames that say it, so the model only ever has to voice the word it has just been given:

    ... <|SPEECH_START|> <|TEXT_START|> w1 codes(w1) <|TEXT_START|> w2 codes(w2) ... <|SPEECH_END|>

The model predicts each <|TEXT_START|> (where a word ends) and the codes; the word's own tokens are given, in training
(no loss on them) and in sampling (forced). A tiny LM without it learnt to say the first word of a text and then lost
its place (see audiollm/tts/demo.py).

The ids of the control tokens and the layout are saved with the model as ``tts_config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LAYOUTS = ("single", "snac7", "rvq")
ARCHITECTURES = ("flat", "csm")  # one token stream of the layout's tokens, or CSM's frame backbone + depth decoder
INTERLEAVES = ("none", "words")
TEXT_START, TEXT_END = "<|TEXT_UNDERSTANDING_START|>", "<|TEXT_UNDERSTANDING_END|>"  # LLaSA's names
SPEECH_START, SPEECH_END = "<|SPEECH_GENERATION_START|>", "<|SPEECH_GENERATION_END|>"
CONTROL_TOKENS = (TEXT_START, TEXT_END, SPEECH_START, SPEECH_END)
TTS_CONFIG = "tts_config.json"
EMBED_ROW_MULTIPLE = 64  # grown vocabularies are rounded up so the lm_head matmul stays aligned
# Orpheus's frame: (level, position within the frame) per slot; level l has 2**l codes per frame.
SNAC7_SLOTS = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))


class LayoutError(ValueError):
    """Codes or tokens that do not fit the layout."""


@dataclass(frozen=True)
class TokenLayout:
    """``slots[s] = (level, position)``: slot s of frame f holds code ``level`` at index f * rate + position."""

    name: str
    codebook_size: int
    slots: tuple[tuple[int, int], ...]

    @property
    def per_frame(self) -> int:
        return len(self.slots)

    @property
    def level_rates(self) -> tuple[int, ...]:
        levels = max(level for level, _ in self.slots) + 1
        return tuple(sum(1 for level, _ in self.slots if level == k) for k in range(levels))

    @property
    def vocab_size(self) -> int:
        """Speech tokens in the LM vocabulary."""
        return self.per_frame * self.codebook_size

    def codes_to_tokens(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """One (frames * rate_l,) tensor per level -> (frames * per_frame,) speech token indices (no code_offset)."""
        rates = self.level_rates
        if len(codes) != len(rates):
            raise LayoutError(f"{self.name}: expected {len(rates)} code levels, got {len(codes)}")
        frames = codes[0].shape[-1] // rates[0]
        if any(c.shape[-1] != frames * r for c, r in zip(codes, rates)):
            raise LayoutError(f"{self.name}: level lengths {[c.shape[-1] for c in codes]} are not frames x {rates}")
        grid = [c.reshape(frames, r) for c, r in zip(codes, rates)]  # (frames, rate_l) per level
        columns = [grid[level][:, pos] + slot * self.codebook_size for slot, (level, pos) in enumerate(self.slots)]
        return torch.stack(columns, dim=1).reshape(-1).long()

    def tokens_to_codes(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(frames * per_frame,) speech token indices -> one (frames * rate_l,) code tensor per level."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.numel() % self.per_frame:
            raise LayoutError(f"{self.name}: {tokens.numel()} tokens is not a whole number of {self.per_frame}-token "
                              "frames")
        grid = tokens.reshape(-1, self.per_frame)
        slot_base = torch.arange(self.per_frame) * self.codebook_size
        codes = grid - slot_base
        if (codes < 0).any() or (codes >= self.codebook_size).any():
            raise LayoutError(f"{self.name}: a token lies outside its slot's range of {self.codebook_size} codes")
        rates = self.level_rates
        levels = [torch.empty(grid.shape[0], r, dtype=torch.long) for r in rates]
        for slot, (level, pos) in enumerate(self.slots):
            levels[level][:, pos] = codes[:, slot]
        return [level.reshape(-1) for level in levels]


def make_layout(name: str, codebook_size: int, level_rates: tuple[int, ...]) -> TokenLayout:
    """The layout ``name`` for a codec with these codebooks; refuses a codec whose levels do not fit."""
    if name == "single" and level_rates == (1,):
        return TokenLayout(name, codebook_size, ((0, 0),))
    if name == "snac7" and level_rates == (1, 2, 4):
        return TokenLayout(name, codebook_size, SNAC7_SLOTS)
    if name == "rvq" and set(level_rates) == {1}:
        return TokenLayout(name, codebook_size, tuple((k, 0) for k in range(len(level_rates))))
    raise LayoutError(f"layout {name!r} does not fit a codec with level rates {level_rates} (single: (1,) "
                      "XCodec2; snac7: (1, 2, 4) SNAC; rvq: (1,)*k Mimi, DAC)")


@dataclass
class TTSVocab:
    """Where the layout's tokens and the control tokens sit in one LM's vocabulary; saved as tts_config.json."""

    layout: str
    codebook_size: int
    slots: list
    code_offset: int
    text_start: int
    text_end: int
    speech_start: int
    speech_end: int
    codec: str  # the codec folder the codes come from
    sample_rate: int
    frame_rate: float
    interleave: str = "none"  # or "words": see the module docstring
    architecture: str = "flat"  # or "csm": codes per frame in a backbone + depth decoder (audiollm/tts/csm_model.py)

    @property
    def words(self) -> bool:
        return self.interleave == "words"

    @property
    def token_layout(self) -> TokenLayout:
        return TokenLayout(self.layout, self.codebook_size, tuple(tuple(s) for s in self.slots))

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[first, end) LM ids of the codes allowed in ``slot``."""
        start = self.code_offset + slot * self.codebook_size
        return start, start + self.codebook_size

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, TTS_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TTSVocab:
        path = Path(folder, TTS_CONFIG)
        if not path.is_file():
            raise LayoutError(f"{folder}: no {TTS_CONFIG}; pass a folder written by `audiollm train tts`")
        return cls(**json.loads(path.read_text()))


def add_tts_tokens(model, tokenizer, layout: TokenLayout, codec, interleave: str = "none") -> TTSVocab:
    """Add the 4 control tokens to ``tokenizer`` and room for the layout's speech tokens to ``model``'s embeddings.

    Speech tokens are ids past the tokenizer (code_offset onward), not tokenizer entries: 65,536 or 28,672 strings
    would only slow the tokenizer, and speech ids never pass through text decoding. New rows start at the mean
    of the old embeddings (transformers' resize), so the first logits over speech are not extreme.
    """
    if interleave not in INTERLEAVES:
        raise LayoutError(f"interleave {interleave!r}: expected one of {INTERLEAVES}")
    missing = [t for t in CONTROL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))
    code_offset = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(code_offset + layout.vocab_size, pad_to_multiple_of=EMBED_ROW_MULTIPLE)
    return TTSVocab(layout.name, layout.codebook_size, [list(s) for s in layout.slots], code_offset, *ids,
                    codec=str(Path(codec.folder).resolve()), sample_rate=codec.sample_rate,
                    frame_rate=codec.frame_rate, interleave=interleave)


def text_ids(tokenizer, vocab: TTSVocab, text: str) -> list[int]:
    """[bos] TEXT_START text TEXT_END SPEECH_START: the prompt part of a sequence."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bos + [vocab.text_start, *body, vocab.text_end, vocab.speech_start]


def word_ids(tokenizer, text: str) -> list[list[int]]:
    """The tokens of each whitespace-separated word of ``text``, each word tokenised on its own."""
    return [tokenizer(word, add_special_tokens=False)["input_ids"] for word in text.split()]


def interleave_words(vocab: TTSVocab, words: list[list[int]], speech: torch.Tensor, starts: list[int]) -> list[int]:
    """Speech tokens (code_offset added, frames x per_frame) with each word's TEXT_START and tokens put before the
    frame where it starts. ``starts``: one frame index per word, the first 0, non-decreasing (a word that starts in
    the same frame as the next one gets no frame of its own)."""
    per_frame, out = vocab.token_layout.per_frame, []
    bounds = [*starts, len(speech) // per_frame]
    for word, start, end in zip(words, bounds, bounds[1:]):
        out += [vocab.text_start, *word, *speech[start * per_frame : end * per_frame].tolist()]
    return out
