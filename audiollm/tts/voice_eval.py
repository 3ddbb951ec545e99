"""The demo's voice, measured by the demo's listener on a split's clips and texts (the TTS never trained on them).

    codec_resynthesis_wer   the split's clips through the codec, transcribed (the ceiling of any TTS on it);
                            codec_resynthesis_gap: minus the clips' own WER, its 95% interval paired over clips
    tts_wer                 one sample per text; tts_wer_best_of_4: the listener picks among 4 (LLaSA's scaling)
    cloning_*               the listener's speaker-sex and pitch answers on TTS output prompted with a clip of the
                            split, against its answers on that clip; the same without a prompt
    spoken_reply_accuracy   spoken questions -> the listener's answers (the demo's eval predictions) -> the TTS
                            speaks them -> the listener transcribes -> scored like voice chat;
                            spoken_reply_ceiling: the same answers spoken by espeak in the voices the TTS learnt
                            (what the listener's transcription allows at best)
    tts_voice_original_wer  the split's texts spoken by espeak in the voices the TTS learnt (what it imitates);
    tts_voice_codec_wer     the same through the codec: the ceiling of tts_wer

The listener is trained on the synthesised source speech only; nothing here trains it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from audiollm.prompts import PROMPT_POOLS
from audiollm.synth.corpus import WER_NORMALIZER, read_jsonl
from eval import metrics
from eval.speech import to_listener_rate

BEST_OF = 4
NORMALIZER = WER_NORMALIZER  # the texts are the corpus's: words one after another, each a unit of WER
CLONING_PROMPTS = 24  # prompt clips, half of each held-out voice's first clips
QUESTIONS = {"sex": PROMPT_POOLS["sex"][0], "pitch": PROMPT_POOLS["pitch"][0]}
EMPTY_ANSWER_SECONDS = 0.1  # an empty answer "spoken": silence the listener hears (espeak refuses an empty text)


def ask(listener, wavs: list[np.ndarray], sample_rate: int, question: str) -> list[str]:
    """The listener's greedy answers to ``question`` about each waveform (resampled to 16 kHz)."""
    from eval.generate import GenerationSettings, generate_answers
    from eval.items import Item
    from eval.speech import audible

    items = [Item(id=f"clip {i}", kind="short", audios=[audible(w)], question=question)
             for i, w in enumerate(to_listener_rate(wavs, sample_rate))]
    return generate_answers(listener.model, listener.tokenizer, items, GenerationSettings(max_new_tokens=8),
                            listener.batch_size, desc=question)


def agreement(a: list[str], b: list[str]) -> float:
    return float(np.mean([metrics.normalize_answer(x) == metrics.normalize_answer(y) for x, y in zip(a, b)]))


def cloning(tts, listener, rows: list[dict], texts: list[str], sampling) -> dict:
    """Speak ``texts[i]`` prompted with clip ``rows[i]`` and unprompted; how often the listener's sex / pitch answer
    on the output equals its answer on the prompt clip."""
    from audiollm.tts.codecs import read_audio
    from audiollm.tts.generate import speak

    rate = tts.codec.sample_rate
    prompts = [read_audio(r["audio"], rate) for r in rows]
    cloned = [speak(tts, t, prompt_audio=r["audio"], prompt_text=r["text"], sampling=sampling).wav
              for r, t in zip(rows, texts)]
    plain = [speak(tts, t, sampling=sampling).wav for t in texts]
    results = {"prompts": len(rows), "prompt_voices": sorted({r["voice"] for r in rows})}
    for name, question in QUESTIONS.items():
        on_prompt = ask(listener, prompts, rate, question)
        results[f"cloning_{name}_agreement"] = agreement(ask(listener, cloned, rate, question), on_prompt)
        results[f"no_prompt_{name}_agreement"] = agreement(ask(listener, plain, rate, question), on_prompt)
    results["prompt_sex_accuracy"] = agreement(ask(listener, prompts, rate, QUESTIONS["sex"]),
                                               [r["sex"] for r in rows])  # does the listener hear the prompts right
    return results


def spoken_by_espeak(texts: list[str], voices: list[str], out: Path) -> list[np.ndarray]:
    """``texts`` spoken by espeak, voices taken in turn, at the corpus's middle rate and pitch: 16 kHz waveforms.
    A blank text (a listener may answer nothing) comes back as EMPTY_ANSWER_SECONDS of silence."""
    import soundfile

    from audiollm.synth.espeak import SAMPLE_RATE
    from audiollm.synth.render import render

    clips = [(f"{i:04d}.wav", text, voices[i % len(voices)], 175, 50) for i, text in enumerate(texts) if text.strip()]
    if clips:
        render(clips, out)
    silence = np.zeros(int(EMPTY_ANSWER_SECONDS * SAMPLE_RATE), dtype=np.float32)
    return [soundfile.read(out / f"{i:04d}.wav", dtype="float32")[0] if text.strip() else silence
            for i, text in enumerate(texts)]


def spoken_replies(tts, listener, predictions: Path, task: str, limit: int, sampling, out: Path,
                   voices: list[str]) -> dict:
    """The listener's answers to spoken questions (``task`` rows of the demo's predictions.jsonl), spoken by the
    TTS and transcribed by the listener, scored against the reference answer like voice chat (exact match after
    the harness's normaliser): one sample per answer, and the best of 4 that the listener, as the verifier, hears
    closest to the answer it meant to say (as ``audiollm speak --best-of 4`` would voice it). Writes the first
    question and its spoken answer as a sample pair."""
    from audiollm.tts.generate import ListenerVerifier, speak, write_wav

    records = [r for r in map(json.loads, predictions.read_text(encoding="utf-8").splitlines())
               if r["task"] == task][:limit]
    verifier = ListenerVerifier(listener, "en", normalizer=NORMALIZER)
    best = [speak(tts, r["prediction"], best_of=BEST_OF, verifier=verifier, sampling=sampling).wav for r in records]
    wavs = [speak(tts, r["prediction"], sampling=sampling).wav for r in records]
    rate = tts.codec.sample_rate
    heard, heard_best = (listener.transcribe(to_listener_rate(w, rate), "en") for w in (wavs, best))
    right = [metrics.exact_match(h, r["reference"]) for h, r in zip(heard, records)]
    right_best = [metrics.exact_match(h, r["reference"]) for h, r in zip(heard_best, records)]
    spoken = listener.transcribe(spoken_by_espeak([r["prediction"] for r in records], voices, out / "espeak"), "en")
    right_espeak = [metrics.exact_match(h, r["reference"]) for h, r in zip(spoken, records)]
    shutil.copy(records[0]["audios"][0], out / "sample_question.wav")
    write_wav(str(out / "sample_answer.wav"), wavs[0], rate)
    return {"spoken_reply_accuracy": float(np.mean(right)),
            f"spoken_reply_accuracy_best_of_{BEST_OF}": float(np.mean(right_best)),
            "spoken_reply_ceiling": float(np.mean(right_espeak)),
            "reply_text_accuracy": float(np.mean([metrics.exact_match(r["prediction"], r["reference"])
                                                  for r in records])),  # the written answers: the ceiling
            "replies": len(records),
            "sample": {"question": records[0]["audios"][0], "answer_text": records[0]["prediction"],
                       "answer_heard": heard[0]}}


def spectrogram_figure(tts, row: dict, sampling, path: Path) -> None:
    """Log-mel spectrograms of one clip as synthesised, through the codec, and its text spoken by the TTS."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    from audiollm.tts.codecs import read_audio
    from audiollm.tts.generate import speak

    rate = tts.codec.sample_rate
    clip = read_audio(row["audio"], rate)
    panels = {"synthesised": clip, "codec": tts.codec.decode(tts.codec.encode(clip))[: len(clip)],
              "TTS": speak(tts, row["text"], sampling=sampling).wav}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, (name, wav) in zip(axes, panels.items()):
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wav, sr=rate, n_mels=80), ref=1.0)
        ax.imshow(mel, origin="lower", aspect="auto", vmin=mel.max() - 80, extent=(0, len(wav) / rate, 0, 80))
        ax.set(title=f"{name}: \"{row['text']}\"" if name == "synthesised" else name, xlabel="s", ylabel="mel bin")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_models(tts_dir: Path, listener_dir: Path, sampling: dict | None, seed: int):
    """The TTS, the listener that measures it, and the TTS's sampling settings (``sampling``: changes to the layout's
    defaults, e.g. temperature, top_k)."""
    from audiollm.tts.generate import load_tts
    from audiollm.tts.sampling import default_sampling
    from eval.speech import load_transcriber

    tts = load_tts(tts_dir)
    return (tts, load_transcriber(str(listener_dir), batch_size=16),
            default_sampling(tts.vocab.layout, **(sampling or {}), seed=seed))


def measure_replies(tts_dir: Path, listener_dir: Path, predictions: Path, reply_task: str, out: Path, texts: int,
                    voices: list[str], seed: int = 0, sampling: dict | None = None) -> dict:
    """The spoken-reply figures (``spoken_replies``) of a TTS and listener on disk, apart from ``measure_voice`` so
    that the demo runs them in its second process: every sample is seeded per text, so nothing that ran before in
    a process changes them."""
    out.mkdir(parents=True, exist_ok=True)
    tts, listener, sampling = load_models(tts_dir, listener_dir, sampling, seed)
    return spoken_replies(tts, listener, predictions, reply_task, texts, sampling, out, voices)


def measure_voice(tts_dir: Path, listener_dir: Path, manifest: Path, out: Path, texts: int, seed: int = 0,
                  full: bool = True, sampling: dict | None = None, tts_voices: list[str] | None = None) -> dict:
    """The voice figures on one split (``manifest``: its {"audio", "text", "voice", "sex"} rows). ``full`` adds
    best-of-4 and cloning to the codec and one-sample TTS figures (spoken replies: ``measure_replies``).
    ``sampling``: changes to the layout's default sampling settings (temperature, top_k...). ``tts_voices``: the
    espeak voices the TTS learnt ("en+f1"), for the reference figures spoken in them."""
    from eval.tts_eval import codec_resynthesis_wer, tts_intelligibility

    out.mkdir(parents=True, exist_ok=True)
    tts, listener, sampling = load_models(tts_dir, listener_dir, sampling, seed)
    rows = read_jsonl(manifest)
    unique = list(dict.fromkeys(r["text"] for r in rows))[:texts]
    clips = rows[:texts]
    codec = codec_resynthesis_wer(tts.codec, [r["audio"] for r in clips], [r["text"] for r in clips], listener,
                                  originals=True, seed=seed, normalizer=NORMALIZER)
    spoken = tts_intelligibility(tts, unique, listener, best_of=BEST_OF if full else 1, seed=seed,
                                 sampling=sampling, normalizer=NORMALIZER)
    figures = {"original_wer": codec["original_wer"]["value"],
               "codec_resynthesis_wer": codec["resynthesis_wer"]["value"],
               "codec_resynthesis_gap": codec["resynthesis_gap"]["value"], "tts_wer": spoken["tts_wer"]["value"],
               "real_time_factor": spoken["real_time_factor"], "time_to_first_audio_s": spoken["time_to_first_audio_s"],
               "ci95": {"original_wer": codec["original_wer"]["ci95"],
                        "codec_resynthesis_wer": codec["resynthesis_wer"]["ci95"],
                        "codec_resynthesis_gap": codec["resynthesis_gap"]["ci95"],  # paired over the clips
                        "tts_wer": spoken["tts_wer"]["ci95"]},
               "clips": len(clips), "texts": len(unique)}
    items = {"codec": codec["items"], "tts": spoken["items"]}
    if full:
        best = f"tts_wer_best_of_{BEST_OF}"
        figures[best], figures["ci95"][best] = (spoken["tts_wer_best_of_n"]["value"],
                                                spoken["tts_wer_best_of_n"]["ci95"])
        items["tts_best_of"] = spoken["items_best_of_n"]
        by_voice = {v: [r for r in rows if r["voice"] == v] for v in sorted({r["voice"] for r in rows})}
        prompts = [r for group in by_voice.values() for r in group[: CLONING_PROMPTS // len(by_voice)]]
        figures |= cloning(tts, listener, prompts, unique[-len(prompts):], sampling)
    if tts_voices:
        reference = codec_resynthesis_wer(tts.codec, spoken_by_espeak(unique, tts_voices, out / "espeak_texts"), unique,
                                          listener, originals=True, seed=seed, normalizer=NORMALIZER)
        figures |= {"tts_voice_original_wer": reference["original_wer"]["value"],
                    "tts_voice_codec_wer": reference["resynthesis_wer"]["value"]}
        items["tts_voice_codec"] = reference["items"]
    if full:
        spectrogram_figure(tts, clips[0], sampling, out / "spectrograms.png")
    (out / "voice_items.json").write_text(json.dumps(items, indent=1))
    return figures
