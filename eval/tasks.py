"""Task kinds: how an item becomes a prompt, how a prediction is scored, and how item scores make a task's value.

Kinds (``KINDS``):
    asr          WER after Whisper's normalisers (CER for zh/ja; a source may name one, e.g. ``words`` for word
                 lists); value = total errors / total reference units
    mcq          MMAU's rule: every token of the right choice in the prediction, no token of another choice
    mcq_letter   AIR-Bench foundation's rule: the response's letter (A-D) equals the right choice's letter; value =
                 right / parsed, as the official score_foundation.py (an unparsed response is left out of the
                 denominator); right / items, the unparsed counted wrong, is reported beside it
    short        normalised exact match (case, punctuation, articles, digits vs number words)
    translation  corpus BLEU (sacrebleu; tokenizer chosen by the target language)
    open         a judge LM scores the answer 1-10 against the reference, twice with the answers swapped
    preference   share of rows whose chosen answer has a higher summed log-probability than the rejected one

Each item's score is stored with its sufficient statistics (``stats``), which add up over items; a task's value is
``aggregate(sum of stats, n)``, so the bootstrap recomputes the same corpus metric on resampled items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audiollm.chat import AUDIO_MARKER
from audiollm.prompts import PROMPT_POOLS
from eval import metrics
from eval.items import EvalError, Item

ASR_PROMPT = PROMPT_POOLS["asr"][0]  # "Transcribe the speech.": the wording stage 1 trained on
MMAU_PROMPT = "{question}\nChoose the answer from these options: {options}.\nAnswer with the text of one option."
# AIR-Bench's own instruction (Inference_Foundation.py), followed by the question and the lettered choices.
AIRBENCH_PROMPT = (
    "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
    "you may only choose A or B or C or D."
)
LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "ja": "Japanese", "de": "German", "fr": "French", "es": "Spanish",
    "it": "Italian", "pt": "Portuguese", "ru": "Russian", "ko": "Korean", "ar": "Arabic", "nl": "Dutch",
    "id": "Indonesian", "ta": "Tamil", "tr": "Turkish", "vi": "Vietnamese", "th": "Thai", "hi": "Hindi",
}


@dataclass(frozen=True)
class Kind:
    name: str
    metric: str
    higher_is_better: bool
    generates: bool  # False: scored by a forward pass, not by generated text
    needs: tuple[str, ...]  # item fields that must be set


KINDS = {
    "asr": Kind("asr", "wer", False, True, ("reference",)),
    "mcq": Kind("mcq", "accuracy", True, True, ("reference", "choices")),
    "mcq_letter": Kind("mcq_letter", "accuracy", True, True, ("reference", "choices")),
    "short": Kind("short", "accuracy", True, True, ("reference",)),
    "translation": Kind("translation", "bleu", True, True, ("reference",)),
    "open": Kind("open", "judge_score", True, True, ()),
    "preference": Kind("preference", "pref_accuracy", True, False, ("chosen", "rejected")),
}


def check_item(item: Item, where: str) -> None:
    """Refuse an item its kind cannot score, naming the source and the item."""
    if item.kind not in KINDS:
        raise EvalError(f"{where}: item {item.id}: unknown kind {item.kind!r}; kinds: {', '.join(KINDS)}")
    missing = [name for name in KINDS[item.kind].needs if getattr(item, name) in (None, [], "")]
    if missing:
        raise EvalError(f"{where}: item {item.id}: a {item.kind} item needs {', '.join(missing)}")


# ------------------------------------------------------------------------------------------------------ prompts


def instruction(item: Item) -> str:
    """The text sent with the audio for a kind (empty for voice chat: the question is spoken)."""
    if item.spoken:
        return ""
    if item.kind == "mcq":
        return MMAU_PROMPT.format(question=item.question or "", options="; ".join(item.choices))
    if item.kind == "mcq_letter":
        lettered = "\n".join(f"{letter}. {choice}" for letter, choice in zip(metrics.LETTERS, item.choices))
        return f"{AIRBENCH_PROMPT}\n{item.question or ''}\n{lettered}"
    if item.question:
        return item.question
    if item.kind == "asr":
        return ASR_PROMPT
    if item.kind == "translation":
        return f"Translate the speech into {LANGUAGE_NAMES.get(item.language or 'en', item.language)}."
    return ""


def build_messages(item: Item) -> list[dict]:
    """The chat turns a model sees for an item: the manifest's own turns, or one user turn (audio, then text)."""
    if item.messages:
        return item.messages
    return [{"role": "user", "content": AUDIO_MARKER * len(item.audios) + instruction(item)}]


def prompt_text(messages: list[dict]) -> str:
    """A readable prompt for predictions.jsonl: the user text of a one-turn prompt, else role-prefixed turns."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------------------ scoring


def score_record(record: dict) -> tuple[float | None, list[float] | None]:
    """(per-item score, sufficient statistics) of a record with its prediction (and judge or log-probs).

    None when the item cannot be scored (open-ended without judge scores).
    """
    kind, prediction, reference = record["kind"], record.get("prediction") or "", record.get("reference")
    if kind == "asr":
        errors, units = metrics.asr_counts(reference, prediction, record.get("language"), record.get("normalizer"))
        return metrics.error_rate(errors, units), [errors, units]
    if kind == "mcq":
        right = float(metrics.mmau_match(prediction, reference, record["choices"]))
        return right, [right]
    if kind == "mcq_letter":
        letter = metrics.airbench_letter(prediction)
        return float(letter == reference), [float(letter == reference), float(letter is None)]
    if kind == "short":
        right = float(metrics.exact_match(prediction, reference))
        return right, [right]
    if kind == "translation":
        tokenize = metrics.bleu_tokenizer(record.get("language"))
        stats = metrics.bleu_stats(prediction, reference, tokenize)
        return metrics.sentence_bleu(prediction, reference, tokenize), stats
    if kind == "open":
        score = (record.get("judge") or {}).get("model_score")
        return (None, None) if score is None else (score, [score])
    if kind == "preference":
        right = float(record["chosen_logp"] > record["rejected_logp"])
        return right, [right]
    raise EvalError(f"record {record.get('id')}: unknown kind {kind!r}")


def aggregator(kind: str, records: list[dict]):
    """The function (summed stats, n) -> task value for a kind; translation needs its one BLEU tokenizer."""
    if kind == "asr":
        return lambda sums, n: metrics.error_rate(sums[0], sums[1])
    if kind == "translation":
        tokenize = bleu_tokenizer_of(records)
        return lambda sums, n: metrics.bleu_from_stats(sums, tokenize)
    if kind == "mcq_letter":
        return lambda sums, n: airbench_accuracy(sums[0], n - sums[1])
    return lambda sums, n: float(sums[0] / n)


def airbench_accuracy(right: float, parsed: float) -> float:
    """AIR-Bench foundation's official accuracy, right / parsed; 0 when no response parsed (the official script
    would divide by zero; a bootstrap resample of only unparsed items can hit this)."""
    return float(right / parsed) if parsed else 0.0


def bleu_tokenizer_of(records: list[dict]) -> str:
    """The BLEU tokenizer of a translation task; one corpus BLEU needs one tokenizer, so languages must agree."""
    tokenizers = {metrics.bleu_tokenizer(r.get("language")) for r in records}
    if len(tokenizers) > 1:
        raise EvalError(
            f"task {records[0]['task']}: target languages need different BLEU tokenizers {sorted(tokenizers)}; "
            "split the task by target language"
        )
    return tokenizers.pop()


def metric_name(kind: str, records: list[dict]) -> str:
    """The metric's name; ASR reads "cer" when every item is zh/ja and "wer_cer" when a task mixes both."""
    if kind != "asr":
        return KINDS[kind].metric
    chars = {metrics.uses_characters(r.get("language")) for r in records}
    return "cer" if chars == {True} else "wer" if chars == {False} else "wer_cer"


def normalizer_label(record: dict) -> str:
    """How an ASR record was normalised, for the report: ``whisper EnglishTextNormalizer``, ``whisper
    BasicTextNormalizer``, or the English one ``word by word``."""
    name = metrics.normalizer_name(record.get("language"), record.get("normalizer"))
    return {"english": "whisper EnglishTextNormalizer", "basic": "whisper BasicTextNormalizer",
            "words": "whisper EnglishTextNormalizer, word by word"}[name]


def details(kind: str, records: list[dict], stats: np.ndarray) -> dict:
    """What else a reader needs to trust a value: normaliser, BLEU signature, unparsed counts, totals."""
    if kind == "asr":
        languages = sorted({metrics.base_language(r.get("language")) for r in records})
        names = sorted({normalizer_label(r) for r in records})
        return {"errors": int(stats[:, 0].sum()), "reference_units": int(stats[:, 1].sum()),
                "languages": languages, "normalizer": ", ".join(names)}
    if kind == "translation":
        return {"signature": metrics.bleu_signature(bleu_tokenizer_of(records))}
    if kind == "mcq_letter":
        return {"unparsed": int(stats[:, 1].sum()), "accuracy_unparsed_wrong": float(stats[:, 0].mean())}
    if kind == "open":
        ref_scores = [r["judge"]["reference_score"] for r in records
                      if r.get("judge") and r["judge"].get("reference_score") is not None]
        return {"reference_score": float(np.mean(ref_scores)) if ref_scores else None}
    return {}
