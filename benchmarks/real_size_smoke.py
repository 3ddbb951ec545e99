"""A real-size smoke run of the SFT stage on one GPU: a random-init Whisper-large-v3 encoder and a Qwen2.5-1.5B-shaped
LLM, written as Hugging Face folders, joined by ``audiollm init`` and trained a few steps by ``stages/sft.py`` with
the shipped recipe (``stages/configs/sft.yaml``: bf16, activation checkpointing, length-grouped batches).

    python -m benchmarks.real_size_smoke --out /tmp/smoke        # one GPU, a few minutes; refuses to run on CPU
    python -m benchmarks.real_size_smoke --out /tmp/s --tiny     # the same path on tiny shapes, CPU, seconds

It checks what the tiny tests cannot: that the real shapes build, load, and train through the Trainer in bf16 on
a GPU without running out of memory, with a finite loss. Rows are noise clips of LibriSpeech-like lengths (mean
12 s) with short answers, so the loss says nothing about learning. Reported: the losses, seconds per step and
peak GPU memory (benchmarks/results/real_size_smoke.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.tiny import CORPUS_WORDS, tiny_text_config, tiny_tokenizer
from benchmarks.common import MB, machine, write_result
from benchmarks.encoder import WHISPER_LARGE_V3, clip_durations
from benchmarks.gpu_mfu import QWEN25_1P5B

RECIPE = Path(__file__).resolve().parents[1] / "stages" / "configs" / "sft.yaml"


def write_encoder(folder: Path, tiny: bool, device: str) -> None:
    """A random Whisper-large-v3 (32 encoder layers; one decoder layer, which ``audiollm init`` ignores)."""
    from transformers import WhisperConfig, WhisperModel

    dims = dict(num_mel_bins=128, d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                max_source_positions=1500, encoder_layers=2) if tiny else dict(WHISPER_LARGE_V3, encoder_layers=32)
    config = WhisperConfig(**dims, decoder_layers=1, decoder_attention_heads=dims["encoder_attention_heads"],
                           decoder_ffn_dim=dims["encoder_ffn_dim"], vocab_size=51866)
    with torch.device(device):
        WhisperModel(config).to(torch.bfloat16).save_pretrained(folder)


def write_llm(folder: Path, tiny: bool, device: str) -> None:
    """A random Qwen2.5-1.5B-shaped LLM with the project's small tokenizer (its ids lie inside the real vocab)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    shape = tiny_text_config(len(tokenizer)) if tiny else dict(QWEN25_1P5B, model_type="qwen2")
    with torch.device(device):
        Qwen2ForCausalLM(Qwen2Config(**shape)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_rows(folder: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` noise clips (LibriSpeech-like lengths) with 30-word answers, as an SFT manifest."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, seconds in enumerate(clip_durations("librispeech", rows, seed)):
        sf.write(folder / f"{i:03d}.wav", 0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE)), SAMPLE_RATE)
        lines.append({"messages": [{"role": "user", "content": "<audio>What does the speaker say?"},
                                   {"role": "assistant", "content": " ".join(rng.choice(CORPUS_WORDS, size=30))}],
                      "audios": [f"{i:03d}.wav"]})
    manifest = folder / "sft.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def timed(label: str, fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    import sys

    from audiollm.cli import main as audiollm
    from stages.sft import main as sft

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_size_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for the models, rows and run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="rows per device step (no accumulation)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, fp32 (the same code path)")
    parser.add_argument("--json", help="output file (default benchmarks/results/real_size_smoke[_tiny].json)")
    args = parser.parse_args(argv)
    if not (args.tiny or torch.cuda.is_available()):
        parser.error("no GPU: the real shapes need one; --tiny runs the same path on tiny shapes on CPU")
    device, out = "cpu" if args.tiny else "cuda", Path(args.out)
    for name in ("whisper", "qwen", "rows"):
        (out / name).mkdir(parents=True)
    seconds = {"write encoder": timed("write encoder", write_encoder, out / "whisper", args.tiny, device),
               "write llm": timed("write llm", write_llm, out / "qwen", args.tiny, device)}
    manifest = write_rows(out / "rows", args.batch * args.steps)
    seconds["audiollm init"] = timed("audiollm init", audiollm, ["init", "--encoder", str(out / "whisper"), "--llm",
                                                                 str(out / "qwen"), "--out", str(out / "model")])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds["train"] = timed("train", sft, [
        "--config", str(RECIPE), "--model_name_or_path", str(out / "model"), "--train_files", str(manifest),
        "--mix_weights", "1.0", "--output_dir", str(out / "run"), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch), "--gradient_accumulation_steps", "1",
        "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
        "--dataloader_num_workers", "0" if args.tiny else "4", *(["--bf16", "false"] if args.tiny else [])])
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    runtime = next(entry["train_runtime"] for entry in state["log_history"] if "train_runtime" in entry)
    result = {"device": machine().get("gpu", "cpu"), "shape": "tiny" if args.tiny else
              "whisper-large-v3 encoder + Qwen2.5-1.5B-shaped LLM", "steps": args.steps, "rows_per_step": args.batch,
              "losses": losses,
              "losses_finite": bool(np.isfinite(losses).all()) and len(losses) == args.steps,
              "train_runtime_s": runtime, "seconds_per_step": runtime / args.steps,
              "peak_memory_mb": torch.cuda.max_memory_allocated() / MB if device == "cuda" else None,
              "seconds": seconds,
              "recipe": "stages/configs/sft.yaml"}
    print(json.dumps(result, indent=1))
    default = Path(__file__).resolve().parent / "results" / f"real_size_smoke{'_tiny' if args.tiny else ''}.json"
    write_result("real_size_smoke", {"results": result}, argv, Path(args.json) if args.json else default)
    return result


if __name__ == "__main__":
    main()
