"""What can be wrong with one manifest row, apart from its audio (``audiollm.audio_checks``).

The collator calls ``check_chat_row`` on every row it encodes and ``audiollm data check`` calls it before training,
so both refuse the same rows for the same reasons. Every problem is a ``RowError`` with a ``kind`` from
``ROW_KINDS``, so bad rows can be counted by class. A JSONL line that is not a row at all gets its kind from
``parse_line``, which loading a manifest (``audiollm.data``) and ``data check`` share for the same reason.
"""

from __future__ import annotations

import json
import os

from audiollm.chat import count_audio_markers

ROW_KINDS = {
    "non_utf8": ("error", "the manifest line is not valid UTF-8"),
    "bad_json": ("error", "the manifest line is not valid JSON"),
    "bad_row": ("error", "missing or mistyped fields (messages, audios, text)"),
    "placeholder_mismatch": ("error", "the <audio> markers and the audio files differ in number"),
    "empty_assistant": ("error", "no assistant turn, or an empty one"),
    "over_length": ("error", "more tokens (audio included) than max_length"),
    "escapes_root": ("error", "an audio path outside the configured data root"),
    "transcript_mismatch": ("error", "'transcripts' (for distillation) not one string per audio"),
}


class RowError(ValueError):
    """A manifest row that cannot be used; the message names the row and what to fix, ``kind`` is a ROW_KINDS
    key (or an audio kind when the row's audio is the problem)."""

    def __init__(self, message: str, kind: str = "bad_row"):
        super().__init__(message)
        self.kind = kind


def parse_line(raw: bytes) -> tuple[dict | None, tuple[str, str] | None]:
    """One JSONL line -> (the row, None) or (None, (kind, detail)) for a non-UTF-8, non-JSON or non-object line."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, ("non_utf8", f"byte {err.start}: {err.reason}")
    except json.JSONDecodeError as err:
        return None, ("bad_json", str(err))
    if not isinstance(row, dict):
        return None, ("bad_row", f"a JSON {type(row).__name__}, not an object")
    return row, None


def check_chat_row(row: dict, row_id: str, data_root: str | None = None, generation: bool = False) -> None:
    """Refuse a chat row whose structure, marker count, assistant turns or paths are wrong (RowError)."""
    messages, audios = row.get("messages"), row.get("audios") or []
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RowError(f"{row_id}: 'messages' must be a non-empty list of {{role, content}} objects", "bad_row")
    if not isinstance(audios, list):
        raise RowError(f"{row_id}: 'audios' must be a list of files, got {type(audios).__name__}", "bad_row")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise RowError(f"{row_id}: each message needs a role (system/user/assistant) and a text content; "
                           f"got {m!r:.120}", "bad_row")
    markers = count_audio_markers(messages)
    if markers != len(audios):
        raise RowError(f"{row_id}: {markers} <audio> marker(s) in messages but {len(audios)} file(s) in "
                       "'audios'; put one <audio> in the text for each audio file", "placeholder_mismatch")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not generation and (not answers or any(not a.strip() for a in answers)):
        raise RowError(f"{row_id}: {'an empty assistant turn' if answers else 'no assistant turn'}; a training row "
                       "needs the answer to learn", "empty_assistant")
    for path in audios:
        if isinstance(path, str):
            check_inside_root(path, data_root, row_id)


def check_inside_root(path: str, data_root: str | None, row_id: str) -> None:
    """With a data root set, refuse a path that resolves outside it (``../``, absolute paths, symlinks)."""
    if data_root is None:
        return
    root = os.path.realpath(data_root)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise RowError(f"{row_id}: audio {path} is outside the data root {root}", "escapes_root")
