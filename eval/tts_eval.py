"""Round-trip intelligibility of a TTS, the seed-tts-eval protocol: text -> TTS -> waveform -> a listener (an ASR
model) transcribes it -> WER against the text.

    listener = load_transcriber("whisper-large-v3")                    # or an audio-LLM folder (eval.speech)
    results = tts_intelligibility(tts, texts, listener, best_of=4)
    results["tts_wer"]            # {"value", "ci95", "errors", "words", "n"}: one sample per text
    results["tts_wer_best_of_n"]  # the same for the best of 4 candidates, chosen by the same listener
    ceiling = codec_resynthesis_wer(tts.codec, clip_paths, clip_texts, listener, originals=True)

- The one-sample WER uses sampling seed ``seed``; the best-of-N candidates are drawn with ``seed + 1``, so the two
  figures come from independent samples. Each text is sampled with the same seed (every text is repeatable alone).
- Best-of-N follows LLaSA: the verifier is the same listener, and it scores each candidate against the text the TTS
  was asked to say; nothing else about the item reaches it. The kept candidate is reported as the verifier heard
  it (one transcription gives both its score and its WER).
- ``real_time_factor`` is synthesis wall seconds / audio seconds of the one-sample run (sampling + codec decoding,
  batch 1, after one untimed warm-up); ``time_to_first_audio_s`` is the median over the first texts of the wall time
  ``speak_stream`` takes to yield its first chunk.
- Codec resynthesis: each clip encoded and decoded by the TTS's codec, then transcribed. A TTS speaking that codec
  cannot be more intelligible than its codec's resynthesis, so this WER is the ceiling to read tts_wer against.
- WER after the harness's normaliser by language, or ``normalizer`` by name (``eval.metrics.ASR_NORMALIZERS``:
  ``words`` for texts that list words, so that "seven eleven" is two words, not the number 711).
- 95% CIs are percentile bootstraps over items of the corpus WER (``eval.metrics.bootstrap_ci``), as ``audiollm
  eval`` reports them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from audiollm.audio import SAMPLE_RATE
from eval import metrics
from eval.generate import _chunks
from eval.items import EvalError
from eval.loaders import _manifest_rows
from eval.report import _cell, _number, write_results
from eval.speech import resample, to_listener_rate, transcript_wer
from eval.tasks import aggregator

CHUNK = 32  # texts synthesised, then transcribed together: listener batches without holding every waveform
FIRST_AUDIO_TEXTS = 10  # texts streamed for time to first audio (prefill + one hop of frames: it varies little)
WORST_SHOWN = 5  # items listed in report.md


# ------------------------------------------------------------------------------------------------------ inputs


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts to speak: a .txt file (one a line; trailing blank lines ignored) or .jsonl rows with "text"."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such texts file")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").rstrip().splitlines()
        rows = [(f"{path}:{number}", line.strip()) for number, line in enumerate(lines, 1)]
    elif path.suffix == ".jsonl":
        rows = [(where, row.get("text") if isinstance(row, dict) else None)
                for where, row in _manifest_rows(path)]
    else:
        raise EvalError(f"{path}: pass a .txt file (one text a line) or a .jsonl file of {{\"text\": ...}} rows")
    if not rows:
        raise EvalError(f"{path}: no texts in this file")
    for where, text in rows:
        if not isinstance(text, str):
            raise EvalError(f"{where}: no \"text\" string in this row")
        if not text.strip():
            raise EvalError(f"{where}: empty text")
    return [text.strip() for _, text in rows]


def read_clips(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(audio paths, texts) of a JSONL manifest of {"audio", "text"} rows (the tts stage's format; audio paths
    relative to the manifest). Every file must exist; decoding problems surface when a clip is read."""
    from audiollm.tts.data import read_manifest

    if not Path(path).is_file():
        raise EvalError(f"{path}: no such clip manifest")
    try:
        rows = read_manifest(path)
    except ValueError as err:
        raise EvalError(str(err)) from err
    if not rows:
        raise EvalError(f"{path}: no clips in this manifest")
    for row in rows:
        if not row["text"].strip():
            raise EvalError(f"{row['where']}: empty text")
        if not Path(row["audio"]).is_file():
            raise EvalError(f"{row['where']}: no such audio file {row['audio']}")
    return [row["audio"] for row in rows], [row["text"].strip() for row in rows]


def check_texts(texts: Sequence[str]) -> None:
    """Refuse no texts, or an empty one: an item without words has no WER."""
    if not texts:
        raise EvalError("no texts to speak")
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise EvalError(f"texts[{empty[0]}] is empty; every item needs words to score against")


# ------------------------------------------------------------------------------------------------------ scoring


def wer_entry(items: list[dict], n_resamples: int, seed: int) -> dict:
    """Per-item {"errors", "words"} -> {"value", "ci95", "errors", "words", "n"}: the corpus WER (total errors /
    total words) and its percentile-bootstrap 95% interval over items."""
    stats = [[item["errors"], item["words"]] for item in items]
    errors, words = sum(s[0] for s in stats), sum(s[1] for s in stats)
    low_high = metrics.bootstrap_ci(stats, aggregator("asr", items), n_resamples, seed)
    return {"value": metrics.error_rate(errors, words), "ci95": list(low_high) if low_high else None,
            "errors": errors, "words": words, "n": len(items)}


def wer_gap_entry(items: list[dict], baseline: list[dict], n_resamples: int, seed: int) -> dict:
    """WER of ``items`` minus WER of ``baseline``, the same references item for item (a codec's resynthesis against
    the clips it resynthesised), with a paired percentile-bootstrap 95% interval: each resample draws the same
    items for both sides, so the spread of what the clips say is not counted twice (a difference of two 60-clip
    WERs, each with its own interval about 0.2 wide, is known far better than those intervals suggest)."""
    if [item["words"] for item in items] != [item["words"] for item in baseline]:
        raise EvalError("a WER gap needs the same references on both sides, item for item")
    stats = [[a["errors"], b["errors"], a["words"]] for a, b in zip(items, baseline)]
    gap = lambda sums, n: float((sums[0] - sums[1]) / sums[2]) if sums[2] else 0.0  # noqa: E731
    low_high = metrics.bootstrap_ci(stats, gap, n_resamples, seed)
    totals = np.asarray(stats, dtype=np.float64).reshape(-1, 3).sum(axis=0)  # (3,), zeros when there are no items
    return {"value": gap(totals, len(stats)), "ci95": list(low_high) if low_high else None, "n": len(stats)}


def scored_items(texts: Sequence[str], transcripts: Sequence[str], wavs: Sequence[np.ndarray], sample_rate: int,
                 language: str | None, normalizer: str | None = None) -> list[dict]:
    """{"text", "transcript", "errors", "words", "seconds"} per item (``seconds``: audio length)."""
    items = transcript_wer(texts, transcripts, language, normalizer)["items"]
    return [item | {"seconds": len(wav) / sample_rate} for item, wav in zip(items, wavs)]


def listen(transcriber, wavs: Sequence[np.ndarray], sample_rate: int, texts: Sequence[str],
           language: str | None, normalizer: str | None = None) -> list[dict]:
    """Transcribe waveforms at ``sample_rate`` (resampled to 16 kHz) and score them against ``texts``."""
    transcripts = transcriber.transcribe(to_listener_rate(wavs, sample_rate), language)
    return scored_items(texts, transcripts, wavs, sample_rate, language, normalizer)


# ------------------------------------------------------------------------------------------------------ the TTS


def one_sample_each(tts, texts: Sequence[str], transcriber, sampling, language: str | None,
                    normalizer: str | None = None) -> list[dict]:
    """One sample per text, timed (``synthesis_s``: wall seconds of ``speak``), transcribed and scored."""
    from audiollm.tts.generate import speak

    items = []
    for part in _chunks(texts, CHUNK):
        wavs, seconds = [], []
        for text in part:
            start = time.perf_counter()
            wavs.append(speak(tts, text, sampling=sampling).wav)
            seconds.append(time.perf_counter() - start)
        scored = listen(transcriber, wavs, tts.codec.sample_rate, part, language, normalizer)
        items += [item | {"synthesis_s": s} for item, s in zip(scored, seconds)]
    return items


def best_of_each(tts, texts: Sequence[str], transcriber, best_of: int, sampling, language: str | None,
                 normalizer: str | None = None) -> list[dict]:
    """Per text, ``best_of`` candidates in one batch; the listener keeps the one with the lowest WER against the
    text. Items add ``chosen`` (candidate index) and ``scores`` (-WER per candidate); ``synthesis_s`` includes
    the verifier's transcription, the method's real cost."""
    from audiollm.tts.generate import ListenerVerifier, speak

    verifier = ListenerVerifier(transcriber, language, normalizer=normalizer)
    items = []
    for text in texts:
        start = time.perf_counter()
        result = speak(tts, text, best_of=best_of, verifier=verifier, sampling=sampling)
        elapsed = time.perf_counter() - start
        [item] = scored_items([text], [verifier.heard[result.chosen]], [result.wav], result.sample_rate, language,
                              normalizer)
        items.append(item | {"synthesis_s": elapsed, "chosen": result.chosen, "scores": list(result.scores)})
    return items


def first_audio_times(tts, texts: Sequence[str], sampling) -> list[float]:
    """Wall seconds until ``speak_stream`` yields its first chunk, per text. The codec's stream context is measured
    once beforehand, as a server would: that probe is a setup cost, not a per-utterance latency."""
    from audiollm.tts.codecs import stream_context
    from audiollm.tts.generate import speak_stream, timed_stream

    context = stream_context(tts.codec)
    return [timed_stream(speak_stream(tts, text, sampling=sampling, context=context),
                         tts.codec.sample_rate)[1].first_audio_s for text in texts]


def real_time_factor(items: list[dict]) -> float:
    """Synthesis seconds / audio seconds over all items (below 1: faster than real time)."""
    audio = sum(item["seconds"] for item in items)
    return sum(item["synthesis_s"] for item in items) / audio if audio else float("inf")


def tts_intelligibility(tts, texts: Sequence[str], transcriber, best_of: int = 1, seed: int = 0,
                        language: str | None = "en", sampling=None, n_resamples: int = 1000,
                        first_audio_texts: int = FIRST_AUDIO_TEXTS, normalizer: str | None = None) -> dict:
    """Round-trip WER of a loaded TTS (``audiollm.tts.generate.TTSModel``) on ``texts`` with ``transcriber``.

    sampling: an ``audiollm.tts.sampling.Sampling`` (default: the layout's); its seed is replaced by ``seed``.
    Returns {"tts_wer", "items", "real_time_factor", "time_to_first_audio_s", ...}; with best_of > 1 also
    "tts_wer_best_of_n", "items_best_of_n", "real_time_factor_best_of_n". Items: {"text", "transcript", "errors",
    "words", "seconds" (of audio), "synthesis_s"}.
    """
    from audiollm.tts.generate import speak
    from audiollm.tts.sampling import default_sampling

    check_texts(texts)
    if best_of < 1:
        raise EvalError(f"best_of must be >= 1, got {best_of}")
    sampling = replace(sampling or default_sampling(tts.vocab.layout), seed=seed)
    speak(tts, texts[0], sampling=sampling)  # warm-up: first-call costs (kernels, allocator) are not the TTS's speed
    items = one_sample_each(tts, texts, transcriber, sampling, language, normalizer)
    times = first_audio_times(tts, texts[:max(first_audio_texts, 0)], sampling)
    results = {
        "tts": str(getattr(tts.model, "name_or_path", "") or ""), "codec": str(tts.codec.folder),
        "transcriber": transcriber.name, "language": language, "normalizer": normalizer, "texts": len(texts),
        "sampling": asdict(sampling),
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "tts_wer": wer_entry(items, n_resamples, seed), "items": items,
        "real_time_factor": real_time_factor(items),
        "time_to_first_audio_s": statistics.median(times) if times else None,
        "time_to_first_audio_texts": len(times),
        "best_of": best_of,
    }
    if best_of > 1:
        best = best_of_each(tts, texts, transcriber, best_of, replace(sampling, seed=seed + 1), language, normalizer)
        results |= {"tts_wer_best_of_n": wer_entry(best, n_resamples, seed), "items_best_of_n": best,
                    "real_time_factor_best_of_n": real_time_factor(best)}
    return results


# ------------------------------------------------------------------------------------------------------ the codec


def read_clip(source, index: int, rate: int, sample_rate: int) -> np.ndarray:
    """A clip (path, or (n,) waveform at ``sample_rate``) -> (n',) float32 at ``rate``; a path that cannot be read
    raises EvalError naming it (and its index in ``clips``)."""
    from audiollm.tts.codecs import CodecError, read_audio

    if isinstance(source, (str, os.PathLike)):
        try:
            return read_audio(source, rate)
        except CodecError as err:
            raise EvalError(f"clips[{index}]: {err}") from err
    return resample(np.asarray(source, dtype=np.float32).reshape(-1), sample_rate, rate)


def codec_resynthesis_wer(codec, clips: Sequence, texts: Sequence[str], transcriber, language: str | None = "en",
                          originals: bool = False, sample_rate: int = SAMPLE_RATE, n_resamples: int = 1000,
                          seed: int = 0, normalizer: str | None = None) -> dict:
    """WER of ``clips`` after encoding and decoding them with ``codec`` (an ``audiollm.tts.codecs.Codec``).

    clips: audio paths, or (n,) waveforms at ``sample_rate``; texts: what each clip says. With ``originals`` the
    clips as given are transcribed too, for reference, and ``resynthesis_gap`` is the WER the codec adds with a
    paired interval. Returns {"resynthesis_wer", "items", ["original_wer", "items_original", "resynthesis_gap"],
    ...} with items {"text", "transcript", "errors", "words", "seconds"}.
    """
    if len(clips) != len(texts):
        raise EvalError(f"{len(clips)} clips but {len(texts)} texts")
    check_texts(texts)
    rate, resynthesised, heard = codec.sample_rate, [], []
    for start in range(0, len(clips), CHUNK):
        part = texts[start : start + CHUNK]
        wavs = [read_clip(clip, start + i, rate, sample_rate) for i, clip in enumerate(clips[start : start + CHUNK])]
        # The codec pads to whole frames; the padding is not speech the clip had.
        decoded = [codec.decode(codec.encode(wav))[: len(wav)] for wav in wavs]
        resynthesised += listen(transcriber, decoded, rate, part, language, normalizer)
        if originals:
            heard += listen(transcriber, wavs, rate, part, language, normalizer)
    results = {"codec": str(codec.folder), "transcriber": transcriber.name, "language": language,
               "normalizer": normalizer,
               "clips": len(clips), "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
               "resynthesis_wer": wer_entry(resynthesised, n_resamples, seed), "items": resynthesised}
    if originals:
        results |= {"original_wer": wer_entry(heard, n_resamples, seed), "items_original": heard,
                    "resynthesis_gap": wer_gap_entry(resynthesised, heard, n_resamples, seed)}
    return results


# ------------------------------------------------------------------------------------------------------ a run


def evaluate_tts(tts_dir: str, texts_file: str, listener: str, out_dir: str | os.PathLike, best_of: int = 1,
                 codec_clips: str | None = None, originals: bool = False, codec_dir: str | None = None,
                 language: str | None = "en", seed: int = 0, n_resamples: int = 1000, device: str | None = None,
                 batch_size: int = 8, normalizer: str | None = None) -> dict:
    """``audiollm eval-tts``: read the inputs (all checked before any model loads), score, write results.json and
    report.md to ``out_dir``; returns the results ({"tts": ..., "codec_resynthesis": ... or None})."""
    from audiollm.tts.generate import load_tts
    from eval.speech import load_transcriber

    texts = read_texts(texts_file)
    clips = read_clips(codec_clips) if codec_clips else None
    tts = load_tts(tts_dir, codec_dir, device)
    transcriber = load_transcriber(listener, device, batch_size)
    # The codec run first: it is the cheaper one, and a clip that cannot be decoded stops the run early.
    codec = codec_resynthesis_wer(tts.codec, clips[0], clips[1], transcriber, language, originals,
                                  n_resamples=n_resamples, seed=seed, normalizer=normalizer) if clips else None
    spoken = tts_intelligibility(tts, texts, transcriber, best_of, seed, language, n_resamples=n_resamples,
                                 normalizer=normalizer)
    results = {"tts": spoken | {"tts": str(Path(tts_dir).resolve()), "texts_file": str(texts_file)},
               "codec_resynthesis": codec | {"manifest": str(codec_clips)} if codec else None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out)
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    return results


def _wer_row(name: str, entry: dict | None) -> list[str]:
    if entry is None:
        return []
    low, high = entry["ci95"] or (None, None)
    return [f"| {name} | {_number(entry['value'])} | {_number(low)} – {_number(high)} | {entry['errors']} / "
            f"{entry['words']} | {entry['n']} |"]


def _gap_row(entry: dict | None) -> list[str]:
    if entry is None:
        return []
    low, high = entry["ci95"] or (None, None)
    return [f"| codec resynthesis − original (paired) | {entry['value']:+.4f} | {_number(low)} – {_number(high)} | "
            f"| {entry['n']} |"]


def render_report(results: dict) -> str:
    """report.md: the WER table (one sample, best of N, codec resynthesis, original clips), speed, worst items."""
    spoken, codec = results["tts"], results["codec_resynthesis"] or {}
    n = spoken["best_of"]
    lines = [
        "# TTS intelligibility", "",
        f"TTS `{spoken['tts']}` · codec `{spoken['codec']}` · listener `{spoken['transcriber']}` · language "
        f"{spoken['language']} · normaliser {spoken.get('normalizer') or 'by language'} · sampling seed {spoken['sampling']['seed']} · 95% CI: percentile bootstrap, "
        f"{spoken['bootstrap']['resamples']} resamples", "",
        "| measure | WER ↓ | 95% CI | errors / words | n |", "|---|---|---|---|---|",
        *_wer_row("TTS, one sample", spoken["tts_wer"]),
        *_wer_row(f"TTS, best of {n}", spoken.get("tts_wer_best_of_n")),
        *_wer_row("codec resynthesis (ceiling)", codec.get("resynthesis_wer")),
        *_wer_row("original clips", codec.get("original_wer")),
        *_gap_row(codec.get("resynthesis_gap")),
        "",
        f"Real-time factor {_number(spoken['real_time_factor'])} (synthesis / audio seconds, one sample, batch 1); "
        f"time to first audio {_number(spoken['time_to_first_audio_s'])} s (median of "
        f"{spoken['time_to_first_audio_texts']} streamed texts).",
    ]
    worst = sorted((i for i in spoken["items"] if i["errors"]), key=lambda i: -i["errors"] / max(i["words"], 1))
    if worst:
        lines += ["", "## Worst items (one sample)", "", "| text | transcript | errors / words |", "|---|---|---|"]
        lines += [f"| {_cell(i['text'])} | {_cell(i['transcript'])} | {i['errors']} / {i['words']} |"
                  for i in worst[:WORST_SHOWN]]
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    spoken, codec = results["tts"], results["codec_resynthesis"] or {}
    rows = [("tts_wer", spoken["tts_wer"]), (f"tts_wer_best_of_{spoken['best_of']}", spoken.get("tts_wer_best_of_n")),
            ("codec_resynthesis_wer", codec.get("resynthesis_wer")), ("original_wer", codec.get("original_wer"))]
    lines = [f"listener {spoken['transcriber']}:"]
    for name, entry in rows:
        if entry is not None:
            low, high = entry["ci95"]
            lines.append(f"  {name:<24} {entry['value']:.4g}  [{low:.4g}, {high:.4g}]  n={entry['n']}")
    if codec.get("resynthesis_gap"):
        gap = codec["resynthesis_gap"]
        lines.append(f"  {'codec minus original':<24} {gap['value']:+.4g}  [{gap['ci95'][0]:.4g}, {gap['ci95'][1]:.4g}]"
                     "  paired over clips")
    lines.append(f"  real-time factor {_number(spoken['real_time_factor'])}, time to first audio "
                 f"{_number(spoken['time_to_first_audio_s'])} s")
    return "\n".join(lines)
