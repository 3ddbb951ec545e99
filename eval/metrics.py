"""Scoring rules as pure functions: text in, numbers out. No model, no files.

Every corpus-level metric here is a function of per-item *sufficient statistics* that add up over items (WER:
errors and reference words; BLEU: n-gram matches and totals; accuracy: 0/1). The corpus value is computed from the
summed statistics, so the bootstrap can resample items and recompute the exact corpus metric from sums.

Rules and where they come from:
- ASR: Whisper's own text normalisers (``EnglishTextNormalizer`` for English, ``BasicTextNormalizer`` otherwise),
  jiwer's alignment; characters instead of words for Chinese and Japanese (no spaces between words). ``words``
  applies the English one to each word on its own, for lists of words (``ASR_NORMALIZERS``).
- MMAU (official ``evaluation.py``): tokens are ``re.findall(r"\\b\\w+\\b", text.lower())``; right when every token
  of the answer is in the prediction and no token of another choice is, where tokens the answer shares with another
  choice do not count against, and a choice with exactly the answer's tokens is ignored.
- AIR-Bench foundation (official ``score_foundation.py``): the first character of the stripped response if it is
  A-D; else the second-to-last character if it is A-D (``"The answer is B."``); else unparsed.
- Short answers: normalised exact match (lowercase, numbers as words, punctuation and articles dropped).
- Translation: sacrebleu BLEU with the tokenizer the target language needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

CHAR_LANGUAGES = frozenset({"zh", "ja"})  # scored by characters (CER): no spaces between words


# ------------------------------------------------------------------------------------------------------------ ASR


# Whisper's normalisers by name. The English one writes a run of number words as one number: right for read speech
# ("nineteen eighty four" -> "1984") but not for lists of words, where each spoken word is a unit: "seven eleven
# fifteen two" becomes "711152", one reference word, so one misheard word costs all four and the run counts once.
# "words" applies the English normaliser to each word on its own ("7 11 15 2"), keeping its other rules (spellings,
# "mister", digits against number words).
ASR_NORMALIZERS = ("english", "words", "basic")


def normalizer_name(language: str | None = "en", name: str | None = None) -> str:
    """The normaliser a WER uses: ``name`` when given, else Whisper's English one for English (or unknown language),
    its basic one for the rest."""
    return name or ("english" if base_language(language) == "en" else "basic")


@lru_cache(maxsize=None)
def asr_normalizer(language: str | None = "en", name: str | None = None) -> Callable[[str], str]:
    """The normaliser ``normalizer_name(language, name)`` as a function (``ASR_NORMALIZERS``)."""
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    name = normalizer_name(language, name)
    if name not in ASR_NORMALIZERS:
        raise ValueError(f"unknown ASR normaliser {name!r}; choose one of {', '.join(ASR_NORMALIZERS)}")
    if name == "basic":
        return BasicTextNormalizer()
    english = EnglishTextNormalizer()
    if name == "english":
        return english
    return lambda text: " ".join(filter(None, (english(word) for word in text.split())))


def base_language(language: str | None) -> str:
    """``"en-US"`` / ``"EN"`` / None -> ``"en"``: the part before any region, lowercased (None means English)."""
    return (language or "en").replace("_", "-").split("-")[0].lower()


def uses_characters(language: str | None) -> bool:
    return base_language(language) in CHAR_LANGUAGES


def asr_counts(reference: str, hypothesis: str, language: str | None = "en",
               normalizer: str | None = None) -> tuple[int, int]:
    """(errors, reference units) after normalisation (``asr_normalizer``): units are words, or characters for zh/ja.

    errors = substitutions + deletions + insertions of jiwer's alignment. An empty normalised reference has 0 units
    and counts every hypothesis unit as an insertion (jiwer would divide by zero in a per-item WER).
    """
    import jiwer

    normalize = asr_normalizer(language, normalizer)
    ref, hyp = normalize(reference), normalize(hypothesis)
    if uses_characters(language):  # the basic normaliser leaves spaces around punctuation; they are not characters
        ref_units, hyp_units = list(re.sub(r"\s+", "", ref)), list(re.sub(r"\s+", "", hyp))
    else:
        ref_units, hyp_units = ref.split(), hyp.split()
    if not ref_units:
        return len(hyp_units), 0
    if not hyp_units:
        return len(ref_units), len(ref_units)
    out = jiwer.process_words(" ".join(ref_units), " ".join(hyp_units))
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def error_rate(errors: float, units: float) -> float:
    """Corpus error rate: total errors / total reference units (inf when there are errors but no reference)."""
    if units == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / units


# ---------------------------------------------------------------------------------------------- multiple choice


def mmau_tokens(text: str) -> set[str]:
    """MMAU's tokens: lowercase word runs (``\\w+``), so punctuation splits and case does not matter."""
    return set(re.findall(r"\b\w+\b", str(text).lower()))


def mmau_match(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """MMAU's official rule: every answer token is in the prediction and no other choice's own token is.

    A token the answer shares with another choice ("a" in "A woman" / "A child") never counts against; a choice
    with exactly the answer's tokens (a duplicate, or the same words in another order) is not "another choice".
    """
    predicted, right = mmau_tokens(prediction), mmau_tokens(answer)
    if not predicted:
        return False
    wrong = set()
    for choice in choices:
        tokens = mmau_tokens(choice)
        if tokens != right:
            wrong |= tokens - right
    return right <= predicted and predicted.isdisjoint(wrong)


LETTERS = "ABCD"


def airbench_letter(prediction: str) -> str | None:
    """AIR-Bench foundation's reading of a response: its first character if A-D (case-sensitive, as the official
    script), else its second-to-last if A-D (``"The answer is C."``), else None (unparsed).

    Newlines are removed before reading, as in the official script.
    """
    text = str(prediction).strip().replace("\n", "")
    if not text or text == "None":
        return None
    if text[0] in LETTERS:
        return text[0]
    if len(text) > 1 and text[-2] in LETTERS:
        return text[-2]
    return None


def choice_letter(answer: str, choices: Sequence[str]) -> str:
    """The letter (A, B, ...) of ``answer`` among ``choices``, matched exactly as AIR-Bench does."""
    for letter, choice in zip(LETTERS, choices):
        if choice == answer:
            return letter
    raise ValueError(f"the answer {answer!r} is none of the choices {list(choices)}")


# ----------------------------------------------------------------------------------------- short answer (exact)

ARTICLES = frozenset({"a", "an", "the"})
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def number_to_words(n: int) -> str:
    """A non-negative integer in English words without hyphens or "and": 21 -> "twenty one"."""
    if n < 0:
        raise ValueError(f"number_to_words takes n >= 0, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            if n // scale >= 1000:  # beyond the largest scale: read it digit by digit
                break
            rest = n % scale
            return number_to_words(n // scale) + f" {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    return " ".join(_ONES[int(d)] for d in str(n))


def _spell_number(match: re.Match) -> str:
    whole, _, fraction = match.group().partition(".")
    words = number_to_words(int(whole))
    if fraction:  # "3.05" -> "three point zero five", as it is read aloud
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return f" {words} "


def normalize_answer(text: str) -> str:
    """Lowercase; numbers as words ("7" -> "seven", "1,000" -> "one thousand", "2.5" -> "two point five");
    punctuation to spaces ("twenty-one" -> "twenty one"); drop articles; single spaces."""
    text = str(text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # thousands separators
    text = re.sub(r"\d+(?:\.\d+)?", _spell_number, text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(word for word in text.split() if word not in ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


# -------------------------------------------------------------------------------------------------- translation


@lru_cache(maxsize=1)
def mecab_available() -> bool:
    """sacrebleu's ja-mecab tokenizer needs the optional mecab-python3 + ipadic packages."""
    try:
        from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

        TokenizerJaMecab()
    except Exception:  # ImportError, or RuntimeError from sacrebleu when the dictionary is missing
        return False
    return True


def bleu_tokenizer(language: str | None) -> str:
    """sacrebleu tokenizer for a target language: "zh", "ja-mecab" (or "char" without MeCab), else "13a"."""
    base = base_language(language)
    if base == "zh":
        return "zh"
    if base == "ja":
        return "ja-mecab" if mecab_available() else "char"
    return "13a"


@lru_cache(maxsize=None)
def _bleu(tokenize: str, effective_order: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, effective_order=effective_order)


def bleu_stats(hypothesis: str, reference: str, tokenize: str) -> list[int]:
    """One sentence's BLEU statistics: [hyp_len, ref_len, matches_1..4, totals_1..4]; they add over a corpus."""
    stats = _bleu(tokenize)._extract_corpus_statistics([hypothesis], [[reference]])
    return [int(x) for x in stats[0]]


def bleu_from_stats(stats: Sequence[float], tokenize: str) -> float:
    """Corpus BLEU (0-100) from summed ``bleu_stats``; equals ``sacrebleu.corpus_bleu`` on the same sentences."""
    return float(_bleu(tokenize)._compute_score_from_stats([int(round(x)) for x in stats]).score)


def sentence_bleu(hypothesis: str, reference: str, tokenize: str) -> float:
    """Per-sentence BLEU with effective order (short sentences are not all zero); for ranking errors only."""
    return float(_bleu(tokenize, True).sentence_score(hypothesis, [reference]).score)


def bleu_signature(tokenize: str) -> str:
    return str(_bleu(tokenize).get_signature())


# ------------------------------------------------------------------------------------------------- judge output

_SCORE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")  # a standalone number, not part of "a7" or "7th"


def parse_judge_scores(text: str, expected: int = 2, low: float = 1, high: float = 10) -> list[float] | None:
    """The first ``expected`` numbers of a judge's reply, each in [low, high]; None when they are not there.

    "Assistant 1"/"Assistant 2" labels and "/10" suffixes are removed first, so "Assistant 1: 7/10, Assistant 2: 8"
    reads as [7, 8]. A number out of range makes the reply unparsed rather than clipped.
    """
    text = re.sub(r"assistant\s*\d", " ", str(text), flags=re.IGNORECASE)
    text = re.sub(r"/\s*10\b", " ", text)
    numbers = [float(m) for m in _SCORE.findall(text)][:expected]
    if len(numbers) < expected or any(not low <= x <= high for x in numbers):
        return None
    return numbers


# -------------------------------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    stats: Sequence[Sequence[float]] | np.ndarray,
    aggregate: Callable[[np.ndarray, int], float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a corpus metric; pure and deterministic for a given seed.

    stats: (N, K) per-item sufficient statistics (a 1-D sequence is read as K = 1).
    aggregate: (summed stats (K,), N) -> metric value; the same function gives the point value from all items.
    Each resample draws N items with replacement and recomputes the metric from its sums. None for N = 0.
    """
    table = np.asarray(stats, dtype=np.float64)
    if table.ndim == 1:
        table = table[:, None]
    n = len(table)
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([aggregate(table[rng.integers(0, n, n)].sum(axis=0), n) for _ in range(n_resamples)])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)
