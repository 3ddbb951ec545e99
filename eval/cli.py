"""``audiollm eval`` (and ``python -m eval``): generate answers for benchmark tasks, score them, write a report;
``audiollm eval-tts``: the round-trip intelligibility of a TTS (eval.tts_eval).

    audiollm eval --model runs/sft --task mmau=mmau-test-mini.json --audio-root mmau=data/mmau --out runs/eval
    audiollm eval --model runs/sft --task ls=data/LibriSpeech/test-clean \\
        --task chat=airbench_chat:Chat_meta.json --judge models/Qwen2.5-7B-Instruct --out runs/eval
    audiollm eval --score-only runs/eval/predictions.jsonl --judge models/Qwen2.5-7B-Instruct --out runs/eval2
    audiollm eval-tts --tts runs/tts --texts texts.txt --listener runs/sft --best-of 4 --codec-clips clips.jsonl \\
        --out runs/tts_eval
"""

from __future__ import annotations

import argparse

SOURCE_HELP = (
    "NAME=SOURCE, repeatable. SOURCE is [norm=NORM:][KIND[@LANG]:][FORMAT:]PATH: NORM the ASR normaliser, english, "
    "basic or words (the English one word by word, for word lists; default: by language); KIND one of asr, mcq, "
    "mcq_letter, short, translation, open, preference (default: from the format or the rows); LANG the references' "
    "language (asr: spoken, translation: target; default en); FORMAT one of manifest, mmau, airbench_foundation, "
    "airbench_chat, hf, librispeech (default: detected). Examples: mmau=mmau-test-mini.json, "
    "ls=data/LibriSpeech/test-clean, aishell=asr@zh:hf:data/aishell, covost=translation@de:manifest:st.jsonl"
)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The eval options, shared by ``audiollm eval`` and ``python -m eval``."""
    p.add_argument("--model", metavar="DIR", help="model folder (ours or a stock Qwen2-Audio folder)")
    p.add_argument("--task", metavar="NAME=SOURCE", action="append", default=[], help=SOURCE_HELP)
    p.add_argument("--out", metavar="DIR", required=True, help="writes predictions.jsonl, results.json, report.md")
    p.add_argument("--score-only", metavar="PREDICTIONS", help="rescore a saved predictions.jsonl; no model needed")
    p.add_argument("--audio-root", metavar="[NAME=]DIR", action="append", default=[],
                   help="folder that benchmark audio paths are relative to, for all tasks or task NAME "
                   "(default: the benchmark file's folder)")
    p.add_argument("--batch-size", type=int, default=8, help="items per generation batch (default 8)")
    p.add_argument("--file-order", action="store_true", help="batch items in file order instead of by prompt "
                   "length (predictions.jsonl is in file order either way)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap in tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam search over K partial answers "
                   "(default 1: greedy); about K times the decoding time")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items of each task")
    p.add_argument("--judge", metavar="PATH", help="local causal-LM folder that scores open-ended answers 1-10; "
                   "without it open-ended tasks are reported as unscored")
    p.add_argument("--trust-remote-code", action="store_true", help="let the --judge folder run its own code")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the 95%% CI")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp32 on CPU, the stored dtype on GPU")


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model on audio benchmarks: audiollm eval --model DIR --task NAME=SOURCE --out DIR",
        description="Generate answers for each task (batched, left-padded), score them (WER, MMAU / AIR-Bench "
        "choice rules, exact match, BLEU, a judge LM, preference accuracy) and write predictions.jsonl, "
        "results.json (value, n, bootstrap 95% CI per task) and report.md. --score-only rescores saved "
        "predictions.",
    )
    add_eval_arguments(p)
    p.set_defaults(run=run_eval, parser=p)


def _audio_roots(values: list[str], parser) -> str | dict | None:
    """``DIR`` (all tasks) or ``NAME=DIR`` entries -> one folder or {task: folder}."""
    named = dict(v.split("=", 1) for v in values if "=" in v)
    plain = [v for v in values if "=" not in v]
    if len(plain) > 1 or (plain and named):
        parser.error("--audio-root: give one DIR for all tasks, or NAME=DIR per task")
    return plain[0] if plain else (named or None)


def _check(args, parser) -> None:
    if args.score_only and (args.model or args.task):
        parser.error("--score-only rescores saved predictions: it takes no --model or --task")
    if not args.score_only and (not args.model or not args.task):
        parser.error("give --model DIR and at least one --task NAME=SOURCE (or --score-only PREDICTIONS)")
    if min(args.batch_size, args.max_new_tokens, args.bootstrap, args.num_beams) < 1:
        parser.error("--batch-size, --max-new-tokens, --num-beams and --bootstrap must be >= 1")


def _summary(results: dict) -> str:
    lines = [f"model {results['model']}, judge {results['judge'] or 'none'}:"]
    for name, entry in results["tasks"].items():
        if entry["unscored"]:
            lines.append(f"  {name:<24} {entry['metric']:<14} unscored ({entry['reason']})")
        else:
            low, high = entry["ci95"]
            speed = f"  {entry['items_per_s']:.3g} items/s" if entry.get("items_per_s") else ""
            lines.append(f"  {name:<24} {entry['metric']:<14} {entry['value']:.4g}  "
                         f"[{low:.4g}, {high:.4g}]  n={entry['n']}{speed}")
    return "\n".join(lines)


def run_eval(args) -> int:
    from audiollm.audio import AudioError
    from audiollm.collator import RowError
    from eval.items import EvalError
    from eval.pipeline import evaluate, rescore

    parser = args.parser
    _check(args, parser)
    try:
        if args.score_only:
            results = rescore(args.score_only, args.out, args.judge, args.trust_remote_code, args.bootstrap,
                              args.seed, args.device, args.dtype)
        else:
            tasks = {}
            for spec in args.task:
                name, sep, source = spec.partition("=")
                if not sep or name in tasks:
                    parser.error(f"--task {spec!r}: write NAME=SOURCE, with a new NAME for each task")
                tasks[name] = source
            results = evaluate(
                args.model, tasks, args.out, args.batch_size, args.max_new_tokens, args.temperature, args.top_p,
                args.seed, args.judge, args.trust_remote_code, _audio_roots(args.audio_root, parser), args.limit,
                args.bootstrap, args.device, args.dtype, not args.file_order, args.num_beams,
            )
    except (EvalError, FileNotFoundError, AudioError, RowError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(_summary(results))
    return 0


def add_eval_tts_parser(subparsers) -> None:
    from eval.metrics import ASR_NORMALIZERS

    p = subparsers.add_parser(
        "eval-tts",
        help="round-trip intelligibility of a TTS: audiollm eval-tts --tts DIR --texts FILE --listener PATH --out DIR",
        description="Speak each text with a tts folder (audiollm train tts), transcribe the speech with a listener "
        "and score the WER against the text (seed-tts-eval's protocol), with a bootstrap 95% CI; optionally the "
        "best of N candidates (chosen by the same listener) and the codec's own resynthesis WER on recorded "
        "clips, the ceiling for any TTS on that codec. Writes results.json and report.md.",
    )
    p.add_argument("--tts", required=True, metavar="DIR", help="tts folder (with tts_config.json)")
    p.add_argument("--texts", required=True, metavar="FILE", help=".txt (one text a line) or .jsonl rows with "
                   "\"text\"")
    p.add_argument("--listener", required=True, metavar="PATH", help="the ASR model: Whisper .pt, HF Whisper "
                   "folder, or an audio-LLM folder (ours or a stock Qwen2-Audio), asked \"Transcribe the speech.\"")
    p.add_argument("--out", required=True, metavar="DIR", help="writes results.json and report.md")
    p.add_argument("--best-of", type=int, default=1, metavar="N", help="also score the best of N candidates, "
                   "chosen by the listener's WER against the text (default 1: off)")
    p.add_argument("--codec-clips", metavar="MANIFEST", help="JSONL of {\"audio\", \"text\"} rows (audio relative "
                   "to the file): WER of the clips resynthesised by the TTS's codec")
    p.add_argument("--originals", action="store_true", help="with --codec-clips: also the WER of the clips as is")
    p.add_argument("--codec", metavar="DIR", help="codec folder (default: the one the tts folder recorded)")
    p.add_argument("--language", default="en", help="language of the texts: picks the normaliser, CER for zh/ja")
    p.add_argument("--normalizer", choices=ASR_NORMALIZERS, help="the WER's normaliser instead of the "
                   "language's: words = the English one word by word, for texts that list words")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (best-of uses SEED + 1) and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the 95%% CI")
    p.add_argument("--batch-size", type=int, default=8, help="clips per listener batch (default 8)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.set_defaults(run=run_eval_tts, parser=p)


def run_eval_tts(args) -> int:
    from eval.items import EvalError
    from eval.tts_eval import evaluate_tts, summary

    parser = args.parser
    if args.best_of < 1 or args.bootstrap < 1 or args.batch_size < 1:
        parser.error("--best-of, --bootstrap and --batch-size must be >= 1")
    if args.originals and not args.codec_clips:
        parser.error("--originals goes with --codec-clips")
    try:
        results = evaluate_tts(args.tts, args.texts, args.listener, args.out, args.best_of, args.codec_clips,
                               args.originals, args.codec, args.language, args.seed, args.bootstrap, args.device,
                               args.batch_size, args.normalizer)
    except EvalError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(summary(results))
    print(f"wrote {args.out}/results.json and report.md")
    return 0
