"""Log-mel feature throughput (clips/s): our batched torch path vs the stock padded-to-30-s extractors.

    python -m benchmarks.features            # 32 LibriSpeech-like clips, ~1 min on one core
    python -m benchmarks.features --quick    # smoke run

Variants, all on the same 16 kHz clips, 128 mel bins (Whisper-large-v3), one process, interleaved rounds:
  ours          ``audiollm.audio.featurize``: batches of ``--batch-size`` clips, one torch STFT per batch, each
                batch padded only to its longest clip (+2 frames)
  transformers  ``WhisperFeatureExtractor(feature_size=128)`` (numpy), the same batches, padded to 30 s
  openai        openai-whisper: ``log_mel_spectrogram(pad_or_trim(clip), n_mels=128)`` per clip (torch), 30 s each
All three give the same values on a clip's frames (tests/test_audio.py); the stock ones compute 3000 frames per
clip whatever its length. Timed with one torch thread, as in a data-loader worker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from audiollm.audio import N_MELS, SAMPLE_RATE, featurize
from benchmarks.common import interleaved_medians, pick_clock, print_table, write_result
from benchmarks.encoder import clip_durations


def make_clips(count: int, distribution: str, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)
            for s in clip_durations(distribution, count, seed)]


def extractors(clips: list[np.ndarray], batch_size: int) -> dict:
    """No-argument callables, one per variant, each featurizing every clip once."""
    import whisper
    from transformers import WhisperFeatureExtractor

    hf = WhisperFeatureExtractor(feature_size=N_MELS)
    batches = [clips[i : i + batch_size] for i in range(0, len(clips), batch_size)]
    tensors = [torch.from_numpy(c) for c in clips]

    def ours():
        for batch in batches:
            featurize(batch)

    def transformers_padded():
        for batch in batches:
            hf(batch, sampling_rate=SAMPLE_RATE, return_tensors="np")

    def openai_padded():
        for clip in tensors:
            whisper.log_mel_spectrogram(whisper.pad_or_trim(clip), n_mels=N_MELS)

    return {"ours": ours, "transformers": transformers_padded, "openai": openai_padded}


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--distribution", default="librispeech", choices=["librispeech", "short"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 clips, 1 round")
    parser.add_argument("--json", help="output file (default benchmarks/results/features.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.batch_size, args.repeats, args.warmup, args.distribution = 4, 2, 1, 0, "short"
    torch.set_num_threads(1)
    clips = make_clips(args.clips, args.distribution)
    clock_name, clock = pick_clock()
    medians = interleaved_medians(extractors(clips, args.batch_size), args.repeats, args.warmup, clock=clock)
    results = {name: {"seconds": s, "clips_per_s": len(clips) / s, "x_transformers": medians["transformers"] / s}
               for name, s in medians.items()}
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    print_table(f"log-mel, {len(clips)} {args.distribution} clips ({seconds / len(clips):.1f} s mean), batches of "
                f"{args.batch_size}, 1 thread, median of {args.repeats} ({clock_name} time)",
                ["extractor", "clips/s", "x transformers"],
                [[name, r["clips_per_s"], r["x_transformers"]] for name, r in results.items()])
    report = {"setup": {"clips": len(clips), "distribution": args.distribution, "mean_s": seconds / len(clips),
                        "batch_size": args.batch_size, "repeats": args.repeats, "clock": clock_name},
              "results": results}
    write_result("features", report, argv, Path(args.json) if args.json else None)
    return report


if __name__ == "__main__":
    main()
