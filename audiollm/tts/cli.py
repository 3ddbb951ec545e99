"""The ``audiollm speak`` and ``audiollm chat`` subcommands.

    audiollm speak --model runs/tts --text "hello world" --out hello.wav [--stream]
    audiollm speak --model runs/tts --text "..." --out x.wav --prompt-audio ref.wav --prompt-text "what ref says"
    audiollm speak --model runs/tts_csm --text "..." --out x.wav --turn "earlier words" earlier.wav   # csm context
    audiollm speak --model runs/tts --text "..." --out x.wav --best-of 4 --verifier whisper-large-v3.pt
    audiollm chat --model runs/sft --audio question.wav --tts runs/tts --out-wav reply.wav
    audiollm chat --model runs/sft --audio question.wav --mode cascade --asr whisper.pt [--text-llm Qwen2.5/]
"""

from __future__ import annotations

import numpy as np


def add_tts_commands(subparsers) -> None:
    """Add ``speak`` and ``chat`` to the ``audiollm`` command's subparsers."""
    from eval.metrics import ASR_NORMALIZERS

    p = subparsers.add_parser("speak", help="text to speech with a model from `audiollm train tts`")
    p.add_argument("--model", required=True, metavar="DIR", help="tts output folder (with tts_config.json)")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True, metavar="WAV")
    p.add_argument("--codec", metavar="DIR", help="codec folder (default: the one recorded at training)")
    p.add_argument("--stream", action="store_true", help="decode while sampling; prints time to first audio")
    p.add_argument("--prompt-audio", metavar="WAV", help="voice to clone (needs --prompt-text)")
    p.add_argument("--prompt-text", help="the words of --prompt-audio")
    p.add_argument("--turn", nargs=2, action="append", metavar=("TEXT", "WAV"), help="a csm model: an earlier turn "
                   "of the conversation (its words and its audio), oldest first; repeat for more")
    p.add_argument("--best-of", type=int, default=1, metavar="N", help="sample N, keep the best by --verifier")
    p.add_argument("--verifier", metavar="LISTENER", help="scores --best-of candidates by WER: a Whisper .pt, an HF "
                   "Whisper folder or an audio-LLM folder (audiollm init / training output, stock Qwen2-Audio)")
    p.add_argument("--normalizer", choices=ASR_NORMALIZERS, help="the verifier's WER normaliser (default: Whisper's "
                   "English one); words: each spoken word counts, for texts that list words or numbers")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_speak, parser=p)

    c = subparsers.add_parser("chat", help="speech to speech: answer a spoken question, voice the answer")
    c.add_argument("--model", required=True, metavar="LISTENER", help="audiollm model folder (the listener)")
    c.add_argument("--audio", required=True, metavar="WAV", help="the spoken question")
    c.add_argument("--tts", metavar="DIR", help="tts folder to voice the answer")
    c.add_argument("--out-wav", metavar="WAV", help="where the spoken answer goes (needs --tts)")
    c.add_argument("--mode", choices=("listen", "cascade"), default="listen",
                   help="listen: the audio LLM hears the question; cascade: Whisper -> text LLM")
    c.add_argument("--asr", metavar="WHISPER", help="cascade: Whisper .pt or HF folder")
    c.add_argument("--text-llm", metavar="DIR", help="cascade: text LLM folder (default: the listener's LLM)")
    c.set_defaults(run=run_chat, parser=c)


def run_speak(args) -> int:
    from audiollm.tts.generate import ListenerVerifier, load_tts, speak, speak_stream, timed_stream, write_wav
    from audiollm.tts.sampling import default_sampling

    if args.best_of > 1 and not args.verifier:
        args.parser.error("--best-of N needs --verifier LISTENER")
    if args.stream and args.best_of > 1:
        args.parser.error("--stream speaks one candidate; it does not go with --best-of")
    if (args.prompt_audio is None) != (args.prompt_text is None):
        args.parser.error("--prompt-audio and --prompt-text go together")
    tts = load_tts(args.model, args.codec)
    sampling = default_sampling(tts.vocab.layout, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    clone = {"prompt_audio": args.prompt_audio, "prompt_text": args.prompt_text,
             "turns": [tuple(t) for t in args.turn] if args.turn else None}
    if args.stream:
        wav, timing = timed_stream(speak_stream(tts, args.text, sampling=sampling, **clone), tts.codec.sample_rate)
        write_wav(args.out, wav, tts.codec.sample_rate)
        print(f"time to first audio {timing.first_audio_s:.3f} s, real-time factor {timing.rtf:.2f}")
    else:
        verifier = ListenerVerifier(args.verifier, normalizer=args.normalizer) if args.verifier else None
        result = speak(tts, args.text, best_of=args.best_of, verifier=verifier, sampling=sampling,
                       out_wav=args.out, **clone)
        if result.scores:
            print(f"best of {args.best_of}: candidate {result.chosen} (scores {np.round(result.scores, 3).tolist()})")
        wav = result.wav
    print(f"wrote {args.out} ({len(wav) / tts.codec.sample_rate:.2f} s at {tts.codec.sample_rate} Hz)")
    return 0


def run_chat(args) -> int:
    from audiollm.tts.chat import chat

    if args.out_wav and not args.tts:
        args.parser.error("--out-wav needs --tts")
    if args.mode == "cascade" and not args.asr:
        args.parser.error("--mode cascade needs --asr WHISPER")
    reply = chat(args.model, args.audio, args.tts, args.out_wav, args.mode, args.asr, args.text_llm)
    if reply.transcript is not None:
        print(f"heard: {reply.transcript}")
    print(f"answer: {reply.text}")
    if args.out_wav:
        print(f"wrote {args.out_wav} ({len(reply.wav) / reply.sample_rate:.2f} s)")
    return 0
