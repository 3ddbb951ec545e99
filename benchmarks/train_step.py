"""SFT training-step throughput and peak memory: the stock way vs unpadded audio, length grouping, packing, lean loss.

    python -m benchmarks.train_step                      # tiny + mid-size models, ~10 min on 2 CPU cores
    python -m benchmarks.train_step --sizes tiny --rows 64
    python -m benchmarks.train_step --quick              # smoke run: tiny model, 8 rows, 1 round

Variants (same rows, same model, one process, interleaved rounds; each round is one epoch over the rows):
  stock            what a stock Qwen2-Audio pipeline does: every clip's features padded to 30 s (3000 frames + a
                   mask, as transformers' processor feeds the encoder), rows in random order, padded batches
  unpadded         our collator: features padded to the batch's longest clip only; random order
  grouped          unpadded + length-grouped batches (``train_sampling_strategy: group_by_length``; transformers'
                   ``get_length_grouped_indices`` on the rows' token counts)
  packed           unpadded + sequence packing (``packing: true``): each batch one padding-free sequence, attention
                   per packed row (``attn_implementation: sdpa_packed``, audiollm/packing.py), and the packed
                   encoder (``packed_encoder: true``): the clips' real frames only, attention per clip
  packed-dense     the same packed batches on plain sdpa: one block-diagonal mask over the whole sequence (LLM and
                   encoder), so attention costs (sum of lengths)^2 instead of sum(length^2)
  grouped+packed   both
  grouped+packed+lean  both + the memory-lean cross-entropy (``lean_loss_chunk_tokens: 1024``)

Reported per variant: tokens/s (real LLM tokens, audio placeholders included, per second of forward + backward +
AdamW step; collation is excluded, as a data-loader worker does it), LLM positions and encoder frames computed per
real one, the peak memory of one epoch (tensors alive at once above the weights and optimizer states: CUDA's
allocator counter, or on CPU the profiler's allocation events replayed), and the per-token loss of the epoch's
batches at the starting weights, which must agree across variants (same tokens, same logits).

Models (random weights; cost depends on shapes only). The encoder is frozen and the projector + LLM train, as in
``stages/configs/sft.yaml``:
  tiny  ``audiollm.tiny`` test size: encoder and LLM width 64, 2 layers, vocab 825
  mid   encoder width 384 x 4 layers (Whisper-base-like), LLM width 512 x 4 layers with Qwen's 151,936-token vocab:
        the vocabulary is what makes the loss's logits the largest activation
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.trainer_pt_utils import get_length_grouped_indices

from audiollm.audio import CHUNK_SAMPLES, MAX_FRAMES, SAMPLE_RATE, featurize, mel_frame_count
from audiollm.chat import AUDIO_TOKEN
from audiollm.collator import ChatCollator
from audiollm.model.config import AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model.trainable import set_trainable
from audiollm.packing import PACKED_SDPA, pack_batch
from audiollm.tiny import CORPUS_WORDS, tiny_audio_config, tiny_text_config, tiny_tokenizer
from benchmarks.common import MB, interleaved_medians, peak_memory_bytes, pick_clock, print_table, write_result
from benchmarks.encoder import clip_durations, packed_mel_frames

QWEN_VOCAB = 151_936  # Qwen2 / Qwen2.5 embedding rows
LEAN_CHUNK_TOKENS = 1024
LEARNING_RATE = 1e-5  # small: the weights barely move between interleaved variants, the cost does not depend on them
VARIANTS = ("stock", "unpadded", "grouped", "packed", "packed-dense", "grouped+packed", "grouped+packed+lean")
MID_VARIANTS = ("stock", "unpadded", "packed", "packed+lean")  # one batch per epoch: grouping cannot act
ANSWER_WORDS = (2, 40)  # answer length range in words: short labels to a sentence or two


def model_config(size: str, tokenizer) -> AudioLLMConfig:
    """The tiny test model, or the mid-size one described in the module docstring."""
    audio, text = tiny_audio_config(), tiny_text_config(len(tokenizer))
    if size == "mid":
        audio.update(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536)
        text.update(vocab_size=QWEN_VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    elif size != "tiny":
        raise ValueError(f"unknown size {size!r}: tiny or mid")
    return AudioLLMConfig(audio_config=audio, text_config=text,
                          audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))


def build_model(size: str, tokenizer) -> AudioLLMForConditionalGeneration:
    torch.manual_seed(0)
    model = AudioLLMForConditionalGeneration._from_config(model_config(size, tokenizer), attn_implementation="sdpa")
    set_trainable(model, encoder=False, projector=True, llm=True)
    return model.train()


def make_rows(count: int, clips: str, seed: int = 0) -> list[dict]:
    """Chat rows with one noise clip each (durations from ``clips``) and answers of 2-40 words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, seconds in enumerate(clip_durations(clips, count, seed)):
        wav = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
        words = rng.choice(CORPUS_WORDS, size=int(rng.integers(*ANSWER_WORDS)))
        rows.append({"id": f"row{i}", "audios": [wav], "messages": [
            {"role": "user", "content": "<audio>What does the speaker say?"},
            {"role": "assistant", "content": " ".join(words)}]})
    return rows


def stock_features(batch: dict, rows: list[dict]) -> dict:
    """The batch with every clip's features as the stock processor makes them: 30 s of audio, (C, 128, 3000)."""
    wavs = [torch.as_tensor(w) for row in rows for w in row["audios"]]
    padded = featurize([F.pad(w, (0, CHUNK_SAMPLES - w.numel())) for w in wavs])
    mask = torch.zeros(len(wavs), MAX_FRAMES, dtype=torch.long)
    for i, w in enumerate(wavs):
        mask[i, : mel_frame_count(w.numel())] = 1
    return dict(batch, input_features=padded.input_features, feature_attention_mask=mask)


def batch_order(rows: list[dict], lengths: list[int], batch_size: int, grouped: bool, seed: int) -> list[list[int]]:
    """Row indices per batch: a seeded random permutation (the Trainer's random sampler) or length-grouped.

    The Trainer's grouping sorts "mega-batches" of up to 50 batches by length; on a dataset of 200+ batches they
    are 50 batches wide. This epoch is smaller, so all of it is one mega-batch: what a large dataset gets.
    """
    generator = torch.Generator().manual_seed(seed)
    if grouped:
        mega = max(1, len(rows) // batch_size)
        order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=mega, generator=generator)
    else:
        order = torch.randperm(len(rows), generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def variant_batches(variant: str, rows, lengths, collator, batch_size: int, seed: int) -> list[dict]:
    """The epoch's collated batches for ``variant`` (collation happens here, outside the timed steps)."""
    batches = []
    for index in batch_order(rows, lengths, batch_size, "grouped" in variant, seed):
        chosen = [rows[i] for i in index]
        batch = collator(chosen)
        if variant == "stock":
            batch = stock_features(batch, chosen)
        if "packed" in variant:
            batch = pack_batch(batch, collator.tokenizer.pad_token_id)  # one sequence per batch
        batches.append(batch)
    return batches


def epoch_counts(batches: list[dict], packed: bool) -> dict:
    """Real LLM tokens, LLM positions and encoder mel frames computed vs real, over an epoch's batches."""
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)
    if packed:  # the packed encoder reads each clip's 2 T' + 1 frames (AudioEncoder._encode_packed)
        frames = sum(sum(packed_mel_frames(b["feature_attention_mask"])) for b in batches)
    else:
        frames = sum(b["feature_attention_mask"].numel() for b in batches)
    real_frames = sum(int(b["feature_attention_mask"].sum()) for b in batches)
    return {"real_tokens": real, "positions_per_real": positions / real, "frames_per_real": frames / real_frames}


def use_variant(model, variant: str) -> None:
    """The variant's model switches: the lean loss, the packed encoder, and per-row / per-clip attention for packed
    batches (but packed-dense)."""
    model.loss_chunk_tokens = LEAN_CHUNK_TOKENS if "lean" in variant else 0
    model.audio_tower.packed = "packed" in variant
    attention = PACKED_SDPA if "packed" in variant and "dense" not in variant else "sdpa"
    model.language_model.config._attn_implementation = attention
    model.audio_tower.config._attn_implementation = attention


def run_epoch(model, optimizer, batches: list[dict], variant: str) -> None:
    """Forward, backward and an AdamW step per batch."""
    use_variant(model, variant)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def epoch_loss(model, batches: list[dict]) -> float:
    """Per-token mean loss over all the epoch's labelled tokens, without updating the weights."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return total / count


def bench_size(args, size: str) -> dict:
    """All variants on one model size: tokens/s, overheads, peak memory, loss; ratios against ``stock``."""
    tokenizer = tiny_tokenizer()
    collator = ChatCollator(tokenizer, max_length=args.max_length)
    rows = make_rows(args.rows, args.clips)
    lengths = [len(collator.encode(row, i).input_ids) for i, row in enumerate(rows)]
    batches = {v: variant_batches(v, rows, lengths, collator, args.batch_size, args.seed) for v in args.variants}
    model = build_model(size, tokenizer)
    loss_model = copy.deepcopy(model).eval()  # the starting weights, for the loss check
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    steps = {v: (lambda v=v: run_epoch(model, optimizer, batches[v], v)) for v in args.variants}
    clock_name, clock = pick_clock()
    medians = interleaved_medians(steps, args.repeats, args.warmup, clock=clock)
    results = {}
    for variant in args.variants:
        counts = epoch_counts(batches[variant], "packed" in variant)
        use_variant(loss_model, variant)
        peak = peak_memory_bytes(lambda v=variant: run_epoch(model, optimizer, batches[v], v))
        results[variant] = dict(counts, epoch_s=medians[variant], tokens_per_s=counts["real_tokens"] / medians[variant],
                                peak_mb=peak / MB, loss=epoch_loss(loss_model, batches[variant]))
    base = results["stock"] if "stock" in results else None
    for row in results.values():
        if base:
            row["speedup_vs_stock"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["memory_vs_stock"] = row["peak_mb"] / base["peak_mb"]
    if "grouped" in results and "grouped+packed" in results:
        results["grouped+packed"]["speedup_vs_grouped"] = (results["grouped+packed"]["tokens_per_s"]
                                                          / results["grouped"]["tokens_per_s"])
    if "packed" in results and "unpadded" in results:
        packed, unpadded = results["packed"]["tokens_per_s"], results["unpadded"]["tokens_per_s"]
        results["packed"]["speedup_vs_unpadded"] = packed / unpadded
    return {"clock": clock_name, "rows": len(rows), "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "vocab": model.config.text_config.vocab_size, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--rows", type=int, default=32, help="rows per epoch")
    parser.add_argument("--mid-rows", type=int, default=8, help="rows per epoch for the mid-size model")
    parser.add_argument("--mid-clips", default="short", choices=["librispeech", "short"],
                        help="clip lengths for the mid-size model (its 152k-vocab head makes long rows slow on CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", default="librispeech", choices=["librispeech", "short"],
                        help="clip-length distribution (benchmarks/encoder.py)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (epochs) per variant; median reported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="tiny model's variants")
    parser.add_argument("--mid-variants", default=",".join(MID_VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; with 1 the timings are the process's CPU seconds (see common.py)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 8 rows, batch 4, 1 round")
    parser.add_argument("--json", help="output file (default benchmarks/results/train_step.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rows, args.batch_size, args.repeats, args.warmup, args.clips = "tiny", 8, 4, 1, 0, "short"
        args.mid_rows, args.mid_variants = 4, "unpadded,packed+lean"
    args.variants = [v for v in args.variants.split(",") if v]
    args.mid_variants = [v for v in args.mid_variants.split(",") if v]
    return args


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"setup": {"rows": args.rows, "mid_rows": args.mid_rows, "batch_size": args.batch_size,
                        "clips": args.clips, "repeats": args.repeats, "warmup": args.warmup,
                        "mid_clips": args.mid_clips, "lean_chunk_tokens": LEAN_CHUNK_TOKENS,
                        "threads": torch.get_num_threads()}, "sizes": {}}
    for size in args.sizes.split(","):
        size_args = copy.copy(args)
        if size == "mid":
            size_args.rows, size_args.clips, size_args.variants = args.mid_rows, args.mid_clips, args.mid_variants
        report["sizes"][size] = bench_size(size_args, size)
        result = report["sizes"][size]
        print_table(
            f"{size}: {result['parameters_m']:.1f} M parameters ({result['trainable_m']:.1f} M trainable), "
            f"vocab {result['vocab']}, {size_args.rows} rows ({size_args.clips} clips), batch {args.batch_size}, "
            f"median of {args.repeats} epochs ({result['clock']} time)",
            ["variant", "tokens/s", "x stock", "positions/real", "frames/real", "peak MB", "loss"],
            [[v, r["tokens_per_s"], r.get("speedup_vs_stock", math.nan), r["positions_per_real"],
              r["frames_per_real"], r["peak_mb"], f"{r['loss']:.6f}"] for v, r in result["results"].items()],
        )
    from pathlib import Path

    write_result("train_step", report, argv, Path(args.json) if args.json else None)
    return report


if __name__ == "__main__":
    main()
