"""``audiollm data check``: the command line over ``audiollm.data_check``."""

from __future__ import annotations

import json

from audiollm.data_check import CheckOptions, check_manifests, summarize, write_clean


def add_check_parser(jobs) -> None:
    c = jobs.add_parser("check", help="decode every row's audio and report problems by kind, with file and row")
    c.add_argument("manifests", nargs="+", metavar="MANIFEST", help=".jsonl / .json / .parquet / save_to_disk folder")
    c.add_argument("--model", metavar="DIR", help="a model folder: exact token counts with its tokenizer "
                   "(without it, text length is estimated)")
    c.add_argument("--max-length", type=int, default=4096, help="tokens per row, audio included (the recipe's)")
    c.add_argument("--max-audio-seconds", type=float, default=600.0, help="longer files are errors (the recipe's)")
    c.add_argument("--data-root", metavar="DIR", help="refuse audio paths outside this folder")
    c.add_argument("--workers", type=int, default=4, help="rows checked in parallel")
    c.add_argument("--fix-out", metavar="CLEAN.jsonl", help="write the rows without errors here")
    c.add_argument("--json", metavar="REPORT.json", help="write every row's problems here")
    c.set_defaults(run=run_check, parser=c)


def run_check(args) -> int:
    options = CheckOptions(args.max_length, args.max_audio_seconds, args.data_root, _collator(args.model))
    reports = check_manifests(args.manifests, options, args.workers)
    table = summarize(reports)
    errors = sum(r.has_error for r in reports)
    print(f"{len(reports)} rows checked: {errors} with errors, {len(reports) - errors} usable")
    for entry in table:
        print(f"  {entry['severity']:<7} {entry['kind']:<20} {entry['rows']:>6} rows  {entry['meaning']}")
        for example in entry["examples"]:
            print(f"          {example}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": len(reports), "rows_with_errors": errors, "kinds": table,
                       "problems": [{"source": r.source, "line": r.line, "id": r.row_id, "problems": r.problems}
                                    for r in reports if r.problems]}, f, indent=1)
    if args.fix_out:
        print(f"wrote {write_clean(reports, args.fix_out)} usable rows to {args.fix_out}")
    return 1 if errors else 0


def _collator(model_dir: str | None):
    """A ChatCollator on the model's tokenizer and projector stacking, or None."""
    if model_dir is None:
        return None
    from transformers import AutoTokenizer

    from audiollm.collator import ChatCollator
    from audiollm.model.config import AudioLLMConfig

    stack = AudioLLMConfig.from_pretrained(model_dir).projector_stack
    return ChatCollator(AutoTokenizer.from_pretrained(model_dir), max_length=10**9, stack=stack)
