"""Evaluation items/s: batches of similar prompt length (``audiollm eval``'s default) vs batches in file order.

    python -m benchmarks.eval_order            # mid-size model, 32 LibriSpeech-like clips, batches of 8
    python -m benchmarks.eval_order --quick    # smoke run: tiny model, 6 short clips, 1 round

Variants (the same items, model and greedy settings, one process, interleaved rounds; a round answers every item):
  file-order  batches of ``--batch-size`` items as the benchmark file lists them (``--file-order``)
  by-length   the items sorted by estimated prompt length, longest first, then batched; answers put back in item
              order (eval.generate.batch_order)
Reported: items per second of ``eval.generate.generate_answers`` (collation, audio features, the encoder,
prefill and ``--max-new-tokens`` greedy steps), the audio frames and prompt positions computed per real one, and
whether both orders give the same answers.

Model: benchmarks/train_step.py's mid size (encoder width 384 x 4 layers, LLM width 512 x 4 layers with Qwen's
151,936-token vocabulary) or the tiny test model, random weights: a random model rarely stops early, so every
item decodes ``--max-new-tokens`` tokens, as a long answer would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.collator import ChatCollator
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.tiny import tiny_tokenizer
from benchmarks.common import interleaved_medians, pick_clock, print_table, write_result
from benchmarks.encoder import clip_durations
from benchmarks.train_step import model_config
from eval.generate import NO_LENGTH_LIMIT, GenerationSettings, batch_order, generate_answers
from eval.items import Item
from eval.tasks import build_messages

VARIANTS = ("file-order", "by-length")


def make_items(count: int, clips: str, seed: int = 0) -> list[Item]:
    """ASR items with seeded noise clips of ``clips``-distributed lengths."""
    rng = np.random.default_rng(seed)
    return [Item(f"clip{i}", "asr", [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)],
                 reference="unused") for i, s in enumerate(clip_durations(clips, count, seed))]


def padding(items: list[Item], tokenizer, batch_size: int, by_length: bool) -> dict:
    """Prompt positions and mel frames computed per real one over an epoch of this variant's batches."""
    collator = ChatCollator(tokenizer, max_length=NO_LENGTH_LIMIT, generation=True)
    positions = real = frames = real_frames = 0
    for indices in batch_order(items, batch_size, by_length):
        batch = collator([{"id": items[i].id, "messages": build_messages(items[i]), "audios": items[i].audios}
                          for i in indices])
        positions, real = positions + batch["attention_mask"].numel(), real + int(batch["attention_mask"].sum())
        mask = batch["feature_attention_mask"]
        frames, real_frames = frames + mask.numel(), real_frames + int(mask.sum())
    return {"positions_per_real": positions / real, "frames_per_real": frames / real_frames}


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_order", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mid", choices=["mid", "tiny"])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--clips", default="librispeech", choices=["librispeech", "short"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 6 short clips, 1 round")
    parser.add_argument("--json", help="output file (default benchmarks/results/eval_order.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.items, args.clips, args.batch_size, args.repeats, args.warmup = "tiny", 6, "short", 2, 1, 0
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = AudioLLMForConditionalGeneration._from_config(model_config(args.size, tokenizer),
                                                          attn_implementation="sdpa").eval()
    items = make_items(args.items, args.clips)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    answers = {}

    def run(variant):
        answers[variant] = generate_answers(model, tokenizer, items, settings, args.batch_size, variant,
                                            by_length=variant == "by-length")

    clock_name, clock = pick_clock()
    medians = interleaved_medians({v: (lambda v=v: run(v)) for v in VARIANTS}, args.repeats, args.warmup,
                                  clock=clock)
    results = {v: {"seconds": medians[v], "items_per_s": len(items) / medians[v],
                   **padding(items, tokenizer, args.batch_size, v == "by-length")} for v in VARIANTS}
    for row in results.values():
        row["speedup"] = row["items_per_s"] / results["file-order"]["items_per_s"]
    same = answers["file-order"] == answers["by-length"]
    mean_s = float(np.mean([len(i.audios[0]) / SAMPLE_RATE for i in items]))
    print_table(f"eval, {args.size} model, {len(items)} {args.clips} clips ({mean_s:.1f} s mean), batches of "
                f"{args.batch_size}, {args.max_new_tokens} new tokens, median of {args.repeats} ({clock_name} time); "
                f"same answers: {same}",
                ["batches", "items/s", "x file order", "positions/real", "frames/real"],
                [[v, r["items_per_s"], r["speedup"], r["positions_per_real"], r["frames_per_real"]]
                 for v, r in results.items()])
    report = {"setup": {"size": args.size, "items": len(items), "clips": args.clips, "mean_s": mean_s,
                        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                        "repeats": args.repeats, "clock": clock_name,
                        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6},
              "same_answers": same, "results": results}
    write_result("eval_order", report, argv, Path(args.json) if args.json else None)
    return report


if __name__ == "__main__":
    main()
