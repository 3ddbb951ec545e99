"""Audio in: a file or a manifest's audio entry (path, Hugging Face ``Audio`` value, waveform) -> 16 kHz mono.

Files go through ``audiollm.audio_checks.read_checked``, so training, evaluation and ``data check`` refuse the same
files for the same reasons. Kept apart from ``audiollm.audio`` because it builds on the checks, which in turn build
on that module's constants and ``AudioError``.
"""

from __future__ import annotations

import os

import numpy as np

from audiollm.audio import MIN_CHUNK_SAMPLES, SAMPLE_RATE, AudioError
from audiollm.audio_checks import read_checked


def load_audio(path: str | os.PathLike, max_seconds: float | None = None) -> np.ndarray:
    """Decode wav/flac/mp3/ogg to 16 kHz mono float32, shape (n_samples,).

    Channels are averaged and other sample rates are resampled (soxr, as librosa does by default). Files that
    cannot be trained on (corrupt, empty, silent, NaN, out of range, a corrupt header, longer than
    ``max_seconds``) raise ``AudioError`` with the kind of problem; see ``audiollm.audio_checks``.
    """
    return read_checked(path, max_seconds)[0]


def load_audio_source(source, name: str = "audio", max_seconds: float | None = None) -> np.ndarray:
    """A manifest's audio entry -> 16 kHz mono float32, at least 25 ms long (one audio token).

    Accepts a path, a Hugging Face ``Audio`` value (``{"path", "bytes"}`` undecoded, or ``{"array",
    "sampling_rate"}``), or a waveform already at 16 kHz. Anything unusable raises ``AudioError`` with its kind.
    """
    wav = _load_source(source, name, max_seconds)
    if wav.size < MIN_CHUNK_SAMPLES:
        raise AudioError(f"{name}: {wav.size} samples ({wav.size / SAMPLE_RATE * 1000:.1f} ms) is shorter than the "
                         f"{MIN_CHUNK_SAMPLES * 1000 // SAMPLE_RATE} ms that yield one audio token", "too_short")
    return wav


def _load_source(source, name: str, max_seconds: float | None) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        return load_audio(source, max_seconds)
    if isinstance(source, dict):
        if source.get("array") is not None:
            import librosa  # heavy import (about a second): only for a waveform that needs resampling

            wav = np.asarray(source["array"], dtype=np.float32)
            wav = wav.mean(axis=0) if wav.ndim == 2 else wav
            return librosa.resample(wav, orig_sr=source["sampling_rate"], target_sr=SAMPLE_RATE)
        if source.get("bytes"):
            return _decode_bytes(source["bytes"], source.get("path") or name)
        if source.get("path"):
            return load_audio(source["path"], max_seconds)
    try:
        wav = np.asarray(source, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise AudioError(f"{name}: expected a path or a mono 16 kHz waveform, got {type(source).__name__}") from err
    if wav.ndim != 1 or wav.size == 0:
        raise AudioError(f"{name}: expected a path or a non-empty mono 16 kHz waveform, got shape {wav.shape}",
                         "empty" if wav.size == 0 else "unreadable")
    return wav


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    import io

    import librosa
    import soundfile

    try:
        wav, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{name}: cannot decode embedded audio bytes ({err})") from err
    wav = wav.mean(axis=1)
    if wav.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    return librosa.resample(wav, orig_sr=sr, target_sr=SAMPLE_RATE) if sr != SAMPLE_RATE else wav
