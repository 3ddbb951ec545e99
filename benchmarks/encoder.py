"""What the stock 30 s padding costs the audio encoder, and what unpadded input saves.

    python -m benchmarks.encoder                          # 5 s clip, tiny + 1 real-size layer: ~1 min, 2 CPU cores
    python -m benchmarks.encoder --layers-real 4 --repeats 10 --json runs/bench/encoder.json
    python -m benchmarks.encoder --clips librispeech --repeats 2   # adds a batch-of-8 clip-length distribution
    python -m benchmarks.encoder --clips short --layers-real 2 --json benchmarks/results/encoder_short.json

Variants for one clip (default 5 s = 500 mel frames):
  padded    the stock layout: the waveform zero-padded to 30 s, 3000 mel frames, a frame mask marking the real
            500 (what transformers' Qwen2-Audio processor feeds the encoder; 1500 encoder positions)
  unpadded  our collator: 500 frames, 250 encoder positions
Encoders (random weights; cost depends on shapes only):
  tiny      ``audiollm.tiny.tiny_audio_config()``: 2 layers of width 64
  large     a slice of Whisper-large-v3's encoder: d_model 1280, 20 heads, ffn 5120, 128 mels, 1500 positions,
            ``--layers-real`` layers (the full encoder has 32)

Timings are medians over ``--repeats`` rounds after ``--warmup`` rounds; inside a round the variants alternate
(A B A B ...) so clock and cache drift hit both alike. ``fwd+bwd`` is a training step's encoder cost (forward, then
backward of ``hidden.sum()``); ``fwd`` runs under ``torch.no_grad()``.

Memory: ``act MB`` is what autograd saves for backward during the forward (saved-tensor hooks, weights excluded),
measured on every device: the activation memory that padding multiplies. CPU has no peak counter for tensors
(tracemalloc does not see torch's allocator), so only on CUDA is ``peak MB`` reported as well:
``torch.cuda.max_memory_allocated`` during one forward+backward, above what was allocated before (the weights).

FLOPs: forward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on an eager-attention copy of the
encoder, because the counter has no formula for the CPU sdpa kernel and would leave attention out.

``--clips librispeech|short`` adds a clip-length distribution: durations drawn with a fixed seed from a gamma
distribution (librispeech: shape 4, scale 3 s, mean 12 s; short: shape 8, scale 0.5 s, mean 4 s), capped at 30 s,
in batches of 8, comparing padded-to-30s (stock), padded-to-longest (our collator, batches in manifest order),
length-grouped (clips sorted by length first, as the Trainer's ``group_by_length`` does) and packed (the batches in
manifest order, the encoder's ``packed`` switch: the layers see only real frames, attention per clip through the
``sdpa_packed`` kernel; no padding at all). Synthetic mel features
stand in for audio there (values do not change the cost). Reported: fwd+bwd seconds per clip, and encoder frames
computed per real frame, the analytic forward FLOPs of each batching (``analytic_forward_flops``) and their
padded-30s/this ratio (the speed-up a FLOP-bound machine would show), and the largest batch's activation memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2AudioEncoderConfig

from audiollm.audio import CHUNK_SAMPLES, EDGE_FRAMES, MAX_FRAMES, N_MELS, SAMPLE_RATE, featurize, mel_frame_count
from audiollm.model.encoder import AudioEncoder
from audiollm.packing import PACKED_SDPA
from audiollm.tiny import tiny_audio_config

# Whisper-large-v3's encoder shape (Qwen2-Audio's audio tower), minus the layer count.
WHISPER_LARGE_V3 = dict(
    num_mel_bins=128, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, max_source_positions=1500
)
# Gamma (shape, scale in seconds) of clip durations; mean = shape * scale. Floor keeps every clip >= 1 token.
DISTRIBUTIONS = {"librispeech": (4.0, 3.0), "short": (8.0, 0.5)}
MIN_SECONDS, MAX_SECONDS = 0.5, 30.0
MB = 2**20


# ---------------------------------------------------------------------------------------------- encoders and inputs


def encoder_config(name: str, layers_real: int, attn: str = PACKED_SDPA) -> Qwen2AudioEncoderConfig:
    """"tiny" or "large" (a ``layers_real``-layer Whisper-large-v3 slice) with the given attention kernel."""
    if name == "tiny":
        kwargs = {k: v for k, v in tiny_audio_config().items() if k != "model_type"}
    elif name == "large":
        kwargs = dict(WHISPER_LARGE_V3, encoder_layers=layers_real)
    else:
        raise ValueError(f"unknown encoder config {name!r}: use tiny or large")
    config = Qwen2AudioEncoderConfig(**kwargs)
    config._attn_implementation = attn
    return config


def config_label(name: str, layers_real: int) -> str:
    return "tiny" if name == "tiny" else f"large-v3 x{layers_real} layer{'s' * (layers_real > 1)}"


def synthetic_clip(seconds: float, seed: int = 0) -> torch.Tensor:
    """Seeded noise at 16 kHz, shape (seconds * 16000,): encoder cost depends on the length only."""
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(round(seconds * SAMPLE_RATE)), generator=generator)


def clip_variants(seconds: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One clip as the stock layout and unpadded: {"padded": ((1, 128, 3000), (1, 3000)), "unpadded": (T = 100 s)}.

    The stock processor pads the waveform with zeros to 30 s, takes the log-mel of all of it, and masks the frames
    past the clip's end; ours stops at the clip's last frame.
    """
    wav = synthetic_clip(seconds)
    real_frames = mel_frame_count(wav.numel())
    stock = featurize([F.pad(wav, (0, CHUNK_SAMPLES - wav.numel()))])  # (1, 128, 3000)
    stock_mask = torch.zeros(1, MAX_FRAMES, dtype=torch.long)
    stock_mask[:, :real_frames] = 1
    ours = featurize([wav])  # (1, 128, real_frames)
    return {
        "padded": (stock.input_features, stock_mask),
        "unpadded": (ours.input_features, ours.feature_attention_mask),
    }


# ---------------------------------------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(encoder: AudioEncoder, features: torch.Tensor, mask: torch.Tensor, backward: bool) -> None:
    """One encoder pass over (C, 128, T) features: forward+backward (a training step) or no-grad forward."""
    encoder.train(backward)
    if not backward:
        with torch.no_grad():
            encoder(features, mask)
        return
    hidden, _ = encoder(features, mask)  # (C, N, d_model)
    hidden.float().sum().backward()
    encoder.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()``: CPU seconds of this process with one torch thread (see benchmarks.common.pick_clock)."""
    from benchmarks.common import pick_clock

    clock = pick_clock(device)[1]
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved_medians(steps: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each no-argument callable in ``steps``, run A B A B ... for warmup + repeats rounds."""
    times = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            seconds = timed(step, device)
            if round_index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def saved_activation_bytes(encoder: AudioEncoder, features: torch.Tensor, mask: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one training-mode forward, each storage once, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # a Linear saves its weight too; that is not activation memory
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor  # the graph holds it, so no storage address is reused while we count

    encoder.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden, _ = encoder(features, mask)
    del hidden
    return sum(saved.values())


def cuda_peak_bytes(encoder: AudioEncoder, features: torch.Tensor, mask: torch.Tensor) -> int:
    """Peak CUDA memory of one forward+backward above what was allocated before it (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_step(encoder, features, mask, backward=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def forward_flops(config: Qwen2AudioEncoderConfig, features: torch.Tensor, mask: torch.Tensor) -> int:
    """Forward FLOPs of the encoder on (C, 128, T) features, counted on an eager-attention CPU copy.

    FlopCounterMode has formulas for matmuls, convolutions and the CUDA sdpa kernels but not for CPU sdpa, so
    eager attention (explicit matmuls) is what makes the count include attention. Weights are random: the count
    depends on shapes only (masked positions are computed, then ignored, so they cost the same).
    """
    eager = copy.deepcopy(config)
    eager._attn_implementation = "eager"
    encoder = AudioEncoder(eager).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(features.cpu(), mask.cpu())
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- one clip


def bench_clip(args, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Padded vs unpadded for one clip on one encoder config: times, memory, FLOPs and padded/unpadded ratios."""
    config = encoder_config(name, args.layers_real)
    torch.manual_seed(0)
    encoder = AudioEncoder(config).to(device=device, dtype=dtype)
    variants = {
        key: (features.to(device=device, dtype=dtype), mask.to(device))
        for key, (features, mask) in clip_variants(args.seconds).items()
    }
    result = {key: {"mel_frames": int(features.shape[-1])} for key, (features, _) in variants.items()}
    for label, backward in (("fwd_bwd_s", True), ("fwd_s", False)):
        steps = {key: (lambda f=f, m=m: run_step(encoder, f, m, backward)) for key, (f, m) in variants.items()}
        for key, seconds in interleaved_medians(steps, args.repeats, args.warmup, device).items():
            result[key][label] = seconds
    for key, (features, mask) in variants.items():
        result[key]["activation_mb"] = saved_activation_bytes(encoder, features, mask) / MB
        result[key]["forward_gflop"] = forward_flops(config, features, mask) / 1e9
        if device.type == "cuda":
            result[key]["peak_mb"] = cuda_peak_bytes(encoder, features, mask) / MB
    metrics = [m for m in result["padded"] if m != "mel_frames"]
    result["ratio"] = {m: result["padded"][m] / result["unpadded"][m] for m in metrics}
    return result


# ---------------------------------------------------------------------------------------------- a distribution


def analytic_forward_flops(config: Qwen2AudioEncoderConfig, frames: int) -> int:
    """Forward FLOPs (2 per multiply-add) of the encoder on one chunk of ``frames`` mel frames.

    conv1 (mels -> d, k=3) over T frames, conv2 (d -> d, k=3, stride 2) to T' = (T - 1) // 2 + 1 positions, then
    per layer the q, k, v, out projections (4 d^2), the FFN (2 d ffn) and attention's QK^T and AV (2 T' d each).
    Masked positions are computed like real ones, so padding costs its full share.
    """
    d, ffn, mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    positions = (frames - 1) // 2 + 1
    convs = 2 * frames * d * mels * 3 + 2 * positions * d * d * 3
    layer = 2 * positions * (4 * d * d + 2 * d * ffn) + 2 * 2 * positions * positions * d
    return convs + config.encoder_layers * layer


def clip_durations(kind: str, count: int, seed: int = 0) -> np.ndarray:
    """``count`` clip durations in seconds from the named gamma distribution, clipped to [0.5, 30] s."""
    shape, scale = DISTRIBUTIONS[kind]
    return np.random.default_rng(seed).gamma(shape, scale, count).clip(MIN_SECONDS, MAX_SECONDS)


def mel_batch(frames: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (B, 128, width) log-mel, zero past each clip's ``frames``, and its (B, width) frame mask."""
    width = min(width, MAX_FRAMES)
    mask = (torch.arange(width)[None, :] < torch.tensor(frames)[:, None]).long()
    features = torch.randn(len(frames), N_MELS, width, generator=torch.Generator().manual_seed(seed))
    return features * mask[:, None, :], mask


def clip_frames(durations: np.ndarray) -> list[int]:
    """Real mel frames of each clip."""
    return [mel_frame_count(int(round(d * SAMPLE_RATE))) for d in durations]


def distribution_batches(durations: np.ndarray, batch_size: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The clips batched four ways: padded to 30 s, padded to the batch's longest, length-grouped + longest, and
    packed (the padded-to-longest batches; the packed encoder reads only each clip's real frames)."""
    frames = clip_frames(durations)
    in_order = [frames[i : i + batch_size] for i in range(0, len(frames), batch_size)]
    by_length = sorted(frames)
    grouped = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    return {
        "padded-30s": [mel_batch(b, MAX_FRAMES, i) for i, b in enumerate(in_order)],
        # Our collator pads to the longest clip plus the 2 edge frames the convolutions read (audio.log_mel).
        "padded-longest": [mel_batch(b, max(b) + EDGE_FRAMES, i) for i, b in enumerate(in_order)],
        "length-grouped": [mel_batch(b, max(b) + EDGE_FRAMES, i) for i, b in enumerate(grouped)],
        "packed": [mel_batch(b, max(b) + EDGE_FRAMES, i) for i, b in enumerate(in_order)],
    }


def packed_mel_frames(mask: torch.Tensor) -> list[int]:
    """Mel frames the packed encoder's convolutions read per clip: 2 T' + 1 for T' conv frames (``_encode_packed``)."""
    conv = (mask.sum(-1) - 1) // 2 + 1
    return [min(2 * int(t) + 1, mask.shape[-1]) for t in conv]


def bench_distribution(args, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Forward+backward seconds per clip over ``--batches`` batches of ``--batch-size`` clips, per batching."""
    torch.manual_seed(0)
    config = encoder_config(name, args.layers_real)
    encoder = AudioEncoder(config).to(device=device, dtype=dtype)
    durations = clip_durations(args.clips, args.batches * args.batch_size)
    batches = {
        variant: [(f.to(device=device, dtype=dtype), m.to(device)) for f, m in items]
        for variant, items in distribution_batches(durations, args.batch_size).items()
    }

    def epoch(items, packed):
        encoder.packed = packed
        for features, mask in items:
            run_step(encoder, features, mask, backward=True)

    steps = {variant: (lambda items=items, p=variant == "packed": epoch(items, p)) for variant, items in batches.items()}
    medians = interleaved_medians(steps, args.repeats, args.warmup, device)
    real = sum(int(m.sum()) for _, m in batches["padded-30s"])
    result = {variant: measure_batching(encoder, config, items, variant == "packed",
                                        medians[variant] / len(durations), real)
              for variant, items in batches.items()}
    # The bound: every clip encoded alone at its own length (+2 edge frames), no batch padding at all.
    alone = sum(analytic_forward_flops(config, min(f + EDGE_FRAMES, MAX_FRAMES)) for f in clip_frames(durations))
    result["flop_ratio_padded-30s/no-padding"] = result["padded-30s"]["forward_gflop"] * 1e9 / alone
    for variant in ("padded-longest", "length-grouped", "packed"):
        result[f"ratio_padded-30s/{variant}"] = medians["padded-30s"] / medians[variant]
        result[f"flop_ratio_padded-30s/{variant}"] = (result["padded-30s"]["forward_gflop"]
                                                      / result[variant]["forward_gflop"])
    return result


def measure_batching(encoder: AudioEncoder, config, items: list, packed: bool, seconds_per_clip: float,
                     real: int) -> dict:
    """Frames computed, analytic forward FLOPs and the largest batch's activations of one batching of the clips."""
    encoder.packed = packed
    if packed:
        frames = [packed_mel_frames(m) for _, m in items]
        computed = sum(sum(f) for f in frames)
        flops = sum(analytic_forward_flops(config, n) for f in frames for n in f)
    else:
        computed = sum(m.numel() for _, m in items)
        flops = sum(f.shape[0] * analytic_forward_flops(config, f.shape[-1]) for f, _ in items)
    activations = max(saved_activation_bytes(encoder, f, m) for f, m in items)
    encoder.packed = False
    return {"fwd_bwd_s_per_clip": seconds_per_clip, "frames_computed_per_real": computed / real, "forward_gflop": flops / 1e9,
            "activation_mb_largest_batch": activations / MB}


# ---------------------------------------------------------------------------------------------- report


def print_clip_table(report: dict) -> None:
    clip = report["clip"]
    first = next(iter(clip["results"].values()))
    print(
        f"\n{clip['seconds']:g} s clip ({clip['real_frames']} real mel frames): stock padded to 30 s "
        f"({MAX_FRAMES} frames + mask) vs unpadded ({first['unpadded']['mel_frames']} frames); "
        f"{report['device']}, {report['dtype']}, {report['threads']} threads, median of {report['repeats']}"
    )
    columns = [("fwd_bwd_s", "fwd+bwd ms", 1e3), ("fwd_s", "fwd ms", 1e3), ("activation_mb", "act MB", 1)]
    columns += [("forward_gflop", "fwd GFLOP", 1), ("peak_mb", "peak MB", 1)]
    columns = [c for c in columns if c[0] in first["padded"]]
    print(f"{'encoder':<22}{'variant':<10}{'frames':>7}" + "".join(f"{title:>12}" for _, title, _ in columns))
    for config, result in clip["results"].items():
        for variant in ("padded", "unpadded"):
            row = result[variant]
            cells = "".join(f"{row[key] * scale:>12.2f}" for key, _, scale in columns)
            print(f"{config:<22}{variant:<10}{row['mel_frames']:>7}{cells}")
        ratios = "".join(f"{result['ratio'][key]:>11.2f}x" for key, _, _ in columns)
        print(f"{config:<22}{'ratio':<10}{'':>7}{ratios}")


def print_distribution_table(report: dict) -> None:
    dist = report["clips"]
    print(
        f"\n{dist['distribution']} clip lengths: {dist['n_clips']} clips, mean {dist['mean_s']:.1f} s, "
        f"max {dist['max_s']:.1f} s, batches of {dist['batch_size']}; fwd+bwd per clip, median of {report['repeats']}"
    )
    print(f"{'encoder':<22}{'batching':<16}{'ms/clip':>10}{'frames/real':>13}{'30s/this':>10}{'FLOP 30s/this':>15}"
          f"{'act MB':>9}")
    for config, result in dist["results"].items():
        base = result["padded-30s"]["fwd_bwd_s_per_clip"]
        for variant in ("padded-30s", "padded-longest", "length-grouped", "packed"):
            row = result[variant]
            speedup = base / row["fwd_bwd_s_per_clip"]
            flop_ratio = result["padded-30s"]["forward_gflop"] / row["forward_gflop"]
            print(
                f"{config:<22}{variant:<16}{row['fwd_bwd_s_per_clip'] * 1e3:>10.1f}"
                f"{row['frames_computed_per_real']:>13.2f}{speedup:>9.2f}x{flop_ratio:>14.2f}x"
                f"{row['activation_mb_largest_batch']:>9.1f}"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers-real", type=int, default=1, help="layers of the real-size encoder slice (of 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--configs", default="tiny,large", help="comma-separated: tiny, large")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length for the padded/unpadded comparison")
    parser.add_argument("--clips", choices=sorted(DISTRIBUTIONS), help="also run this clip-length distribution")
    parser.add_argument("--batches", type=int, default=2, help="batches in the distribution run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 30:
        parser.error("--seconds must be in (0, 30]: one chunk")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, write ``--json``; returns the report dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory": "activation_mb: autograd saved tensors after the forward, weights excluded"
        + ("; peak_mb: torch.cuda.max_memory_allocated over one fwd+bwd, above the weights" * (device.type == "cuda")),
        "clip": {
            "seconds": args.seconds,
            "real_frames": mel_frame_count(int(round(args.seconds * SAMPLE_RATE))),
            "results": {},
        },
    }
    for name in names:
        report["clip"]["results"][config_label(name, args.layers_real)] = bench_clip(args, name, device, dtype)
    print_clip_table(report)
    if args.clips:
        durations = clip_durations(args.clips, args.batches * args.batch_size)
        report["clips"] = {
            "distribution": args.clips,
            "n_clips": len(durations),
            "batch_size": args.batch_size,
            "mean_s": float(durations.mean()),
            "max_s": float(durations.max()),
            "results": {config_label(n, args.layers_real): bench_distribution(args, n, device, dtype) for n in names},
        }
        print_distribution_table(report)
    if args.json:
        import sys

        from benchmarks.common import machine

        shown = sys.argv[1:] if argv is None else argv
        report.update(benchmark="encoder", command=" ".join(["python -m benchmarks.encoder", *shown]),
                      machine=machine())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
