"""Audio augmentation of training clips (pretraining and SFT): the recipe's ``augmentation`` mapping.

Eight voices teach a small listener those eight voices, not speech; the Whisper+LLM trainers this project is
measured against (Ultravox) augment every training clip with noise, gain, band limits, codecs and rooms. Each
transform is one of audiomentations' (a well-kept numpy library), except the two that are a resampler call:
``resample`` (down to a lower rate and back, soxr) and ``speed`` (``audiollm.audio.change_speed``). A recipe names
the transforms it wants, each with its probability ``p`` and one range to draw from::

    augmentation:
      speed: {p: 1.0, factor: [0.9, 1.1]}       # tempo, pitch and formants together
      reverb: {p: 0.2, rt60_s: [0.2, 0.6]}      # a shoebox room (pyroomacoustics), the clip's length kept
      telephone: {p: 0.1}                       # 300-3,400 Hz band
      lowpass: {p: 0.2, hz: [2000, 7000]}
      resample: {p: 0.2, hz: [8000, 12000]}     # down to this rate and back up to 16 kHz
      mp3: {p: 0.2, kbps: [16, 64]}
      noise: {p: 0.5, snr_db: [10, 40]}         # white to brown (spectral slope -6..+6 dB/octave)
      gain: {p: 0.5, db: [-18, 6]}

They run in that order (speed first: it changes the length; noise after the channel, as a microphone hears it;
gain last). A transform that changes what a row asks about would make its answer wrong, so it skips rows whose
``task`` (pretraining rows carry it; a chat row may) is in ``CHANGES``: a "slow" clip sped up by 10% is no longer
slow, nor is a "low" voice shifted up a few semitones low. A clip whose peak ends above full scale is scaled down
to it, never clipped, so every output is finite and within [-1, 1].

Determinism: the draws for a clip depend only on (seed, row id, clip index, epoch), not on the batch it falls in,
the dataloader worker or the core count, so a resumed run hears what the uninterrupted one heard. The epoch comes
from the trainer through ``CollatorEpochs``, into shared memory that persistent dataloader workers read too.
Evaluation rows are never augmented (``make_collator(train=False)``); DPO rows neither (its own collator).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback

from audiollm.audio import MIN_CHUNK_SAMPLES, SAMPLE_RATE, change_speed

log = logging.getLogger(__name__)

TELEPHONE_HZ = (300.0, 3400.0)  # the narrow band of a landline (ITU-T G.712)
BAND_STOP_WIDTH = (0.2, 0.5)  # the notch's width as a fraction of its centre frequency
NOISE_SLOPES_DB = (-6.0, 6.0)  # dB/octave of the coloured noise: -6 brown, -3 pink, 0 white, +3 blue, +6 violet
# Each transform's range key, in the order they are applied.
RANGES = {"speed": "factor", "pitch": "semitones", "reverb": "rt60_s", "telephone": None, "lowpass": "hz",
          "band_stop": "hz", "eq": "db", "resample": "hz", "mp3": "kbps", "time_mask": "part", "noise": "snr_db",
          "gain": "db"}


# What each range may span: a lowpass cutoff up to the 8 kHz Nyquist frequency, a resampling rate below 16 kHz, a
# reverberation time the rooms can have (below ~0.11 s the largest room, 5.6 x 3.9 x 3 m, would need walls that absorb
# more than all the sound: pyroomacoustics refuses).
LIMITS = {"speed": (0.5, 2.0), "pitch": (-12.0, 12.0), "reverb": (0.15, 2.0), "lowpass": (500.0, SAMPLE_RATE / 2),
          "band_stop": (50.0, 7000.0), "eq": (-24.0, 24.0), "resample": (2000.0, SAMPLE_RATE), "mp3": (8.0, 320.0),
          "time_mask": (0.0, 0.5), "noise": (-10.0, 80.0), "gain": (-60.0, 24.0)}

# What each transform changes about the speaker, as the tasks that ask about it (audiollm.prompts): a row with one of
# these tasks keeps its clip's tempo, pitch and formants. speed moves all three (x 0.9 = 1.8 semitones lower, 10%
# slower); pitch shift moves pitch and formants, which a speaker's sex is heard by.
CHANGES = {"speed": ("rate", "pitch", "sex", "age", "emotion"), "pitch": ("pitch", "sex", "age", "emotion")}


class AugmentationError(ValueError):
    """A recipe's ``augmentation`` that cannot be used; the message names the transform and key."""


@dataclass
class Augmentation:
    """The checked ``augmentation`` mapping of a recipe: ``{name: {"p": probability, range_key: [low, high]}}``.

    ``augment(wav, row_id, clip)`` returns the clip transformed, shape (n,) -> (m,) float32, m = n unless
    ``speed`` ran. ``epoch`` is set by ``CollatorEpochs`` at the start of every training epoch.
    """

    spec: dict
    seed: int = 0
    chain: list = field(init=False, repr=False)
    shared_epoch: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.spec = check_spec(self.spec)
        self.chain = [(name, build(name, self.spec[name][1])) for name in RANGES if name in self.spec]
        # In shared memory, so that dataloader workers (persistent ones too) read the epoch the trainer set.
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.shared_epoch.fill_(value)

    def augment(self, wav: np.ndarray, row_id: str, clip: int = 0, task: str | None = None) -> np.ndarray:
        """One clip transformed; ``task`` (the row's, if it has one) turns off the transforms that change it."""
        rng = random.Random(draw_seed(self.seed, row_id, clip, self.epoch))
        out = wav.astype(np.float32)
        for name, transform in self.chain:
            if rng.random() < self.spec[name][0] and task not in CHANGES.get(name, ()):
                out = self.apply(name, transform, out, random.Random(rng.getrandbits(64)), f"{row_id} audio {clip}")
        if not np.isfinite(out).all():
            log.warning("%s audio %d: augmentation gave non-finite samples; the clip is used as it was", row_id, clip)
            return wav
        peak = float(np.abs(out).max(initial=0.0))
        return out / peak if peak > 1.0 else out


    @staticmethod
    def apply(name: str, transform, wav: np.ndarray, rng: random.Random, where: str) -> np.ndarray:
        """One transform; one that fails on this clip (a library's refusal of a drawn setting) is skipped with a
        warning, so that a rare draw never stops a long run."""
        try:
            return transform(wav, rng)
        except Exception as err:  # noqa: BLE001  (any library error: the clip goes on without this transform)
            log.warning("%s: augmentation %s skipped (%s: %s)", where, name, type(err).__name__, err)
            return wav


def draw_seed(seed: int, row_id: str, clip: int, epoch: int) -> int:
    """A 64-bit seed for one clip's draws: a hash, so neighbouring rows get unrelated draws."""
    digest = hashlib.sha256(f"{seed}:{row_id}:{clip}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def check_spec(spec) -> dict[str, tuple[float, tuple[float, float] | None]]:
    """``{name: (p, (low, high) or None)}`` from the recipe's mapping; raises AugmentationError on anything else."""
    if not isinstance(spec, dict) or not spec:
        raise AugmentationError(f"augmentation must map transform names to settings, got {spec!r}")
    checked = {}
    for name, settings in spec.items():
        if name not in RANGES:
            raise AugmentationError(f"augmentation: unknown transform {name!r}; known: {', '.join(RANGES)}")
        key = RANGES[name]
        wanted = {"p"} | ({key} if key else set())
        if not isinstance(settings, dict) or set(settings) != wanted:
            raise AugmentationError(f"augmentation.{name} takes exactly {sorted(wanted)}, got {settings!r}")
        p = settings["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise AugmentationError(f"augmentation.{name}.p must be a probability in [0, 1], got {p!r}")
        checked[name] = (float(p), check_range(name, key, settings[key]) if key else None)
    return checked


def check_range(name: str, key: str, value) -> tuple[float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or value[0] > value[1]:
        raise AugmentationError(f"augmentation.{name}.{key} must be two numbers [low, high], got {value!r}")
    low, high = float(value[0]), float(value[1])
    limits = LIMITS[name]
    if low < limits[0] or high > limits[1]:
        raise AugmentationError(f"augmentation.{name}.{key} must lie within {list(limits)}, got {[low, high]}")
    return low, high


def build(name: str, bounds: tuple[float, float] | None):
    """One transform as ``f(wav, rng) -> wav``; ``rng`` seeds every draw it makes (audiomentations draws from the
    global ``random`` and ``numpy.random``, which ``seeded`` sets for the call and restores after)."""
    try:
        import audiomentations as am
    except ImportError:
        raise AugmentationError("augmentation needs audiomentations: pip install 'audiollm[train]'") from None
    if name == "speed":
        return lambda wav, rng: speed(wav, rng.uniform(*bounds))
    if name == "resample":
        return lambda wav, rng: resample_round_trip(wav, rng.uniform(*bounds))
    low, high = bounds or (0.0, 0.0)
    transform = {
        "reverb": lambda: am.RoomSimulator(calculation_mode="rt60", min_target_rt60=low, max_target_rt60=high,
                                           use_ray_tracing=False, leave_length_unchanged=True, p=1.0),
        "telephone": lambda: am.Compose([am.HighPassFilter(*(TELEPHONE_HZ[0],) * 2, p=1.0),
                                         am.LowPassFilter(*(TELEPHONE_HZ[1],) * 2, p=1.0)]),
        "lowpass": lambda: am.LowPassFilter(min_cutoff_freq=low, max_cutoff_freq=high, p=1.0),
        # SpecAugment's two masks, made on the waveform: a band notched out (its centre drawn from `hz`, its
        # width 20-50% of the centre) and a stretch of the clip silenced (`part` of its length).
        "band_stop": lambda: am.BandStopFilter(min_center_freq=low, max_center_freq=high,
                                               min_bandwidth_fraction=BAND_STOP_WIDTH[0],
                                               max_bandwidth_fraction=BAND_STOP_WIDTH[1], p=1.0),
        "time_mask": lambda: am.TimeMask(min_band_part=low, max_band_part=high, p=1.0),
        "eq": lambda: am.SevenBandParametricEQ(min_gain_db=low, max_gain_db=high, p=1.0),
        "pitch": lambda: am.PitchShift(min_semitones=low, max_semitones=high, p=1.0),
        "mp3": lambda: am.Mp3Compression(min_bitrate=int(low), max_bitrate=int(high), p=1.0),
        "noise": lambda: am.AddColorNoise(min_snr_db=low, max_snr_db=high, min_f_decay=NOISE_SLOPES_DB[0],
                                          max_f_decay=NOISE_SLOPES_DB[1], p=1.0),
        "gain": lambda: am.Gain(min_gain_db=low, max_gain_db=high, p=1.0),
    }[name]()
    return lambda wav, rng: seeded(rng, lambda: transform(wav, sample_rate=SAMPLE_RATE))


def seeded(rng: random.Random, run):
    """``run()`` with the global ``random`` and ``numpy.random`` seeded from ``rng``, their states restored after."""
    saved_py, saved_np = random.getstate(), np.random.get_state()
    try:
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        return np.asarray(run(), dtype=np.float32)
    finally:
        random.setstate(saved_py)
        np.random.set_state(saved_np)


def speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """``change_speed``, except where the faster clip would be too short to yield an audio token."""
    return wav if len(wav) / factor < MIN_CHUNK_SAMPLES + 1 else change_speed(wav, factor).astype(np.float32)


def resample_round_trip(wav: np.ndarray, rate: float) -> np.ndarray:
    """Down to ``rate`` Hz and back to 16 kHz (soxr): the band and the artefacts of a low-rate recording, same
    length as the input."""
    import soxr

    down = soxr.resample(wav, SAMPLE_RATE, rate)
    up = soxr.resample(down, rate, SAMPLE_RATE).astype(np.float32)
    return np.pad(up, (0, max(0, len(wav) - len(up))))[: len(wav)]


class CollatorEpochs(TrainerCallback):
    """Hands the epoch to ``collator.set_epoch`` when each training epoch begins (on resume: the epoch being
    resumed), before that epoch's batches are drawn; workers read it from shared memory."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
