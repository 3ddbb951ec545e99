"""The codec's pitch tracker and harmonic vocoder (audiollm/tts/vocoder.py) on signals whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiollm.tts.vocoder import harmonic_synthesis, yin_pitch

RATE, N_FFT, HOP = 16000, 1024, 256


def pulse_train(f0: float, seconds: float = 1.0) -> np.ndarray:
    """A glottal-like source: one click per period, through a one-pole low-pass (a vowel's spectral tilt)."""
    n = int(RATE * seconds)
    x = np.zeros(n)
    x[(np.arange(0, seconds, 1 / f0) * RATE).astype(int)] = 1.0
    y = np.zeros(n)
    for i in range(1, n):  # y[i] = x[i] + 0.9 y[i-1]
        y[i] = x[i] + 0.9 * y[i - 1]
    return (0.1 * y / np.abs(y).max()).astype(np.float32)


@pytest.mark.parametrize("f0", [85.0, 140.0, 230.0])
def test_yin_finds_the_period_of_voiced_frames(f0):
    wav = torch.from_numpy(pulse_train(f0))[None]
    pitch, periodicity = yin_pitch(wav, RATE, N_FFT, HOP, 60.0, 400.0)
    assert pitch.shape == periodicity.shape == (1, RATE // HOP)
    inner = slice(4, -4)  # away from the zero padding at the clip's ends
    assert (periodicity[0, inner] == 1).all()
    np.testing.assert_allclose(pitch[0, inner].numpy(), f0, rtol=0.005)  # between whole-sample lags


def test_noise_and_silence_are_not_periodic():
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(RATE).astype(np.float32) * 0.05)
    wav = torch.cat([noise, torch.zeros(RATE), torch.from_numpy(pulse_train(120.0))])[None]
    _, periodicity = yin_pitch(wav, RATE, N_FFT, HOP, 60.0, 400.0)
    frames = RATE // HOP
    assert periodicity[0, 4 : frames - 4].mean() < 0.1  # white noise has no period
    assert (periodicity[0, frames + 4 : 2 * frames - 4] == 0).all()  # digital silence
    assert (periodicity[0, 2 * frames + 4 : -4] == 1).all()


def test_harmonics_land_on_multiples_of_f0_at_the_envelope_level():
    import librosa

    frames = 64
    level = np.full((513, frames), 2.0)
    level[200:] = 0.2  # a 20 dB step at 3.1 kHz
    wav = harmonic_synthesis(level, np.full(frames, 200.0), np.ones(frames), RATE, N_FFT, HOP)
    assert wav.shape == ((frames - 1) * HOP,) and wav.dtype == np.float32
    spec = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP)).mean(1)  # (513,)
    harmonic_bins = np.round(np.arange(200, 3000, 200) / (RATE / N_FFT)).astype(int)
    between = harmonic_bins[:-1] + 6  # ~100 Hz off each harmonic, between two of them
    assert spec[harmonic_bins].min() > 20 * spec[between].max()  # a comb, not a smear
    np.testing.assert_allclose(spec[harmonic_bins], 2.0, rtol=0.25)  # each harmonic as loud as the envelope there
    high = np.round(np.arange(3400, 7000, 200) / (RATE / N_FFT)).astype(int)
    np.testing.assert_allclose(spec[high], 0.2, rtol=0.25)


def test_unvoiced_frames_are_noise_at_the_envelope_level():
    import librosa

    frames = 128
    wav = harmonic_synthesis(np.full((513, frames), 0.5), np.full(frames, 150.0), np.zeros(frames), RATE,
                             N_FFT, HOP, seed=3)
    spec = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP))[:, 8:-8]
    assert 0.35 < np.sqrt((spec ** 2).mean()) < 0.65  # white noise whose |STFT| follows the envelope
    np.testing.assert_array_equal(wav, harmonic_synthesis(np.full((513, frames), 0.5), np.full(frames, 150.0),
                                                          np.zeros(frames), RATE, N_FFT, HOP, seed=3))
