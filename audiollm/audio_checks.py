"""Everything that can be wrong with one audio file, found as cheaply as possible.

``read_checked`` is the one place that opens an audio file for training, evaluation and ``audiollm data check``.
It reads the header first, so a corrupt or absurd header (a sample rate of 1 Hz claims hours of audio; resampling
that to 16 kHz would allocate gigabytes) is refused before anything is decoded. Then it decodes at the file's own
rate and looks at the raw samples (NaN/Inf, values outside [-1, 1], silence, clipping) before mixing down and
resampling, so a problem is named by what is in the file, not by what resampling made of it.

Problems have a kind and a severity:

    error    the file cannot be trained on: it raises ``AudioError(kind=...)``
    warning  usable but suspicious (clipped): returned, reported by ``data check``
    info     handled for you (resampled, mixed down, chunked): returned, counted by ``data check``
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from audiollm.audio import CHUNK_SAMPLES, MIN_CHUNK_SAMPLES, SAMPLE_RATE, AudioError

MIN_HEADER_RATE = 4_000  # Hz; a header below this is corrupt, and upsampling from it would explode the size
MAX_HEADER_RATE = 384_000  # Hz; the highest rate real recorders write
SILENCE_PEAK = 1e-4  # peak |sample| below -80 dBFS: nothing to hear (Whisper's log-mel floor is 80 dB down)
CLIP_LEVEL = 0.999  # |sample| at or above this is a clipped sample
CLIPPED_FRACTION = 1e-3  # more than 0.1 % clipped samples: warn
RANGE_TOLERANCE = 1e-3  # float files may overshoot 1.0 by rounding; beyond this the scale is wrong

# kind -> (severity, what it means). Row-level kinds (the manifest's side) are in audiollm/row_checks.py.
AUDIO_KINDS = {
    "missing": ("error", "the audio file does not exist"),
    "unreadable": ("error", "the file cannot be decoded (corrupt or not audio)"),
    "absurd_header": ("error", "the header claims an impossible sample rate or duration"),
    "too_long": ("error", "longer than the configured maximum duration"),
    "empty": ("error", "zero samples"),
    "too_short": ("error", "shorter than 25 ms, the least that yields one audio token"),
    "nonfinite": ("error", "NaN or Inf samples"),
    "out_of_range": ("error", "float samples outside [-1, 1]"),
    "silent": ("error", "all silent (peak below -80 dBFS)"),
    "clipped": ("warning", "more than 0.1 % of samples at full scale"),
    "resampled": ("info", "not 16 kHz: resampled"),
    "multichannel": ("info", "more than one channel: mixed down"),
    "chunked": ("info", "over 30 s: split into 30 s chunks"),
}


@dataclass(frozen=True)
class Finding:
    """A warning or info about a usable file: its kind and the detail (rate, channels, seconds...)."""

    kind: str
    detail: str

    @property
    def severity(self) -> str:
        return AUDIO_KINDS[self.kind][0]


def read_checked(path: str | os.PathLike, max_seconds: float | None = None,
                 sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[Finding]]:
    """Decode ``path`` to mono float32 (n_samples,) at ``sample_rate`` (16 kHz: the encoder's; a codec may want
    24 kHz), refusing every error kind of ``AUDIO_KINDS``.

    Returns the waveform and the warnings/infos found on the way. Raises ``AudioError`` (with ``kind``) or, for a
    missing file, ``FileNotFoundError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: audio file not found")
    raw, rate = _decode(path, max_seconds)  # (n, channels) at the file's own rate
    findings = _sample_findings(raw, path)
    if raw.shape[1] > 1:
        findings.append(Finding("multichannel", f"{raw.shape[1]} channels"))
    wav = raw.mean(axis=1)
    if rate != sample_rate:
        import librosa  # heavy import: only when a file needs it

        findings.append(Finding("resampled", f"{rate} Hz"))
        wav = librosa.resample(wav, orig_sr=rate, target_sr=sample_rate)
    if wav.size < MIN_CHUNK_SAMPLES * sample_rate // SAMPLE_RATE:
        raise AudioError(f"{path}: {wav.size / sample_rate * 1000:.1f} ms is shorter than 25 ms (one audio token)",
                         "too_short")
    if wav.size > CHUNK_SAMPLES * sample_rate // SAMPLE_RATE:
        findings.append(Finding("chunked", f"{wav.size / SAMPLE_RATE:.1f} s"))
    return wav.astype(np.float32, copy=False), findings


def _decode(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(samples (n, channels) float32, rate), the header checked before any sample is read."""
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception as err:  # not a format libsndfile knows (m4a, ...): decode it without a header to check first
        return _decode_other(path, err, max_seconds)
    _check_header(path, info.samplerate, info.frames, max_seconds)
    try:
        raw, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{path}: cannot decode audio ({_reason(err)})", "unreadable") from err
    if raw.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)", "empty")
    return raw, rate


def _check_header(path: str, rate: int, frames: int, max_seconds: float | None) -> None:
    if not MIN_HEADER_RATE <= rate <= MAX_HEADER_RATE:
        raise AudioError(f"{path}: the header claims {rate} Hz ({frames / max(rate, 1):.0f} s); a corrupt header "
                         f"(real audio is {MIN_HEADER_RATE}-{MAX_HEADER_RATE} Hz)", "absurd_header")
    if frames == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)", "empty")
    if max_seconds is not None and frames / rate > max_seconds:
        raise AudioError(f"{path}: {frames / rate:.1f} s is longer than the maximum of {max_seconds:g} s "
                         "(max_audio_seconds)", "too_long")


def _decode_other(path: str, soundfile_error: Exception, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """As ``_decode``, by librosa (audioread's decoders: ffmpeg...) for a file libsndfile refused. With no header to
    read first, decoding stops one second past ``max_seconds``: a file that long is refused as too long without
    decoding an hour of it."""
    import librosa

    limit = None if max_seconds is None else max_seconds + 1.0
    try:
        wav, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32, duration=limit)
    except Exception as err:  # librosa/audioread raise several unrelated types for corrupt files
        raise AudioError(f"{path}: cannot decode audio ({_reason(err, soundfile_error)})", "unreadable") from err
    raw = wav[:, None] if wav.ndim == 1 else wav.T
    _check_header(path, int(rate), raw.shape[0], max_seconds)  # the decoded rate and length, checked the same way
    return raw, int(rate)


def _reason(*errors: Exception) -> str:
    """Why a file could not be decoded: the words of the first of ``errors`` that gives any (the exception chain
    keeps the rest). audioread's NoBackendError (every decoder refused the file) has none; libsndfile's message is
    "Error opening '<path>': " with the reason in ``error_string``."""
    for err in errors:
        words = str(getattr(err, "error_string", None) or err).strip().rstrip(".")
        if words:
            return words
    return "no decoder can read it"


def _sample_findings(raw: np.ndarray, path: str) -> list[Finding]:
    """Errors (raised) and warnings (returned) that only the decoded samples (n, channels) show."""
    finite = np.isfinite(raw)
    if not finite.all():
        raise AudioError(f"{path}: {int((~finite).sum())} NaN/Inf samples", "nonfinite")
    peak = float(np.abs(raw).max())
    if peak > 1.0 + RANGE_TOLERANCE:
        raise AudioError(f"{path}: samples reach {peak:.3g}, outside [-1, 1] (wrong scale in a float file)",
                         "out_of_range")
    if peak < SILENCE_PEAK:
        raise AudioError(f"{path}: all silent (peak {peak:.1e}, below -80 dBFS)", "silent")
    clipped = float((np.abs(raw) >= CLIP_LEVEL).mean())
    return [Finding("clipped", f"{clipped:.2%} of samples at full scale")] if clipped > CLIPPED_FRACTION else []
