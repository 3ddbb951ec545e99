"""The two steps of an evaluation, kept apart so scoring can rerun on saved predictions:

    generate: benchmark items -> model answers (or preference log-probs) -> predictions.jsonl
    score:    predictions.jsonl (+ a judge for open-ended tasks) -> scores -> results.json, report.md
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from eval.generate import GenerationSettings, generate_answers, load_model, preference_logps
from eval.items import Item, read_records, to_record, write_records
from eval.judge import Judge
from eval.loaders import Source, load_source, parse_task
from eval.report import summarize, write_report, write_results
from eval.tasks import KINDS, build_messages, prompt_text, score_record

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"


def load_tasks(tasks: dict[str, str], audio_root: str | dict | None = None,
               limit: int | None = None) -> dict[str, list[Item]]:
    """Items per task. A source whose rows have several kinds (a pretrain manifest: asr and short rows) becomes one
    task per kind, named ``NAME/KIND``, since one value cannot mix WER and accuracy."""
    loaded = {}
    for name, spec in tasks.items():
        source: Source = parse_task(f"{name}={spec}")
        root = audio_root.get(name) if isinstance(audio_root, dict) else audio_root
        items = load_source(source, root, limit)
        kinds = sorted({item.kind for item in items})
        for kind in kinds:
            loaded[name if len(kinds) == 1 else f"{name}/{kind}"] = [i for i in items if i.kind == kind]
    return loaded


def predict(task: str, items: list[Item], model, tokenizer, settings: GenerationSettings, batch_size: int,
            model_name: str, by_length: bool = True) -> list[dict]:
    """Records of one task with the model's predictions filled in (scores still empty), in the task's item order.

    Each record carries ``generate_seconds``, the task's generation time shared equally among its items, so the
    items/s of results.json is recomputed from predictions.jsonl alone when it is rescored.
    """
    records = [to_record(item, task, prompt_text(build_messages(item)), model_name, settings.as_dict())
               for item in items]
    start = time.perf_counter()
    _fill_predictions(records, items, model, tokenizer, settings, batch_size, task, by_length)
    share = (time.perf_counter() - start) / len(items)
    for record in records:
        record["generate_seconds"] = share
    log.info("%s: %d items, %.2f items/s", task, len(items), 1 / share)
    return records


def _fill_predictions(records: list[dict], items: list[Item], model, tokenizer, settings: GenerationSettings,
                      batch_size: int, task: str, by_length: bool) -> None:
    if KINDS[items[0].kind].generates:
        answers = generate_answers(model, tokenizer, items, settings, batch_size, task, by_length)
        for record, answer in zip(records, answers):
            record["prediction"] = answer
        return
    for record, (chosen, rejected) in zip(records, preference_logps(model, tokenizer, items, batch_size, task,
                                                                    by_length)):
        record |= {"chosen_logp": chosen, "rejected_logp": rejected,
                   "prediction": record["chosen"] if chosen > rejected else record["rejected"]}


def evaluate(model_dir: str | os.PathLike, tasks: dict[str, str], out_dir: str | os.PathLike, batch_size: int = 8,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             judge: str | Judge | None = None, judge_trust_remote_code: bool = False,
             audio_root: str | dict | None = None, limit: int | None = None, n_resamples: int = 1000,
             device: str | None = None, dtype: str | None = None, by_length: bool = True, num_beams: int = 1) -> dict:
    """Generate answers for every task, then score them; returns the results dict written to results.json.

    tasks: {name: SOURCE} with SOURCE as in ``eval.loaders`` (``[norm=NORM:][KIND[@LANG]:][FORMAT:]PATH``).
    judge: a local causal-LM folder (or a ready ``Judge``) for open-ended tasks; without one they are unscored.
    by_length: batches of similar prompt length, longest first (predictions.jsonl keeps the task's order either
        way); False batches in file order.
    num_beams: beam search width (1: greedy or plain sampling); each record keeps it with its other settings.
    """
    items = load_tasks(tasks, audio_root, limit)  # every benchmark file is checked before the model loads
    model, tokenizer = load_model(str(model_dir), device, dtype)
    settings = GenerationSettings(max_new_tokens, temperature, top_p, seed, num_beams)
    model_name = Path(model_dir).resolve().name
    records = []
    for task, task_items in items.items():
        records += predict(task, task_items, model, tokenizer, settings, batch_size, model_name, by_length)
    del model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records(records, out / PREDICTIONS)  # saved before scoring: a failing judge never costs the generations
    return score(records, out, judge, judge_trust_remote_code, n_resamples, seed, device, dtype)


def score(records: list[dict], out_dir: str | os.PathLike, judge: str | Judge | None = None,
          judge_trust_remote_code: bool = False, n_resamples: int = 1000, seed: int = 0,
          device: str | None = None, dtype: str | None = None) -> dict:
    """Score records (judging open-ended ones when a judge is given) and write all three outputs to ``out_dir``."""
    open_records = [r for r in records if r["kind"] == "open"]
    for record in open_records:
        record.pop("judge", None)  # scores always come from this run's judge, never from an earlier one
    judge_name = judge.name if isinstance(judge, Judge) else Path(judge).resolve().name if judge else None
    if judge is not None and open_records:
        if not isinstance(judge, Judge):
            judge = Judge.from_pretrained(str(judge), device, dtype, judge_trust_remote_code)
        for record, verdict in zip(open_records, judge.judge(open_records)):
            record["judge"] = verdict
    for record in records:
        record["score"], record["stats"] = score_record(record)
    results = summarize(records, judge_name, n_resamples, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records(records, out / PREDICTIONS)
    write_results(results, out)
    write_report(results, records, out)
    log.info("wrote %s, results.json and report.md to %s", PREDICTIONS, out)
    return results


def rescore(predictions: str | os.PathLike, out_dir: str | os.PathLike, judge: str | Judge | None = None,
            judge_trust_remote_code: bool = False, n_resamples: int = 1000, seed: int = 0,
            device: str | None = None, dtype: str | None = None) -> dict:
    """Score a saved predictions.jsonl again (new rules, a judge added) without the model or benchmark files."""
    records = read_records(predictions)
    return score(records, out_dir, judge, judge_trust_remote_code, n_resamples, seed, device, dtype)
