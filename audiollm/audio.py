"""Audio features: Whisper log-mel in batches, 30 s chunking, token counts, and the constants every audio module
shares.

The features are exactly Whisper's (openai-whisper ``log_mel_spectrogram`` and transformers'
``WhisperFeatureExtractor``): 25 ms Hann windows every 10 ms, 128 mel bins, log10, floor at max - 8, (x + 4) / 4.
What differs from the stock pipelines is the padding: a clip is never padded to 30 s. A batch is padded only to its
longest clip and a frame mask says which frames are real; audio over 30 s is cut into 30 s chunks.

This module is the one place that turns mel frames into audio-token counts (``audio_token_count``); the collator
and the model both call it. It is the bottom of the audio layers: files are opened and checked in
``audiollm.audio_checks``, and manifest entries become waveforms in ``audiollm.audio_sources``; both build on this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz, what Whisper was trained on
N_FFT = 400  # samples per STFT window: 25 ms
HOP_LENGTH = 160  # samples between frames: 10 ms, so 100 mel frames per second
N_MELS = 128  # mel bins of Whisper-large-v3 (80 for older Whisper sizes)
CHUNK_SECONDS = 30  # the encoder's positional table covers 30 s
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples
MAX_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3,000 mel frames per chunk
MIN_CHUNK_SAMPLES = N_FFT  # 25 ms: 3 mel frames, the shortest input that yields one audio token
LOG_RANGE = 8.0  # log10 units kept below a clip's loudest frame (80 dB)
EDGE_FRAMES = 2  # frames past a clip's end that the encoder's conv1 (k=3) and stride-2 conv2 (k=3) read


class AudioError(ValueError):
    """A clip that cannot be used, with the file (or caller-given name) in the message.

    ``kind`` says what is wrong (``audiollm.audio_checks.AUDIO_KINDS``), so bad rows can be counted by class.
    """

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def change_speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """Play a 16 kHz clip ``factor`` times faster: shape (n,) -> (about n / factor,).

    Tempo, pitch and formants all scale by ``factor``, as with a tape run fast or slow (Kaldi's speed
    perturbation). At 0.9..1.1 it moves formants by up to 10%, about the spread of vocal tract lengths between
    adult speakers, so training hears voices its data does not have. Resampled with soxr (librosa's default).
    """
    import librosa

    return librosa.resample(wav, orig_sr=SAMPLE_RATE * factor, target_sr=SAMPLE_RATE)


def mel_frame_count(n_samples: int) -> int:
    """Mel frames for a clip: one per 10 ms hop whose centre lies inside the clip, ceil(n / 160).

    This is the count transformers' WhisperFeatureExtractor puts in its attention mask.
    """
    return -(-n_samples // HOP_LENGTH)


def audio_token_count(mel_frames, stack: int = 1):
    """Audio tokens the model produces for ``mel_frames`` frames of one chunk (int or integer tensor).

    conv2 has stride 2: ``a = (L - 1) // 2 + 1`` frames at 50 Hz; AvgPool1d(2): ``n = (a - 2) // 2 + 1`` at 25 Hz
    (40 ms per token, 750 tokens for 30 s). A ``stack`` projector then merges k tokens into one: ceil(n / k).
    """
    after_conv = (mel_frames - 1) // 2 + 1
    after_pool = (after_conv - 2) // 2 + 1
    return (after_pool + stack - 1) // stack


def clip_token_count(n_samples: int, stack: int = 1) -> int:
    """Audio tokens for a whole clip of ``n_samples`` at 16 kHz: the sum over its 30 s chunks."""
    full, rest = divmod(n_samples, CHUNK_SAMPLES)
    tokens = full * audio_token_count(MAX_FRAMES, stack)
    if rest:
        tokens += audio_token_count(mel_frame_count(max(rest, MIN_CHUNK_SAMPLES)), stack)
    return tokens


def split_chunks(wav: torch.Tensor, name: str = "audio") -> list[torch.Tensor]:
    """Cut a clip into consecutive 30 s chunks; the last chunk holds the remainder.

    A remainder under 25 ms would give no token, so it is zero-padded to 25 ms and the padding is logged.
    """
    if wav.numel() < MIN_CHUNK_SAMPLES:
        raise AudioError(
            f"{name}: {wav.numel()} samples ({wav.numel() / SAMPLE_RATE * 1000:.1f} ms) is shorter than the "
            f"{MIN_CHUNK_SAMPLES * 1000 // SAMPLE_RATE} ms minimum that yields one audio token"
        )
    chunks = list(torch.split(wav, CHUNK_SAMPLES))
    if chunks[-1].numel() < MIN_CHUNK_SAMPLES:
        short = chunks[-1].numel()
        chunks[-1] = F.pad(chunks[-1], (0, MIN_CHUNK_SAMPLES - short))
        log.info("%s: padded the last %d-sample chunk to %d samples", name, short, MIN_CHUNK_SAMPLES)
    return chunks


def _mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """Whisper's own filterbank (librosa slaney mel, shipped by openai-whisper), shape (n_mels, 201)."""
    from whisper.audio import mel_filters

    return mel_filters(device, n_mels)


def log_mel(wavs: list[torch.Tensor], n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of a batch of 16 kHz clips, each at most 30 s, padded only as far as the encoder reads.

    Args:
        wavs: B float tensors of shape (n_i,), n_i <= 480,000 samples.
    Returns:
        features (B, n_mels, T) float32 with T = min(max_i L_i + 2, 3000), L_i = ceil(n_i / 160).
        mask (B, T) int64, 1 on a clip's L_i real frames (the ``feature_attention_mask``).

    Every frame, real or padding, is the frame the stock pipelines compute for that clip padded to 30 s (they pad
    the wave with zeros before the STFT): past a clip's end come two frames holding its windowed tail, then
    Whisper's silence floor. The encoder's two convolutions read those two frames at the clip's edge, so the
    unpadded encoder sees exactly the stock input, and a clip gets the same features alone or in a batch.
    """
    if any(w.numel() > CHUNK_SAMPLES for w in wavs):
        raise AudioError("log_mel takes chunks of at most 30 s; call split_chunks first")
    device = wavs[0].device
    lengths = torch.tensor([mel_frame_count(w.numel()) for w in wavs], device=device)
    frames = min(int(lengths.max()) + EDGE_FRAMES, MAX_FRAMES)
    batch = torch.stack([_stock_framing(w.float(), frames) for w in wavs])  # (B, (frames - 1) * 160 + 400)
    window = torch.hann_window(N_FFT, device=device)
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    mel = _mel_filters(n_mels, device) @ _power(stft)  # (B, 201, T) -> (B, n_mels, T)
    logmel = torch.clamp(mel, min=1e-10).log10()
    loudest = logmel.amax(dim=(1, 2), keepdim=True)  # frames of pure padding are -10: never the loudest
    logmel = (torch.maximum(logmel, loudest - LOG_RANGE) + 4.0) / 4.0
    mask = torch.arange(frames, device=device)[None, :] < lengths[:, None]  # (B, T)
    return logmel, mask.long()


def _power(stft: torch.Tensor) -> torch.Tensor:
    """|X|^2 of a complex STFT as re^2 + im^2, shape kept (B, 201, T).

    ``stft.abs() ** 2`` (what openai-whisper writes) takes a square root (hypot) only to square it again: measured
    at 3x the cost of the 400-point FFT itself on 8 x 25 s clips, one thread. The sum of squares differs from it by
    float32 rounding only (a relative 1e-7 in power, under 1e-6 after the log; tests/test_audio.py).
    """
    return stft.real.square() + stft.imag.square()


def _stock_framing(wav: torch.Tensor, frames: int) -> torch.Tensor:
    """The samples a centred STFT of ``wav`` zero-padded to 30 s reads for its first ``frames`` frames.

    Like Whisper: the start is reflected (200 samples), zeros follow the clip up to 30 s, and the 30 s end is
    reflected, which only a clip of nearly 30 s ever reaches. Built piece by piece: padding every clip to 480,000
    samples first would cost more than the STFT itself.
    """
    half = N_FFT // 2
    needed = (frames - 1) * HOP_LENGTH + N_FFT  # samples read by `frames` frames, 400 + 160 per extra frame
    start = wav[1 : half + 1].flip(0)  # reflect pad of a centred STFT
    body = F.pad(wav, (0, min(needed - half, CHUNK_SAMPLES) - wav.numel()))
    past_end = needed - half - CHUNK_SAMPLES
    if past_end <= 0:
        return torch.cat([start, body])
    end = F.pad(wav[-(half + 1) :], (0, CHUNK_SAMPLES - wav.numel()))  # the last 201 samples of the 30 s wave
    return torch.cat([start, body, end[-(half + 1) : -1].flip(0)[:past_end]])


@dataclass
class AudioBatch:
    """Encoder inputs for a batch of clips, every clip cut into 30 s chunks.

    input_features: (C, n_mels, T) for the C chunks of all clips, clip by clip, in order.
    feature_attention_mask: (C, T), 1 on real frames.
    tokens_per_clip: audio tokens each clip expands to (the sum over its chunks).
    chunks_per_clip: how many of the C chunks each clip became.
    """

    input_features: torch.Tensor
    feature_attention_mask: torch.Tensor
    tokens_per_clip: list[int]
    chunks_per_clip: list[int]


def featurize(clips: list, names: list[str] | None = None, stack: int = 1, n_mels: int = N_MELS) -> AudioBatch:
    """16 kHz mono waveforms (numpy or torch, any length) -> chunked, batch-padded log-mel and token counts."""
    names = names or [f"audio[{i}]" for i in range(len(clips))]
    chunks, tokens_per_clip, chunks_per_clip = [], [], []
    for clip, name in zip(clips, names):
        wav = torch.as_tensor(clip, dtype=torch.float32)
        if wav.ndim != 1:
            raise AudioError(f"{name}: expected a mono waveform of shape (n_samples,), got {tuple(wav.shape)}")
        pieces = split_chunks(wav, name)
        chunks += pieces
        chunks_per_clip.append(len(pieces))
        tokens_per_clip.append(clip_token_count(wav.numel(), stack))
    features, mask = log_mel(chunks, n_mels)
    return AudioBatch(features, mask, tokens_per_clip, chunks_per_clip)
