"""The demo's voice made real: a codec and a TTS decoder trained on the demo corpus, measured by the demo's
listener on texts the TTS never saw.

    corpus (audiollm data synth) -> clips as (audio, text) manifests
    -> codec: stages/codec.py with stages/configs/codec_demo.yaml (mel frames -> RVQ -> magnitude -> Griffin-Lim)
    -> TTS: stages/tts.py with stages/configs/tts_demo.yaml (a tiny Qwen2 writes the codec's codes for a text,
       each word's text given just before its frames)
    -> measured (audiollm/tts/voice_eval.py) by the listener the demo trained on the synthesised source speech only

The listener never trains on codec or TTS output: it measures, it is not taught. Texts and clips are the held-out
split's (sentences and voices the TTS never trained on); settings are compared on the validation split.
"""

from __future__ import annotations

import functools
import importlib
import json
import random
from pathlib import Path

import torch

from audiollm.synth.corpus import read_jsonl, write_jsonl

CONFIG_DIR = Path(__file__).resolve().parents[2] / "stages" / "configs"
# English clips only: the TTS learns one language's spelling-to-sound; the codec hears the same speech.
LANGUAGE = "en"
# Training rows: every English training clip (~9,100, 1-3 s each); evaluation rows per split (the first ones).
EVAL_ROWS = 200
# The TTS interleaves words (stages/configs/tts_demo.yaml; espeak says where each word starts): without it the tiny
# LM said a text's first word and then lost its place, on training texts too (WER 0.91 on 60 of them). Validation
# TTS WER, 60 texts, the same codec, 3,000 steps: 0.924 without, 0.273 with (the clips themselves: 0.583).
# Chosen on the validation split (listener: the demo's pretrained model, 30 texts): the TTS writes only the codec's
# first level (WER 0.85 with 1 level, 0.85 with 2, 1.08 with 4, a 64-wide LM, 800-2000 steps: fewer tokens per
# second are easier to learn) and is sampled at temperature 0.5 among the top 20 codes (0.78, against 0.90 greedy
# and 0.92 at the rvq default T 0.9 / top-k 50, a 128-wide LM, 3000 steps).
TTS_CODEBOOKS = 1
SAMPLING = {"temperature": 0.5, "top_k": 20}
# The TTS's own voices: the training split's English texts, each spoken by espeak in both (a two-speaker TTS corpus,
# as LJSpeech-style corpora are one or a few speakers). Training every voice of the listener's corpus (115 accent x
# variant pairs, ~90 clips each) left the TTS at validation WER 0.68 and its spoken replies at 0.27: the tiny LM
# averaged over voices, and the listener hears each voice differently. Chosen on the validation split: the
# listener's WER on 60 validation texts spoken by espeak (rate 175, pitch 50) was lowest in these two training
# voices (en+m1 0.233, en+f1 0.240; en-US+m3 0.279, en-GB-x-rp+f2 0.287, en-US+f3 0.380, en-US+Andy 0.357).
TTS_VOICES = {"female": "en+f1", "male": "en+m1"}
# Training texts the TTS corpus speaks (the first ones, in corpus order): as many as the demo corpus had when the
# voice's recipes were chosen, so that the listener's larger corpus does not lengthen the voice's synthesis.
TTS_TEXTS = 5060


def voice_manifests(corpus: Path, out: Path) -> dict[str, Path]:
    """{train, heldout, validation}: the corpus's English clips of each split as {"audio", "text", "voice", "sex",
    "words"} rows. Training's include the spoken answers the listener learns to transcribe (the corpus's
    ``taught_answers``), so the TTS speaks sentences of the form of its replies too ("before six comes five")."""
    clips = read_jsonl(corpus / "clips.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for split in ("train", "heldout", "validation"):
        rows = [{"audio": str((corpus / c["audio"]).resolve()), "text": c["text"], "voice": c["voice"],
                 "sex": c["sex"], **word_times(c["text"], c.get("word_starts", []))}
                for c in clips if c["split"] == split and c["language"] == LANGUAGE]
        rows = rows if split == "train" else rows[:EVAL_ROWS]
        manifests[split] = out / f"voice_{split}.jsonl"
        write_jsonl(manifests[split], rows)
    return manifests


def tts_corpus(corpus: Path, out: Path, seed: int) -> Path:
    """The training split's English texts spoken by espeak in each of TTS_VOICES, rate and pitch drawn per clip
    from the corpus's normal ranges (so that cloning has pitch to follow): a manifest of rows like voice_manifests'.
    Only training texts: the held-out and validation texts stay unheard by the TTS."""
    from audiollm.synth.render import render
    from audiollm.synth.voices import PITCH_NORMAL, RATE_NORMAL

    clips = read_jsonl(corpus / "clips.jsonl")
    texts = list(dict.fromkeys(c["text"] for c in clips if c["split"] == "train" and c["language"] == LANGUAGE))
    texts = texts[:TTS_TEXTS]
    rng = random.Random(f"{seed}:tts voices")
    plan = [(f"tts/{i:05d}.wav", text, voice, sex, rng.randint(*RATE_NORMAL), rng.randint(*PITCH_NORMAL))
            for i, (text, (sex, voice)) in enumerate((t, v) for t in texts for v in TTS_VOICES.items())]
    _, _, starts = render([(audio, text, voice, rate, pitch) for audio, text, voice, _, rate, pitch in plan], out)
    rows = [{"audio": str((out / audio).resolve()), "text": text, "voice": voice, "sex": sex,
             **word_times(text, word_starts)} for (audio, text, voice, sex, *_), word_starts in zip(plan, starts)]
    manifest = out / "voice_tts_train.jsonl"
    write_jsonl(manifest, rows)
    return manifest


def in_turn(jobs: list) -> list:
    """Each of ``jobs`` (callables without arguments) in turn; their values."""
    return [job() for job in jobs]


def on_one_thread(fn, *args):
    """``fn(*args)`` on one intra-op thread (in a process of its own, beside another)."""
    torch.set_num_threads(1)
    return fn(*args)


def word_times(text: str, starts: list[float]) -> dict:
    """{"words": [{"word", "start"}...]} for a clip whose espeak word starts match its words one to one, else {}
    (the tts stage then skips and counts the row)."""
    words = text.split()
    return {"words": [{"word": w, "start": t} for w, t in zip(words, starts)]} if len(words) == len(starts) else {}


def run_recipe(module: str, recipe: str, overrides: list[str], max_steps: int | None, callbacks: list | None = None
               ) -> None:
    """stages/MODULE.py with stages/configs/RECIPE and ``overrides``, as ``audiollm train MODULE --config ...`` runs
    it; every demo stage, listening and voice, goes through here. ``callbacks`` go to the stage's trainer (the
    listening stages take them)."""
    argv = ["--config", str(CONFIG_DIR / recipe), *overrides]
    if max_steps is not None:  # a shortened run still logs every step, so its loss curve has points
        argv += ["--max_steps", str(max_steps), "--logging_steps", "1"]
    stage = importlib.import_module(f"stages.{module}")
    if callbacks is None:
        stage.main(argv)
    else:
        stage.main(argv, callbacks=callbacks)


def train_voice(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0, max_steps: int | None = None
                ) -> dict[str, Path]:
    """Train the codec, then the TTS on its codes, into ``out_dir``; returns the folders and manifests."""
    from audiollm.tts.tiny import tiny_lm

    corpus, out = Path(corpus_dir), Path(out_dir)
    manifests = voice_manifests(corpus, out / "data")
    manifests["tts_train"] = tts_corpus(corpus, out / "data", seed)
    threads = torch.get_num_threads()
    # One intra-op thread: models this small gain nothing from more, and on a busy 2-core machine OpenMP's
    # thread sync made a TTS training step 25x slower (1.16 s vs 0.045 s measured).
    torch.set_num_threads(1)
    try:
        run_recipe("codec", "codec_demo.yaml", ["--train_files", str(manifests["tts_train"]), "--eval_files",
                                               str(manifests["validation"]), "--output_dir", str(out / "codec"),
                                               "--seed", str(seed)], max_steps)
        lm = tiny_lm(out / "init" / "lm", "demo", seed)
        run_recipe("tts", "tts_demo.yaml", ["--model_name_or_path", str(lm), "--codec_name_or_path",
                                           str(out / "codec"), "--codec_codebooks", str(TTS_CODEBOOKS),
                                           "--train_files", str(manifests["tts_train"]),
                                           "--eval_files", str(manifests["validation"]), "--output_dir",
                                           str(out / "tts"), "--cache_dir", str(out / "cache"), "--seed", str(seed)],
                  max_steps)
    finally:
        torch.set_num_threads(threads)
    return {"codec": out / "codec", "tts": out / "tts", **manifests}


def measure_demo_voice(folders: dict[str, Path], listener: str | Path, seed: int = 0, texts: int = 60) -> dict:
    """Measure a trained voice (``train_voice``'s folders) with ``listener`` on the held-out split (every figure) and
    the validation split (codec and one-sample TTS WER, where settings are compared); writes voice_results.json."""
    from audiollm.beside import Beside, sharing_cores, stop_on_error
    from audiollm.tts.voice_eval import measure_replies, measure_voice

    out = Path(folders["tts"]).parent
    predictions = Path(listener).parent / "eval" / "predictions.jsonl"
    voices = list(TTS_VOICES.values())
    measure = functools.partial(measure_voice, folders["tts"], Path(listener), texts=texts, seed=seed,
                                sampling=SAMPLING, tts_voices=voices)
    # A second process beside the held-out split, one thread each (models this small gain less from a second thread
    # than from a second process): validation, then the held-out spoken replies, the held-out half's longest part.
    # Validation alone left that core idle for 140 of the 192 s.
    jobs = [functools.partial(measure, folders["validation"], out / "validation", full=False)]
    if predictions.is_file():
        jobs.append(functools.partial(measure_replies, folders["tts"], Path(listener), predictions,
                                      "heldout_voice_chat", out / "heldout", texts, voices, seed=seed,
                                      sampling=SAMPLING))
    beside = Beside(on_one_thread, out / "validation.log", in_turn, jobs)
    with sharing_cores(beside) as share, stop_on_error(beside):
        share()  # one thread here while the other process runs; all of them again afterwards
        heldout = measure(folders["heldout"], out / "heldout")
    validation, *replies = beside.result()
    results = {"heldout": heldout | (replies[0] if replies else {}), "validation": validation}
    (out / "voice_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
