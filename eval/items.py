"""The one shape every benchmark item takes (``Item``), and the prediction record it becomes in predictions.jsonl.

Loaders turn benchmark files into Items; the task kind turns an Item into a prompt; generation adds a prediction;
scoring adds a score. A record is a plain JSON object holding everything scoring needs, so scoring can rerun on a
saved predictions.jsonl without the model or the benchmark files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


class EvalError(ValueError):
    """A benchmark file, source spec or prediction file that cannot be used; the message names it and the fix."""


@dataclass
class Item:
    """One benchmark question.

    audios: paths, or undecoded Hugging Face audio values ``{"bytes", "path"}``, one per clip.
    question: the text instruction sent with the audio; with ``spoken=True`` it is what the audio says (voice chat,
        VoiceBench) and no text is sent; it still goes to a judge.
    messages: prompt turns of a chat manifest (``<audio>`` marks clips), sent verbatim instead of ``question``.
    reference: the expected answer (transcript, choice text, choice letter, translation, reference answer).
    language: ISO 639-1 code of the reference text (ASR: the spoken language; translation: the target language).
    context: text only a judge sees (AIR-Bench chat's ``meta_info`` audio description).
    group: a sub-score key (MMAU's task, AIR-Bench's task_name).
    normalizer: ASR's text normaliser by name (``eval.metrics.ASR_NORMALIZERS``); None: chosen by language.
    """

    id: str
    kind: str
    audios: list = field(default_factory=list)
    question: str | None = None
    spoken: bool = False
    messages: list[dict] | None = None
    reference: str | None = None
    choices: list[str] | None = None
    language: str | None = None
    context: str | None = None
    group: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    normalizer: str | None = None


RECORD_ITEM_FIELDS = ("question", "spoken", "choices", "language", "context", "group", "chosen", "rejected",
                      "normalizer")


def audio_label(source) -> str:
    """How a clip is named in predictions.jsonl: its path, or ``<embedded>`` for bytes without a path."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return "<embedded>"


def to_record(item: Item, task: str, prompt: str, model: str, generation: dict) -> dict:
    """The predictions.jsonl row of an item before generation: prediction and score still empty."""
    values = asdict(item)
    record = {
        "task": task,
        "kind": item.kind,
        "id": item.id,
        "model": model,
        "generation": generation,
        "prompt": prompt,
        "audios": [audio_label(a) for a in item.audios],
        "reference": item.reference,
        "prediction": None,
        "score": None,
        "stats": None,
    }
    record.update({key: values[key] for key in RECORD_ITEM_FIELDS if values[key] not in (None, False)})
    return record


def write_records(records: list[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a predictions.jsonl written by this harness; names the line of anything else."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number}: not JSON ({err})") from err
            missing = [key for key in ("task", "kind", "id", "prediction") if key not in record]
            if missing:
                raise EvalError(f"{path}:{number}: no {', '.join(missing)}; pass a predictions.jsonl written by eval")
            records.append(record)
    if not records:
        raise EvalError(f"{path}: no predictions in this file")
    return records
