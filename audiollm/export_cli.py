"""``audiollm export``: the argument parser and its runner (see ``audiollm.export`` for the work).

    audiollm export --model runs/sft --out exports/sft
    audiollm export --model runs/sft/checkpoint-500 --out exports/sft-500 --dtype fp32
    audiollm export --model runs/sft/adapter --merge-lora --out exports/sft-merged --results eval/results.json
    audiollm export --model runs/sft --out exports/sft --check --push-to-hub me/my-audio-model --private

Kept apart from ``audiollm.export`` so that building the ``audiollm`` parser imports neither torch nor
transformers.
"""

from __future__ import annotations

import argparse

from audiollm.export_choices import DTYPE_NAMES, FORMATS


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained model as a Hugging Face folder (stock Qwen2-Audio when possible), optionally upload",
        description="Export a model folder, a checkpoint-N (ZeRO shards consolidated on CPU) or a LoRA adapter "
        "(--merge-lora) into a new folder with safetensors shards, config, tokenizer, processor, generation "
        "config and a model card (README.md). The folder appears complete or not at all.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="model folder, checkpoint-N or LoRA adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output folder")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="qwen2_audio (stock transformers), native (audiollm classes) or auto (default: "
                   "qwen2_audio whenever the model fits it)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="weights dtype on disk (default bf16)")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base")
    p.add_argument("--base", metavar="PATH", help="base folder of an adapter (overrides adapter_config.json), or "
                   "where a mid-run checkpoint's tokenizer and processor files are")
    p.add_argument("--results", metavar="JSON", help="eval results.json to put in the model card")
    p.add_argument("--check", action="store_true",
                   help="measure unpadded vs 30 s-padded logits on a synthetic clip; record it in the card")
    p.add_argument("--license", help="license id for the card's metadata, e.g. apache-2.0 (default: other)")
    p.add_argument("--base-model", action="append", metavar="REPO_ID", dest="base_models",
                   help="Hub id of a model this one derives from (repeatable), for the card's metadata")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repo (token: HF_TOKEN "
                   "or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    p.set_defaults(run=run_export, parser=p)


def run_export(args: argparse.Namespace) -> int:
    if (args.private or args.revision) and not args.push_to_hub:
        args.parser.error("--private and --revision go with --push-to-hub")
    from audiollm.export import export  # heavy (torch, transformers): only once the arguments are good

    out = export(args.model, args.out, args.format, args.dtype, args.merge_lora, args.results, args.push_to_hub,
                 args.private, args.revision, base=args.base, check=args.check, license=args.license,
                 base_models=args.base_models)
    print(f"wrote {out}")
    return 0
