"""Manifests through ``datasets``: local JSONL / JSON / Parquet, ``save_to_disk`` folders, Hub names; mixing.

Rows keep their audio as paths (resolved against the manifest's folder) or undecoded Hub ``Audio`` values: the
collator decodes audio per batch, so nothing is cached as features. Three row formats, one per stage:

    pretrain:   {"audio": "a.wav", "task": "asr", "text": "the transcript"}   (optional "prompt" overrides the pool,
                optional "transcript": what the clip says, for distillation)
    chat (SFT): {"messages": [{"role": "user", "content": "<audio>..."}, {"role": "assistant", ...}],
                 "audios": ["a.wav"]}    (optional "transcripts": one per audio, for distillation; optional
                "task", as pretraining rows carry it: what the row asks about, which augmentation keeps)
    preference: the chat row plus "chosen" and "rejected" answers (strings or assistant messages);
                LLaMA-Factory's "rejected_response" is read as "rejected".
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from audiollm.audio import SAMPLE_RATE
from audiollm.prompts import pick_prompt
from audiollm.row_checks import parse_line

log = logging.getLogger(__name__)
MANIFEST_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_manifest(source: str, streaming: bool = False, split: str = "train", bad_rows=None):
    """One manifest as a ``datasets`` Dataset (IterableDataset when streaming), with ``id`` and absolute paths.

    ``source``: a .jsonl/.json/.parquet file, a folder written by ``save_to_disk``, or a Hub dataset name
    (``org/name``; needs a network). Row ids are ``file:line`` (1-based) unless the manifest has an ``id``.
    JSONL lines that are not UTF-8 or not JSON are left out and recorded in ``bad_rows`` (a ``BadRowLog``).
    """
    import datasets

    name = os.path.basename(os.path.normpath(source))
    base_dir = os.path.dirname(os.path.abspath(source))  # relative audio paths are relative to the manifest
    if source.endswith(".jsonl") and os.path.isfile(source):
        source = parseable_jsonl(source, bad_rows)
    if os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        ds = ds.to_iterable_dataset() if streaming else ds
        base_dir = os.path.abspath(source)
    elif os.path.isfile(source):
        builder = MANIFEST_BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise ValueError(f"{source}: unknown manifest type; use .jsonl, .json, .parquet or a save_to_disk folder")
        ds = datasets.load_dataset(builder, data_files=source, split="train", streaming=streaming)
    elif "/" in source and not os.path.exists(os.path.dirname(source) or "."):
        ds = _load_hub(source, split, streaming)
    else:
        raise FileNotFoundError(f"{source}: manifest not found (not a file, a save_to_disk folder or a Hub name)")
    ds = _undecoded_audio(ds)
    return ds.map(locate_paths, with_indices=True, fn_kwargs={"name": name, "base_dir": base_dir})


def parseable_jsonl(source: str, bad_rows=None) -> str:
    """``source`` when every line parses; else a copy without the broken lines, in the temporary folder (the
    manifest's own folder may be read-only), whose rows keep their ids (original line numbers). The broken lines
    are logged and recorded.

    Streams the file twice at most and holds only the broken lines' numbers: a manifest of millions of rows costs
    a pass of ``json.loads``, not its rows in memory.
    """
    name, good, broken = os.path.basename(source), 0, []
    with open(source, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                problem = parse_line(raw)[1]
                good += problem is None
                broken += [(number, problem)] if problem else []
    if not broken:
        return source
    for _ in range(good if bad_rows is not None else 0):
        bad_rows.good()  # the ceiling is a fraction of all rows
    for number, (kind, detail) in broken:
        log.warning("%s:%d: %s (%s), row left out", source, number, kind, detail)
        if bad_rows is not None:
            bad_rows.bad(f"{name}:{number}", kind, detail)
    handle, copy = tempfile.mkstemp(prefix=f"{name}.parseable-", suffix=".jsonl")  # one per process and call
    with open(source, "rb") as f, os.fdopen(handle, "w", encoding="utf-8") as out:
        for number, raw in enumerate(f, start=1):
            row = parse_line(raw)[0] if raw.strip() else None
            if row is not None:
                out.write(json.dumps({"id": f"{name}:{number}", **row}, ensure_ascii=False) + "\n")
    return copy


def _load_hub(name: str, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown name, gated: say which and why
        raise FileNotFoundError(f"{name}: not a local manifest and the Hub dataset cannot be loaded ({err})") from err


def _undecoded_audio(ds):
    """Keep Hub ``Audio`` columns as {path, bytes}: decoding happens in the collator, batch by batch."""
    import datasets

    for column in ("audio", "audios"):
        feature = (ds.features or {}).get(column)
        if isinstance(feature, datasets.Audio):
            ds = ds.cast_column(column, datasets.Audio(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Audio):
            ds = ds.cast_column(column, datasets.List(datasets.Audio(decode=False)))
    return ds


def locate_paths(row: dict, index: int, name: str, base_dir: str) -> dict:
    """Give the row an id and make its audio paths absolute (relative paths are relative to the manifest)."""
    out = {"id": str(row.get("id") or f"{name}:{index + 1}")}
    if isinstance(row.get("audio"), str):
        out["audio"] = os.path.join(base_dir, row["audio"])
    if row.get("audios") is not None:
        out["audios"] = [os.path.join(base_dir, a) if isinstance(a, str) else a for a in row["audios"]]
    return out


def load_mixture(sources: list[str], weights: list[float] | None = None, streaming: bool = False, seed: int = 0,
                 prompt_seed: int = 0, bad_rows=None):
    """Several manifests as one dataset of chat rows; ``weights`` are sampling probabilities (normalised), None
    concatenates. Pretraining manifests are turned into chat rows first, so any stage can mix in any format
    (e.g. replay ASR rows during SFT so that the model keeps transcribing).

    With weights, sampling stops when every source has been seen once (``all_exhausted``): small sources are
    oversampled to their weight, none is cut short.
    """
    import datasets

    parts = [as_chat(load_manifest(s, streaming, bad_rows=bad_rows), prompt_seed) for s in sources]
    if len(parts) == 1:
        return parts[0]
    if weights is None:
        return datasets.concatenate_datasets(parts)
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"mix_weights {weights} must give one non-negative weight per source ({len(sources)})")
    probs = [w / sum(weights) for w in weights]
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy="all_exhausted")


def as_chat(dataset, prompt_seed: int = 0):
    """Chat rows as they are; pretraining rows (audio, task, text) -> chat rows, lazily for streamed data."""
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    if "messages" in columns or "task" not in columns:
        return dataset
    return dataset.map(pretrain_to_chat, fn_kwargs={"seed": prompt_seed}, remove_columns=list(columns))


def pretrain_to_chat(row: dict, seed: int = 0) -> dict:
    """A pretraining row -> a chat row: the audio, one instruction from the task's pool, the target text."""
    prompt = row.get("prompt") or pick_prompt(row["task"], row["id"], seed)
    messages = [
        {"role": "user", "content": f"<audio>{prompt}"},
        {"role": "assistant", "content": str(row["text"])},
    ]
    # The task stays with the row: augmentation leaves alone what a row asks about (audiollm/augment.py).
    chat = {"id": row["id"], "messages": messages, "audios": [row["audio"]], "task": str(row["task"])}
    if "transcript" in row:  # what the clip says: CTC targets (audiollm/ctc.py), text for a kd teacher
        chat["transcripts"] = None if row["transcript"] is None else [str(row["transcript"])]
    return chat


def add_lengths(dataset, num_proc: int | None = None):
    """Add ``length`` (estimated tokens) and ``seconds`` (of audio) columns for length-grouped or token-budget
    batching; reads audio headers only.

    Text counts about 4 characters a token; audio 25 tokens a second. Grouping needs an order, not exact counts.
    """
    return dataset.map(_estimate_length, num_proc=num_proc)


def _estimate_length(row: dict) -> dict:
    texts = [m["content"] for m in row.get("messages") or []] or ["", str(row.get("text") or "")]  # pretrain: 2 turns
    sources = row.get("audios") or ([row["audio"]] if row.get("audio") else [])
    seconds = sum(audio_seconds(source) for source in sources)
    return {"length": estimated_tokens(texts, seconds, len(sources)), "seconds": seconds}


# Chat-template tokens around the contents (Qwen tokenizer): a default system turn (~11), each turn's
# <|im_start|>role\n ... <|im_end|>\n (~5), each clip's "Audio k: <|audio_bos|> ... <|audio_eos|>\n" (~6). A 2 s
# clip's row holds ~30 of them: left out, a budget of short rows would overrun by a quarter.
SYSTEM_TOKENS, TURN_TOKENS, CLIP_TOKENS = 11, 5, 6


def estimated_tokens(texts: list, seconds: float, clips: int = 0) -> int:
    """About 4 characters a text token, 25 audio tokens a second (40 ms each), plus the template's tokens."""
    template = SYSTEM_TOKENS + TURN_TOKENS * len(texts) + CLIP_TOKENS * clips
    return sum(len(str(t)) for t in texts) // 4 + int(seconds * 25) + template


def audio_seconds(source) -> float:
    """Duration of an audio entry from its header only (path, undecoded Hub value, decoded Hub array, or a 16 kHz
    waveform); 0 when it cannot be read: the decoder names a bad file later, where the row is used."""
    import io

    import soundfile

    if isinstance(source, dict) and source.get("array") is not None:
        return len(source["array"]) / source["sampling_rate"]
    if not isinstance(source, (str, os.PathLike, dict)):
        return len(source) / SAMPLE_RATE if hasattr(source, "__len__") else 0.0
    data = source.get("bytes") if isinstance(source, dict) else None
    path = source if isinstance(source, (str, os.PathLike)) else (source or {}).get("path")
    try:
        if data:
            return soundfile.info(io.BytesIO(data)).duration
        return soundfile.info(path).duration if path and os.path.isfile(path) else 0.0
    except Exception:  # a format libsndfile cannot read: the order is only an estimate
        return 0.0
