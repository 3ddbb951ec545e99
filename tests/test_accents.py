"""Made-up accents for training clips (audiollm/synth/accents.py) and the espeak phoneme calls they use."""

import random

import numpy as np
import pytest

from audiollm.synth.accents import VOWEL_NEIGHBOURS, draw_accent, speak_with_accent
from audiollm.synth.espeak import Espeak
from audiollm.synth.voices import ACCENTS

SENTENCE = "twenty seven birds and water"


@pytest.fixture(scope="module")
def tts():
    return Espeak()


def test_phonemes_spoken_back_sound_like_the_text(tts):
    """A voice's own phonemes, read back through [[ ]], give the text's audio: same words, same length."""
    words = tts.phonemes(SENTENCE, "en-US")
    assert len(words) == len(SENTENCE.split()) and words[0] == ["t", "w", "'E", "n", "t", "i"]
    text, text_starts = tts.synth_words(SENTENCE, "en-US+m3")
    said, said_starts = tts.synth_words(speak_with_accent(words, {}), "en-US+m3", phonemes=True)
    assert len(said_starts) == len(text_starts)
    assert abs(said.size - text.size) < 0.02 * text.size  # measured 0.4% longer (pauses between clauses)
    assert np.sqrt(np.mean(said**2)) > 0.02


@pytest.mark.parametrize("accent", ACCENTS["train"])
def test_every_vowel_and_neighbour_is_spoken_in_every_training_accent(tts, accent):
    """An unknown phoneme name ("Q") is said as a short quiet gap: each vowel a clip may use must be voiced."""
    def energy(phonemes: str) -> float:
        return float(np.sum(tts.synth_words(phonemes, accent, phonemes=True)[0] ** 2))

    unknown = energy("b'Qd")
    for vowel in {v for pair in VOWEL_NEIGHBOURS.items() for v in (pair[0], *pair[1])}:
        assert energy(f"b'{vowel}d") > 10 * unknown, vowel  # measured 50-70x at least


def test_an_accent_moves_each_vowel_the_same_way_everywhere():
    accent = {"E": "a", "i": "I", "aI": "A:"}
    words = [["t", "w", "'E", "n", "t", "i;"], ["f", "'aI", "v"], ["s", ",E", "v", "@", "n"]]
    assert speak_with_accent(words, accent) == "tw'antI; f'A:v s,av@n"  # stress and lengthening kept
    assert speak_with_accent(words, {}) == "tw'Enti; f'aIv s,Ev@n"


def test_accents_are_drawn_per_seed_among_neighbours():
    assert draw_accent(random.Random(1), 0.3) == draw_accent(random.Random(1), 0.3)
    assert draw_accent(random.Random(1), 0.0) == {}
    every = draw_accent(random.Random(2), 1.0)
    assert set(every) == set(VOWEL_NEIGHBOURS)
    assert all(every[v] in VOWEL_NEIGHBOURS[v] for v in every)
    sizes = [len(draw_accent(random.Random(seed), 0.3)) for seed in range(200)]
    assert abs(np.mean(sizes) / len(VOWEL_NEIGHBOURS) - 0.3) < 0.03
