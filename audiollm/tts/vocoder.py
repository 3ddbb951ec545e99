"""Waveforms from magnitude spectrograms for the codec trained here (audiollm/tts/melcodec.py): a pitch tracker
that gives the codec its pitch targets, and a harmonic-plus-noise vocoder that voices a decoded spectrum.

Why not Griffin-Lim alone: a codec's decoder, trained with an L1 loss on log-magnitudes, predicts a smooth
spectral envelope (formants, no harmonics), and Griffin-Lim turns that into breathy, whispered speech. With the
fundamental frequency as well, the vocoder below puts sinusoids at its harmonics, each as loud as the envelope at
its frequency, which is how a source-filter (formant) synthesiser such as the demo's speaks.

    magnitude |X| (513, T), f0 (T,) Hz,             frames of a centred STFT: frame t sits at sample t * hop
    periodicity p (T,) in [0, 1]
      -> harmonics: sum_k a_k(n) cos(k phi(n)), phi(n) = 2 pi cumsum(f0(n)) / sr, a_k = sqrt(p) |X|(k f0) / (n_fft / 4)
      -> noise:     white noise shaped by sqrt(1 - p) |X| in the STFT domain
      -> their sum, (T - 1) * hop samples
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# YIN (de Cheveigné & Kawahara 2002): a lag is the period where the cumulative-mean-normalised difference first dips
# under THRESHOLD. How deep that dip is says how periodic the frame is: fully at PERIODIC_DIP or below, not at all
# at APERIODIC_DIP or above (fricatives: ~1), linearly between (the demo's breathy espeak voices, en+m1, dip to
# 0.3-0.5 in frames pYIN calls voiced); frames more than SILENCE_DB under the clip's loudest are not periodic.
YIN_THRESHOLD = 0.15
PERIODIC_DIP, APERIODIC_DIP = 0.1, 0.5
SILENCE_DB = 40.0
HARMONIC_CEILING = 0.95  # harmonics above this share of the Nyquist frequency are left out (aliasing)


def yin_pitch(wav: torch.Tensor, sample_rate: int, frame: int, hop: int, f0_min: float, f0_max: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) waveforms -> (f0 (B, n / hop) in Hz, periodicity (B, n / hop) in [0, 1]), one value per frame of a
    centred STFT with window ``frame`` and ``hop`` (the frame count ``MelCodecModel.spectrogram`` keeps).
    Aperiodic frames carry the f0 of their best dip anyway (the codec's loss weighs f0 by periodicity)."""
    lag_min, lag_max = int(sample_rate / f0_max), int(np.ceil(sample_rate / f0_min))
    span = frame - lag_max  # samples compared per lag
    x = F.pad(wav.float(), (frame // 2, frame // 2)).unfold(-1, frame, hop)[:, : wav.shape[-1] // hop]  # (B, T, W)
    size = 2 * frame
    # sum_{j < span} x_j x_{j+lag} for every lag at once: a correlation through the FFT (zero-padded: no wrap).
    cross = torch.fft.irfft(torch.fft.rfft(x, size) * torch.fft.rfft(x[..., :span], size).conj(), size)
    cross = cross[..., : lag_max + 1]
    energy = F.pad((x * x).cumsum(-1), (1, 0))  # (B, T, W + 1): energy[i] = sum of the first i squares
    lags = torch.arange(lag_max + 1, device=wav.device)
    shifted = energy[..., lags + span] - energy[..., lags]  # sum_{j < span} x_{j+lag}^2
    diff = (energy[..., span : span + 1] + shifted - 2 * cross).clamp(min=0)  # (B, T, lags)
    cmnd = diff[..., 1:] * lags[1:] / diff[..., 1:].cumsum(-1).clamp(min=1e-8)  # lag 1.. lag_max
    cmnd = cmnd[..., lag_min - 1 :]  # lags lag_min.. lag_max
    below = cmnd < YIN_THRESHOLD
    first = torch.where(below.any(-1), below.float().argmax(-1), cmnd.argmin(-1))  # (B, T)
    # From the first dip under the threshold, walk down to its bottom (at most a quarter period further).
    window = torch.arange(lag_min // 4 + 1, device=wav.device)
    idx = (first[..., None] + window).clamp(max=cmnd.shape[-1] - 1)
    values = cmnd.gather(-1, idx)
    best = idx.gather(-1, values.argmin(-1, keepdim=True))[..., 0]
    dip = values.min(-1).values
    # A parabola through the bottom and its two neighbours puts the period between whole samples: an integer lag
    # is up to 0.5% off at 150 Hz, which moves the 40th harmonic by 30 Hz.
    around = cmnd.gather(-1, (best[..., None] + torch.arange(-1, 2, device=wav.device)).clamp(0, cmnd.shape[-1] - 1))
    curve = around[..., 0] - 2 * around[..., 1] + around[..., 2]
    shift = torch.where(curve > 0, 0.5 * (around[..., 0] - around[..., 2]) / curve.clamp(min=1e-8), 0.0)
    db = 10 * torch.log10((x * x).mean(-1).clamp(min=1e-10))
    loud = db > db.amax(-1, keepdim=True) - SILENCE_DB
    periodicity = ((APERIODIC_DIP - dip) / (APERIODIC_DIP - PERIODIC_DIP)).clamp(0, 1) * loud
    return sample_rate / (best + lag_min + shift.clamp(-0.5, 0.5)), periodicity


def harmonic_synthesis(mag: np.ndarray, f0: np.ndarray, periodicity: np.ndarray, sample_rate: int, n_fft: int,
                       hop: int, seed: int = 0) -> np.ndarray:
    """mag (513, T) linear magnitudes, f0 (T,) Hz, periodicity (T,) in [0, 1] -> (T - 1) * hop float32 samples:
    harmonics carry a share p of each frame's power, shaped noise the rest (1 - p).

    Deterministic (the noise is seeded). Harmonics are summed in groups to bound memory on long clips."""
    frames = mag.shape[1]
    n = (frames - 1) * hop
    f0 = fill_unvoiced(f0, periodicity > 0.5)
    t_frames, t = np.arange(frames) * hop, np.arange(n)
    phase = 2 * np.pi * np.cumsum(np.interp(t, t_frames, f0)) / sample_rate  # (n,)
    bin_hz = sample_rate / n_fft
    count = int(sample_rate / 2 * HARMONIC_CEILING / max(f0.min(), 1.0))
    out = np.zeros(n)
    for start in range(1, count + 1, 16):
        k = np.arange(start, min(start + 16, count + 1))[:, None]  # (K, 1)
        amp = envelope_at(mag, k * f0[None] / bin_hz) / (n_fft / 4)  # a sinusoid of amplitude a peaks at a*n_fft/4
        amp *= (k * f0[None] < sample_rate / 2 * HARMONIC_CEILING) * np.sqrt(periodicity)[None]
        out += sum(np.interp(t, t_frames, a) * np.cos(kk * phase) for a, kk in zip(amp, k[:, 0]))
    return (out + shaped_noise(mag * np.sqrt(1 - periodicity)[None], n_fft, hop, n, seed)).astype(np.float32)


def fill_unvoiced(f0: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """f0 with unvoiced frames interpolated from voiced neighbours, so the phase glides, never jumps."""
    if not voiced.any():
        return np.full_like(f0, 120.0, dtype=np.float64)
    idx = np.flatnonzero(voiced)
    return np.interp(np.arange(len(f0)), idx, f0[idx]).astype(np.float64)


def envelope_at(mag: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """mag (F, T) sampled at fractional ``bins`` (K, T), linearly between neighbouring bins -> (K, T)."""
    low = np.clip(np.floor(bins).astype(int), 0, mag.shape[0] - 2)
    frac = np.clip(bins - low, 0.0, 1.0)
    cols = np.arange(mag.shape[1])[None]
    return mag[low, cols] * (1 - frac) + mag[low + 1, cols] * frac


def shaped_noise(mag: np.ndarray, n_fft: int, hop: int, n: int, seed: int) -> np.ndarray:
    """White noise whose STFT magnitude follows ``mag`` (F, T): n samples."""
    import librosa

    noise = np.random.default_rng(seed).standard_normal(n + n_fft)
    spec = librosa.stft(noise, n_fft=n_fft, hop_length=hop, center=True)[:, : mag.shape[1]]
    spec /= np.sqrt((np.hanning(n_fft) ** 2).sum())  # unit-variance noise: |STFT| ~ sqrt(sum of window^2)
    return librosa.istft(spec * mag, hop_length=hop, n_fft=n_fft, length=n)
