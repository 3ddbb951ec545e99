"""The exported folder's ``README.md``: Hub metadata (YAML front matter) and a card a reader can act on.

What the card says comes from files the export can read safely, never from pickles:
- ``training_summary.json`` (written by ``write_training_summary``; one entry per stage, chained across stages)
  in the model folder or its run folder; else the run's ``trainer_state.json`` (JSON: steps, epochs, last loss);
  else "not recorded". ``training_args.bin`` is a pickle and is never read.
- an eval ``results.json`` (eval/report.py's format) for the results table;
- the padding check (``audiollm.export.padding_check``) for the unpadded-vs-padded logit difference.

Local paths never reach the card: metadata keeps only values that look like Hub ids, and data files are named by
their file name alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FILE = "training_summary.json"
TRAINER_STATE_FILE = "trainer_state.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name"
TAGS = ["audio", "audio-text-to-text", "qwen2-audio", "speech", "audiollm"]
NOT_RECORDED = "not recorded"


def is_hub_id(value) -> bool:
    """True for "owner/name" strings that are not also a local path (so nothing local leaks into metadata)."""
    return isinstance(value, str) and bool(HUB_ID.match(value)) and not os.path.exists(value)


@dataclass
class CardFacts:
    """Everything the card reports; filled by ``audiollm.export``."""

    name: str  # the repo id when pushing, else the folder name
    format: str  # "qwen2_audio" or "native"
    dtype: str  # "bf16", "fp16", "fp32"
    projector: str  # "linear", "mlp", "stack"
    projector_stack: int
    encoder: dict  # layers, d_model, mel bins
    llm: dict  # model_type, layers, hidden size, vocab
    parameters: dict[str, int]  # per part, from build.parameter_counts
    source_kind: str  # "folder", "zero checkpoint", "LoRA adapter merged into its base"
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    training: dict | None = None  # a training_summary.json, or {"trainer_state": {...}}
    adapter: dict | None = None  # the LoRA adapter's config, when one was merged
    results: dict | None = None  # an eval results.json
    padding: dict | None = None  # padding_check()'s record


# --------------------------------------------------------------------------------------------- training records


def write_training_summary(output_dir: str | os.PathLike, previous_dir: str | os.PathLike | None, entry: dict,
                           base_models: list[str] | None = None) -> Path:
    """Append one stage's ``entry`` to the chain read from ``previous_dir`` and write it into ``output_dir``.

    Meant for the stages' final save: ``entry`` holds plain values, e.g. ``{"stage": "sft", "train_files":
    [...], "train_rows": 1200, "steps": 300, "epochs": 2, "global_batch": 128, "learning_rate": 1e-5,
    "trainable": ["projector", "llm"], "lora": None, "final_loss": 0.71}``. The chain lets the card of the last
    stage describe every stage.
    """
    previous = read_training_summary([Path(previous_dir)]) if previous_dir else None
    summary = {"base_model": list(base_models or (previous or {}).get("base_model", [])),
               "stages": [*(previous or {}).get("stages", []), entry]}
    path = Path(output_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def stage_entry(stage: str, model_args, data_args, args, state, train_rows: int | None = None,
                distill_args=None) -> dict:
    """One stage's ``training_summary.json`` entry from the stage's argument dataclasses (audiollm.stage_args'
    ModelArguments and DataArguments, TrainingArguments, audiollm.distill's DistillArguments) and the finished
    ``trainer.state``."""
    trainable = [part for part, on in (("encoder", model_args.train_encoder), ("projector", model_args.train_projector),
                                       ("llm", model_args.train_llm)) if on]
    lora = ({"llm_r": model_args.llm_lora_r, "encoder_r": model_args.encoder_lora_r, "alpha_ratio":
             model_args.lora_alpha_ratio} if model_args.llm_lora_r or model_args.encoder_lora_r else None)
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {"stage": stage, "train_files": list(data_args.train_files), "train_rows": train_rows,
            "steps": state.global_step, "epochs": state.epoch,
            "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "learning_rate": args.learning_rate, "trainable": trainable, "lora": lora,
            "ctc": ({"weight": model_args.ctc_weight, "layer": model_args.ctc_layer}
                    if getattr(model_args, "ctc_weight", 0) else None),
            "mix_weights": getattr(data_args, "mix_weights", None),
            "augmentation": getattr(data_args, "augmentation", None) or None,
            "distillation": distillation(distill_args),
            "final_loss": losses[-1] if losses else None}


def distillation(distill_args) -> dict | None:
    """The ``loss: kd`` settings of a stage (audiollm.distill.DistillArguments), None for cross-entropy."""
    if distill_args is None or not distill_args.enabled:
        return None
    teacher = distill_args.kd_teacher  # by name only: a card must not show the trainer's local folders
    teacher = (teacher if is_hub_id(teacher) else Path(teacher).name) if teacher else "the starting model's LLM"
    return {"temperature": distill_args.kd_temperature, "ce_weight": distill_args.kd_ce_weight,
            "teacher": teacher, "rows": distill_args.kd_rows}


def read_training_summary(folders: list[Path]) -> dict | None:
    """The first ``training_summary.json`` among ``folders``, or None."""
    for folder in folders:
        path = folder / SUMMARY_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def read_trainer_state(folders: list[Path]) -> dict | None:
    """Steps, epochs, per-device batch and the last logged loss from the first ``trainer_state.json``, or None."""
    for folder in folders:
        path = folder / TRAINER_STATE_FILE
        if path.is_file():
            state = json.loads(path.read_text())
            losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
            return {"steps": state.get("global_step"), "epochs": state.get("epoch"),
                    "per_device_batch": state.get("train_batch_size"), "final_loss": losses[-1] if losses else None}
    return None


def training_record(folders: list[Path]) -> dict | None:
    """What the card's training section is built from: a training summary, else the trainer state, else None."""
    summary = read_training_summary(folders)
    if summary is not None:
        return summary
    state = read_trainer_state(folders)
    return {"trainer_state": state} if state is not None else None


def datasets_of(summary: dict | None) -> list[str]:
    """Hub dataset ids named in a training summary (local manifests are left out)."""
    found = []
    for stage in (summary or {}).get("stages", []):
        for name in [*stage.get("datasets", []), *stage.get("train_files", [])]:
            if is_hub_id(name) and name not in found:
                found.append(name)
    return found


# ------------------------------------------------------------------------------------------------------ render


def _value(value) -> str:
    if value is None or value == "" or value == []:
        return NOT_RECORDED
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _file_names(files, weights=None) -> str:
    """Data sources by file name or Hub id (a card must not show the trainer's local folders), each with its
    sampling weight where the stage mixed them."""
    if not files:
        return NOT_RECORDED
    names = [f if is_hub_id(f) else Path(f).name for f in files]
    if weights and len(weights) == len(names):
        names = [f"{name} ({weight:g})" for name, weight in zip(names, weights)]
    return ", ".join(names)


def _trainable(stage: dict) -> str:
    parts = _value(stage.get("trainable"))
    lora, ctc = stage.get("lora"), stage.get("ctc")
    parts = f"{parts}; LoRA {json.dumps(lora)}" if lora else parts
    parts = f"{parts}; CTC on the encoder {json.dumps(ctc)}" if ctc else parts
    kd, augmentation = stage.get("distillation"), stage.get("augmentation")
    parts = f"{parts}; distilled from the text LLM {json.dumps(kd)}" if kd else parts
    return f"{parts}; audio augmented {json.dumps(augmentation)}" if augmentation else parts


def training_section(facts: CardFacts) -> list[str]:
    lines = ["## Training", ""]
    record = facts.training or {}
    if "stages" in record:
        lines += ["| stage | data | rows | steps | epochs | global batch | learning rate | trainable | final loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in record["stages"]:
            lines.append(f"| {_value(s.get('stage'))} | {_file_names(s.get('train_files'), s.get('mix_weights'))} | "
                         f"{_value(s.get('train_rows'))} | {_value(s.get('steps'))} | {_value(s.get('epochs'))} | "
                         f"{_value(s.get('global_batch'))} | {_value(s.get('learning_rate'))} | {_trainable(s)} | "
                         f"{_value(s.get('final_loss'))} |")
    elif "trainer_state" in record:
        state = record["trainer_state"]
        lines.append(f"Stages and data: {NOT_RECORDED} (no {SUMMARY_FILE}). The last run's {TRAINER_STATE_FILE}: "
                     f"{_value(state['steps'])} steps, epochs {_value(state['epochs'])}, per-device batch "
                     f"{_value(state['per_device_batch'])}, last logged loss {_value(state['final_loss'])}.")
    else:
        lines.append(f"Stages, data sizes and trainable modules: {NOT_RECORDED} (no {SUMMARY_FILE} or "
                     f"{TRAINER_STATE_FILE} next to the exported weights).")
    if facts.adapter:
        a = facts.adapter
        lines += ["", f"Exported from a LoRA adapter merged into its base: rank {a.get('r')}, alpha "
                  f"{a.get('lora_alpha')}, fully trained modules {_value(a.get('modules_to_save'))}."]
    return lines + [""]


def _metric_cell(entry: dict) -> str:
    if entry.get("unscored"):
        return f"unscored ({entry.get('reason', '')})".replace("|", "\\|")
    value = entry.get("value")
    return "–" if value is None else f"{value:.4g}"


def eval_section(results: dict | None) -> list[str]:
    """The eval results table (eval/report.py's results.json), or a line saying there is none."""
    lines = ["## Evaluation", ""]
    if not results:
        return lines + ["No evaluation results were given at export.", ""]
    judge = results.get("judge")
    boot = results.get("bootstrap") or {}
    lines += [f"95% CI: percentile bootstrap ({boot.get('resamples', '?')} resamples). Judge for open-ended "
              f"answers: {Path(judge).name if judge else 'none'}.", "",
              "| task | kind | metric | value | 95% CI | n |", "|---|---|---|---|---|---|"]
    for task, entry in results.get("tasks", {}).items():
        arrow = "↑" if entry.get("higher_is_better", True) else "↓"
        ci = entry.get("ci95")
        ci_text = "–" if not ci else f"{ci[0]:.4g} – {ci[1]:.4g}"
        lines.append(f"| {task} | {entry.get('kind', '')} | {entry.get('metric', '')} {arrow} | "
                     f"{_metric_cell(entry)} | {ci_text} | {entry.get('n', 0)} |")
    return lines + [""]


STOCK_USAGE = '''```python
import librosa
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

repo = "{repo}"
processor = AutoProcessor.from_pretrained(repo)
model = Qwen2AudioForConditionalGeneration.from_pretrained(repo, dtype="auto")

wav, _ = librosa.load("clip.wav", sr=16000)  # mono, resampled to 16 kHz
conversation = [{{"role": "user", "content": [
    {{"type": "audio", "audio": "clip.wav"}},
    {{"type": "text", "text": "What does the speaker say?"}},
]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
inputs = processor(text=prompt, audio=[wav], sampling_rate=16000, return_tensors="pt").to(model.device)
ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
answer = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(answer)
```'''

NATIVE_USAGE = '''```python
from transformers import AutoTokenizer

from audiollm.collator import ChatCollator
from audiollm.model.modeling import AudioLLMForConditionalGeneration

repo = "{repo}"
model = AudioLLMForConditionalGeneration.from_pretrained(repo, dtype="auto").eval()
tokenizer = AutoTokenizer.from_pretrained(repo)
collator = ChatCollator(tokenizer, stack=model.config.projector_stack, generation=True)
batch = collator([{{"messages": [{{"role": "user", "content": "<audio>What does the speaker say?"}}],
                   "audios": ["clip.wav"]}}])  # any sample rate: resampled to 16 kHz, no 30 s padding
ids = model.generate(**batch, max_new_tokens=64, do_sample=False)
answer = tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
print(answer)
```'''


def usage_section(facts: CardFacts) -> list[str]:
    if facts.format == "qwen2_audio":
        serving = ("Serving stacks with Qwen2-Audio support (vLLM) read the same layout; the exporter does not test "
                   "them." if facts.llm["model_type"] == "qwen2" else f"Serving stacks whose Qwen2-Audio support "
                   f"assumes a Qwen2 LLM may not take this {facts.llm['model_type']} LLM.")
        return ["## Usage", "", "Stock `transformers` (no custom code, no `trust_remote_code`); the folder is a "
                f"Qwen2-Audio checkpoint. {serving}", "", STOCK_USAGE.format(repo=facts.name), ""]
    why = {"mlp": "a two-layer MLP projector", "stack": f"a frame-stacking projector (k={facts.projector_stack})"}
    return ["## Usage", "", f"This model has {why.get(facts.projector, facts.projector)}, which Qwen2-Audio's "
            "architecture cannot express, so it loads with the `audiollm` package's classes:", "",
            NATIVE_USAGE.format(repo=facts.name), "",
            "Stock `Auto*` classes and vLLM refuse this folder (model type `audiollm` is unknown to them). "
            "Calling `Qwen2AudioForConditionalGeneration.from_pretrained` on it explicitly does **not** fail: "
            "transformers only warns about the model-type mismatch and prints missing projector weights, then runs "
            "with a random projector. Do not load it that way.", ""]


def padding_section(padding: dict | None) -> list[str]:
    lines = ["## Padded vs unpadded audio", "",
             "Training fed the encoder unpadded audio (each clip's own length, attention masked past its end); stock "
             "processors pad every clip to 30 s and truncate longer audio. Clips over 30 s lose their tail with "
             "the stock processor; `audiollm` cuts them into 30 s chunks instead."]
    if padding is None:
        return lines + ["", "The unpadded-vs-padded logit difference was not measured at export (run "
                        "`audiollm export --check`).", ""]
    return lines + ["", f"Measured at export on a synthetic {padding['clip_seconds']:g} s clip in fp32 "
                    f"({padding['unpadded_frames']} mel frames unpadded vs {padding['padded_frames']} padded, "
                    f"padded side: {padding['padded_with']}): max |logit difference| = "
                    f"{padding['max_abs_logit_diff']:.2e} (largest |logit| {padding['max_abs_logit']:.3g}).", ""]


def model_section(facts: CardFacts) -> list[str]:
    enc, llm = facts.encoder, facts.llm
    rate = 25 / facts.projector_stack
    lines = [f"# {facts.name.split('/')[-1]}", "",
             f"An audio-language model in the Qwen2-Audio style, exported by `audiollm` in the **{facts.format}** "
             f"format with {facts.dtype} weights (from a {facts.source_kind}).", "",
             f"- Audio encoder: Whisper-style, {enc['layers']} layers, width {enc['d_model']}, {enc['mel_bins']} mel "
             "bins, 16 kHz input, average-pooled to 25 Hz",
             f"- Projector: {facts.projector} ({rate:g} audio tokens per second)",
             f"- Language model: {llm['model_type']}, {llm['layers']} layers, hidden size {llm['hidden_size']}, "
             f"vocabulary {llm['vocab_size']}",
             "- Parameters: " + ", ".join(f"{part} {count:,}" for part, count in facts.parameters.items()), ""]
    return lines


def card_metadata(facts: CardFacts):
    """The YAML front matter as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    tags = TAGS + [f"projector-{facts.projector}"] + (["custom-architecture"] if facts.format == "native" else [])
    return ModelCardData(license=facts.license or "other", base_model=facts.base_models or None,
                         datasets=facts.datasets or None, tags=tags, pipeline_tag="audio-text-to-text",
                         library_name="transformers")


def render_card(facts: CardFacts) -> str:
    """The whole README.md: front matter, then model, training, evaluation, padding and usage sections."""
    body = [*model_section(facts), *training_section(facts), *eval_section(facts.results),
            *padding_section(facts.padding), *usage_section(facts)]
    if not facts.license:
        body += ["## License", "", "No license was given at export (`--license`); the metadata says `other`. "
                 "Check the licenses of the base encoder and LLM before publishing.", ""]
    return f"---\n{card_metadata(facts).to_yaml()}\n---\n\n" + "\n".join(body)
