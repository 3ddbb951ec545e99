"""The spoken questions of the demo corpus: what is asked, in which sentences, and the right and wrong answers.

Kept small on purpose, so that a tiny model can learn it in minutes: number words zero..twenty, five kinds of
question (plus, minus, after, before, count), each in three sentences.
"""

from __future__ import annotations

import functools
import random

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
MAX_NUMBER = len(NUMBER_WORDS) - 1  # answers stay within zero..twenty


# Each spoken question can be put in several sentences. The held-out split holds out sentences (by the hash of
# the whole sentence), not facts: a held-out "which number follows seven" is a sentence no training clip says,
# in a voice no training clip has, while "what comes after seven" may well be in training. What the split tests
# is hearing a new sentence, not inventing arithmetic: a model of a few million parameters trained for minutes
# does not learn sums that extend to pairs it never saw (held-out voice-chat accuracy 0.03 when whole facts were
# held out, against 0.83 on training questions). So every fact keeps at least one sentence in training
# (``audiollm.synth.splits.question_splits``).
QUESTION_FORMS = {
    "plus": ("what is {a} plus {b}", "how much is {a} plus {b}", "add {a} and {b}"),
    "minus": ("what is {a} minus {b}", "how much is {a} minus {b}", "take {b} away from {a}"),
    "after": ("what comes after {a}", "which number follows {a}", "say the number after {a}"),
    "before": ("what comes before {a}", "which number is just before {a}", "say the number before {a}"),
    "count": ("count from {a} to {b}", "please count from {a} to {b}", "say the numbers from {a} to {b}"),
}
# Answers restate the question in one fixed form before the result ("three plus four is seven"): the result is
# then predicted from text the model has just written, the same whichever sentence asked, instead of straight
# from the audio of one particular sentence.
ANSWER_FORMS = {"plus": "{a} plus {b} is", "minus": "{a} minus {b} is", "after": "after {a} comes",
                "before": "before {a} comes"}
# Plus and minus use numbers up to four: 25 sums and 15 differences. The tiny demo model learns a lookup table,
# not arithmetic, and each fact must be asked often enough: with numbers up to six (49 sums, 28 differences) it
# answered 0.26-0.36 of spoken sums and differences on the validation split, most of them heard right (the
# restatement was right) and added wrong; a run that also taught them typed got 0.45 of typed ones right.
MAX_TERM = 4


def spoken_fact(rng: random.Random) -> tuple[str, int, int]:
    """A question kind and its numbers: (kind, a, b); b is 0 where the kind takes one number."""
    kind = rng.choice(tuple(QUESTION_FORMS))
    if kind == "plus":
        return kind, rng.randint(0, MAX_TERM), rng.randint(0, MAX_TERM)
    if kind == "minus":
        a = rng.randint(0, MAX_TERM)
        return kind, a, rng.randint(0, a)
    if kind == "after":
        return kind, rng.randint(0, MAX_NUMBER - 1), 0
    if kind == "before":
        return kind, rng.randint(1, MAX_NUMBER), 0
    a = rng.randint(0, MAX_NUMBER - 4)
    return kind, a, a + rng.randint(2, 4)


@functools.cache  # misheard() asks for every planned question
def all_facts() -> tuple[tuple[str, int, int], ...]:
    """Every (kind, a, b) that ``spoken_fact`` can draw: 25 sums, 15 differences, 20 + 20 neighbours, 51 counts."""
    m, top = MAX_TERM, MAX_NUMBER
    return tuple([("plus", a, b) for a in range(m + 1) for b in range(m + 1)]
                 + [("minus", a, b) for a in range(m + 1) for b in range(a + 1)]
                 + [("after", a, 0) for a in range(top)]
                 + [("before", a, 0) for a in range(1, top + 1)]
                 + [("count", a, a + d) for a in range(top - 3) for d in (2, 3, 4)])


def fact_answer(kind: str, a: int, b: int) -> tuple[str, list[str]]:
    """The answer and plausible wrong ones: ``("plus", 3, 4)`` -> ``"three plus four is seven"``, ["two plus four
    is six", "four plus four is eight", "three plus three is six", "three plus five is eight"]: the right answers to
    the questions one number away (``misheard``); a count: one short, one too far.

    Not a wrong result after the right restatement ("three plus four is eight"): once the LLM knows its sums (the
    demo's text stage), the SFT model already prefers the right answer to every such pair, and DPO learns nothing
    from them. On the validation pairs, 7 of the SFT model's 10 errors were misheard answers.
    """
    if kind == "count":
        answer = " ".join(NUMBER_WORDS[a : b + 1])
        return answer, off_by_one(answer)
    head, value = answer_parts(kind, a, b)
    return f"{head} {NUMBER_WORDS[value]}", misheard(kind, a, b)


def answer_parts(kind: str, a: int, b: int) -> tuple[str, int]:
    """The restated question and the result: ``("plus", 3, 4)`` -> ``("three plus four is", 7)``."""
    value = {"plus": a + b, "minus": a - b, "after": a + 1, "before": a - 1}[kind]
    return ANSWER_FORMS[kind].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), value


def misheard(kind: str, a: int, b: int) -> list[str]:
    """Right answers to the questions one number away, as a model that mishears says them: ``("plus", 3, 4)`` ->
    ["two plus four is six", "four plus four is eight", "three plus three is six", "three plus five is eight"].
    Telling these from the right answer takes hearing the question, not only knowing the sums. Kept to the facts
    the questions ask (``all_facts``)."""
    near = [(kind, a + d, b) for d in (-1, 1)]
    if kind in ("plus", "minus"):
        near += [(kind, a, b + d) for d in (-1, 1)]
    return [f"{head} {NUMBER_WORDS[value]}" for head, value in (answer_parts(*f) for f in near if f in all_facts())]


def fact_sentences(kind: str, a: int, b: int) -> tuple[str, ...]:
    """Every sentence that asks one fact: ``("plus", 3, 4)`` -> ``("what is three plus four", "how much is three
    plus four", "add three and four")``."""
    return tuple(form.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]) for form in QUESTION_FORMS[kind])


def spoken_question(rng: random.Random, usable=lambda sentences: sentences) -> tuple[str, str, list[str]] | None:
    """A question a tiny model can learn to answer from speech alone: (sentence, answer, plausible wrong answers).

    The fact is drawn first, then one of its sentences that ``usable`` keeps (a split's own); ``None`` when it keeps
    none. Drawing the fact first keeps every split's facts in the same proportions: drawing sentences instead would
    ask a split most often about the facts with the most sentences in it, which for the held-out split are the
    facts training asks least.
    """
    kind, a, b = spoken_fact(rng)
    sentences = usable(fact_sentences(kind, a, b))
    return (rng.choice(sentences), *fact_answer(kind, a, b)) if sentences else None


STATEMENT_RUN = (3, 6)  # numbers in a counted run of ``random_statement``


def random_statement(rng: random.Random) -> str:
    """A sentence shaped like a spoken reply with its numbers drawn at random over zero..twenty, true or not:
    "twelve plus three is nine", "before four comes eighteen", "six seven eight nine".

    What it is for: a listener taught to write down only true replies learns to write down what it expects, not what
    it hears; it turned "three minus one is two" into "three minus two is one". Callers keep out the sentences that
    are a fact's right answer (``audiollm.synth.corpus.statement_rows``).
    """
    kind = rng.choice(tuple(QUESTION_FORMS))
    if kind == "count":
        start = rng.randint(0, MAX_NUMBER - STATEMENT_RUN[0] + 1)
        end = min(MAX_NUMBER, start + rng.randint(*STATEMENT_RUN) - 1)
        return " ".join(NUMBER_WORDS[start : end + 1])
    a, b, value = (rng.randint(0, MAX_NUMBER) for _ in range(3))
    return f"{ANSWER_FORMS[kind].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])} {NUMBER_WORDS[value]}"


def off_by_one(answer: str) -> list[str]:
    """Plausible wrong answers to a number answer: one less / one more; for a count, one short / one too far."""
    parts = answer.split()
    last = NUMBER_WORDS.index(parts[-1])
    if len(parts) > 1:
        longer = [answer + " " + NUMBER_WORDS[last + 1]] if last < MAX_NUMBER else []
        return [" ".join(parts[:-1])] + longer
    return [NUMBER_WORDS[i] for i in (last - 1, last + 1) if 0 <= i <= MAX_NUMBER]
