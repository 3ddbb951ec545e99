"""The demo corpus on disk (``audiollm data synth``): the rows ``audiollm.synth.corpus`` plans, checked, their clips
synthesised, and every manifest written. Written under DIR:

    audio/train/00000.wav ...      16 kHz mono PCM_16 clips, 1-3 s each
    audio/heldout/00000.wav ...
    pretrain.jsonl   {"audio", "task", "text"[, "transcript"]}: asr, sex, language, rate, pitch; the ASR rows'
                     "transcript" (what the clip says) is for CTC on the encoder (audiollm/ctc.py)
    sft.jsonl        {"messages", "audios", "transcripts"}: voice chat (the question is spoken), audio analysis
                     (clip + text instruction), multi-turn (two spoken questions, or a text follow-up about the
                     same clip); "transcripts": what each clip says, for distillation (audiollm/distill.py)
    dpo.jsonl        the SFT prompt turns + "chosen" (right) / "rejected" (misheard, one number off, another word,
                     or rambling)
    text.jsonl       {"messages", "audios": []}: every spoken question typed, in its training sentences only
    replies.jsonl    the pretraining ASR rows that speak a reply-shaped sentence (taught answers and random
                     statements), again: SFT replays them at a weight of their own (stages/configs/sft_demo.yaml)
    sex.jsonl        the pretraining rows that ask the speaker's sex, again: the demo's speaker phase trains on them
                     at half its mix (stages/configs/pretrain_speaker_demo.yaml)
    heldout_pretrain.jsonl, heldout_sft.jsonl, heldout_dpo.jsonl, heldout_text.jsonl
    validation_pretrain.jsonl, validation_sft.jsonl, validation_dpo.jsonl, validation_text.jsonl
    clips.jsonl      one line per clip: what was said, by which voice, rate and pitch, the vowel moves of its own
                     accent (training clips, ``audiollm.synth.accents``); where each word starts (s)
    corpus.json      counts, voices, languages, seconds of audio, seed, size, build time

The manifests depend on the seed and size only. The audio too: each shard of clips is synthesised in a fresh
process (espeak's wave generator keeps state between utterances; see ``audiollm.synth.render``), so a build is
byte-identical to any other build with the same seed, size and espeak version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from audiollm.chat import count_audio_markers
from audiollm.synth.corpus import LANGUAGES, MANIFESTS, Clip, plan_split, typed_rows, write_jsonl
from audiollm.synth.espeak import FORMANT_SCALE_MAX, FORMANT_SCALE_MIN, SAMPLE_RATE, language_table
from audiollm.synth.render import render
from audiollm.synth.splits import SPLITS, TRAIN_ONLY, CorpusError, split_counts
from audiollm.synth.voices import ACCENTS, FORMANT_RANGE, TABLE_SHARE, VOWEL_SHARE


def check_heldout(clips: list[Clip], typed: tuple[str, ...] = ()) -> None:
    """Raise unless no utterance is spoken in two splits and no held-out or validation voice variant or English accent
    speaks in another split. ``typed`` questions count as training utterances."""
    texts = {split: {c.text for c in clips if c.split == split} for split in SPLITS}
    texts["train"] |= set(typed)
    for i, one in enumerate(SPLITS):
        for other in SPLITS[i + 1 :]:
            shared = sorted(texts[one] & texts[other])
            if shared:
                raise CorpusError(f"utterances spoken in both {one} and {other}: {shared[:5]}")
    for part, name in ((2, "voice variants"), (0, "English accents")):
        used = {split: {c.voice.partition("+")[part] for c in clips if c.split == split and
                        (part == 2 or c.language == "en")} for split in SPLITS}
        for split in ("heldout", "validation"):
            others = set().union(*(used[o] for o in SPLITS if o != split))
            if not used[split] or used[split] & others:
                raise CorpusError(f"{split} {name} {sorted(used[split])} must all be unused in other splits")
    mixed = {split: {c.phoneme_table for c in clips if c.split == split and c.phoneme_table} for split in SPLITS}
    unheard = {language_table(a) for split in ("heldout", "validation") for a in ACCENTS[split]}
    if mixed["heldout"] or mixed["validation"] or mixed["train"] & unheard:
        raise CorpusError(f"phoneme tables of other accents are for training clips only, never a held-out or "
                          f"validation accent's {sorted(unheard)}; got {mixed}")


def check_chat_rows(rows: list[dict], name: str) -> None:
    """Raise unless every chat row has as many ``<audio>`` markers as audios."""
    for i, row in enumerate(rows, 1):
        if count_audio_markers(row["messages"]) != len(row["audios"]):
            raise CorpusError(f"{name}:{i}: {count_audio_markers(row['messages'])} <audio> markers, "
                              f"{len(row['audios'])} audios")


def manifest_name(split: str, manifest: str) -> str:
    """``sft.jsonl`` for training, ``heldout_sft.jsonl`` / ``validation_sft.jsonl`` for the others."""
    return f"{manifest}.jsonl" if split == "train" else f"{split}_{manifest}.jsonl"


def summarise(seed: int, size: str, clips: list[Clip], samples: list[int], espeak: str) -> dict:
    """``corpus.json``: what was built, per split (rows per manifest and kind, clips, voices, seconds)."""
    splits = {}
    for split in SPLITS:
        mine = [(c, n) for c, n in zip(clips, samples) if c.split == split]
        counts = split_counts(size, split)
        splits[split] = {
            "manifests": {manifest_name(split, m): counts[m] for m in MANIFESTS},
            "clips": len(mine),
            "audio_seconds": round(sum(n for _, n in mine) / SAMPLE_RATE, 1),
            "voices": sorted({c.voice for c, _ in mine}),
            "languages": sorted({LANGUAGES[c.language] for c, _ in mine}),
        }
    return {"seed": seed, "size": size, "sample_rate": SAMPLE_RATE, "espeak_version": espeak, "splits": splits}


def _require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CorpusError(f"{out}: exists and is not an empty folder; a corpus is never written over, "
                          "choose a new --out or delete this one")


def _check_options(vowel_share: float, formant_range: tuple[float, float], table_share: float) -> None:
    if not 0.0 <= vowel_share <= 1.0:
        raise CorpusError(f"vowel_share must be within 0-1 (a probability per vowel), got {vowel_share}")
    low, high = formant_range
    if not FORMANT_SCALE_MIN <= low <= high <= FORMANT_SCALE_MAX:
        raise CorpusError(f"formant_range must be (low, high) with {FORMANT_SCALE_MIN} <= low <= high <= "
                          f"{FORMANT_SCALE_MAX}, got {formant_range}")
    if not 0.0 <= table_share <= 1.0:
        raise CorpusError(f"table_share must be within 0-1 (a probability per clip), got {table_share}")


def synth(out: str | os.PathLike, seed: int = 0, size: str = "small", vowel_share: float = VOWEL_SHARE,
          formant_range: tuple[float, float] = FORMANT_RANGE, table_share: float = TABLE_SHARE) -> dict:
    """Build the corpus in ``out`` (new or empty folder); returns the ``corpus.json`` summary. ``vowel_share``: how
    much of each English training clip's vowel system its own accent moves (``audiollm.synth.accents``);
    ``formant_range``: the (low, high) factor on each training clip's formant frequencies; ``table_share``: the
    share of English training clips spoken with another training accent's phoneme table (``synth/voices.py``).

    The corpus is assembled in a hidden sibling folder and renamed into place, so a failed build leaves nothing.
    """
    start = time.perf_counter()
    out = Path(out)
    _require_empty(out)
    _check_options(vowel_share, formant_range, table_share)
    plans = {split: plan_split(split, seed, size, vowel_share, formant_range, table_share) for split in SPLITS}
    clips = [c for split in SPLITS for c in plans[split][1]]
    typed = {split: typed_rows(seed, split) for split in SPLITS}
    check_heldout(clips, tuple(row["messages"][0]["content"] for row in typed["train"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        plan = [(c.audio, c.text, c.voice, c.rate, c.pitch, c.vowels, c.formant_scale, c.phoneme_table)
                for c in clips]
        samples, espeak, word_starts = render(plan, tmp)
        for split, (rows, _) in plans.items():
            for manifest in MANIFESTS:
                if manifest != "pretrain":
                    check_chat_rows(rows[manifest], manifest_name(split, manifest))
                write_jsonl(tmp / manifest_name(split, manifest), rows[manifest])
        for split, rows in typed.items():
            write_jsonl(tmp / manifest_name(split, "text"), rows)
        write_jsonl(tmp / "replies.jsonl", plans["train"][0]["replies"])  # rows of pretrain.jsonl, again
        sex = [row for row in plans["train"][0]["pretrain"] if row["task"] == "sex"]
        write_jsonl(tmp / "sex.jsonl", sex)  # the speaker phase's rows, again
        write_jsonl(tmp / "clips.jsonl", [asdict(c) | {"word_starts": w} for c, w in zip(clips, word_starts)])
        summary = summarise(seed, size, clips, samples, espeak) | {
            "vowel_share": vowel_share, "formant_range": list(formant_range), "table_share": table_share}
        for split, rows in typed.items():
            summary["splits"][split]["manifests"][manifest_name(split, "text")] = {"typed_question": len(rows)}
        summary["splits"]["train"]["manifests"]["replies.jsonl"] = {
            kind: split_counts(size, "train")["pretrain"][kind] for kind in TRAIN_ONLY}
        summary["splits"]["train"]["manifests"]["sex.jsonl"] = {"sex": len(sex)}
        summary["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _require_empty(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary

