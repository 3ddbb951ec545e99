"""The held-out rows again, each clip re-spoken in an accent training used: what the listener misses on voices it
never heard, parted from what it misses on accents it never heard.

The held-out split's voices are new in two ways at once: their voice variants (formants and pitch) and their
accents (``audiollm.synth.voices``: New York and Caribbean). This module keeps everything of a held-out clip (its
text, variant, rate and pitch) but its accent, which it draws from training's, and writes the given rows (the demo
passes its held-out ASR, voice-chat and analysis rows) again over the new clips:

    audio/heldout_training_accents/00223.wav ...   the held-out clips' names, re-spoken
    heldout_training_accents_asr.jsonl, heldout_training_accents_voice_chat.jsonl,
    heldout_training_accents_analysis.jsonl        the held-out rows, pointing at them
    heldout_training_accents_clips.jsonl           each clip's text, voice (training accent + held-out variant),
                                                   rate and pitch, and the held-out clip it re-speaks

Nothing trains on these rows: they are scored beside the held-out ones (``audiollm.demo``). Their texts are the
held-out split's, so they are as unseen as before; only the accent is a familiar one.
"""

from __future__ import annotations

import random
from pathlib import Path

from audiollm.synth.corpus import read_jsonl, write_jsonl
from audiollm.synth.render import render
from audiollm.synth.voices import ACCENTS

NAME = "heldout_training_accents"


def moved(audio: str) -> str:
    """``audio/heldout/00223.wav`` -> ``audio/heldout_training_accents/00223.wav``."""
    parts = Path(audio).parts
    if parts[:2] != ("audio", "heldout"):
        raise ValueError(f"{audio}: not a held-out clip of the corpus")
    return str(Path("audio", NAME, *parts[2:]))


def clip_plan(clips: dict[str, dict], audios: list[str], seed: int) -> list[tuple]:
    """One render job per clip: its text, variant, rate and pitch, with a training accent drawn per clip from
    (seed, clip); English clips only (the held-out split speaks no other language in these rows)."""
    plan = []
    for audio in audios:
        clip = clips[audio]
        if clip["language"] != "en":
            raise ValueError(f"{audio}: a {clip['language']} clip; only English clips have accents to swap")
        variant = clip["voice"].split("+", 1)[1]
        accent = random.Random(f"{seed}:{audio}").choice(ACCENTS["train"])
        plan.append((moved(audio), clip["text"], f"{accent}+{variant}", clip["rate"], clip["pitch"]))
    return plan


def with_moved_audio(row: dict) -> dict:
    if "audio" in row:
        return {**row, "audio": moved(row["audio"])}
    return {**row, "audios": [moved(audio) for audio in row["audios"]]}


def clip_paths(row: dict) -> list[str]:
    return [row["audio"]] if "audio" in row else row["audios"]


def respeak(data: str | Path, rows: dict[str, list[dict]], seed: int = 0) -> dict[str, Path]:
    """Re-speak the clips of held-out ``rows`` ({name: rows of a manifest of the corpus in ``data``}) in training
    accents; returns the new manifests by name. The corpus's own files are left as they are."""
    data = Path(data)
    clips = {c["audio"]: c for c in read_jsonl(data / "clips.jsonl")}
    audios = sorted({audio for part in rows.values() for row in part for audio in clip_paths(row)})
    plan = clip_plan(clips, audios, seed)
    render(plan, data)
    lines = [{"audio": a, "text": t, "voice": v, "rate": r, "pitch": p, "respeaks": o} for (a, t, v, r, p), o in
             zip(plan, audios)]
    write_jsonl(data / f"{NAME}_clips.jsonl", lines)
    paths = {}
    for name, part in rows.items():
        paths[name] = data / f"{NAME}_{name}.jsonl"
        write_jsonl(paths[name], [with_moved_audio(r) for r in part])
    return paths
