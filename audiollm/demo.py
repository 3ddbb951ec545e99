"""``audiollm demo``: the whole product on a laptop CPU, on speech it synthesises itself.

    synth (eSpeak NG, held-out voices and word sequences)  ->  init (tiny "demo" model)
    ->  text: the tiny LLM learns the facts in writing, as a released LLM knows them (the SFT module, typed rows)
    ->  speaker: a first pretraining phase in which half the rows ask the speaker's sex (the ordinary mix never
        teaches it: docs/demo_history.md, "Who speaks")
    ->  pretrain -> SFT -> DPO   (stages/*.py with stages/configs/*_demo.yaml, the `audiollm train` path)
    ->  eval on the held-out split (the eval/ harness)  ->  export (stock Qwen2-Audio folder)
    ->  the voice (audiollm/tts/demo.py): a codec (stages/codec.py), then a codec-token TTS decoder (stages/tts.py)
        on the corpus's training texts spoken in two voices, trained in a second process beside the listening
        stages, then measured by the listener just trained (it never trains on their audio)
    ->  results.json, report.md, loss.png

The stages are the same modules and recipe format a GPU user runs; only the recipe sizes are small. Every figure
in results.json is measured on the held-out split by the evaluation harness.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from audiollm.beside import Beside, ShareCores, sharing_cores, stop_on_error
from audiollm.synth.corpus import WER_NORMALIZER, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

STAGES = ("text", "speaker", "pretrain", "sft", "dpo")
VOICE_TEXTS = 60  # held-out texts (and clips) the voice is measured on; each costs about 2 s of speaking
# The stage module each demo stage runs (stages/<module>.py) and its recipe (in stages/configs/).
STAGE_RECIPES = {"text": ("sft", "sft_text_demo.yaml"), "speaker": ("pretrain", "pretrain_speaker_demo.yaml"),
                 "pretrain": ("pretrain", "pretrain_demo.yaml"),
                 "sft": ("sft", "sft_demo.yaml"), "dpo": ("dpo", "dpo_demo.yaml")}
# Which manifests of the corpus each stage trains on, in the order of its recipe's mix_weights. Typed questions
# (text.jsonl) stay in the mixes so that pretraining and SFT do not wipe out what the text stage taught.
STAGE_DATA = {"text": ["text.jsonl"], "speaker": ["pretrain.jsonl", "text.jsonl", "sex.jsonl"],
              "pretrain": ["pretrain.jsonl", "text.jsonl"],
              "sft": ["sft.jsonl", "pretrain.jsonl", "text.jsonl", "replies.jsonl"], "dpo": ["dpo.jsonl"]}
RESULT_KEYS = ("asr_wer", "analysis_accuracy", "voice_chat_accuracy", "dpo_pref_accuracy_before",
               "dpo_pref_accuracy_after")
# The voice's figures (held-out split), in results.json under "voice" (audiollm/tts/voice_eval.py).
VOICE_KEYS = ("original_wer", "codec_resynthesis_wer", "codec_resynthesis_gap", "tts_voice_original_wer",
              "tts_voice_codec_wer", "tts_wer", "tts_wer_best_of_4", "cloning_sex_agreement",
              "no_prompt_sex_agreement", "cloning_pitch_agreement", "no_prompt_pitch_agreement",
              "spoken_reply_accuracy", "spoken_reply_accuracy_best_of_4", "spoken_reply_ceiling",
              "reply_text_accuracy", "real_time_factor", "time_to_first_audio_s")
# Figures per voice (the accent+variant that spoke the clip answered), from the harness's per-item records.
PER_VOICE_TASKS = {"voice_chat_accuracy": "{split}_voice_chat", "analysis_accuracy": "{split}_analysis",
                   "asr_wer": "{split}/asr"}
# The held-out rows again, every clip re-spoken in a training accent (audiollm/synth/respeak.py): the voices stay
# unheard, the accent does not. Figure -> harness task.
ACCENT_SWAP_TASKS = {"asr_wer": "heldout_training_accents_asr",
                     "analysis_accuracy": "heldout_training_accents_analysis",
                     "voice_chat_accuracy": "heldout_training_accents_voice_chat"}
PARTS = ("all", "listening", "voice")  # --part: the whole demo, or one half (voice: on a finished listening run)


class Clock:
    """Wall seconds per step of the demo, in the order they ran."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), {}

    @contextmanager
    def step(self, name: str):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        yield
        self.steps[name] = round(time.perf_counter() - t0, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def run_demo(out: str | Path, seed: int = 0, max_steps: int | None = None, corpus_size: str = "full",
             part: str = "all") -> dict:
    """Run the pipeline into ``out`` (new or empty); returns the results written to ``out/results.json``.

    ``max_steps`` caps every stage (tests run a shortened demo); None keeps the recipes' schedules. ``part``
    "listening" stops before the voice; "voice" trains and measures the voice in the folder of a listening run;
    "all" trains the voice in a second process beside the listening stages (it needs only the corpus).
    """
    from audiollm.tts.demo import measure_demo_voice, train_voice

    out, clock = Path(out), Clock()
    if part == "voice":
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        with clock.step("train the voice: codec, tts"):
            voice = train_voice(out / "data", out / "voice", seed, max_steps)
    else:
        results, voice = run_listening(out, clock, seed, max_steps, corpus_size, voice_beside=part == "all")
    if part != "listening":
        with clock.step("measure the voice"):
            results["voice"] = measure_demo_voice(voice, out / "export", seed,
                                                  texts=VOICE_TEXTS if max_steps is None else 2)
    before = results.get("wall_seconds", 0.0) if part == "voice" else 0.0  # the listening run's own time
    results.update(wall_seconds=round(before + clock.total(), 1), seed=seed, max_steps=max_steps,
                   step_seconds={**results.get("step_seconds", {}), **clock.steps})
    write_outputs(out, results)
    return results


def run_listening(out: Path, clock: Clock, seed: int, max_steps: int | None, corpus_size: str,
                  voice_beside: bool = False) -> tuple[dict, dict | None]:
    """Synthesise, init, train text -> speaker -> pretrain -> SFT -> DPO, evaluate, export: the listening figures.
    With ``voice_beside`` the voice trains in a second process from the moment the corpus exists; returns its
    folders too (else None)."""
    from audiollm.build import build_tiny
    from audiollm.synth.build import synth
    from audiollm.synth.respeak import respeak
    from audiollm.tts.demo import train_voice

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the demo writes a new folder")
    data = out / "data"
    with clock.step("synthesise a spoken corpus"):
        corpus = synth(data, seed=seed, size=corpus_size)
        respeak(data, held_out_rows(data), seed)  # the held-out rows in training accents, scored beside them
    beside = Beside(train_voice, out / "voice" / "train.log", data, out / "voice", seed, max_steps) \
        if voice_beside else None
    with sharing_cores(beside) as share, stop_on_error(beside):
        with clock.step("init a tiny model"):
            build_tiny(out / "init", size="demo", seed=seed)
        previous = out / "init"
        for stage in STAGES:
            share()
            with clock.step(f"train: {stage}"):
                run_stage(stage, previous, out / stage, data, seed, max_steps, callbacks=[ShareCores(share)])
            previous = out / stage
        share()
        with clock.step("evaluate on the held-out split"):
            figures = evaluate_heldout(out, data)
        with clock.step("export"):
            export_folder(out / "dpo", out / "export", out / "eval" / "results.json")
    results = {**figures, "per_voice": per_voice(out / "eval" / "predictions.jsonl", data),
               "corpus": corpus["splits"]}
    if beside is None:
        return results, None
    with clock.step("train the voice: the rest after the listening stages"):
        voice = beside.result()
    results["voice_training_seconds"] = beside.seconds  # its own wall time, beside the listening stages
    return results, voice


def run_stage(stage: str, model: Path, output: Path, data: Path, seed: int, max_steps: int | None,
              callbacks: list | None = None) -> None:
    """One listening stage through its module and demo recipe, exactly as ``audiollm train STAGE --config ...``."""
    from audiollm.tts.demo import run_recipe

    module, recipe = STAGE_RECIPES[stage]
    run_recipe(module, recipe, ["--model_name_or_path", str(model), "--train_files",
                                *[str(data / name) for name in STAGE_DATA[stage]], "--output_dir", str(output),
                                "--seed", str(seed)], max_steps, callbacks)


def is_voice_chat(row: dict) -> bool:
    """Every user turn of the row is only spoken audio (no typed instruction)."""
    return all(m["content"].strip() == "<audio>" for m in row["messages"] if m["role"] == "user")


def split_chat(data: Path, split: str) -> dict[str, Path]:
    """A split's SFT rows as two manifests: voice chat (every user turn is only spoken audio) and analysis."""
    rows = read_jsonl(data / f"{split}_sft.jsonl")
    spoken = [is_voice_chat(r) for r in rows]
    parts = {"voice_chat": [r for r, s in zip(rows, spoken) if s],
             "analysis": [r for r, s in zip(rows, spoken) if not s]}
    paths = {}
    for name, part in parts.items():
        paths[name] = data / f"{split}_{name}.jsonl"
        write_jsonl(paths[name], part)
    return paths


def held_out_rows(data: Path) -> dict[str, list[dict]]:
    """The held-out ASR, voice-chat and analysis rows, by the name their re-spoken manifests take
    (``audiollm.synth.respeak``)."""
    chat = split_chat(data, "heldout")
    return {"asr": [r for r in read_jsonl(data / "heldout_pretrain.jsonl") if r["task"] == "asr"],
            "voice_chat": read_jsonl(chat["voice_chat"]), "analysis": read_jsonl(chat["analysis"])}


def evaluate_heldout(out: Path, data: Path) -> dict:
    """The demo's figures, from the eval harness on held-out rows only (voices and word sequences unseen), and
    the same figures on the validation split (other unseen voices and sentences), where recipe choices are made."""
    from eval.pipeline import evaluate
    from eval.report import paired_gain

    tasks = {"preference": f"preference:manifest:{data / 'heldout_dpo.jsonl'}", **listening_tasks(data)}
    after = evaluate(out / "dpo", tasks, out / "eval", batch_size=16, max_new_tokens=16)
    before = evaluate(out / "sft", {"preference": tasks["preference"]}, out / "eval_sft", batch_size=16)
    value = lambda res, task: float(res["tasks"][task]["value"])  # noqa: E731  (the harness may give numpy floats)
    figures = split_figures(after)
    # The harness's 95% bootstrap intervals over items; DPO's change is paired over the same 180 pairs.
    ci95 = {key: after["tasks"][task]["ci95"] for key, task in figure_tasks("heldout").items()}
    ci95["dpo_pref_accuracy_after"] = after["tasks"]["preference"]["ci95"]
    gain = paired_gain(out / "eval_sft" / "predictions.jsonl", out / "eval" / "predictions.jsonl", "preference")
    swapped = {key: value(after, task) for key, task in ACCENT_SWAP_TASKS.items() if task in after["tasks"]}
    ci95 |= {f"{key}_training_accents": after["tasks"][ACCENT_SWAP_TASKS[key]]["ci95"] for key in swapped}
    return {**figures["heldout"], "dpo_pref_accuracy_before": value(before, "preference"),
            "dpo_pref_accuracy_after": value(after, "preference"), "dpo_pref_gain": gain, "ci95": ci95,
            "validation": figures["validation"], "heldout_training_accents": swapped}


def figure_tasks(split: str) -> dict[str, str]:
    """The demo's listening figures of one split, each with the harness task (``listening_tasks``) it is read from."""
    return {"asr_wer": f"{split}/asr", "classification_accuracy": f"{split}/short",
            "analysis_accuracy": f"{split}_analysis", "voice_chat_accuracy": f"{split}_voice_chat",
            "typed_question_accuracy": f"{split}_typed"}  # the same questions, typed


def split_figures(results: dict) -> dict[str, dict[str, float]]:
    """{split: {figure: value}} of both splits from the harness's results of ``listening_tasks``."""
    return {split: {key: float(results["tasks"][task]["value"]) for key, task in figure_tasks(split).items()}
            for split in ("heldout", "validation")}


def listening_tasks(data: Path) -> dict[str, str]:
    """The eval harness's tasks of the held-out and validation splits: pretraining rows (ASR and classification),
    voice chat, analysis, and the same questions typed."""
    tasks = {}
    for split in ("heldout", "validation"):
        chat = split_chat(data, split)
        tasks.update({split: f"norm={WER_NORMALIZER}:manifest:{data / f'{split}_pretrain.jsonl'}",
                      f"{split}_voice_chat": f"short:manifest:{chat['voice_chat']}",
                      f"{split}_analysis": f"short:manifest:{chat['analysis']}",
                      f"{split}_typed": f"short:manifest:{data / f'{split}_text.jsonl'}"})
    for name, task in ACCENT_SWAP_TASKS.items():  # absent from corpora built before they were
        path = data / f"{task}.jsonl"
        if path.exists():
            tasks[task] = f"{f'norm={WER_NORMALIZER}' if name == 'asr_wer' else 'short'}:manifest:{path}"
    return tasks


def per_voice(predictions: Path, data: Path) -> dict:
    """``{split: {voice: {figure: value, "items": {figure: n}}}}`` for the held-out and validation splits: each item
    counts for the voice of its last clip (the question being answered)."""
    import numpy as np

    from eval.items import read_records
    from eval.tasks import aggregator

    clips = read_jsonl(data / "clips.jsonl")
    voice_of = {clip["audio"]: clip["voice"] for clip in clips}
    records = [r for r in read_records(predictions) if r.get("stats") is not None and r.get("audios")]
    table: dict = {}
    for split in ("heldout", "validation"):
        for figure, task in PER_VOICE_TASKS.items():
            groups: dict[str, list[dict]] = {}
            for r in (r for r in records if r["task"] == task.format(split=split)):
                groups.setdefault(voice_of["/".join(Path(r["audios"][-1]).parts[-3:])], []).append(r)
            for voice, rows in sorted(groups.items()):
                sums = np.asarray([r["stats"] for r in rows], dtype=np.float64).sum(axis=0)
                cell = table.setdefault(split, {}).setdefault(voice, {})
                cell[figure] = float(aggregator(rows[0]["kind"], rows)(sums, len(rows)))
                cell.setdefault("items", {})[figure] = len(rows)
    return table


def per_voice_markdown(table: dict) -> str:
    rows = ["| split | voice | voice chat | analysis | ASR WER | voice-chat items |", "|---|---|---|---|---|---|"]
    for split, voices in table.items():
        for voice, cell in voices.items():
            rows.append(f"| {split} | {voice} | " + " | ".join(_cell(cell.get(k)) for k in PER_VOICE_TASKS)
                        + f" | {cell['items'].get('voice_chat_accuracy', 0)} |")
    return "\n".join(rows)


def export_folder(model: Path, out: Path, results: Path) -> None:
    from audiollm.export import export

    export(model, out, format="qwen2_audio", dtype="fp32", results=results)


def write_outputs(out: Path, results: dict) -> None:
    """results.json, report.md and loss.png (every stage's training loss), then a short table on stdout."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_losses(out, out / "loss.png")
    table = results_table(results)
    (out / "report.md").write_text(report_markdown(results, table), encoding="utf-8")
    print("\n" + table + f"\n\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'loss.png'}")


def results_table(results: dict) -> str:
    """Held-out figures with their 95% bootstrap intervals over items (voice: over texts or clips), and validation's."""
    rows = ["| figure | held-out | 95% CI | validation |", "|---|---|---|---|"]
    ci95 = results.get("ci95", {})
    for key in ("asr_wer", "classification_accuracy", "analysis_accuracy", "voice_chat_accuracy",
                "typed_question_accuracy", "dpo_pref_accuracy_before", "dpo_pref_accuracy_after"):
        rows.append(f"| {key} | {results[key]:.3f} | {_interval(ci95.get(key))} | "
                    f"{_cell(results['validation'].get(key))} |")
    for key, value in results.get("heldout_training_accents", {}).items():
        rows.append(f"| {key}, held-out rows in training accents | {value:.3f} | "
                    f"{_interval(ci95.get(f'{key}_training_accents'))} | |")
    if "dpo_pref_gain" in results:
        gain = results["dpo_pref_gain"]
        rows.append(f"| dpo_pref_gain (paired: {gain['fixed']} pairs fixed, {gain['broken']} broken) | "
                    f"{gain['gain']:+.3f} | {_interval(gain['ci95'], signed=True)} | |")
    voice = results.get("voice", {})
    for key in VOICE_KEYS if voice else ():
        held, checked = voice["heldout"].get(key), voice["validation"].get(key)
        signed = key == "codec_resynthesis_gap"
        rows.append(f"| voice: {key} | {_cell(held, signed)} | "
                    f"{_interval(voice['heldout'].get('ci95', {}).get(key), signed)} | {_cell(checked, signed)} |")
    rows.append(f"| wall_seconds | {results['wall_seconds']:.0f} | | |")
    return "\n".join(rows)


def _cell(value, signed: bool = False) -> str:
    return "" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def _interval(low_high, signed: bool = False) -> str:
    return "" if not low_high else f"{_cell(low_high[0], signed)} – {_cell(low_high[1], signed)}"


def report_markdown(results: dict, table: str) -> str:
    steps = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in results["step_seconds"].items())
    voices = results.get("per_voice")
    return (
        "# audiollm demo\n\nA tiny listening model trained on CPU from speech synthesised with eSpeak NG, through "
        "text -> speaker -> pretrain -> SFT -> DPO, scored on a held-out split whose voices, accents and word "
        "sequences never occur in training. The validation column is a second split of unseen sentences, voices "
        "and accents: the recipes' settings are chosen on it, never on the held-out split. The rows \"in training "
        "accents\" are the held-out rows again with every clip re-spoken in an accent training used, its voice, text, "
        "rate and pitch kept: they part what the listener misses on new voices from what it misses on new accents. "
        "Every WER counts each spoken word (Whisper's English normaliser word by word: "
        f"`{WER_NORMALIZER}`, eval/metrics.py).\n\n"
        f"{table}\n\n## Time per step (s)\n\n"
        f"| step | seconds |\n|---|---|\n{steps}\n\n"
        + (f"## Per voice\n\n{per_voice_markdown(voices)}\n\n" if voices else "")
        + "Per-item predictions: `eval/predictions.jsonl`; the harness's own report: `eval/report.md`. "
        "Loss curves: `loss.png`.\n\n" + (voice_markdown(results["voice"]) if "voice" in results else "")
    )


def voice_markdown(voice: dict) -> str:
    held = voice["heldout"]
    return (
        "## The voice\n\nA codec (`voice/codec`) and a TTS decoder (`voice/tts`) trained on the corpus's English "
        "training clips, measured by the listener above (trained on the synthesised speech only, never on codec or "
        f"TTS audio) on {held['texts']} held-out texts and clips: `original_wer` (the clips as synthesised), "
        "`codec_resynthesis_wer` (through the codec: the ceiling of any TTS on it), `tts_wer` (one sample per text), "
        "`tts_wer_best_of_4` (the listener picks the candidate it hears best), cloning (how often the listener's "
        "speaker-sex / pitch answer on the TTS output equals its answer on the prompt clip, prompted and not), "
        "`spoken_reply_accuracy` (held-out spoken questions answered by the listener, spoken by the TTS, "
        "transcribed by the listener, scored like voice chat). 95% bootstrap intervals: `voice/voice_results.json`."
        "\n\nA sample pair: `voice/heldout/sample_question.wav` -> `voice/heldout/sample_answer.wav` (answer "
        f"\"{held.get('sample', {}).get('answer_text', '')}\", heard back as "
        f"\"{held.get('sample', {}).get('answer_heard', '')}\"). Spectrograms (synthesised, codec, TTS): "
        "`voice/heldout/spectrograms.png`.\n"
    )


def plot_losses(out: Path, path: Path) -> None:
    """Training loss per logged step of each stage, from the stages' trainer_state.json."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    runs = {stage: out / stage for stage in STAGES}
    runs |= {name: out / "voice" / name for name in ("codec", "tts") if (out / "voice" / name).is_dir()}
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for ax, (stage, folder) in zip(axes, runs.items()):
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        points = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set(title=stage, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
