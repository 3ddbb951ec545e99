"""SFT step time and peak memory: one process vs DeepSpeed ZeRO-2 vs ZeRO-3 on 2 ranks, side by side, on CPU.

    python -m benchmarks.zero_compare                                  # tiny model, 3 rounds: ~3 min on 2 cores
    python -m benchmarks.zero_compare --repeats 5 --steps 20 --json runs/bench/zero_compare.json
    python -m benchmarks.zero_compare --llm-width 512 --llm-layers 8   # a ~40 M parameter LLM: memory shows

Every variant runs the real stage, ``stages/sft.py``'s ``main()`` with the shipped recipe (stages/configs/sft.yaml)
and CPU overrides, started as the tests start it: ``python`` for one process, ``deepspeed --num_gpus 2 ...
--deepspeed deepspeed_configs/zeroN.json --use_cpu true`` for two ranks on gloo. The only addition is a
Trainer callback that times steps and reads memory in each rank, which the stage's Trainer class gets by being
swapped for a subclass before ``main()`` runs. Global batch: 1 x 4 rows = 2 ranks x 2 rows per step.

Rounds interleave the variants (round r starts at variant r mod 3), so machine-load drift hits all three alike.
Reported per variant, medians over rounds:
  step ms      wall time of one optimizer step (forward, backward, all-reduce / reduce-scatter, optimizer) on
               rank 0, the median over steps after the first (the first also allocates and warms up)
  train RSS MB per rank, the largest resident set seen at the end of a step (``psutil``, sampled after every
               step): weights, gradients, optimizer states, plus the Python / torch / DeepSpeed runtime (~0.7 GB
               per process on its own). Max over ranks.
  peak RSS MB  per rank, the process's lifetime peak (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, Linux KB),
               read after the stage's final save: it also covers model loading and the save (ZeRO-3 gathers the
               full weights there). Max over ranks; "all ranks" sums them, the machine's total.
  startup s    launch to the end of training, minus the timed steps: imports, process-group setup, model
               load, DeepSpeed engine build.
On the default tiny model (~0.4 M parameters, 1.6 MB of fp32 weights) ZeRO's memory savings are kilobytes,
invisible under the runtime; there the table measures ZeRO's overhead. ``--llm-width`` scales the LLM up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("single", "zero2", "zero3")
RANKS = {"single": 1, "zero2": 2, "zero3": 2}
MICRO_BATCH = {1: 4, 2: 2}
WORKER_FLAG = "--worker-out"  # a rank process: run the stage and write its measurements to this folder
CPU_OVERRIDES = [
    "--bf16", "false", "--use_cpu", "true",  # CPU: fp32; --use_cpu starts the HF Trainer's gloo ranks
    "--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--learning_rate", "1e-4",
    "--train_sampling_strategy", "random", "--dataloader_num_workers", "0", "--logging_steps", "1",
    "--save_strategy", "no", "--report_to", "none", "--seed", "0",
]


# ------------------------------------------------------------------------------------------- inside a rank


def run_worker(out_dir: Path, stage_argv: list[str]) -> None:
    """Run stages/sft.py's main() with a step clock on its Trainer; write this rank's numbers to out_dir."""
    import psutil  # an accelerate dependency, so present wherever the Trainer is
    from transformers import Trainer, TrainerCallback

    import stages.sft as sft

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self.train_rss_mb = 0.0
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._start)
            rss_mb = psutil.Process().memory_info().rss / 2**20
            self.train_rss_mb = max(self.train_rss_mb, rss_mb)

    clock = StepClock()

    class ClockedTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(clock)

    sft.Trainer = ClockedTrainer
    sft.main(stage_argv)
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "step_s": clock.step_s, "train_rss_mb": clock.train_rss_mb,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, width: int | None, layers: int | None) -> int:
    """The tiny model (or its LLM widened/deepened); returns the parameter count."""
    from audiollm.build import build_tiny, save_model_folder
    from audiollm.chat import AUDIO_TOKEN
    from audiollm.model.config import AudioLLMConfig
    from audiollm.model.modeling import AudioLLMForConditionalGeneration
    from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer

    if width is None and layers is None:
        model = build_tiny(folder)
    else:
        import torch

        tokenizer = tiny_tokenizer()
        text = tiny_text_config(len(tokenizer))
        width = width or text["hidden_size"]
        heads = max(4, width // 64)
        text.update(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers or 2,
                    num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=width // heads)
        config = AudioLLMConfig(audio_config=tiny_audio_config(), text_config=text,
                                audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
        torch.manual_seed(0)
        model = AudioLLMForConditionalGeneration(config)
        save_model_folder(model, tokenizer, folder)
    return sum(p.numel() for p in model.parameters())


def make_data(folder: Path, rows: int) -> Path:
    """``rows`` chat rows, each with a 0.5-1 s tone and a short answer."""
    import numpy as np
    import soundfile as sf

    from audiollm.audio import SAMPLE_RATE

    words = "one two three four five six seven eight nine ten".split()
    lines = []
    for i in range(rows):
        seconds = 0.5 + 0.5 * (i % 5) / 4
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wav = 0.3 * np.sin(2 * np.pi * (150 + 30 * i) * t) + 0.01 * np.random.default_rng(i).standard_normal(t.size)
        sf.write(folder / f"clip{i}.wav", wav.astype(np.float32), SAMPLE_RATE)
        text = " ".join(words[i % 10:] + words[:i % 10])[: 20 + 3 * (i % 7)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<audio>What does the speaker say?"},
                                              {"role": "assistant", "content": text}], "audios": [f"clip{i}.wav"]}))
    manifest = folder / "sft.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_variant(variant: str, model: Path, manifest: Path, steps: int, work: Path, threads: int) -> dict:
    """One run of ``variant``; returns rank 0's step times, every rank's peak RSS and the wall time."""
    ranks = RANKS[variant]
    out = work / f"{variant}-{time.monotonic_ns()}"
    out.mkdir()
    stage_argv = ["--config", "stages/configs/sft.yaml", "--model_name_or_path", str(model),
                  "--train_files", str(manifest), "--output_dir", str(out / "model"), "--max_steps", str(steps),
                  "--per_device_train_batch_size", str(MICRO_BATCH[ranks]), *CPU_OVERRIDES]
    worker = ["-m", "benchmarks.zero_compare", WORKER_FLAG, str(out), "--"]
    if variant == "single":
        cmd = [sys.executable, *worker, *stage_argv]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
               *worker[1:], *stage_argv, "--deepspeed", f"deepspeed_configs/{variant}.json"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    if len(results) != ranks:
        raise RuntimeError(f"{variant}: {len(results)} of {ranks} ranks reported; stderr:\n{proc.stderr[-3000:]}")
    step_s = results[0]["step_s"]
    return {"step_ms": 1000 * statistics.median(step_s[1:]), "step_s": step_s,
            "train_rss_mb": [r["train_rss_mb"] for r in results], "peak_rss_mb": [r["peak_rss_mb"] for r in results],
            "startup_s": wall - sum(step_s), "wall_s": wall}


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    table = {}
    for variant, results in runs.items():
        table[variant] = {
            "ranks": RANKS[variant],
            "step_ms": statistics.median(r["step_ms"] for r in results),
            "step_ms_min_max": [min(r["step_ms"] for r in results), max(r["step_ms"] for r in results)],
            "train_rss_mb_per_rank": statistics.median(max(r["train_rss_mb"]) for r in results),
            "peak_rss_mb_per_rank": statistics.median(max(r["peak_rss_mb"]) for r in results),
            "peak_rss_mb_all_ranks": statistics.median(sum(r["peak_rss_mb"]) for r in results),
            "startup_s": statistics.median(r["startup_s"] for r in results),
            "runs": results,
        }
    return table


def print_table(table: dict[str, dict], header: str) -> None:
    print(header)
    print(f"{'variant':<8} {'ranks':>5} {'step ms':>9} {'(min-max)':>17} {'train RSS MB/rank':>18} "
          f"{'peak RSS MB/rank':>17} {'all ranks':>10} {'startup s':>10}")
    for variant, row in table.items():
        low, high = row["step_ms_min_max"]
        print(f"{variant:<8} {row['ranks']:>5} {row['step_ms']:>9.1f} {f'({low:.1f}-{high:.1f})':>17} "
              f"{row['train_rss_mb_per_rank']:>18.0f} {row['peak_rss_mb_per_rank']:>17.0f} "
              f"{row['peak_rss_mb_all_ranks']:>10.0f} {row['startup_s']:>10.1f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if WORKER_FLAG in argv:  # inside a rank: --worker-out DIR [--local_rank=N] -- stage arguments
        out_dir = Path(argv[argv.index(WORKER_FLAG) + 1])
        rest = [a for a in argv if a.startswith("--local_rank")]  # added by the deepspeed launcher
        run_worker(out_dir, argv[argv.index("--") + 1:] + rest)
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs all three variants")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rows", type=int, default=16, help="rows in the synthetic SFT manifest")
    parser.add_argument("--llm-width", type=int, help="LLM hidden size (tiny: 64)")
    parser.add_argument("--llm-layers", type=int, help="LLM layers (tiny: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/zero_compare.json"), help="results file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="zero_compare-") as tmp:
        work = Path(tmp)
        params = make_model(work / "model", args.llm_width, args.llm_layers)
        manifest = make_data(work, args.rows)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for round_index in range(args.repeats):
            order = VARIANTS[round_index % 3:] + VARIANTS[:round_index % 3]
            for variant in order:
                runs[variant].append(run_variant(variant, work / "model", manifest, args.steps, work, args.threads))
                print(f"round {round_index + 1}/{args.repeats} {variant}: {runs[variant][-1]['step_ms']:.1f} ms/step",
                      file=sys.stderr)

    table = summarise(runs)
    header = (f"SFT, {params / 1e6:.2f} M parameters, {args.steps} steps x global batch 4, {args.repeats} rounds, "
              f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per process, fp32, torch AdamW")
    print_table(table, header)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setup": header, "args": {k: str(v) for k, v in vars(args).items()},
                                     "results": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
