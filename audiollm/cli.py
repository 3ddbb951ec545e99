"""The ``audiollm`` command. One subcommand per job; each is a pair ``add_<job>_parser`` / ``run_<job>``.

    audiollm init --encoder whisper-large-v3 --llm Qwen2.5-7B-Instruct --out runs/init
    audiollm init --encoder large-v3.pt --llm Qwen3-8B --projector stack --stack 4 --out runs/init
    audiollm init --from-qwen2-audio Qwen2-Audio-7B-Instruct --out runs/init
    audiollm init --tiny --out runs/tiny
    audiollm train sft --config stages/configs/sft.yaml --learning_rate 2e-5
    audiollm eval-tts --tts runs/tts --texts texts.txt --listener whisper-large-v3 --best-of 4 --out runs/tts_eval
    audiollm serve --model runs/demo/export --tts runs/demo/voice/tts --port 7860

A subcommand's user errors (a missing file, a wrong checkpoint) print one line naming the file and exit with 1;
argument mistakes are parser errors (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from audiollm.data_check_cli import add_check_parser
from audiollm.export_cli import add_export_parser
from audiollm.model.config import PROJECTORS
from audiollm.serve import add_serve_parser
from audiollm.synth.voices import FORMANT_RANGE, TABLE_SHARE, VOWEL_SHARE
from audiollm.tts.cli import add_tts_commands
from eval.cli import add_eval_parser, add_eval_tts_parser

INIT_MODES = ("parts", "qwen2_audio", "tiny")
# Options each init mode takes beyond --out; anything else given with that mode is an argument error.
INIT_OPTIONS = {
    "parts": {"projector", "stack", "dtype", "trust_remote_code", "seed"},
    "qwen2_audio": set(),
    "tiny": {"projector", "stack", "llm_type", "tie", "seed", "size"},
}
INIT_DEFAULTS = {
    "projector": "linear",
    "stack": 4,
    "dtype": "bf16",
    "trust_remote_code": False,
    "llm_type": "qwen2",
    "tie": False,
    "seed": 0,
    "size": "test",
}


def add_init_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="build a model folder: Whisper encoder + LLM + new projector, a released Qwen2-Audio, or a tiny model",
        description="Write one Hugging Face folder (model, tokenizer with audio tokens, processor, generation "
        "config). A linear projector gives a stock Qwen2-Audio checkpoint.",
    )
    source = p.add_argument_group("source (exactly one)")
    source.add_argument("--encoder", metavar="PATH", help="HF Whisper folder or OpenAI Whisper .pt (needs --llm)")
    source.add_argument("--llm", metavar="PATH", help="local HF causal-LM folder, e.g. Qwen2.5-7B-Instruct")
    source.add_argument("--from-qwen2-audio", metavar="PATH", help="a released Qwen2-Audio folder, re-saved as is")
    source.add_argument("--tiny", action="store_true", help="tiny random model for tests and the CPU demo")
    p.add_argument("--out", metavar="DIR", required=True, help="new (or empty) output folder")
    # None marks "not given", so options that do not fit the chosen source can be refused.
    p.add_argument("--projector", choices=PROJECTORS, help="linear (Qwen2-Audio, default), mlp or stack")
    p.add_argument("--stack", type=int, metavar="K", help="frames merged per token by --projector stack (default 4)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weights dtype for --encoder/--llm (default bf16)")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="run the LLM folder's own code")
    p.add_argument("--llm-type", choices=("qwen2", "qwen3"), help="--tiny LLM family (default qwen2)")
    p.add_argument("--tie", action="store_true", default=None, help="--tiny LLM with tied input/output embeddings")
    p.add_argument("--seed", type=int, help="seed of the random projector / tiny weights (default 0)")
    p.add_argument("--size", choices=("test", "demo"), help="--tiny size: test (width 64, 2 layers, default) or "
                   "demo (width 128, 4 layers)")
    p.set_defaults(run=run_init, parser=p)


def _init_mode(args, parser: argparse.ArgumentParser) -> str:
    """Which source was chosen; refuses zero or several sources and options that do not apply to it."""
    chosen = {
        "parts": args.encoder is not None or args.llm is not None,
        "qwen2_audio": args.from_qwen2_audio is not None,
        "tiny": args.tiny,
    }
    modes = [mode for mode in INIT_MODES if chosen[mode]]
    if len(modes) != 1:
        parser.error("choose exactly one source: --encoder with --llm, --from-qwen2-audio PATH, or --tiny")
    mode = modes[0]
    if mode == "parts" and (args.encoder is None or args.llm is None):
        parser.error("--encoder and --llm go together")
    flag = {"parts": "--encoder/--llm", "qwen2_audio": "--from-qwen2-audio", "tiny": "--tiny"}[mode]
    for option in sorted(set().union(*INIT_OPTIONS.values()) - INIT_OPTIONS[mode]):
        if getattr(args, option) is not None:
            parser.error(f"--{option.replace('_', '-')} does not apply to {flag}")
    if args.stack is not None and (args.projector != "stack" or args.stack < 1):
        parser.error("--stack K takes K >= 1 and goes with --projector stack")
    for option, value in INIT_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    return mode


def _describe(model, out: Path) -> str:
    """What was written: the folder's files with sizes and the parameter count of each part."""
    from audiollm.build import parameter_counts

    lines = [f"wrote {out} (projector {model.config.projector_type}, model dtype {model.dtype}):"]
    for file in sorted(out.iterdir()):
        lines.append(f"  {file.name:<32} {file.stat().st_size:>16,} bytes")
    lines.append("parameters:")
    for part, count in parameter_counts(model).items():
        lines.append(f"  {part:<32} {count:>16,}")
    return "\n".join(lines)


def run_init(args) -> int:
    from audiollm import build  # heavy (transformers, torch): only once the arguments are good

    mode = _init_mode(args, args.parser)
    out = Path(args.out)
    if mode == "parts":
        model = build.init_model(
            args.encoder, args.llm, out, args.projector, args.stack, args.dtype, args.trust_remote_code, args.seed
        )
    elif mode == "qwen2_audio":
        model = build.from_qwen2_audio(args.from_qwen2_audio, out)
    else:
        model = build.build_tiny(out, args.projector, args.stack, args.llm_type, args.tie, args.seed, args.size)
    print(_describe(model, out))
    return 0


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="data tools: synth (the spoken demo corpus), check (a preflight)")
    jobs = p.add_subparsers(dest="data_job", required=True, metavar="JOB")
    s = jobs.add_parser("synth", help="synthesise the spoken demo corpus offline with eSpeak NG")
    s.add_argument("--out", metavar="DIR", required=True, help="new or empty folder")
    s.add_argument("--seed", type=int, default=0, help="same seed, same corpus (audio included)")
    s.add_argument("--size", choices=("small", "full"), default="small", help="small: ~1,000 clips in seconds")
    s.add_argument("--vowel-share", type=float, default=VOWEL_SHARE, metavar="P",
                   help=f"each English training clip in an accent of its own: each vowel moves to a neighbouring one "
                   f"with probability P, the same way all through the clip (default {VOWEL_SHARE}; 0: the accent "
                   "voices' own vowels)")
    s.add_argument("--formant-range", type=float, nargs=2, default=FORMANT_RANGE, metavar=("LOW", "HIGH"),
                   help="each training clip in a vocal tract of its own: the voice's formant frequencies times a "
                   f"factor drawn from LOW-HIGH (default {FORMANT_RANGE[0]} {FORMANT_RANGE[1]}; 1 1: as shipped)")
    s.add_argument("--table-share", type=float, default=TABLE_SHARE, metavar="P",
                   help="each English training clip, with probability P, in its accent's rules spoken with another "
                   f"training accent's phoneme table (default {TABLE_SHARE}; 0: every accent as shipped)")
    s.set_defaults(run=run_data_synth, parser=s)
    add_check_parser(jobs)


def run_data_synth(args) -> int:
    from audiollm.synth.build import synth

    summary = synth(args.out, seed=args.seed, size=args.size, vowel_share=args.vowel_share,
                    formant_range=tuple(args.formant_range), table_share=args.table_share)
    for split, info in summary["splits"].items():
        print(f"{split}: {info['clips']} clips, {info['audio_seconds']:.0f} s of audio")
    print(f"wrote {args.out}")
    return 0


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on a laptop CPU: synth -> init -> text -> speaker -> pretrain -> SFT -> DPO -> eval "
        "-> export -> the voice (codec, TTS)",
        description="Synthesises a spoken corpus offline, trains a tiny listening model through the three stages, "
        "scores it on a held-out split and exports it; beside the listening stages, in a second process, trains a "
        "codec and a TTS decoder on the corpus's training texts spoken in two voices; then measures the voice with "
        "the listener. About 20 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="new or empty folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every stage at this many steps (a quick smoke run)")
    p.add_argument("--part", choices=("all", "listening", "voice"), default="all",
                   help="listening: stop before the voice; voice: train and measure the voice in --out, the folder "
                   "of a finished listening run (default: all)")
    p.set_defaults(run=run_demo, parser=p)


def run_demo(args) -> int:
    from audiollm.demo import run_demo as demo

    if args.part == "voice" and not Path(args.out, "export", "config.json").is_file():
        args.parser.error(f"--part voice needs a finished listening run in {args.out} (its export/ is missing)")
    demo(args.out, seed=args.seed, max_steps=args.max_steps, part=args.part)
    return 0


STAGES = ("pretrain", "sft", "dpo", "grpo", "codec", "tts")  # stages/<name>.py: the listening pipeline, the voice


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="run one training stage: audiollm train STAGE --config YAML [--key value ...]",
        description="Runs stages/STAGE.py in this process. Everything after STAGE goes to the stage's own parser "
        "(a recipe YAML and overrides of any of its keys). Several GPUs: launch/train.sh.",
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="--config YAML and overrides")
    p.set_defaults(run=run_train, parser=p)


def run_train(args) -> int:
    import importlib

    importlib.import_module(f"stages.{args.stage}").main(args.stage_args)
    return 0


SUBCOMMANDS = (add_demo_parser, add_init_parser, add_data_parser, add_train_parser, add_eval_parser,
               add_eval_tts_parser, add_export_parser, add_tts_commands, add_serve_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiollm", description="Train Qwen2-Audio-style audio-language models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from audiollm.audio import AudioError
    from audiollm.bad_rows import TooManyBadRows
    from audiollm.build import BuildError
    from audiollm.synth.splits import CorpusError
    from audiollm.synth.espeak import EspeakError
    from audiollm.tts.codecs import CodecError
    from audiollm.tts.layout import LayoutError

    try:
        return args.run(args)
    except (BuildError, CorpusError, EspeakError, CodecError, LayoutError, AudioError, FileNotFoundError,
            TooManyBadRows) as err:
        args.parser.exit(1, f"audiollm {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
