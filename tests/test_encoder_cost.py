"""What padding to 30 s costs the encoder, counted (FLOPs, not timings), and a smoke run of benchmarks.encoder."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2AudioEncoderConfig

from benchmarks import encoder as bench


def expected_forward_flops(config: Qwen2AudioEncoderConfig, frames: int) -> int:
    """Matmul and conv FLOPs (2 per multiply-add) of the encoder on one chunk of ``frames`` mel frames.

    conv1 (mels -> d, k=3) over T frames, conv2 (d -> d, k=3, stride 2) to T' = (T - 1) // 2 + 1 positions, then per
    layer: q, k, v, out projections (4 d^2), the FFN (2 d ffn) and attention's QK^T and AV (2 T' d each).
    """
    d, ffn, mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    positions = (frames - 1) // 2 + 1
    convs = 2 * frames * d * mels * 3 + 2 * positions * d * d * 3
    layer = 2 * positions * (4 * d * d + 2 * d * ffn) + 2 * 2 * positions * positions * d
    return convs + config.encoder_layers * layer


@pytest.mark.parametrize("name", ["tiny", "large"])
def test_padding_a_5s_clip_to_30s_costs_over_5x_the_flops(name):
    config = bench.encoder_config(name, layers_real=1)
    variants = bench.clip_variants(5.0)
    flops = {key: bench.forward_flops(config, features, mask) for key, (features, mask) in variants.items()}
    ratio = flops["padded"] / flops["unpadded"]
    padded, unpadded = flops["padded"] / 1e9, flops["unpadded"] / 1e9
    print(f"{name}: padded {padded:.2f} GFLOP, unpadded {unpadded:.3f} GFLOP, {ratio:.1f}x")

    # The counter sees every matmul, attention included (a missing op would break the equality).
    for key, (features, _) in variants.items():
        assert flops[key] == expected_forward_flops(config, features.shape[-1]), key
    # 1500 vs ~250 positions: 6x on the linear parts, up to 36x on attention.
    assert ratio >= 5


def test_clip_length_distributions():
    librispeech, short = bench.clip_durations("librispeech", 2000), bench.clip_durations("short", 2000)
    assert 11 < librispeech.mean() < 13 and librispeech.max() <= 30  # LibriSpeech utterances: ~12 s, <= 30 s here
    assert 3.5 < short.mean() < 4.5 and short.min() >= 0.5
    assert (bench.clip_durations("librispeech", 16) == librispeech[:16]).all()  # fixed seed: same clips every run


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench" / "encoder.json"
    argv = ["--configs", "tiny", "--repeats", "1", "--warmup", "0", "--clips", "short", "--batches", "1"]
    report = bench.main(argv + ["--json", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert {"device", "dtype", "threads", "repeats", "memory", "clip", "clips"} <= data.keys()

    tiny = data["clip"]["results"]["tiny"]
    assert tiny["padded"]["mel_frames"] == 3000 and tiny["unpadded"]["mel_frames"] < 3000
    metrics = {"fwd_bwd_s", "fwd_s", "activation_mb", "forward_gflop"}
    for variant in ("padded", "unpadded"):
        assert metrics <= tiny[variant].keys()
        assert all(tiny[variant][key] > 0 for key in metrics), variant
    assert tiny["ratio"].keys() == metrics
    assert tiny["ratio"]["forward_gflop"] >= 5 and tiny["ratio"]["activation_mb"] > 5  # counted, not timed

    dist = data["clips"]
    assert (dist["distribution"], dist["n_clips"], dist["batch_size"]) == ("short", 8, 8)
    rows = dist["results"]["tiny"]
    assert all(rows[v]["fwd_bwd_s_per_clip"] > 0 for v in ("padded-30s", "padded-longest", "length-grouped"))
    overhead = [rows[v]["frames_computed_per_real"] for v in ("padded-30s", "padded-longest", "length-grouped")]
    assert overhead[0] > overhead[1] >= overhead[2] >= 1  # one batch: grouping only reorders, so equal here
