"""Streaming TTS on CPU: time to first audio (TTFA) and real-time factor (RTF) of the tiny decoder LM per codec.

    python -m benchmarks.tts_stream [--out runs/bench/tts_stream.json] [--repeats 3]

For each layout (SNAC snac7, Mimi rvq, XCodec2 single) a tiny random codec and a tiny Qwen2 with TTS tokens are
built in a temporary folder; each utterance is sampled and decoded in a sliding window (audiollm.tts.streaming).
TTFA is the wall time from the call to the first audio chunk; RTF is wall time / audio seconds. Random models
speak noise of random length, so lengths are capped the same way for all (text-length cap) and the medians over
repeats and texts are reported. One intra-op thread, as the tests run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

TEXTS = ("one two three four", "the red cat and the blue dog", "good morning")
CASES = (("snac", "snac7"), ("mimi", "rvq"), ("xcodec2", "single"))


def build(kind: str, layout: str, root: Path):
    """A TTSModel with a tiny codec and a tiny LM (random, never trained)."""
    from audiollm.tts.generate import TTSModel
    from audiollm.tts.tiny import tiny_codec, tiny_lm
    from audiollm.tts.training import TTSModelArguments, load_tts_model
    from audiollm.tts.codecs import load_codec

    codec_dir, lm_dir = tiny_codec(kind, root / kind), tiny_lm(root / f"lm-{kind}")
    model, tokenizer, vocab = load_tts_model(TTSModelArguments(str(lm_dir), str(codec_dir), layout=layout))
    return TTSModel(model.eval(), tokenizer, vocab, load_codec(codec_dir))


def measure(tts, repeats: int) -> dict:
    from audiollm.tts.generate import speak_stream, timed_stream
    from audiollm.tts.sampling import default_sampling
    from audiollm.tts.codecs import stream_context
    from audiollm.tts.streaming import FrameStreamer

    context = stream_context(tts.codec)  # measured once, not per call
    ttfa, rtf, audio = [], [], []
    for seed in range(repeats):
        for text in TEXTS:
            sampling = default_sampling(tts.vocab.layout, seed=seed)
            _, timing = timed_stream(speak_stream(tts, text, sampling=sampling, context=context),
                                     tts.codec.sample_rate)
            ttfa.append(timing.first_audio_s)
            rtf.append(timing.rtf)
            audio.append(timing.audio_s)
    return {"ttfa_s": statistics.median(ttfa), "rtf": statistics.median(rtf),
            "audio_s": statistics.median(audio), "n": len(ttfa),
            "exact_stream": FrameStreamer(tts.codec, context=context).exact}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/tts_stream.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, layout in CASES:
            results[f"{kind}/{layout}"] = measure(build(kind, layout, Path(tmp)), args.repeats)
    print(f"{'codec/layout':<18}{'TTFA (s)':>10}{'RTF':>8}{'audio (s)':>11}{'n':>4}  exact stream")
    for name, r in results.items():
        print(f"{name:<18}{r['ttfa_s']:>10.3f}{r['rtf']:>8.2f}{r['audio_s']:>11.2f}{r['n']:>4}  {r['exact_stream']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
