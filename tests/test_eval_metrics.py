"""Scoring rules on hand-checked pairs, MMAU's rule on the real test-mini metadata, the judge's swap, the bootstrap."""

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from eval import metrics
from eval.judge import Judge
from eval.report import NO_JUDGE_REASON, summarize_task
from eval.tasks import aggregator, details, score_record

# shared/ sits beside the checkout
MMAU_JSON = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mmau-test-mini.json"


# ------------------------------------------------------------------------------------------------------------ ASR


@pytest.mark.parametrize(
    "reference, hypothesis, expected",
    [
        ("the cat sat on the mat", "the cat sat on mat", (1, 6)),  # one deletion
        ("a b c", "a x c d", (2, 3)),  # one substitution, one insertion
        ("Hello, World!", "hello world", (0, 2)),  # case and punctuation are normalised away
        ("Mr. Smith has twenty-one dogs.", "mister smith has 21 dogs", (0, 5)),  # English normaliser: Mr, numbers
        ("", "a b", (2, 0)),  # nothing to say: every word is an insertion
        ("a b", "", (2, 2)),  # nothing said: every word is a deletion
    ],
)
def test_asr_counts_english(reference, hypothesis, expected):
    assert metrics.asr_counts(reference, hypothesis, "en") == expected


def test_word_lists_keep_each_number_word_a_word():
    # Whisper's English normaliser reads a run of number words as one number: one misheard word costs the run.
    reference, hypothesis = "seven eleven fifteen two", "seven eleven fifteen three"
    assert metrics.asr_normalizer("en")(reference) == "711152"
    assert metrics.asr_counts(reference, hypothesis, "en") == (1, 1)
    assert metrics.asr_counts(reference, hypothesis, "en", "words") == (1, 4)
    assert metrics.asr_counts("eighteen red eleven", "eighteen eleven", "en") == (3, 3)  # "18 red 11" vs "1811"
    assert metrics.asr_counts("eighteen red eleven", "eighteen eleven", "en", "words") == (1, 3)
    # its other rules stay: spellings, titles, "is" for "'s", digits against number words, fillers dropped
    assert metrics.asr_counts("Mr. Smith's colour, um, 7", "mister smith's color seven", "en", "words") == (0, 5)
    assert metrics.asr_counts("Mr. Smith", "mister smith", "en", "basic") == (1, 2)
    with pytest.raises(ValueError, match="unknown ASR normaliser"):
        metrics.asr_counts("a", "a", "en", "word")


def test_a_record_is_scored_and_reported_with_its_normaliser():
    records = [{"kind": "asr", "prediction": "one two four", "reference": "one two three", "normalizer": "words"}]
    assert score_record(records[0]) == (pytest.approx(1 / 3), [1, 3])
    assert score_record(records[0] | {"normalizer": None}) == (1.0, [1, 1])  # "124" against "123"
    stats = np.array([score_record(records[0])[1]])
    assert details("asr", records, stats)["normalizer"] == "whisper EnglishTextNormalizer, word by word"


def test_asr_other_languages_use_the_basic_normaliser():
    # The basic normaliser lowercases and drops punctuation but knows no English spellings.
    assert metrics.asr_counts("Guten Tag, Welt!", "guten tag welt", "de") == (0, 3)
    assert metrics.asr_counts("Mr. Smith", "mister smith", "de") == (1, 2)
    assert metrics.asr_counts("Mr. Smith", "mister smith", "en") == (0, 2)
    assert metrics.asr_counts("Mr. Smith", "mister smith", "en-US") == (0, 2)


def test_asr_counts_characters_for_chinese_and_japanese():
    assert metrics.asr_counts("你好，世界！", "你好世界", "zh") == (0, 4)
    assert metrics.asr_counts("你好世界", "你好事界", "zh") == (1, 4)
    assert metrics.asr_counts("こんにちは", "こんにちわ", "ja") == (1, 5)
    assert metrics.asr_counts("你好 世界", "你好世界", "zh") == (0, 4)  # spaces are not characters


def test_corpus_wer_is_total_errors_over_total_words():
    records = [{"kind": "asr", "prediction": "the cat sat on mat", "reference": "the cat sat on the mat"},
               {"kind": "asr", "prediction": "a x c d", "reference": "a b c"}]
    stats = np.array([score_record(r)[1] for r in records])
    assert [score_record(r)[0] for r in records] == pytest.approx([1 / 6, 2 / 3])
    # corpus WER 3/9, not the mean of per-item WERs (5/12)
    assert aggregator("asr", records)(stats.sum(axis=0), 2) == pytest.approx(3 / 9)


# ---------------------------------------------------------------------------------------------- multiple choice

SOURCES = ["Man", "Woman", "Child", "Robot"]
SHARED = ["A child", "A woman", "An adult man", "A teenager"]
DOORS = ["Car door", "House door", "Cabinet door", "Elevator door"]


@pytest.mark.parametrize(
    "prediction, answer, choices, right",
    [
        ("Man", "Man", SOURCES, True),
        ("MAN!!", "Man", SOURCES, True),  # case and punctuation
        ("The speaker is a man.", "Man", SOURCES, True),  # extra words that belong to no choice
        ("Man or woman", "Man", SOURCES, False),  # names two choices
        ("Woman", "Man", SOURCES, False),  # "woman" is one token: it does not contain "man"
        ("", "Man", SOURCES, False),
        ("A woman.", "A woman", SHARED, True),  # "a" is shared with "A child", "A teenager": never against
        ("It sounds like a woman speaking", "A woman", SHARED, True),
        ("woman", "A woman", SHARED, False),  # every answer token must appear, "a" too (MMAU's own rule)
        ("An adult woman", "A woman", SHARED, False),  # "an", "adult" belong only to another choice
        ("the house door", "House door", DOORS, True),  # "door" is shared by all four choices
        ("door", "House door", DOORS, False),
        ("the house door, not the car door", "House door", DOORS, False),
        ("thirteen", "thirteen", ["thirteen", "twenty", "thirteen", "five"], True),  # duplicate choice
        ("a men s locker room post exercise", "A men's locker room post-exercise",
         ["A classroom during a lecture", "A men's locker room post-exercise"], True),  # ' and - split tokens
    ],
)
def test_mmau_rule(prediction, answer, choices, right):
    assert metrics.mmau_match(prediction, answer, choices) is right


def mmau_records(predict):
    items = json.loads(MMAU_JSON.read_text())
    return [{"task": "mmau", "kind": "mcq", "id": x["id"], "reference": x["answer"], "choices": x["choices"],
             "prediction": predict(x), "group": x["task"], "model": "m"} for x in items]


def _score(records):
    for r in records:
        r["score"], r["stats"] = score_record(r)
    return summarize_task(records, judge=None, n_resamples=200)


def test_mmau_real_reference_answers_score_one():
    result = _score(mmau_records(lambda x: x["answer"]))
    assert result["n"] == 1000
    assert result["value"] == 1.0 and result["ci95"] == [1.0, 1.0]
    assert set(result["groups"]) == {"sound", "music", "speech"}


def _another_choice(item):
    """A wrong choice with a token of its own (one real item's choices are orderings of the same four words)."""
    right = metrics.mmau_tokens(item["answer"])
    return next((c for c in item["choices"] if metrics.mmau_tokens(c) - right), None)


def test_mmau_real_two_choice_predictions_are_wrong():
    records = [r for r in mmau_records(lambda x: f"{x['answer']} or maybe {_another_choice(x)}")
               if _another_choice({"answer": r["reference"], "choices": r["choices"]}) is not None]
    assert len(records) == 999
    assert _score(records)["value"] == 0.0


def test_mmau_real_case_and_punctuation_changes_stay_right():
    result = _score(mmau_records(lambda x: f"({x['answer'].upper().replace(' ', ' -- ')})!!"))
    assert result["value"] == 1.0


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("  C. a dog barking", "C"),
        ("The answer is D.", "D"),  # the official second-to-last-character fallback
        ("the answer is d.", None),  # case-sensitive, as the official script
        ("The answer is D", None),  # no closing character: the fallback reads " "
        ("dog barking", None),
        ("Dog barking", "D"),  # a quirk of the official rule, kept for comparable numbers
        ("A\nB", "A"),
        ("", None),
        ("None", None),
    ],
)
def test_airbench_letter(response, letter):
    assert metrics.airbench_letter(response) == letter


def test_airbench_score_counts_unparsed():
    records = [{"kind": "mcq_letter", "prediction": p, "reference": "B", "choices": ["x", "y"]}
               for p in ("B", "A.", "no idea")]
    assert [score_record(r) for r in records] == [(1.0, [1.0, 0.0]), (0.0, [0.0, 0.0]), (0.0, [0.0, 1.0])]
    for record, group in zip(records, ("Sound_AQA_clotho", "Sound_AQA_clotho", "Speaker_cv")):
        record["group"] = group
    result = _score(records)  # official: right / parsed = 1 / 2; unparsed counted wrong: 1 / 3
    assert (result["value"], result["n"], result["unparsed"]) == (0.5, 3, 1)
    assert result["accuracy_unparsed_wrong"] == pytest.approx(1 / 3)
    assert result["groups"]["Sound_AQA_clotho"] == {"value": 0.5, "n": 2, "unparsed": 0,
                                                    "accuracy_unparsed_wrong": 0.5}
    assert result["groups"]["Speaker_cv"]["value"] == 0.0  # nothing parsed: 0, not a division by zero
    assert metrics.choice_letter("y", ["x", "y", "z"]) == "B"
    with pytest.raises(ValueError, match="none of the choices"):
        metrics.choice_letter("w", ["x", "y"])


# ------------------------------------------------------------------------------------------------ short answers


@pytest.mark.parametrize(
    "prediction, reference, right",
    [
        ("seven", "7", True),
        ("Seven.", "seven", True),
        ("The cat", "cat", True),
        ("twenty-one", "21", True),
        ("1,000", "one thousand", True),
        ("3.5", "three point five", True),
        ("  Male ", "male", True),
        ("seven", "eight", False),
        ("female", "male", False),
        ("seventy", "7", False),
    ],
)
def test_exact_match(prediction, reference, right):
    assert metrics.exact_match(prediction, reference) is right


@pytest.mark.parametrize(
    "n, words",
    [(0, "zero"), (15, "fifteen"), (40, "forty"), (99, "ninety nine"), (105, "one hundred five"),
     (1234, "one thousand two hundred thirty four"), (1_000_000, "one million")],
)
def test_number_to_words(n, words):
    assert metrics.number_to_words(n) == words


# -------------------------------------------------------------------------------------------------- translation


def test_bleu_tokenizer_by_language():
    assert metrics.bleu_tokenizer("zh") == "zh"
    assert metrics.bleu_tokenizer("de") == "13a"
    assert metrics.bleu_tokenizer("ja") == ("ja-mecab" if metrics.mecab_available() else "char")


@pytest.mark.parametrize(
    "hyps, refs, tokenize",
    [
        (["the cat sat on the mat", "a dog", "hello there world"],
         ["the cat sat on a mat", "the dog barked", "hello there world"], "13a"),
        (["我们今天去公园散步", "他很高兴"], ["我们今天去公园走走", "他非常高兴"], "zh"),
    ],
)
def test_bleu_from_summed_sentence_stats_equals_sacrebleu_corpus_bleu(hyps, refs, tokenize):
    stats = np.sum([metrics.bleu_stats(h, r, tokenize) for h, r in zip(hyps, refs)], axis=0)
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score
    assert metrics.bleu_from_stats(stats, tokenize) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100


def test_bleu_identical_text_is_100():
    stats = metrics.bleu_stats("the quick brown fox jumps", "the quick brown fox jumps", "13a")
    assert metrics.bleu_from_stats(stats, "13a") == pytest.approx(100.0)


# -------------------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    "reply, expected, scores",
    [
        ("7 8", 2, [7, 8]),
        ("Assistant 1: 7/10, Assistant 2: 8/10", 2, [7, 8]),
        ("8.5 6", 2, [8.5, 6]),
        ("7", 2, None),
        ("11 3", 2, None),  # out of the 1-10 scale: unparsed, not clipped
        ("seven eight", 2, None),
        ("Score: 9", 1, [9]),
    ],
)
def test_parse_judge_scores(reply, expected, scores):
    assert metrics.parse_judge_scores(reply, expected) == scores


def open_record(prediction="a dog barks twice", reference="a dog barking"):
    return {"task": "chat", "kind": "open", "id": "1", "model": "m", "question": "What is the sound?",
            "reference": reference, "prediction": prediction}


def test_judge_runs_twice_with_answers_swapped():
    def prefers_reference(prompts):
        # 9 for whichever assistant slot holds the reference text, 4 for the other
        return ["9 4" if p.index("a dog barking\n") < p.index("a dog barks twice\n") else "4 9" for p in prompts]

    verdict = Judge(prefers_reference, "stub").judge([open_record()])[0]
    assert verdict["model_score"] == 4 and verdict["reference_score"] == 9
    assert len(verdict["outputs"]) == 2


def test_judge_swap_cancels_position_bias():
    verdict = Judge(lambda prompts: ["8 3"] * len(prompts), "first-slot-lover").judge([open_record()])[0]
    assert verdict["model_score"] == 5.5 and verdict["reference_score"] == 5.5


def test_judge_without_reference_scores_once():
    verdict = Judge(lambda prompts: ["6"] * len(prompts), "stub").judge([open_record(reference=None)])[0]
    assert verdict["model_score"] == 6 and len(verdict["outputs"]) == 1


def test_open_tasks_are_unscored_without_a_judge_or_a_readable_reply():
    unjudged = open_record()
    unjudged["score"], unjudged["stats"] = score_record(unjudged)
    entry = summarize_task([unjudged], judge=None)
    assert entry["unscored"] and entry["value"] is None and entry["reason"] == NO_JUDGE_REASON
    unreadable = open_record()
    unreadable["judge"] = Judge(lambda prompts: ["good answer"] * len(prompts), "stub").judge([unreadable])[0]
    unreadable["score"], unreadable["stats"] = score_record(unreadable)
    entry = summarize_task([unreadable], judge="stub")
    assert entry["unscored"] and entry["value"] is None and entry["judge"] == "stub"


# ---------------------------------------------------------------------------------------------------- bootstrap


def mean(sums, n):
    return float(sums[0] / n)


def test_bootstrap_constant_score_has_zero_width():
    assert metrics.bootstrap_ci([1.0] * 50, mean) == (1.0, 1.0)
    low, high = metrics.bootstrap_ci([0.7] * 33, mean)
    assert low == high == mean(np.sum([0.7] * 33, keepdims=True), 33)


def test_bootstrap_ci_contains_the_value_and_is_deterministic():
    scores = np.random.default_rng(1).integers(0, 2, 200).astype(float)
    value = scores.mean()
    low, high = metrics.bootstrap_ci(scores, mean, n_resamples=1000, seed=0)
    assert low < value < high
    assert 0.05 < high - low < 0.2  # about 2 x 1.96 x sqrt(p(1-p)/n) = 0.14
    assert metrics.bootstrap_ci(scores, mean, seed=0) == (low, high)
    assert metrics.bootstrap_ci([], mean) is None


def test_bootstrap_of_a_ratio_metric():
    counts = np.array([[1, 6], [2, 3], [0, 10], [4, 8], [1, 5]], dtype=float)  # (errors, words) per item
    wer = aggregator("asr", [])
    low, high = metrics.bootstrap_ci(counts, wer, n_resamples=500, seed=0)
    assert low <= wer(counts.sum(axis=0), 5) <= high


def test_preference_score():
    record = {"kind": "preference", "chosen_logp": -3.0, "rejected_logp": -5.5}
    assert score_record(record) == (1.0, [1.0])
    assert score_record(record | {"rejected_logp": -3.0}) == (0.0, [0.0])  # a tie is not a preference
