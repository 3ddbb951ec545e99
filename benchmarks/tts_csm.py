"""Flat `rvq` vs `csm` on one codec, one data set and one time budget: held-out round-trip WER, training speed
and peak memory, streaming time to first audio and real-time factor.

    python -m benchmarks.tts_csm --voice runs/demo/voice --listener runs/demo/export --work /tmp/tts_csm \\
        [--budget-s 300] [--texts 60] [--validation-texts 30]

Both architectures train from the demo's recipes (stages/configs/tts_demo.yaml, tts_csm_demo.yaml) through the
stage's own trainer builders, on the demo voice's training rows, with all 4 residual levels of the demo codec
(``interleave: none`` for the flat one, so both get the same inputs: text, then codes). Each gets the same wall
budget: a 12-step pilot measures its seconds per step (median after warm-up), and ``max_steps`` is set so the
cosine schedule ends at the budget. Sampling temperature is chosen per architecture on the validation split's
texts (lowest round-trip WER); the held-out split's texts are spoken once with it and transcribed by the demo's
listener (its export). WER counts each spoken word, as the demo does (``norm=words``).

Training speed: audio frames (32 ms each) per second of training. Peak memory: bytes of tensors alive at once in
one forward + backward on the first training batch (``common.peak_memory_bytes``). Streaming: ``speak_stream``
with the codec's measured context, first chunk time and wall time / audio time, median over the texts.
One torch thread, as the tests run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.common import peak_memory_bytes, print_table, write_result

RECIPES = {"flat": "stages/configs/tts_demo.yaml", "csm": "stages/configs/tts_csm_demo.yaml"}
# Variant -> (architecture, recipe overrides). The csm variants differ in CSM's amortization (the recipe: 1/16 of the
# frames train the depth decoder; all of them here); validation WER picks the one reported as csm.
VARIANTS = {"flat": ("flat", ["--layout", "rvq", "--interleave", "none"]),
            "csm": ("csm", []),
            "csm_depth_all_frames": ("csm", ["--depth_frame_fraction", "1.0"])}
PILOT_STEPS = 12
TEMPERATURES = (0.5, 0.9)  # candidates chosen on validation; top-k 50 as the rvq default (CSM's)
STREAM_TEXTS = 10


def recipe_argv(variant: str, voice: Path, work: Path, max_steps: int, seed: int, cache: Path) -> list[str]:
    data = voice / "data"
    arch, extra = VARIANTS[variant]
    return ["--config", RECIPES[arch], *extra, "--model_name_or_path", str(voice / "init" / "lm"),
            "--codec_name_or_path", str(voice / "codec"), "--codec_codebooks", "4",
            "--train_files", str(data / "voice_tts_train.jsonl"),
            "--eval_files", str(data / "voice_validation.jsonl"), "--eval_strategy", "no",
            "--output_dir", str(work / variant), "--cache_dir", str(cache), "--max_steps", str(max_steps),
            "--logging_steps", "25", "--use_cpu", "true", "--seed", str(seed), "--disable_tqdm", "true"]


def build(arch: str, argv: list[str]):
    """(trainer, tokenizer, vocab) as ``stages/tts.py`` builds them from ``argv``."""
    from transformers import TrainingArguments
    from trl import TrlParser

    from audiollm.training import check_training_args
    from audiollm.tts.csm_training import CsmArguments
    from audiollm.tts.training import TTSDataArguments, TTSModelArguments
    from stages.tts import csm_trainer, flat_trainer

    model_args, data_args, csm_args, args = TrlParser(
        (TTSModelArguments, TTSDataArguments, CsmArguments, TrainingArguments)).parse_args_and_config(argv)
    check_training_args(args)
    if arch == "csm":
        return csm_trainer(model_args, data_args, csm_args, args)
    return flat_trainer(model_args, data_args, args)


def mean_frames(trainer, arch: str, per_frame: int) -> float:
    """Mean audio frames per training row."""
    data = trainer.train_dataset
    if arch == "csm":
        audio = trainer.model.config.audio_token_id
        return statistics.fmean(int((r["input_ids"] == audio).sum()) for r in data.rows)
    lengths = data.index[:, 1] - data.index[:, 2] - 2  # speech tokens: length - label_start - SPEECH_START/END
    return float(lengths.mean()) / per_frame


def step_memory(trainer) -> int:
    """Peak tensor bytes of one forward + backward on the first training batch."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model

    def step():
        trainer.compute_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    return peak_memory_bytes(step)


class StepClock(TrainerCallback):
    """Wall seconds between the ends of consecutive training steps."""

    def __init__(self):
        self.last, self.intervals = None, []

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


def train(variant: str, voice: Path, work: Path, budget_s: float, seed: int, cache: Path) -> tuple[dict, Path]:
    """Pilot, then a budgeted run; returns its training figures and the saved folder."""
    from audiollm.tts.training import save_tts

    arch = VARIANTS[variant][0]
    pilot, _, _ = build(arch, recipe_argv(variant, voice, work / "pilot", PILOT_STEPS, seed, cache))
    clock = StepClock()
    pilot.add_callback(clock)
    pilot.train()
    per_step = statistics.median(clock.intervals[2:])  # after warm-up; the median shrugs off a burst of load
    steps = max(PILOT_STEPS, int(budget_s / per_step))
    trainer, tokenizer, vocab = build(arch, recipe_argv(variant, voice, work, steps, seed, cache))
    memory = step_memory(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    save_tts(trainer, tokenizer, vocab)
    rows = steps * trainer.args.per_device_train_batch_size
    frames = rows * mean_frames(trainer, arch, vocab.token_layout.per_frame)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": steps, "train_s": seconds, "frames_per_s": frames / seconds, "rows_per_s": rows / seconds,
            "peak_step_memory_mb": memory / 2**20, "final_loss": losses[-1] if losses else None,
            "parameters_m": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6}, \
        Path(trainer.args.output_dir)


def texts_of(manifest: Path, count: int) -> list[str]:
    from audiollm.tts.voice_eval import read_rows

    return list(dict.fromkeys(r["text"] for r in read_rows(manifest)))[:count]


def streamed(tts, texts: list[str], sampling) -> dict:
    """Median time to first audio and real-time factor of ``speak_stream``."""
    from audiollm.tts.codecs import stream_context
    from audiollm.tts.generate import speak_stream, timed_stream

    context = stream_context(tts.codec)
    timings = [timed_stream(speak_stream(tts, t, sampling=sampling, context=context), tts.codec.sample_rate)[1]
               for t in texts]
    return {"stream_first_audio_s": statistics.median(t.first_audio_s for t in timings),
            "stream_rtf": statistics.median(t.rtf for t in timings),
            "stream_audio_s": statistics.median(t.audio_s for t in timings), "stream_texts": len(timings)}


def measure(folder: Path, listener, voice: Path, texts: int, validation_texts: int, seed: int) -> dict:
    """Temperature chosen on validation; held-out WER, RTF and streaming figures with it."""
    from audiollm.tts.generate import load_tts
    from audiollm.tts.sampling import default_sampling
    from audiollm.tts.voice_eval import NORMALIZER  # each spoken word one unit of WER, as the demo counts
    from eval.tts_eval import tts_intelligibility

    tts = load_tts(folder)
    data = voice / "data"
    val_texts = texts_of(data / "voice_validation.jsonl", validation_texts)
    choice = {}
    for temperature in TEMPERATURES:
        sampling = default_sampling(tts.vocab.layout, temperature=temperature)
        choice[temperature] = tts_intelligibility(tts, val_texts, listener, seed=seed, sampling=sampling,
                                                  first_audio_texts=0, normalizer=NORMALIZER)["tts_wer"]["value"]
    best = min(choice, key=choice.get)
    sampling = default_sampling(tts.vocab.layout, temperature=best, seed=seed)
    held = tts_intelligibility(tts, texts_of(data / "voice_heldout.jsonl", texts), listener, seed=seed,
                               sampling=sampling, first_audio_texts=0, normalizer=NORMALIZER)
    return {"validation_wer_by_temperature": {str(k): v for k, v in choice.items()}, "temperature": best,
            "heldout_wer": held["tts_wer"]["value"], "heldout_wer_ci95": held["tts_wer"]["ci95"],
            "heldout_texts": held["texts"], "rtf": held["real_time_factor"],
            **streamed(tts, texts_of(data / "voice_heldout.jsonl", STREAM_TEXTS), sampling)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voice", type=Path, default=Path("runs/demo/voice"))
    parser.add_argument("--listener", type=Path, default=Path("runs/demo/export"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench/tts_csm"))
    parser.add_argument("--cache", type=Path, help="codec codes cache (default WORK/cache)")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--texts", type=int, default=60)
    parser.add_argument("--validation-texts", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="results file (default benchmarks/results/tts_csm.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from eval.speech import load_transcriber

    listener = load_transcriber(str(args.listener), batch_size=16)
    results = {}
    for variant in args.variants:
        cache = args.cache or args.work / "cache"
        figures, folder = train(variant, args.voice, args.work, args.budget_s, args.seed, cache)
        results[variant] = figures | measure(folder, listener, args.voice, args.texts, args.validation_texts,
                                             args.seed)
        print(results[variant], flush=True)
    csm = [v for v in results if VARIANTS[v][0] == "csm"]
    chosen = min(csm, key=lambda v: min(results[v]["validation_wer_by_temperature"].values())) if csm else None
    columns = ["variant", "steps", "frames/s", "peak MB", "val WER by T", "T", "held-out WER", "TTFA s", "stream RTF"]
    print_table("flat rvq vs csm", columns, [[a, r["steps"], r["frames_per_s"], r["peak_step_memory_mb"],
                                             r["validation_wer_by_temperature"], r["temperature"], r["heldout_wer"],
                                             r["stream_first_audio_s"], r["stream_rtf"]] for a, r in results.items()])
    report = {"budget_s": args.budget_s, "chosen_csm": chosen, "results": results}
    write_result("tts_csm", report, sys.argv[1:] if argv is None else argv, args.json)
    return results


if __name__ == "__main__":
    main()
