"""DPO step time and memory: a live reference model vs precomputed reference log-probs, padded vs packed batches.

    python -m benchmarks.dpo                 # tiny + mid-size model, 1-3 s clips, ~6 min on one core
    python -m benchmarks.dpo --sizes mid --clips librispeech --json benchmarks/results/dpo_librispeech.json
                                             # ~30 min on one core
    python -m benchmarks.dpo --quick         # smoke run: tiny model, 1 round

Both trainers are built exactly as ``stages/dpo.py`` builds them (full-LLM DPO, frozen encoder and projector) from
one model folder and one preference manifest; they differ only in ``precompute_ref_log_probs`` and ``packing``:
  live        a frozen copy of the starting model scores every batch (one more forward per step, one more copy
              of the weights in memory); the 2B chosen and rejected sequences padded to the longest
  packed      live, with ``packing: true`` and ``attn_implementation: sdpa_packed``: policy and reference run
              their LLM on the 2B sequences packed into one, TRL's loss reads the padded layout back
  precompute  TRL scores the whole dataset once with the starting model before training (timed here as the
              precompute pass) and the steps read the stored log-probs
Reported: the median seconds of one training step (policy forward + backward, plus the reference forward for
live; ``Trainer.training_step``), the step's peak memory of activations (common.peak_memory_bytes), the weights
held (MB: the live reference doubles them), the extra build time of the precompute trainer (its scoring pass over
the dataset, minus the reference copy the live trainer loads instead), and the DPO loss of the same batch at the
starting weights (must agree: log 2 for sigmoid).

Clips (``--clips``): ``demo`` 1-3 s, uniform, like the CPU demo's; ``librispeech`` and ``short`` draw lengths from
benchmarks/encoder.py's distributions (LibriSpeech-like: 2-25 s, mean ~12 s), as the batching and evaluation
benchmarks do. Padding grows with the spread of lengths, so packing gains more on the second.

Models: tiny (``audiollm.tiny`` test size) and mid (benchmarks/train_step.py's: LLM width 512 x 4 layers, Qwen's
151,936-token vocabulary), random weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.build import save_model_folder
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.tiny import CORPUS_WORDS, tiny_tokenizer
from benchmarks.encoder import clip_durations
from benchmarks.common import MB, interleaved_medians, peak_memory_bytes, pick_clock, print_table, write_result
from benchmarks.train_step import model_config
from stages.dpo import AudioDPOTrainer, load_reference, make_preference_collator, parse_recipe

VARIANTS = ("live", "packed", "precompute")
MAX_LENGTH = 1024  # tokens per sequence: a 30 s clip is 750 audio tokens; the demo's rows take ~60-120
CLIPS = ("demo", "librispeech", "short")


def clip_seconds(clips: str, pairs: int, seed: int) -> np.ndarray:
    """Each row's clip length: uniform 1-3 s (``demo``) or one of benchmarks/encoder.py's distributions."""
    if clips == "demo":
        return np.random.default_rng(seed + 1).uniform(1.0, 3.0, pairs)
    return clip_durations(clips, pairs, seed)


def write_data(folder: Path, pairs: int, clips: str = "demo", seed: int = 0) -> Path:
    """``pairs`` preference rows with noise clips (lengths from ``clips``) and answers of 3-20 words; returns the
    manifest."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, seconds in enumerate(clip_seconds(clips, pairs, seed)):
        wav = 0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))
        sf.write(folder / f"clip{i}.wav", wav.astype(np.float32), SAMPLE_RATE)
        chosen, rejected = (" ".join(rng.choice(CORPUS_WORDS, size=int(rng.integers(3, 20)))) for _ in range(2))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<audio>What does the speaker say?"}],
                                 "audios": [f"clip{i}.wav"], "chosen": chosen, "rejected": rejected}))
    manifest = folder / "prefs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def build_trainer(model_dir: Path, manifest: Path, out: Path, batch_size: int, variant: str):
    """(trainer, seconds to build it): as stages.dpo.main builds it; the precompute pass runs inside."""
    recipe = dict(model_name_or_path=model_dir, train_files=manifest, output_dir=out, bf16="false", use_cpu="true",
                  report_to="none", max_length=MAX_LENGTH, per_device_train_batch_size=batch_size,
                  precompute_ref_batch_size=batch_size, train_llm="true", train_projector="false",
                  disable_tqdm="true", activation_checkpointing="false", save_strategy="no", seed=0,
                  precompute_ref_log_probs=str(variant == "precompute").lower())
    if variant == "packed":
        recipe |= dict(packing="true", attn_implementation="sdpa_packed")
    start = time.perf_counter()
    model_args, data_args, args = parse_recipe([t for k, v in recipe.items() for t in (f"--{k}", str(v))])
    from audiollm.training import load_datasets, load_model

    model, tokenizer = load_model(model_args)
    reference = load_reference(model_args, args, model)
    train, _ = load_datasets(data_args, args)
    collator = make_preference_collator(tokenizer, model, data_args)
    trainer = AudioDPOTrainer(model, reference, args, collator, train, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; training_step divides by it
    return trainer, time.perf_counter() - start


def weights_mb(trainer) -> float:
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / MB


def bench_size(args, size: str, work: Path) -> dict:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = AudioLLMForConditionalGeneration._from_config(model_config(size, tokenizer), attn_implementation="sdpa")
    save_model_folder(model, tokenizer, work / size)
    manifest = write_data(work, args.pairs, args.clips)
    trainers, build_s = {}, {}
    for variant in VARIANTS:
        trainers[variant], build_s[variant] = build_trainer(work / size, manifest, work / f"out-{variant}",
                                                            args.batch_size, variant)
    batches = {v: [t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(s, s + args.batch_size)]))
                   for s in range(0, args.pairs, args.batch_size)] for v, t in trainers.items()}
    losses = {}
    for variant, trainer in trainers.items():
        with torch.no_grad():
            losses[variant] = float(trainer.compute_loss(trainer.model, batches[variant][0]))
        trainer.model.train()

    def epoch(variant):
        trainer = trainers[variant]
        for batch in batches[variant]:
            trainer.training_step(trainer.model, batch)
            trainer.model.zero_grad(set_to_none=True)

    clock_name, clock = pick_clock()
    medians = interleaved_medians({v: (lambda v=v: epoch(v)) for v in VARIANTS}, args.repeats, args.warmup,
                                  clock=clock)
    steps = len(batches["live"])
    results = {v: {"step_s": medians[v] / steps, "peak_mb": peak_memory_bytes(lambda v=v: epoch(v)) / MB,
                   "weights_mb": weights_mb(trainers[v]), "build_s": build_s[v], "loss": losses[v]}
               for v in VARIANTS}
    results["precompute"]["extra_build_s"] = build_s["precompute"] - build_s["live"]
    for variant in ("packed", "precompute"):
        results[variant]["speedup_vs_live"] = results["live"]["step_s"] / results[variant]["step_s"]
    padded = [b["attention_mask"] for b in batches["live"]]  # (2B, S) each: positions run vs real tokens
    results["live"]["positions_per_real"] = sum(m.numel() for m in padded) / sum(int(m.sum()) for m in padded)
    return {"clock": clock_name, "pairs": args.pairs, "batch_pairs": args.batch_size, "clips": args.clips,
            "clip_seconds_mean": float(clip_seconds(args.clips, args.pairs, 0).mean()),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--pairs", type=int, default=8, help="preference rows per epoch")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--clips", default="demo", choices=CLIPS, help="clip lengths (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU-time clock)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 4 pairs, 1 round")
    parser.add_argument("--json", help="output file (default benchmarks/results/dpo.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.pairs, args.batch_size, args.repeats, args.warmup = "tiny", 4, 2, 1, 0
    return args


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"setup": {"pairs": args.pairs, "batch_pairs": args.batch_size, "repeats": args.repeats,
                        "threads": args.threads}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        for size in args.sizes.split(","):
            result = report["sizes"][size] = bench_size(args, size, Path(tmp))
            print_table(
                f"DPO {size}: {result['parameters_m']:.1f} M parameters, {args.pairs} pairs ({args.clips} clips), "
                f"{args.batch_size} "
                f"pairs per step, median of {args.repeats} ({result['clock']} time)",
                ["variant", "step s", "vs live", "peak MB", "weights MB", "extra build s", "loss at start"],
                [[v, r["step_s"], r.get("speedup_vs_live", 1.0), r["peak_mb"], r["weights_mb"],
                  r.get("extra_build_s", "-"), f"{r['loss']:.6f}"] for v, r in result["results"].items()])
    write_result("dpo", report, argv, Path(args.json) if args.json else None)
    return report


if __name__ == "__main__":
    main()
