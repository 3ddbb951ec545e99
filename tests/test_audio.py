"""Audio loading, Whisper features (checked against openai-whisper and transformers), chunking, token counts."""

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper
from transformers import WhisperFeatureExtractor

from audiollm.audio import (
    CHUNK_SAMPLES,
    MAX_FRAMES,
    SAMPLE_RATE,
    AudioError,
    audio_token_count,
    clip_token_count,
    featurize,
    load_audio,
    log_mel,
    mel_frame_count,
)


def tone(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-like signal: 3 harmonics of 180 Hz under a 3 Hz envelope, plus light noise."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    wave = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("seconds", [1.0, 5.0, 12.34])
def test_log_mel_matches_openai_whisper(seconds):
    clip = tone(seconds)
    ours, mask = log_mel([torch.from_numpy(clip)])
    ref = whisper.log_mel_spectrogram(torch.from_numpy(clip), n_mels=128)  # (128, n // 160)
    diff = (ours[0, :, : ref.shape[1]] - ref).abs().max().item()
    print(f"max |ours - openai-whisper| over {ref.shape[1]} frames: {diff:.2e}")
    assert diff < 1e-5
    # Whisper drops the frame centred on the last partial hop; we keep it (transformers' mask counts it too).
    assert mask.sum().item() == mel_frame_count(clip.size) == -(-clip.size // 160)


def test_log_mel_matches_transformers_feature_extractor():
    clip = tone(5.0)
    ours, mask = log_mel([torch.from_numpy(clip)])
    fe = WhisperFeatureExtractor(feature_size=128)
    ref = fe(clip, sampling_rate=SAMPLE_RATE, return_attention_mask=True, padding="max_length", return_tensors="pt")
    frames = int(mask.sum())
    assert int(ref["attention_mask"].sum()) == frames
    diff = (ours[0] - ref["input_features"][0, :, :frames]).abs()
    inner = diff[:, :-1].max().item()
    print(f"max |ours - WhisperFeatureExtractor|: {inner:.2e} (all but the last frame), {diff.max():.2e} overall")
    assert inner < 1e-4
    # The last frame's window reaches past the clip: transformers padded the wave to 30 s with zeros, we (like
    # openai-whisper) reflect the clip's own end. That frame alone differs.
    assert diff[:, -1].max().item() > inner


def test_batch_is_padded_to_longest_only_and_is_batch_invariant():
    clips = [torch.from_numpy(tone(s, seed=i)) for i, s in enumerate([2.0, 7.5, 0.8])]
    batch, mask = log_mel(clips)
    assert batch.shape == (3, 128, 750) and mask.sum(1).tolist() == [200, 750, 80]
    for i, clip in enumerate(clips):
        alone, _ = log_mel([clip])
        frames = alone.shape[-1]
        assert torch.equal(batch[i, :, :frames], alone[0])
        assert batch[i, :, frames:].abs().sum() == 0


def test_token_count_arithmetic():
    assert audio_token_count(100) == 25  # 1 s -> 25 tokens (40 ms each)
    assert audio_token_count(MAX_FRAMES) == 750  # 30 s
    assert audio_token_count(MAX_FRAMES, stack=4) == 188  # ceil(750 / 4)
    lengths = torch.tensor([3, 100, 501, 3000])
    assert audio_token_count(lengths).tolist() == [audio_token_count(int(n)) for n in lengths]
    assert clip_token_count(5 * SAMPLE_RATE) == 125


def test_long_audio_is_chunked_without_truncation():
    clip = tone(65.0)
    batch = featurize([clip, tone(3.0)])
    assert batch.input_features.shape == (4, 128, MAX_FRAMES)  # 30 s + 30 s + 5 s, then the 3 s clip
    assert batch.feature_attention_mask.sum(1).tolist() == [3000, 3000, 500, 300]
    assert batch.tokens_per_clip == [750 + 750 + 125, 75]
    # The chunks are the clip's own consecutive samples: the second chunk equals the features of samples 30-60 s.
    second, _ = log_mel([torch.from_numpy(clip[CHUNK_SAMPLES : 2 * CHUNK_SAMPLES])])
    assert torch.equal(batch.input_features[1], second[0])


def test_a_tail_under_25_ms_is_padded_not_dropped(caplog):
    clip = np.concatenate([tone(30.0), tone(0.01)])  # 30 s + 160 samples
    with caplog.at_level("INFO"):
        batch = featurize([clip], names=["long.wav"])
    assert batch.tokens_per_clip == [751] and "long.wav" in caplog.text


def test_too_short_clip_is_an_error_naming_it():
    with pytest.raises(AudioError, match="blip.wav"):
        featurize([np.zeros(100, np.float32)], names=["blip.wav"])


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_load_common_formats_stereo_48k_to_16k_mono(tmp_path, fmt):
    sr, seconds = 48_000, 1.5
    mono = tone(seconds, sr=sr)
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, np.stack([mono, mono], axis=1), sr)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - seconds * SAMPLE_RATE) <= 0.05 * SAMPLE_RATE  # mp3 adds encoder delay/padding
    ref = tone(seconds)  # the same signal made at 16 kHz
    n = min(ref.size, wav.size)
    if fmt in ("wav", "flac"):  # lossless: resampled content matches the 16 kHz original closely
        corr = np.corrcoef(ref[1000 : n - 1000], wav[1000 : n - 1000])[0, 1]
        assert corr > 0.99


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty.wav"):
        load_audio(empty)
