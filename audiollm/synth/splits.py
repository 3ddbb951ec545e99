"""Which split each utterance belongs to, and how many rows of each kind a corpus size has in each split: the
bookkeeping behind ``audiollm.synth.corpus``'s guarantee that held-out and validation rows are never trained on."""

from __future__ import annotations

import hashlib


SPLITS = ("train", "validation", "heldout")
HELDOUT_SHARE = 0.15  # held-out (and validation) rows per training row, per kind
# Shares of all possible utterances reserved for a split (by hash); the rest is training's.
TEXT_SHARES = (("heldout", 0.2), ("validation", 0.1))

# Rows per kind for the training split (the held-out split gets HELDOUT_SHARE of each). "small" is ~1,100
# clips / ~25 min of audio and builds in seconds; "tiny" is for tests.
SMALL = {
    "pretrain": {"asr": 200, "answers": 40, "statements": 40, "sex": 80, "language": 80, "rate": 60, "pitch": 60},
    "sft": {"voice_chat": 200, "analysis": 80, "multi_turn_voice": 30, "multi_turn_followup": 30},
    "dpo": {"voice_chat": 50, "analysis": 50, "multi_turn_followup": 20},
}
# Kinds only training has: spoken answers are taught, never scored (``taught_answers``); statements are random
# reply-shaped sentences (``statement_rows``).
TRAIN_ONLY = ("answers", "statements")


def scaled(table: dict[str, dict[str, int]], factors: dict[str, int]) -> dict[str, dict[str, int]]:
    return {m: {k: factors[m] * n for k, n in kinds.items()} for m, kinds in table.items()}


SIZES = {
    "tiny": {m: {k: 4 if m == "pretrain" else 2 for k in kinds} for m, kinds in SMALL.items()},
    "small": SMALL,
    # The demo's. More distinct clips at the same steps teach the listener voices it never heard: with 3x the
    # pretraining clips of 10 x "small", validation WER after pretraining fell from 0.59 to 0.48 (6x: 0.50); 3x the
    # SFT clips too: see sft_demo.yaml. Each clip is then heard about twice instead of ~5 times.
    "full": scaled(SMALL, {"pretrain": 30, "sft": 30, "dpo": 10}),
}
# Held-out and validation rows per kind are HELDOUT_SHARE of training's, except where a size names its own table:
# "full" evaluates on the same rows as when it trained on 10 x "small", so its figures stay comparable.
EVAL_TABLES = {"full": scaled(SMALL, {"pretrain": 10, "sft": 10, "dpo": 10})}

class CorpusError(ValueError):
    """A corpus that cannot be built or violates its own guarantees; the message says what to do."""



def hash_point(text: str, seed: int) -> float:
    """A stable pseudo-random point in [0, 1) for (seed, text)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def text_split(text: str, seed: int) -> str:
    """The split an utterance belongs to: a stable hash of (seed, text), so no text is ever in two splits."""
    point = hash_point(text, seed)
    for split, share in TEXT_SHARES:
        if point < share:
            return split
        point -= share
    return "train"


def question_splits(sentences: tuple[str, ...], seed: int) -> dict[str, str]:
    """The split of each sentence of one fact: its ``text_split``, except that a fact none of whose sentences fall
    in training gets its lowest-hashed one back. The other splits hold out sentences, never whole facts: with 3
    sentences per fact and 30% held out or validation, 2.7% of facts would otherwise never be taught, and (before
    ``spoken_question`` drew facts first) they made up 15% of the held-out voice-chat rows."""
    splits = {sentence: text_split(sentence, seed) for sentence in sentences}
    if "train" not in splits.values():
        splits[min(sentences, key=lambda sentence: hash_point(sentence, seed))] = "train"
    return splits


def split_counts(size: str, split: str) -> dict[str, dict[str, int]]:
    """Rows per manifest and kind: the size's table for training, HELDOUT_SHARE of it (at least 1) held out."""
    if size not in SIZES:
        raise CorpusError(f"unknown corpus size {size!r}; choose one of {', '.join(SIZES)}")
    if split == "train":
        return SIZES[size]
    return {m: {k: max(1, round(n * HELDOUT_SHARE)) for k, n in kinds.items() if k not in TRAIN_ONLY}
            for m, kinds in EVAL_TABLES.get(size, SIZES[size]).items()}
