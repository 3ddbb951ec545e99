"""``audiollm data check``: decode every row's audio before training and report each problem with its file and row.

Run it on a manifest before a long run::

    audiollm data check train.jsonl [more.jsonl ...] [--model DIR] [--fix-out CLEAN.jsonl]

Rows are checked in parallel threads (decoding and resampling run in C and release the GIL). Each problem has a
kind from ``audiollm.audio_checks.AUDIO_KINDS`` or ``audiollm.row_checks.ROW_KINDS`` and a severity; errors are
the rows training would skip. The exit status is 1 when any row has an error. ``--fix-out`` writes the rows without
errors to a new manifest, audio paths rewritten relative to it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from audiollm.audio import AudioError, clip_token_count
from audiollm.audio_checks import AUDIO_KINDS, read_checked
from audiollm.data import load_manifest, locate_paths, pretrain_to_chat
from audiollm.distill import text_version
from audiollm.row_checks import ROW_KINDS, RowError, check_chat_row, parse_line

KINDS = {**ROW_KINDS, **AUDIO_KINDS}
CHARS_PER_TOKEN = 4  # text length estimate without a tokenizer (English BPE averages about 4 characters a token)


@dataclass
class CheckOptions:
    max_length: int = 4096  # tokens per row, audio included (the recipe's max_length)
    max_seconds: float | None = 600.0  # the recipe's max_audio_seconds
    data_root: str | None = None
    collator: object | None = None  # a ChatCollator (with --model): exact token counts instead of an estimate


@dataclass
class RowReport:
    """One manifest row and what is wrong with it: [(kind, detail)], worst first."""

    source: str
    line: int  # 1-based line (JSONL) or row number
    row_id: str
    row: dict | None  # None when the line could not be parsed
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_error(self) -> bool:
        return any(KINDS[kind][0] == "error" for kind, _ in self.problems)


def read_rows(source: str) -> list[RowReport]:
    """Every row of a manifest, unchecked. JSONL is read line by line so that a non-UTF-8 or broken line is one
    bad row; other formats go through ``audiollm.data.load_manifest``."""
    if not source.endswith(".jsonl"):
        return [RowReport(source, i + 1, row["id"], row) for i, row in enumerate(load_manifest(source))]
    reports, base_dir, name = [], os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    with open(source, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                reports.append(_parse_line(raw, source, name, number, base_dir))
    return reports


def _parse_line(raw: bytes, source: str, name: str, number: int, base_dir: str) -> RowReport:
    report = RowReport(source, number, f"{name}:{number}", None)
    row, problem = parse_line(raw)
    if problem is not None:
        report.problems.append(problem)
        return report
    report.row = {**row, **locate_paths(row, number - 1, name, base_dir)}
    report.row_id = report.row["id"]
    return report


def check_report(report: RowReport, options: CheckOptions) -> RowReport:
    """Fill ``report.problems``: row structure first (nothing is decoded for a malformed row), then each audio
    file, then the length in tokens."""
    if report.row is None:
        return report
    try:
        chat = as_checkable_chat(report.row, report.row_id)
        check_chat_row(chat, report.row_id, options.data_root)
        text_version(chat, report.row_id)  # transcripts for distillation, when given: one per audio
    except RowError as err:
        report.problems.append((err.kind, str(err)))
        return report
    clips = []
    for source in chat["audios"]:
        try:
            wav, findings = read_checked(source, options.max_seconds)
        except FileNotFoundError as err:
            report.problems.append(("missing", str(err)))
            continue
        except AudioError as err:
            report.problems.append((err.kind, str(err)))
            continue
        clips.append(wav)
        report.problems += [(f.kind, f"{source}: {f.detail}") for f in findings]
    if len(clips) == len(chat["audios"]):
        _check_length(report, chat, clips, options)
    return report


def as_checkable_chat(row: dict, row_id: str) -> dict:
    """Any manifest row as the chat row training would see: pretraining rows get their instruction, preference
    rows their chosen answer (both answers must be there)."""
    if "messages" not in row and "task" in row:
        if not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise RowError(f"{row_id}: a pretraining row needs 'audio' (a file) and 'text' (a string)", "bad_row")
        return pretrain_to_chat({**row, "id": row_id})
    if "chosen" in row or "rejected" in row:
        answers = [row.get(key) for key in ("chosen", "rejected")]
        texts = [a.get("content") if isinstance(a, dict) else a for a in answers]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise RowError(f"{row_id}: a preference row needs non-empty 'chosen' and 'rejected'", "empty_assistant")
        return {**row, "messages": list(row.get("messages") or []) + [{"role": "assistant", "content": texts[0]}]}
    return row


def _check_length(report: RowReport, chat: dict, clips: list, options: CheckOptions) -> None:
    if options.collator is not None:
        tokens, how = len(options.collator.encode({**chat, "audios": clips}, 0).input_ids), "tokens"
    else:
        text = sum(len(m["content"]) for m in chat["messages"]) // CHARS_PER_TOKEN
        tokens, how = text + sum(clip_token_count(len(c)) for c in clips), "tokens (estimated; --model counts)"
    if tokens > options.max_length:
        report.problems.append(("over_length", f"{tokens} {how} > max_length={options.max_length}"))


def check_manifests(sources: list[str], options: CheckOptions, workers: int = 4,
                    progress: bool = True) -> list[RowReport]:
    """Read and check every row of ``sources``; the reports come back in manifest order."""
    from tqdm import tqdm

    reports = [r for source in sources for r in read_rows(source)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = pool.map(lambda r: check_report(r, options), reports)
        return list(tqdm(done, total=len(reports), desc="checking rows", unit="row", disable=not progress))


def summarize(reports: list[RowReport], examples: int = 3) -> list[dict]:
    """One entry per problem kind found: severity, rows, and the first ``examples`` as 'file:line: detail'."""
    table: dict[str, dict] = {}
    for report in reports:
        for kind, detail in report.problems:
            entry = table.setdefault(kind, {"kind": kind, "severity": KINDS[kind][0], "meaning": KINDS[kind][1],
                                            "rows": 0, "examples": []})
            entry["rows"] += 1
            if len(entry["examples"]) < examples:
                entry["examples"].append(f"{report.source}:{report.line} ({report.row_id}): {detail}")
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(table.values(), key=lambda e: (order[e["severity"]], -e["rows"], e["kind"]))


def write_clean(reports: list[RowReport], out: str) -> int:
    """The rows without errors as JSONL at ``out``, audio paths relative to it; returns the rows written."""
    out_dir = os.path.dirname(os.path.abspath(out))
    kept = [r for r in reports if not r.has_error and r.row is not None]
    with open(out, "w", encoding="utf-8") as f:
        for report in kept:
            f.write(json.dumps(_relative_paths(report.row, out_dir), ensure_ascii=False) + "\n")
    return len(kept)


def _relative_paths(row: dict, out_dir: str) -> dict:
    row = dict(row)
    if isinstance(row.get("audio"), str):
        row["audio"] = os.path.relpath(row["audio"], out_dir)
    if isinstance(row.get("audios"), list):
        row["audios"] = [os.path.relpath(a, out_dir) if isinstance(a, str) else a for a in row["audios"]]
    return row
