"""Benchmark files on disk -> Items. One loader per format; the format is detected or given in the source spec.

Source spec (the SOURCE of ``--task NAME=SOURCE``): ``[norm=NORM:][KIND[@LANG]:][FORMAT:]PATH``

    NORM     how ASR items are normalised before WER (``eval.metrics.ASR_NORMALIZERS``): english, basic (default:
             by LANG), or words: the English normaliser word by word, for lists of words, where the English one
             would read "seven eleven" as the one number 711
    KIND     asr, mcq, mcq_letter, short, translation, open, preference (default: from the format / the rows)
    LANG     language of the references: asr's spoken language, translation's target (default: a row's own
             "lang" field, else en)
    FORMAT   manifest, mmau, airbench_foundation, airbench_chat, hf, librispeech (default: detected from PATH)

Formats and the fields they read (field names are the constants below):
    manifest             our JSONL (or JSON list) rows: pretrain {audio, task, text[, prompt]} (task asr -> asr,
                         others -> short), chat {messages, audios} (the last assistant turn is the reference, the
                         turns before it the prompt; default kind short), preference {messages, audios, chosen,
                         rejected | rejected_response} (kind preference)
    mmau                 MMAU's JSON list (mmau-test-mini.json): id, audio_id, question, choices, answer; audio_id
                         relative to the audio root (default: the JSON's folder); group = task (sound/music/speech)
    airbench_foundation  AIR-Bench Foundation_meta.json: uniq_id, path, question, choice_a..choice_d, answer_gt,
                         task_name, dataset_name; audio at ROOT/{task_name}_{dataset_name}/{path}
    airbench_chat        AIR-Bench Chat_meta.json: uniq_id, path, question, answer_gt, task_name, dataset_name,
                         meta_info (the audio description the judge sees)
    hf                   a ``save_to_disk`` folder (VoiceBench / AudioBench subsets): audio column "audio" or
                         "context"; "instruction" = a text instruction sent with the audio (AudioBench); else
                         "prompt" = the words spoken in the audio (VoiceBench voice chat: no text is sent);
                         reference column "reference" or "answer"
    librispeech          a folder of SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt ("ID TEXT" lines) + ID.flac
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from audiollm.prompts import pick_prompt
from eval.items import EvalError, Item
from eval.metrics import ASR_NORMALIZERS, choice_letter
from eval.tasks import KINDS, check_item

FORMATS = ("manifest", "mmau", "airbench_foundation", "airbench_chat", "hf", "librispeech")
DEFAULT_KIND = {"mmau": "mcq", "airbench_foundation": "mcq_letter", "airbench_chat": "open", "hf": "open",
                "librispeech": "asr"}
DEFAULT_LANGUAGE = "en"

MMAU_FIELDS = ("id", "audio_id", "question", "choices", "answer")
MMAU_GROUP_FIELD = "task"
AIRBENCH_FOUNDATION_FIELDS = ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name", "dataset_name")
AIRBENCH_CHOICE_FIELDS = ("choice_a", "choice_b", "choice_c", "choice_d")
AIRBENCH_CHAT_FIELDS = ("path", "question", "answer_gt", "task_name", "dataset_name")
AIRBENCH_ID_FIELD = "uniq_id"
AIRBENCH_CONTEXT_FIELD = "meta_info"
AIRBENCH_FLAC_TASKS = ("Audio_Grounding",)  # its meta lists .wav names but the clips ship as .flac
HF_AUDIO_COLUMNS = ("audio", "context")
HF_INSTRUCTION_COLUMNS = ("instruction",)
HF_SPOKEN_COLUMNS = ("prompt",)
HF_REFERENCE_COLUMNS = ("reference", "answer")
HF_ID_COLUMNS = ("id", "uniq_id")
HF_SPLIT = "test"  # taken from a saved DatasetDict when it has several splits
ROW_LANGUAGE_FIELDS = ("lang",)
REJECTED_FIELDS = ("rejected", "rejected_response")  # LLaMA-Factory writes rejected_response


@dataclass
class Source:
    """A parsed ``NAME=SOURCE`` task: where the items are and how to read and score them."""

    name: str
    path: str
    kind: str | None = None
    format: str | None = None
    language: str | None = None
    normalizer: str | None = None


def parse_task(spec: str) -> Source:
    """``NAME=[norm=NORM:][KIND[@LANG]:][FORMAT:]PATH`` -> Source; prefixes are recognised by their names."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise EvalError(f"--task {spec!r}: write NAME=SOURCE, e.g. mmau=mmau-test-mini.json or asr=asr@zh:hf:DIR")
    source = Source(name=name, path=rest)
    while ":" in source.path:
        head, tail = source.path.split(":", 1)
        kind, _, language = head.partition("@")
        if head.startswith("norm=") and source.normalizer is None:
            source.normalizer, source.path = head.removeprefix("norm="), tail
            if source.normalizer not in ASR_NORMALIZERS:
                raise EvalError(f"--task {spec!r}: unknown normaliser {source.normalizer!r}; choose one of "
                                f"{', '.join(ASR_NORMALIZERS)}")
        elif kind in KINDS and source.kind is None and source.format is None:
            source.kind, source.language, source.path = kind, language or None, tail
        elif head in FORMATS and source.format is None:
            source.format, source.path = head, tail
        else:
            break
    return source


def detect_format(path: str) -> str:
    """The format of a file or folder, from its layout or its first row's fields."""
    p = Path(path)
    if p.is_dir():
        if any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        if next(p.rglob("*.trans.txt"), None) is not None:
            return "librispeech"
        raise EvalError(f"{path}: a folder that is neither a save_to_disk dataset nor LibriSpeech (*.trans.txt)")
    if not p.is_file():
        raise EvalError(f"{path}: benchmark file not found")
    if p.suffix == ".jsonl":
        return "manifest"
    if p.suffix == ".json":
        rows = _read_json_list(p)
        keys = set(rows[0]) if rows else set()
        if set(MMAU_FIELDS) <= keys:
            return "mmau"
        if "choice_a" in keys:
            return "airbench_foundation"
        if "answer_gt" in keys:
            return "airbench_chat"
        if keys & {"messages", "task"}:
            return "manifest"
        raise EvalError(f"{path}: cannot tell the format from the fields {sorted(keys)}; give FORMAT:PATH")
    raise EvalError(f"{path}: unknown benchmark file type; use .jsonl/.json, a save_to_disk or LibriSpeech folder")


def load_source(source: Source, audio_root: str | None = None, limit: int | None = None) -> list[Item]:
    """All items of a source (the first ``limit``), each checked against its kind."""
    fmt = source.format or detect_format(source.path)
    loader = {"manifest": load_manifest, "mmau": load_mmau, "airbench_foundation": load_airbench_foundation,
              "airbench_chat": load_airbench_chat, "hf": load_hf, "librispeech": load_librispeech}[fmt]
    items = loader(source.path, audio_root)[:limit]
    for item in items:
        if source.kind is not None:
            if (item.kind == "preference") != (source.kind == "preference"):
                raise EvalError(f"{source.path}: item {item.id} is a {item.kind} row; it cannot be {source.kind}")
            item.kind = source.kind
        if item.kind in ("asr", "translation"):  # the only kinds whose scoring depends on the language
            item.language = source.language or item.language or DEFAULT_LANGUAGE
        if item.kind == "asr":
            item.normalizer = source.normalizer
        check_item(item, source.path)
    if not items:
        raise EvalError(f"{source.path}: no items")
    return items


def _read_json_list(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}: not JSON ({err})") from err
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalError(f"{path}: expected a JSON list of objects")
    return rows


def _require(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvalError(f"{where}: no {', '.join(missing)} field(s); found {sorted(row)}")


# ----------------------------------------------------------------------------------------------- our manifests


def _manifest_rows(path: Path) -> list[tuple[str, dict]]:
    """(``file:line`` name, row) pairs of a JSONL file or a JSON list."""
    if path.suffix == ".json":
        return [(f"{path.name}:{i + 1}", row) for i, row in enumerate(_read_json_list(path))]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path.name}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number}: not JSON ({err})") from err
    return rows


def load_manifest(path: str, audio_root: str | None = None) -> list[Item]:
    """Our pretrain, chat and preference rows (audiollm.data); relative audio paths are relative to the file."""
    base = Path(audio_root or Path(path).resolve().parent)
    items = []
    for where, row in _manifest_rows(Path(path)):
        row_id = str(row.get("id") or where)
        language = next((row[f] for f in ROW_LANGUAGE_FIELDS if row.get(f)), None)
        if row.get("chosen") is not None:
            item = _preference_item(row, row_id, where)
        elif row.get("messages") is not None:
            item = _chat_item(row, row_id, where)
        elif {"audio", "task", "text"} <= row.keys():
            kind = "asr" if row["task"] == "asr" else "short"
            question = row.get("prompt") or pick_prompt(row["task"], row_id)
            item = Item(row_id, kind, [row["audio"]], question=question, reference=str(row["text"]))
        else:
            raise EvalError(f"{path} ({where}): not a pretrain {{audio, task, text}}, chat {{messages, audios}} or "
                            "preference {messages, audios, chosen, rejected} row")
        item.audios = [str(base / a) if isinstance(a, str) else a for a in item.audios]
        item.language = language
        items.append(item)
    return items


def _answer_text(value, where: str) -> str:
    """An answer given as a string, an assistant message or a list of one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise EvalError(f"{where}: an answer must be a string or one assistant message")
    return value


def _chat_item(row: dict, row_id: str, where: str) -> Item:
    """The last assistant turn is the reference; the turns before it are the prompt."""
    messages = list(row["messages"])
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    reference = None
    if last is not None:
        messages, reference = messages[:last], messages[last]["content"]
    if not messages or messages[-1].get("role") != "user":
        raise EvalError(f"{where}: the turns before the last assistant answer must end with a user turn")
    return Item(row_id, "short", list(row.get("audios") or []), messages=messages, reference=reference)


def _preference_item(row: dict, row_id: str, where: str) -> Item:
    rejected = next((row[f] for f in REJECTED_FIELDS if row.get(f) is not None), None)
    if rejected is None:
        raise EvalError(f"{where}: a preference row needs 'rejected' (or 'rejected_response') next to 'chosen'")
    messages = list(row.get("messages") or [])
    if not messages or messages[-1].get("role") != "user":
        raise EvalError(f"{where}: a preference row's messages hold the prompt and end with a user turn")
    chosen = _answer_text(row["chosen"], where)
    return Item(row_id, "preference", list(row.get("audios") or []), messages=messages, reference=chosen,
                chosen=chosen, rejected=_answer_text(rejected, where))


# ------------------------------------------------------------------------------------------- public benchmarks


def load_mmau(path: str, audio_root: str | None = None) -> list[Item]:
    """MMAU test-mini / test JSON: each item's clip is ``audio_root / audio_id``."""
    root = Path(audio_root or Path(path).resolve().parent)
    items = []
    for index, row in enumerate(_read_json_list(Path(path))):
        _require(row, MMAU_FIELDS, f"{path} item {index}")
        items.append(Item(
            str(row["id"]), "mcq", [os.path.normpath(root / row["audio_id"])], question=row["question"],
            reference=row["answer"], choices=list(row["choices"]), group=row.get(MMAU_GROUP_FIELD),
        ))
    return items


def _airbench_audio(row: dict, root: Path) -> str:
    """AIR-Bench's layout: ROOT/{task_name}_{dataset_name}/{path} (Audio_Grounding: the .flac of that name)."""
    name = row["path"]
    if row["task_name"] in AIRBENCH_FLAC_TASKS:
        name = name[:-3] + "flac"
    return str(root / f"{row['task_name']}_{row['dataset_name']}" / name)


def load_airbench_foundation(path: str, audio_root: str | None = None) -> list[Item]:
    """AIR-Bench foundation: the reference is the letter of ``answer_gt`` among the choices."""
    root = Path(audio_root or Path(path).resolve().parent)
    items = []
    for index, row in enumerate(_read_json_list(Path(path))):
        where = f"{path} item {index}"
        _require(row, AIRBENCH_FOUNDATION_FIELDS, where)
        choices = [row[f] for f in AIRBENCH_CHOICE_FIELDS if row.get(f) is not None]
        try:
            letter = choice_letter(row["answer_gt"], choices)
        except ValueError as err:
            raise EvalError(f"{where}: {err}") from err
        items.append(Item(
            str(row.get(AIRBENCH_ID_FIELD, index)), "mcq_letter", [_airbench_audio(row, root)],
            question=row["question"], reference=letter, choices=choices,
            group=f"{row['task_name']}_{row['dataset_name']}",  # the official script scores task and dataset apart
        ))
    return items


def load_airbench_chat(path: str, audio_root: str | None = None) -> list[Item]:
    """AIR-Bench chat: open-ended; ``meta_info`` (the audio described in text) goes to the judge only."""
    root = Path(audio_root or Path(path).resolve().parent)
    items = []
    for index, row in enumerate(_read_json_list(Path(path))):
        _require(row, AIRBENCH_CHAT_FIELDS, f"{path} item {index}")
        items.append(Item(
            str(row.get(AIRBENCH_ID_FIELD, index)), "open", [_airbench_audio(row, root)], question=row["question"],
            reference=row["answer_gt"], context=row.get(AIRBENCH_CONTEXT_FIELD), group=row["task_name"],
        ))
    return items


def _first_column(columns, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in columns), None)


def _load_saved_dataset(path: str):
    """A ``save_to_disk`` folder as one Dataset with its audio left undecoded ({bytes, path})."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if HF_SPLIT not in ds and len(ds) != 1:
            raise EvalError(f"{path}: splits {list(ds)}; point at one split's folder (or keep a '{HF_SPLIT}' split)")
        ds = ds[HF_SPLIT] if HF_SPLIT in ds else next(iter(ds.values()))
    audio = _first_column(ds.column_names, HF_AUDIO_COLUMNS)
    if audio is None:
        raise EvalError(f"{path}: no audio column ({' or '.join(HF_AUDIO_COLUMNS)}); columns: {ds.column_names}")
    if isinstance(ds.features[audio], datasets.Audio):  # decoding would need torchcodec; soundfile reads the bytes
        ds = ds.cast_column(audio, datasets.Audio(decode=False))
    return ds, audio


def load_hf(path: str, audio_root: str | None = None) -> list[Item]:
    """VoiceBench / AudioBench subsets saved with ``save_to_disk``."""
    ds, audio = _load_saved_dataset(path)
    columns = ds.column_names
    instruction = _first_column(columns, HF_INSTRUCTION_COLUMNS)
    spoken = None if instruction else _first_column(columns, HF_SPOKEN_COLUMNS)
    reference = _first_column(columns, HF_REFERENCE_COLUMNS)
    id_column = _first_column(columns, HF_ID_COLUMNS)
    items = []
    for index, row in enumerate(ds):
        question = row[instruction or spoken] if (instruction or spoken) else None
        items.append(Item(
            str(row[id_column]) if id_column else f"{Path(path).name}:{index}", "open", [row[audio]],
            question=question, spoken=spoken is not None,
            reference=str(row[reference]) if reference and row[reference] is not None else None,
        ))
    return items


def load_librispeech(path: str, audio_root: str | None = None) -> list[Item]:
    """LibriSpeech layout: every ``*.trans.txt`` line "ID TEXT" names ID.flac (or ID.wav) beside it."""
    items = []
    for trans in sorted(Path(path).rglob("*.trans.txt")):
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            clip = next((trans.parent / f"{utterance}{ext}" for ext in (".flac", ".wav")
                         if (trans.parent / f"{utterance}{ext}").is_file()), None)
            if clip is None:
                raise EvalError(f"{trans}:{number}: no {utterance}.flac (or .wav) next to the transcript")
            items.append(Item(utterance, "asr", [str(clip)], reference=text, language="en"))
    return items
