"""Token-budget batches vs fixed-size batches with transformers' group_by_length: SFT tokens/s and peak memory.

    python -m benchmarks.batching            # large-v3 x2 encoder layers + 175 M LLM, 24 LibriSpeech-like rows
    python -m benchmarks.batching --quick    # smoke run: tiny model, 12 short rows, 1 round

Variants (same rows, same model, one process, interleaved rounds; a round is one epoch over the rows):
  fixed+grouped  ``per_device_train_batch_size: B`` with ``train_sampling_strategy: group_by_length``
                 (transformers' ``get_length_grouped_indices``; the epoch is smaller than its 50-batch blocks, so it
                 is sorted whole: the best case for it)
  token-budget   ``batch_tokens: B x (longest row)``: the budget the fixed batch of the longest rows needs anyway,
                 so the long batches are the same size and the short ones take more rows (audiollm/batching.py)
Both use the recipe's other switches as sft.yaml recommends them: features padded to the batch's longest clip,
frozen encoder, projector + LLM trained, the memory-lean loss (1,024 tokens a chunk).

Reported: real LLM tokens per second of forward + backward (gradients accumulate over the epoch, as with gradient
accumulation; the optimizer step, once per accumulated batch, is the same work in both), steps per epoch, LLM
positions per real token, peak memory of the epoch (common.peak_memory_bytes), and the per-token loss of the
epoch at the starting weights, which must agree (same rows, same tokens).

Model: Whisper-large-v3's encoder shape (d_model 1280, 20 heads, ffn 5120) with ``--encoder-layers`` layers, and
benchmarks/train_step.py's mid LLM (width 512 x 4 layers, Qwen's 151,936-token vocab: 175 M parameters).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from audiollm.audio import SAMPLE_RATE
from audiollm.batching import TokenBudgetBatchSampler
from audiollm.collator import ChatCollator
from audiollm.data import estimated_tokens
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model.trainable import set_trainable
from audiollm.tiny import tiny_tokenizer
from benchmarks.common import MB, interleaved_medians, peak_memory_bytes, pick_clock, print_table, write_result
from benchmarks.encoder import WHISPER_LARGE_V3
from benchmarks.train_step import epoch_loss, make_rows, model_config

VARIANTS = ("fixed+grouped", "token-budget")
LEAN_CHUNK_TOKENS = 1024


def build_model(size: str, encoder_layers: int, tokenizer) -> AudioLLMForConditionalGeneration:
    """tiny: the test model; real: large-v3's encoder shape with ``encoder_layers`` layers + the mid LLM."""
    config = model_config("tiny" if size == "tiny" else "mid", tokenizer)
    if size == "real":
        for key, value in dict(WHISPER_LARGE_V3, encoder_layers=encoder_layers).items():
            setattr(config.audio_config, key, value)
    torch.manual_seed(0)
    model = AudioLLMForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.loss_chunk_tokens = LEAN_CHUNK_TOKENS
    set_trainable(model, encoder=False, projector=True, llm=True)
    return model.train()


def row_lengths(rows: list[dict]) -> list[int]:
    """What ``audiollm.data.add_lengths`` estimates for a row: text / 4 + 25 audio tokens a second."""
    return [estimated_tokens([m["content"] for m in row["messages"]], len(row["audios"][0]) / SAMPLE_RATE, 1)
            for row in rows]


def variant_orders(rows: list[dict], batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    """Each variant's batches of row indices for one epoch."""
    lengths = row_lengths(rows)
    generator = torch.Generator().manual_seed(seed)
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=max(1, len(rows) // batch_size),
                                       generator=generator)
    fixed = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    budget = batch_size * max(lengths)
    sampler = TokenBudgetBatchSampler(lengths, budget, buckets=8, seed=seed)
    return {"fixed+grouped": fixed, "token-budget": list(sampler)}


def run_epoch(model, batches: list[dict]) -> None:
    """Forward and backward of every batch, gradients accumulating; cleared at the end."""
    for batch in batches:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def bench(args) -> dict:
    tokenizer = tiny_tokenizer()
    collator = ChatCollator(tokenizer, max_length=args.max_length)
    rows = make_rows(args.rows, args.clips, args.seed)
    orders = variant_orders(rows, args.batch_size, args.seed)
    batches = {v: [collator([rows[i] for i in index]) for index in orders[v]] for v in VARIANTS}
    for epoch in batches.values():
        for batch in epoch:
            batch.pop("row_ids", None)
    model = build_model(args.size, args.encoder_layers, tokenizer)
    loss_model = copy.deepcopy(model).eval()
    clock_name, clock = pick_clock()
    medians = interleaved_medians({v: (lambda v=v: run_epoch(model, batches[v])) for v in VARIANTS},
                                  args.repeats, args.warmup, clock=clock)
    results = {}
    for variant in VARIANTS:
        masks = [b["attention_mask"] for b in batches[variant]]
        real = sum(int(m.sum()) for m in masks)
        results[variant] = {
            "steps": len(masks), "rows_per_step": len(rows) / len(masks), "real_tokens": real,
            "positions_per_real": sum(m.numel() for m in masks) / real, "epoch_s": medians[variant],
            "tokens_per_s": real / medians[variant],
            "peak_mb": peak_memory_bytes(lambda v=variant: run_epoch(model, batches[v])) / MB,
            "loss": epoch_loss(loss_model, batches[variant]),
        }
    base = results["fixed+grouped"]
    for row in results.values():
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
    lengths = row_lengths(rows)
    return {"clock": clock_name, "rows": len(rows), "clips": args.clips, "batch_size": args.batch_size,
            "budget_tokens": args.batch_size * max(lengths), "mean_seconds": float(np.mean(
                [len(r["audios"][0]) / SAMPLE_RATE for r in rows])),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "encoder": "tiny" if args.size == "tiny" else f"large-v3 x{args.encoder_layers} layers",
            "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="real", choices=["real", "tiny"])
    parser.add_argument("--encoder-layers", type=int, default=2, help="large-v3 encoder layers (real size)")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--clips", default="librispeech", choices=["librispeech", "short"])
    parser.add_argument("--batch-size", type=int, default=4, help="the fixed variant's rows per batch")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU-time clock)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 12 short rows, 1 round")
    parser.add_argument("--json", help="output file (default benchmarks/results/batching.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rows, args.clips, args.batch_size, args.repeats, args.warmup = "tiny", 12, "short", 2, 1, 0
    return args


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(args)
    print_table(
        f"SFT batches, {result['encoder']} + LLM ({result['parameters_m']:.0f} M parameters), {result['rows']} "
        f"{args.clips} rows ({result['mean_seconds']:.1f} s mean), fixed {args.batch_size} rows vs "
        f"{result['budget_tokens']} tokens, median of {args.repeats} ({result['clock']} time)",
        ["variant", "tokens/s", "x fixed", "steps", "rows/step", "positions/real", "peak MB", "loss"],
        [[v, r["tokens_per_s"], r["speedup"], r["steps"], r["rows_per_step"], r["positions_per_real"], r["peak_mb"],
          f"{r['loss']:.6f}"] for v, r in result["results"].items()],
    )
    report = {"setup": {k: getattr(args, k) for k in ("size", "encoder_layers", "rows", "clips", "batch_size",
                                                       "repeats", "warmup", "threads")}, **result}
    write_result("batching", report, argv, Path(args.json) if args.json else None)
    return report


if __name__ == "__main__":
    main()
