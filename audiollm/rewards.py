"""Rewards for GRPO (``stages/grpo.py``): plain functions, scored with the evaluation harness's own rules.

Each has TRL's reward-function signature: ``reward(completions, **columns) -> list[float | None]``, one value per
completion. ``completions`` are the sampled answers (strings, or TRL's ``[{"role": "assistant", "content": ...}]``
for chat prompts); ``columns`` are the prompt rows' fields, one list entry per completion: ``answer`` (the row's
reference answer, the content of its last assistant turn), ``choices`` for multiple choice, ``language`` and
``normalizer`` for transcription. A reward returns None for a row it cannot score (a multiple-choice reward on a row without
choices); TRL leaves None out of the group's mean.

A recipe names its rewards (``rewards: [exact, format]``); a name with a colon is a function of the user's own,
``package.module:function``, with the same signature.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from eval import metrics

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# R1-AQA's format: reasoning in <think>, then the answer in <answer>, nothing around them.
THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def completion_text(completion) -> str:
    """The text of one completion: a string, or the content of TRL's list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def answer_part(text: str) -> str:
    """What a completion answers: the last ``<answer>...</answer>`` if it has one, else all of it."""
    tagged = ANSWER_TAG.findall(text)
    return tagged[-1] if tagged else text


def exact(completions: list, answer: list[str], **_) -> list[float]:
    """1.0 when the answer equals the reference after the harness's ``short`` normalisation (case, articles,
    punctuation, numbers as words: "7" = "seven"), else 0.0."""
    return [float(metrics.exact_match(answer_part(completion_text(c)), ref)) for c, ref in zip(completions, answer)]


def mcq(completions: list, answer: list[str], choices: list | None = None, **_) -> list[float | None]:
    """MMAU's choice rule (every token of the right choice in the answer, no token of another): 1.0 or 0.0; None on
    a row without choices."""
    choices = choices or [None] * len(completions)
    return [None if not options else float(metrics.mmau_match(answer_part(completion_text(c)), ref, options))
            for c, ref, options in zip(completions, answer, choices)]


def wer(completions: list, answer: list[str], language: list | None = None, normalizer: list | None = None,
        **_) -> list[float]:
    """1 - WER of the transcription against the reference (the harness's normaliser by language, or the row's
    ``normalizer``: ``words`` for word lists, ``eval.metrics.ASR_NORMALIZERS``; characters for zh/ja), floored at 0:
    insertions can take WER above 1."""
    language = language or [None] * len(completions)
    normalizer = normalizer or [None] * len(completions)
    rewards = []
    for c, ref, lang, norm in zip(completions, answer, language, normalizer):
        errors, units = metrics.asr_counts(ref, answer_part(completion_text(c)), lang or "en", norm)
        rewards.append(max(0.0, 1.0 - metrics.error_rate(errors, max(units, 1))))
    return rewards


def think_format(completions: list, **_) -> list[float]:
    """1.0 for ``<think>...</think><answer>...</answer>`` and nothing else (R1-AQA's format reward), else 0.0."""
    return [float(bool(THINK_ANSWER.match(completion_text(c)))) for c in completions]


REWARDS: dict[str, Callable] = {"exact": exact, "mcq": mcq, "wer": wer, "format": think_format}


def reward_functions(names: list[str]) -> list[Callable]:
    """The recipe's reward names as functions, in order (TRL weighs them by ``reward_weights``)."""
    if not names:
        raise ValueError(f"rewards: name at least one of {sorted(REWARDS)} or a package.module:function")
    return [resolve(name) for name in names]


def resolve(name: str) -> Callable:
    """A built-in reward by name, or ``package.module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"rewards: unknown reward {name!r}; built in: {sorted(REWARDS)}, or give "
                         "package.module:function")
    module_name, _, attribute = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rewards: cannot import {name!r}: {err}") from None
    if not callable(function):
        raise ValueError(f"rewards: {name!r} is not a function")
    return function
