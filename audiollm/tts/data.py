"""(text, audio) rows -> codec codes (encoded once, cached on disk) -> token sequences in a numpy memmap.

    manifest rows   {"audio": "clips/a.wav", "text": "..."}   (audio paths relative to the manifest)
                    + "words": [{"word": "hello", "start": 0.12}, ...] (seconds) for ``interleave: words``
    code cache      CACHE/codes/<codec key>/<hash of file path, size, mtime>.npz   one array per code level
    token memmap    CACHE/tokens/<hash of manifests, tokenizer, layout, max_length>/tokens.bin (int32, flat)
                    + index.npy (rows x [start, length, label_start]) + meta.json (row counts, skip reasons)

Rows that cannot be used are skipped, never truncated: a missing or unreadable file, text + speech longer than
max_length, or (interleaving words) word times that are missing or do not fit the text and audio. Each skip is
logged with the manifest, the row and the reason, and counted by reason in meta.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audiollm.tts.codecs import CodecError, read_audio
from audiollm.tts.layout import TTSVocab, interleave_words, text_ids, word_ids

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the cross-entropy skips
TOKEN_DTYPE = np.int32  # ids up to 2**31: LLaSA's 150 k text + 65 k speech ids fit


def read_manifest(path: str | os.PathLike, keys: tuple[str, ...] = ("audio", "text")) -> list[dict]:
    """JSONL rows with their audio path made absolute (relative to the manifest's folder); every row needs ``keys``
    (the codec stage reads audio-only rows: ``keys=("audio",)``)."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
        if not all(key in row for key in keys):
            raise ValueError(f"{path}: line {number} needs {' and '.join(map(repr, keys))} keys, has {sorted(row)}")
        rows.append({"audio": str(path.parent / row["audio"]), "text": str(row.get("text", "")),
                     "words": row.get("words"), "where": f"{path}:{number}"})
    return rows


def file_key(path: str) -> str:
    """Changes when the file is replaced or edited: its absolute path, size and modification time."""
    stat = os.stat(path)
    return hashlib.sha1(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


class CodeCache:
    """Codec codes of audio files, computed once per (file, codec) and kept as .npz files under ``folder``."""

    def __init__(self, folder: str | os.PathLike, codec_key: str, load_codec):
        self.folder = Path(folder) / "codes" / codec_key
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load_codec, self._codec = load_codec, None
        self.encoded = self.hits = 0

    @property
    def codec(self):
        if self._codec is None:  # only a process that has something to encode loads the codec
            self._codec = self._load_codec()
        return self._codec

    def codes(self, audio: str) -> list[torch.Tensor]:
        """One code tensor per level for ``audio``; raises CodecError (missing/unreadable file)."""
        if not os.path.isfile(audio):
            raise CodecError(f"{audio}: no such file")
        cached = self.folder / f"{file_key(audio)}.npz"
        if cached.is_file():
            self.hits += 1
            with np.load(cached) as data:
                return [torch.from_numpy(data[f"level{k}"]).long() for k in range(len(data.files))]
        codes = self.codec.encode(read_audio(audio, self.codec.sample_rate))
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"level{k}": c.numpy().astype(np.int32) for k, c in enumerate(codes)})
        os.replace(tmp, cached)  # atomic: a reader never sees half a file
        self.encoded += 1
        return codes


class WordTimesError(ValueError):
    """A row's word times are missing or do not fit its text and audio."""


def word_frames(words, text: str, frame_rate: float, frames: int) -> list[int]:
    """The frame where each word of ``text`` starts, from the row's [{"word", "start"}] (seconds); the first word
    also takes the frames before it. Raises WordTimesError."""
    expected = text.split()
    if not expected or not isinstance(words, list) or [
            w.get("word") if isinstance(w, dict) else None for w in words] != expected:
        raise WordTimesError(f"\"words\" must list the text's {len(expected)} words in order as {{\"word\", "
                             f"\"start\"}}; got {str(words)[:120]}")
    try:
        starts = [float(w["start"]) for w in words]
    except (KeyError, TypeError, ValueError) as err:
        raise WordTimesError(f"every word needs a \"start\" in seconds; got {str(words)[:120]}") from err
    if any(b < a for a, b in zip(starts, starts[1:])) or starts[0] < 0 or starts[-1] * frame_rate >= frames:
        raise WordTimesError(f"word starts {starts} are not increasing within the audio's {frames / frame_rate:.2f} s")
    return [0] + [round(t * frame_rate) for t in starts[1:]]


def row_tokens(row: dict, tokenizer, vocab: TTSVocab, cache: CodeCache) -> tuple[list[int], int]:
    """(ids, label_start) of one row: prompt, speech tokens (words interleaved if the vocab says so), SPEECH_END;
    labels start at SPEECH_START."""
    prompt = text_ids(tokenizer, vocab, row["text"])
    speech = vocab.token_layout.codes_to_tokens(cache.codes(row["audio"])) + vocab.code_offset
    if vocab.words:
        frames = len(speech) // vocab.token_layout.per_frame
        starts = word_frames(row.get("words"), row["text"], vocab.frame_rate, frames)
        body = interleave_words(vocab, word_ids(tokenizer, row["text"]), speech, starts)
    else:
        body = speech.tolist()
    return prompt + body + [vocab.speech_end], len(prompt) - 1


@dataclass
class Skips:
    """Skipped rows by reason, with every skip logged as it happens."""

    counts: Counter

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("tts data: skipped %s (%s): %s", where, reason, detail)


def encode_rows(rows: list[dict], tokenizer, vocab: TTSVocab, cache: CodeCache, max_length: int):
    """Yield (ids, label_start) per usable row; returns the Skips by reason (generator return value)."""
    skips = Skips(Counter())
    for row in rows:
        try:
            ids, label_start = row_tokens(row, tokenizer, vocab, cache)
        except CodecError as err:
            skips.add("unreadable_audio", row["where"], str(err))
            continue
        except WordTimesError as err:
            skips.add("word_times", row["where"], str(err))
            continue
        if len(ids) > max_length:
            skips.add("too_long", row["where"], f"{len(ids)} tokens > max_length {max_length} "
                      f"({row['audio']}); raise max_length or split the clip")
            continue
        yield ids, label_start
    return skips


def memmap_key(manifests: list[str], tokenizer, vocab: TTSVocab, codec_key: str, max_length: int) -> str:
    parts = [file_key(m) for m in manifests] + [str(len(tokenizer)), json.dumps(vocab.__dict__, sort_keys=True),
                                               codec_key, str(max_length)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def build_memmap(manifests: list[str], tokenizer, vocab: TTSVocab, cache: CodeCache, max_length: int,
                 folder: Path) -> dict:
    """Write tokens.bin / index.npy / meta.json into ``folder`` (reused when meta.json exists); returns meta."""
    if (folder / "meta.json").is_file():
        return json.loads((folder / "meta.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for m in manifests for row in read_manifest(m)]
    index, total = [], 0
    with open(folder / "tokens.bin.tmp", "wb") as out:
        rows_iter = encode_rows(rows, tokenizer, vocab, cache, max_length)
        while True:
            try:
                ids, label_start = next(rows_iter)
            except StopIteration as stop:
                skips = stop.value
                break
            out.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
            index.append((total, len(ids), label_start))
            total += len(ids)
    np.save(folder / "index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 3))
    os.replace(folder / "tokens.bin.tmp", folder / "tokens.bin")
    meta = {"manifests": manifests, "rows": len(rows), "kept": len(index), "skipped": dict(skips.counts),
            "tokens": total, "encoded": cache.encoded, "cache_hits": cache.hits}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("tts data: %d of %d rows kept, skipped %s, %d tokens (%d clips encoded, %d from the cache)",
             len(index), len(rows), dict(skips.counts) or "none", total, cache.encoded, cache.hits)
    return meta


class TokenDataset(torch.utils.data.Dataset):
    """Rows of a token memmap: {"input_ids", "labels"} with labels -100 before SPEECH_START and, for a vocab that
    interleaves words, on the words' own tokens inside the speech (they are given, not predicted)."""

    def __init__(self, folder: str | os.PathLike, vocab: TTSVocab | None = None):
        folder = Path(folder)
        self.vocab = vocab if vocab is not None and vocab.words else None
        self.index = np.load(folder / "index.npy")
        size = int(self.index[:, 1].sum()) if len(self.index) else 0
        self.tokens = np.memmap(folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(size,)) if size else None
        self.meta = json.loads((folder / "meta.json").read_text())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        start, length, label_start = (int(v) for v in self.index[i])
        ids = torch.from_numpy(np.array(self.tokens[start : start + length], dtype=np.int64))
        labels = ids.clone()
        labels[:label_start] = IGNORE_INDEX
        if self.vocab is not None:  # text inside the speech: only TEXT_START (a word ends) and SPEECH_END are learnt
            given = (ids < self.vocab.code_offset) & (ids != self.vocab.text_start) & (ids != self.vocab.speech_end)
            given[:label_start] = False
            labels[given] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


@dataclass
class TokenCollator:
    """Right-pads a list of TokenDataset rows: input_ids (pad id), labels (-100), attention_mask."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_dataset(manifests: list[str], tokenizer, vocab: TTSVocab, codec_key: str, load_codec, max_length: int,
                  cache_dir: str | os.PathLike) -> TokenDataset:
    """The memmapped token rows of ``manifests``, building (and encoding audio) only what is not cached yet."""
    manifests = [str(Path(m).resolve()) for m in manifests]
    cache = CodeCache(cache_dir, codec_key, load_codec)
    folder = Path(cache_dir) / "tokens" / memmap_key(manifests, tokenizer, vocab, codec_key, max_length)
    build_memmap(manifests, tokenizer, vocab, cache, max_length, folder)
    return TokenDataset(folder, vocab)
