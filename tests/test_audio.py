"""Audio loading, Whisper features (checked against openai-whisper and transformers), chunking, token counts."""

import shutil

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
    _power,
    audio_token_count,
    clip_token_count,
    featurize,
    log_mel,
    mel_frame_count,
)
from audiollm.audio_sources import load_audio


def tone(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-like signal: 3 harmonics of 180 Hz under a 3 Hz envelope, plus light noise."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    wave = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def stock_features(clip: np.ndarray) -> torch.Tensor:
    """transformers' WhisperFeatureExtractor as Qwen2-Audio's processor calls it: padded to 30 s, (128, 3000)."""
    fe = WhisperFeatureExtractor(feature_size=128)
    return fe(clip, sampling_rate=SAMPLE_RATE, padding="max_length", return_tensors="pt")["input_features"][0]


@pytest.mark.parametrize("seconds", [1.0, 5.0, 12.34, 30.0])
def test_log_mel_matches_openai_whisper_and_transformers(seconds):
    clip = tone(seconds)
    ours, mask = log_mel([torch.from_numpy(clip)])
    frames = ours.shape[-1]
    assert mask.sum().item() == mel_frame_count(clip.size) == -(-clip.size // 160)
    assert frames == min(mask.sum().item() + 2, MAX_FRAMES)  # the real frames + the 2 the convolutions read
    whisper_30s = whisper.log_mel_spectrogram(torch.from_numpy(clip), n_mels=128, padding=CHUNK_SAMPLES)
    hf_30s = stock_features(clip)
    # A full 30 s clip is the one case where the two stock pipelines disagree, on the last frame: openai-whisper
    # pads another 30 s of zeros, transformers reflects the clip's own end. We follow transformers (Qwen2-Audio).
    whisper_frames = frames - 1 if clip.size == CHUNK_SAMPLES else frames
    d_whisper = (ours[0, :, :whisper_frames] - whisper_30s[:, :whisper_frames]).abs().max().item()
    d_hf = (ours[0] - hf_30s[:, :frames]).abs().max().item()
    print(f"{seconds} s: max |ours - openai-whisper| {d_whisper:.1e}, max |ours - WhisperFeatureExtractor| {d_hf:.1e}")
    # 1e-6: our power spectrum is re^2 + im^2 where openai-whisper takes abs() ** 2; the two differ by float32
    # rounding, measured at one ulp of the normalised feature (1.2e-7). transformers computes in float64 numpy.
    assert d_whisper < 1e-6 and d_hf < 1e-4


def test_power_spectrum_is_abs_squared_to_float32_rounding():
    stft = torch.stft(torch.from_numpy(tone(2.0)), 400, 160, window=torch.hann_window(400), return_complex=True)
    power = _power(stft)
    assert power.shape == stft.shape and power.dtype == torch.float32
    reference = stft.to(torch.complex128).abs() ** 2  # exact enough to judge both float32 forms
    assert ((power - reference).abs() / reference.clamp(min=1e-12)).max() < 1e-6


def test_only_the_last_frame_differs_from_whisper_without_padding():
    """Unpadded, openai-whisper reflects the clip's end into the last window; the 30 s-padded pipelines (and we)
    see zeros there. That frame alone differs."""
    clip = tone(5.0)
    ours, _ = log_mel([torch.from_numpy(clip)])
    unpadded = whisper.log_mel_spectrogram(torch.from_numpy(clip), n_mels=128)  # (128, 500)
    per_frame = (ours[0, :, :500] - unpadded).abs().amax(dim=0)
    assert per_frame[:-1].max() < 1e-5 and per_frame[-1] > 1e-3


def test_batch_is_padded_to_longest_only_and_equals_stock_frames():
    clips = [tone(s, seed=i) for i, s in enumerate([2.0, 7.5, 0.8])]
    batch, mask = log_mel([torch.from_numpy(c) for c in clips])
    assert batch.shape == (3, 128, 752) and mask.sum(1).tolist() == [200, 750, 80]
    for i, clip in enumerate(clips):
        assert (batch[i] - stock_features(clip)[:, :752]).abs().max() < 1e-4  # padding frames included
        alone, _ = log_mel([torch.from_numpy(clip)])
        assert torch.equal(batch[i, :, : alone.shape[-1]], alone[0])


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
    third, _ = log_mel([torch.from_numpy(clip[2 * CHUNK_SAMPLES :])])
    assert torch.equal(batch.input_features[2, :, :502], third[0])


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


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="m4a needs ffmpeg (CI installs it)")
def test_an_m4a_over_the_limit_is_refused_without_decoding_all_of_it(tmp_path, monkeypatch):
    """libsndfile cannot read m4a, so there is no header length to check first: decoding stops a second past the
    limit and the clip is refused as too long."""
    import subprocess

    import librosa

    from audiollm.audio_checks import read_checked

    clips = {}
    for seconds in (2.0, 40.0):
        wav = tmp_path / f"{seconds:.0f}s.wav"
        sf.write(wav, tone(seconds), SAMPLE_RATE)
        clips[seconds] = tmp_path / f"{seconds:.0f}s.m4a"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), str(clips[seconds])], check=True)
    decoded, load = [], librosa.load

    def counting_load(*args, **kwargs):
        wav, rate = load(*args, **kwargs)
        decoded.append(wav.shape[-1])
        return wav, rate

    monkeypatch.setattr(librosa, "load", counting_load)
    with pytest.raises(AudioError, match="40s.m4a.*longer than the maximum of 30 s") as err:
        read_checked(clips[40.0], max_seconds=30)
    assert err.value.kind == "too_long" and decoded[-1] <= 31.5 * SAMPLE_RATE  # not the whole 40 s
    wav, _ = read_checked(clips[2.0], max_seconds=30)
    assert abs(wav.size - 2.0 * SAMPLE_RATE) <= 0.1 * SAMPLE_RATE
