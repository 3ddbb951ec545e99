"""Accents nobody speaks: a training clip's vowels moved to neighbouring vowels, the same way throughout the clip.

English accents differ mostly in their vowels (the same words, the same consonants, other vowel qualities and
diphthongs: the New York, Caribbean and Scottish vowel systems are each a set of such moves). espeak-ng's eight
English voices share one phoneme inventory and differ in how each phoneme sounds, so a listener trained on five of
them learns five vowel systems and little about a sixth. Here a clip draws an accent of its own: each vowel phoneme
moves, with some probability, to one of its neighbours in the vowel space (a higher or lower, fronter or backer
vowel; a diphthong to its first part or to a nearby diphthong), and every occurrence of that vowel in the clip moves
the same way, as in a real accent. The words stay the words of the text, so the transcript stays right.

The neighbours are espeak's ascii phoneme names, all present in the five training accents' phoneme tables (checked
in tests/test_synth.py). Consonants, stress and timing are left as the accent voice gives them.
"""

from __future__ import annotations

import random

# vowel -> the vowels it may become (espeak-ng ascii names; e.g. "i:" as in "three", "aI" as in "five", "@" schwa).
VOWEL_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "i:": ("I", "eI", "i@"),
    "i": ("i:", "I"),
    "I": ("i:", "E", "@"),
    "I2": ("I", "i:", "@"),
    "I#": ("I", "E", "@"),
    "E": ("I", "a", "eI", "e@"),
    "a": ("E", "A:", "V", "aa"),
    "aa": ("a", "A:"),
    "A:": ("a", "0", "O:"),
    "A@": ("A:", "O@", "a"),
    "0": ("A:", "O:", "V"),
    "O:": ("0", "oU", "A:"),
    "O@": ("o@", "A@", "O:"),
    "o@": ("O@", "oU", "O:"),
    "V": ("@", "a", "0", "U"),
    "U": ("u:", "V", "@"),
    "u:": ("U", "oU"),
    "3:": ("@", "E", "V"),
    "3": ("@", "a#"),
    "@": ("V", "I", "3"),
    "@2": ("@", "I"),
    "a#": ("@", "3", "a"),
    "aI": ("A:", "eI", "OI", "a"),
    "aU": ("a", "oU", "A:"),
    "eI": ("E", "i:", "aI"),
    "oU": ("O:", "u:", "aU", "@U"),
    "e@": ("E", "eI", "3:"),
    "i@": ("i:", "I", "e@"),
    "U@": ("u:", "O:", "U"),
    "OI": ("O:", "aI", "oU"),
}
STRESS = "',"  # espeak's primary and secondary stress marks, written before the vowel they stress
LENGTHENING = ";"  # a mark espeak writes after some vowels ("twenti;"); kept


def draw_accent(rng: random.Random, share: float) -> dict[str, str]:
    """An accent: each vowel moves with probability ``share`` to one of its neighbours; {vowel: its replacement}."""
    accent = {}
    for vowel, neighbours in VOWEL_NEIGHBOURS.items():  # dict order is fixed, so a seed gives one accent
        if rng.random() < share:
            accent[vowel] = rng.choice(neighbours)
    return accent


def speak_with_accent(words: list[list[str]], accent: dict[str, str]) -> str:
    """Phonemes per word (``Espeak.phonemes``) -> the ``[[ ]]`` text that says them with ``accent``'s vowels."""
    return " ".join("".join(_moved(phoneme, accent) for phoneme in word) for word in words)


def _moved(phoneme: str, accent: dict[str, str]) -> str:
    """One phoneme name, possibly with stress before it and lengthening after it: its vowel moved."""
    core = phoneme.lstrip(STRESS).rstrip(LENGTHENING)
    if core not in accent:
        return phoneme
    start = len(phoneme) - len(phoneme.lstrip(STRESS))
    return phoneme[:start] + accent[core] + phoneme[start + len(core):]
