"""Who speaks in the demo corpus (``audiollm.synth.corpus``): espeak-ng voice variants and English accents per
split, and the rate and pitch ranges clips are drawn from."""

# Who speaks in each split: an espeak-ng voice variant (a formant and pitch set, usable with every language) per sex,
# and for English an accent (espeak's English voices). The held-out and validation variants and accents never speak
# in training, nor in each other's split, so their figures measure voices and accents the listener never heard.
# Training draws from 23 variants, the Klatt synthesiser's among them (klatt, klatt3, klatt5: the other synthesis
# method), and five of the eight English accents espeak-ng ships (en-Shaw is an alphabet, not an accent). Left out
# everywhere: variants with effects (whisper, croak, robot and demonic sets) and the few whose median pitch is far
# from their stated sex; left out of training: near copies of another split's variant (steph2 has steph's formant
# frequencies, belinda linda's pitch and first formants). The held-out klatt6 and edward share the Klatt
# synthesiser with training's klatt variants, with a voice source (klatt6) or formants (edward) of their own. Sex
# follows the variant's median F0 measured on "what is three plus four" (en, rate 175, pitch 50): female variants
# 173-262 Hz, male ones 81-111 Hz.
VARIANTS = {
    "train": {"female": ("f1", "f2", "f3", "f5", "Alicia", "Andrea", "anika", "aunty", "grandma", "shelby"),
              "male": ("m1", "m2", "m3", "m4", "m5", "m8", "Andy", "Denis", "antonio", "iven", "klatt", "klatt3",
                       "klatt5")},
    "validation": {"female": ("steph", "Annie"), "male": ("m6", "michel", "klatt4")},
    "heldout": {"female": ("f4", "linda"), "male": ("m7", "edward", "klatt6")},
}
ACCENTS = {  # espeak-ng English voices; "en" is southern British, gbclan Lancashire, gbcwmd West Midlands
    "train": ("en", "en-US", "en-GB-x-rp", "en-GB-x-gbclan", "en-GB-x-gbcwmd"),
    "validation": ("en-GB-scotland",),
    "heldout": ("en-029", "en-US-nyc"),  # Caribbean, New York City
}
# Ranges drawn from per clip (inclusive). Rate in words per minute (espeak's default is 175); pitch on espeak's
# 0-100 scale, 50 being the voice's own. Low/high pitch is relative to the voice: a high male voice (~150 Hz)
# is still lower than a low female one (~160 Hz), as listeners also judge pitch against the speaker's sex. The
# normal ranges are wide for variety yet stay clear of the slow/fast and low/high ranges the classification
# tasks ask about.
RATE_NORMAL, RATE_SLOW, RATE_FAST = (135, 220), (100, 120), (250, 280)
PITCH_NORMAL, PITCH_LOW, PITCH_HIGH = (30, 70), (10, 20), (80, 90)
# With VOWEL_SHARE > 0 every English training clip is spoken in an accent of its own (audiollm/synth/accents.py):
# each vowel moves to a neighbouring vowel with that probability, the same way all through the clip (`audiollm data
# synth --vowel-share`). Held-out and validation clips are never moved. Off: after pretraining only it lowered
# validation WER (same steps; share of clips moved, share of vowels -> WER: none 0.482, (0.5, 0.3) 0.467,
# (1.0, 0.5) 0.413, (1.0, 0.8) 0.436, (1.0, 1.0) 0.453), but through the whole demo at 0.5 (two builds, accents
# drawn apart) validation voice chat / analysis / WER were 0.829 / 0.776 / 0.371 and 0.783 / 0.776 / 0.433,
# against 0.835 / 0.788 / 0.462 and 0.858 / 0.794 / 0.442 without: no gain on the mean of the three.
# docs/demo_history.md, "What the voices did".
VOWEL_SHARE = 0.0
# Every training clip in a vocal tract of its own (`audiollm data synth --formant-range LOW HIGH`): the voice's formant
# frequencies all multiplied by a factor drawn uniformly from the range per clip (audiollm.synth.espeak.composed_voice;
# vocal tract length perturbation made at the synthesiser, pitch kept), so that no training voice is heard twice the
# same. Held-out and validation clips keep the shipped voices. Off in the demo: it lowers WER but not the rest.
# Validation after pretraining (demo recipe, seed 0), WER / speaker sex / pitch accuracy: off 0.294 / 0.550 / 0.600,
# (0.9, 1.1) 0.237 / 0.558 / 0.567, (0.85, 1.15) 0.260 / 0.508 / 0.589, (0.8, 1.2) 0.230 / 0.508 / 0.544. Through SFT
# and DPO from the (0.9, 1.1) pretrained model, with the SFT clips as shipped, validation voice chat / analysis / WER
# 0.867 / 0.776 / 0.256 against 0.867 / 0.842 / 0.291 off; the whole demo with every training clip scaled 0.786 /
# 0.697 / 0.251 against 0.896 / 0.848 / 0.308 (held-out voice chat 0.606 against 0.736, WER 0.500 against 0.512).
FORMANT_RANGE = (1.0, 1.0)
# An accent, to espeak, is rules (which phonemes a word has: the dictionary rules and `replace` lines its voice file
# selects) and a phoneme table (how each phoneme sounds). The held-out New York voice is the American voice with a
# table of its own, nothing else, and the listener misses it on sound, not on phonemes (docs/demo_history.md, "What
# the misses are"). With TABLE_SHARE > 0 each English training clip is, with that probability, spoken in its accent's
# rules with another training accent's table, drawn per clip (`audiollm data synth --table-share`): twenty accents
# that mix two of the five, none of them a held-out or validation table. Off in the demo: at 0.5 it lowered WER after
# pretraining alone (validation 0.200 -> 0.182 and 0.200 -> 0.184 at seeds 0 / 1, half the pretraining clips mixed),
# but through the whole demo validation voice chat / analysis / WER went 0.925 / 0.800 / 0.222 -> 0.901 / 0.812 /
# 0.255 (seed 0) and 0.954 / 0.861 / 0.143 -> 0.670 / 0.806 / 0.160 (seed 1); docs/demo_history.md, "What the misses
# are". The tables of the training accents:
PHONEME_TABLES = {"en": "en", "en-US": "en-us", "en-GB-x-rp": "en-rp", "en-GB-x-gbclan": "en-n",
                  "en-GB-x-gbcwmd": "en-wm"}
TABLE_SHARE = 0.0
