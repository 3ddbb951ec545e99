"""GRPO in the demo setting, measured: ``python -m audiollm.demo_grpo --run runs/demo``.

Outside ``audiollm demo`` (600 GRPO steps take 9-11 minutes on one thread, past the demo's 20-minute budget). From a
finished demo run it: writes the training split's voice-chat rows (every user turn spoken) as the GRPO prompts,
trains ``stages/configs/grpo_demo.yaml`` from the run's SFT model with the exact-match reward, evaluates the SFT
model and the GRPO model on the held-out and validation splits with the demo's own tasks, and writes
``OUT/grpo_results.json`` and ``OUT/grpo_report.md``: both models' figures, the voice-chat gain with a paired
bootstrap interval (the same items, before and after), the reward curve and the completions per second.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from audiollm.demo import figure_tasks, is_voice_chat, listening_tasks, split_figures
from audiollm.synth.corpus import read_jsonl, write_jsonl
from audiollm.tts.demo import run_recipe
from eval.report import paired_gain


def voice_chat_prompts(data: Path) -> Path:
    """The training split's voice-chat rows (``sft.jsonl``) as the GRPO manifest, beside it in ``data``."""
    path = data / "voice_chat_train.jsonl"
    write_jsonl(path, [r for r in read_jsonl(data / "sft.jsonl") if is_voice_chat(r)])
    return path


def reward_curve(out: Path) -> tuple[list[list[float]], float]:
    """[[step, mean reward], ...] as logged, and completions per second over the run."""
    state = json.loads((out / "trainer_state.json").read_text())
    curve = [[entry["step"], entry["reward"]] for entry in state["log_history"] if "reward" in entry]
    summary = state["log_history"][-1]
    return curve, float(summary.get("train_samples_per_second", 0.0))


def measure(run: Path, out: Path, overrides: list[str]) -> dict:
    from eval.pipeline import evaluate

    data = run / "data"
    started = time.perf_counter()
    run_recipe("grpo", "grpo_demo.yaml", ["--model_name_or_path", str(run / "sft"), "--train_files",
                                         str(voice_chat_prompts(data)), "--output_dir", str(out), *overrides], None)
    seconds = time.perf_counter() - started
    tasks = listening_tasks(data)
    before = evaluate(run / "sft", tasks, out / "eval_sft", batch_size=16, max_new_tokens=16)
    after = evaluate(out, tasks, out / "eval", batch_size=16, max_new_tokens=16)
    curve, per_second = reward_curve(out)
    gains = {split: paired_gain(out / "eval_sft" / "predictions.jsonl", out / "eval" / "predictions.jsonl",
                                f"{split}_voice_chat") for split in ("heldout", "validation")}
    return {"sft": split_figures(before), "grpo": split_figures(after), "voice_chat_gain": gains, "reward_curve": curve,
            "completions_per_second": per_second, "train_seconds": seconds, "overrides": overrides}


def report(results: dict) -> str:
    lines = ["| split | figure | SFT | GRPO |", "|---|---|---|---|"]
    for split in ("heldout", "validation"):
        for name in figure_tasks(split):
            before, after = results["sft"][split][name], results["grpo"][split][name]
            lines.append(f"| {split} | {name} | {before:.3f} | {after:.3f} |")
    for split, gain in results["voice_chat_gain"].items():
        lines.append(f"\n{split} voice chat gain {gain['gain']:+.3f} (95% CI {gain['ci95'][0]:+.3f} to "
                     f"{gain['ci95'][1]:+.3f}; {gain['fixed']} items fixed, {gain['broken']} broken)")
    curve = ", ".join(f"{step}: {reward:.3f}" for step, reward in results["reward_curve"])
    lines.append(f"\nmean reward by step: {curve}\n\n{results['completions_per_second']:.1f} completions/s, "
                 f"{results['train_seconds']:.0f} s of training")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `audiollm demo --out` folder")
    parser.add_argument("--out", type=Path, help="GRPO output folder (default RUN/grpo)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --max_steps 150")
    args = parser.parse_args(argv)
    out = args.out or args.run / "grpo"
    results = measure(args.run, out, args.overrides)
    (out / "grpo_results.json").write_text(json.dumps(results, indent=1))
    (out / "grpo_report.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
