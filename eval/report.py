"""Scored records -> results.json (per task: metric, value, n, bootstrap CI, model and judge) and report.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from eval import metrics
from eval.items import read_records
from eval.tasks import KINDS, aggregator, details, metric_name

NO_JUDGE_REASON = "open-ended answers need a judge model: rerun scoring with --judge PATH (a local causal LM)"
WORST_SHOWN = 5  # errors listed per task in report.md
CELL_CHARS = 120  # report.md table cells are cut to this many characters


def summarize_task(records: list[dict], judge: str | None, n_resamples: int = 1000, seed: int = 0) -> dict:
    """One task's entry of results.json from its scored records (all of one task and kind).

    ``items`` counts the task's items, ``n`` those scored (an unreadable judge reply leaves an item unscored).
    """
    kind = records[0]["kind"]
    entry = {"kind": kind, "metric": metric_name(kind, records), "higher_is_better": KINDS[kind].higher_is_better,
             "value": None, "n": 0, "ci95": None, "model": records[0].get("model"),
             "judge": judge if kind == "open" else None, "unscored": False, "items": len(records),
             "items_per_s": _items_per_s(records), "generation": records[0].get("generation")}
    scored = [r for r in records if r.get("stats") is not None]
    if kind == "open" and judge is None:
        return entry | {"unscored": True, "reason": NO_JUDGE_REASON}
    if not scored:
        return entry | {"unscored": True, "reason": "no item could be scored (every judge reply was unreadable)"}
    stats = np.asarray([r["stats"] for r in scored], dtype=np.float64)
    aggregate = aggregator(kind, scored)
    low_high = metrics.bootstrap_ci(stats, aggregate, n_resamples, seed)
    entry |= {"value": aggregate(stats.sum(axis=0), len(scored)), "n": len(scored), "ci95": list(low_high)}
    entry |= details(kind, scored, stats)
    groups = sorted({r["group"] for r in scored if r.get("group")})
    if groups:
        entry["groups"] = {}
        for group in groups:
            part = np.asarray([r["stats"] for r in scored if r.get("group") == group], dtype=np.float64)
            entry["groups"][group] = {"value": aggregate(part.sum(axis=0), len(part)), "n": len(part)}
            entry["groups"][group] |= details(kind, [r for r in scored if r.get("group") == group], part)
    return entry


def _items_per_s(records: list[dict]) -> float | None:
    """Generation speed of a task, from each record's share of its generation time (None for older files)."""
    seconds = [r.get("generate_seconds") for r in records]
    return None if None in seconds else len(records) / sum(seconds)


def summarize(records: list[dict], judge: str | None, n_resamples: int = 1000, seed: int = 0) -> dict:
    """results.json: the model, the judge, the bootstrap settings and one entry per task (in first-seen order)."""
    tasks: dict[str, list[dict]] = {}
    for record in records:
        tasks.setdefault(record["task"], []).append(record)
    return {
        "model": records[0].get("model"),
        "judge": judge,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "tasks": {name: summarize_task(rows, judge, n_resamples, seed) for name, rows in tasks.items()},
    }


def paired_gain(before: str | os.PathLike, after: str | os.PathLike, task: str) -> dict:
    """Mean per-item score change on ``task`` between two prediction files of the same items, with a 95% bootstrap
    interval over items, and how many items each direction flipped."""
    scores = [{r["id"]: float(r["score"]) for r in read_records(path) if r["task"] == task} for path in (before, after)]
    ids = sorted(scores[0])
    delta = np.array([scores[1][i] - scores[0][i] for i in ids])
    low, high = metrics.bootstrap_ci(delta, lambda sums, n: sums[0] / n)
    return {"gain": float(delta.mean()), "ci95": [low, high], "fixed": int((delta > 0).sum()),
            "broken": int((delta < 0).sum()), "items": len(ids)}


def write_results(results: dict, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _cell(value) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _number(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _is_error(kind: str, score: float) -> bool:
    """Whether an item belongs in the worst-errors list: not right (0/1 kinds), any ASR error, any BLEU/judge."""
    if kind == "asr":
        return score > 0
    if kind in ("translation", "open"):
        return True
    return score < 1


def worst_errors(records: list[dict], limit: int = WORST_SHOWN) -> list[dict]:
    """The ``limit`` worst scored items of one task: lowest scores, or highest error rates for ASR."""
    kind = records[0]["kind"]
    errors = [r for r in records if r.get("score") is not None and _is_error(kind, r["score"])]
    return sorted(errors, key=lambda r: r["score"], reverse=not KINDS[kind].higher_is_better)[:limit]


def render_report(results: dict, records: list[dict]) -> str:
    """report.md: a results table, then each task's worst errors."""
    lines = [
        "# Evaluation report", "",
        f"Model: `{results['model']}` · judge: `{results['judge'] or 'none'}` · 95% CI: percentile bootstrap, "
        f"{results['bootstrap']['resamples']} resamples, seed {results['bootstrap']['seed']}", "",
        "| task | kind | metric | value | 95% CI | n | items/s |", "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["tasks"].items():
        value = f"unscored: {entry['reason']}" if entry["unscored"] else _number(entry["value"])
        if entry.get("accuracy_unparsed_wrong") is not None:  # AIR-Bench: the official right / parsed, then ours
            value += f" ({_number(entry['accuracy_unparsed_wrong'])} with {entry['unparsed']} unparsed as wrong)"
        ci = "–" if entry["ci95"] is None else f"{_number(entry['ci95'][0])} – {_number(entry['ci95'][1])}"
        direction = "↑" if entry["higher_is_better"] else "↓"
        speed = _number(entry.get("items_per_s"))
        lines.append(f"| {name} | {entry['kind']} | {entry['metric']} {direction} | {_cell(value)} | {ci} | "
                     f"{entry['n']} | {speed} |")
    for name in results["tasks"]:
        rows = worst_errors([r for r in records if r["task"] == name])
        if not rows:
            continue
        lines += ["", f"## {name}: worst errors", "", "| id | reference | prediction | score |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {_cell(r['id'])} | {_cell(r.get('reference'))} | {_cell(r.get('prediction'))} | "
                         f"{_number(r['score'])} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, records: list[dict], out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / "report.md"
    path.write_text(render_report(results, records), encoding="utf-8")
    return path
