"""The voice part of the CPU demo: a tiny TTS decoder trained on the demo corpus's transcribed clips.

    corpus (audiollm data synth)  ->  asr rows as (text, audio) manifests  ->  tiny random Mimi + tiny Qwen2
    ->  stages/tts.py with stages/configs/tts_demo.yaml  ->  loss curve, held-out token accuracy, one sample wav

No trained codec weights exist offline, so the codec is random: its codes are a fixed function of the audio and
the decoder LM really learns to predict them from text, but the decoded audio is not meant to be intelligible.
What is measured is the token pipeline: the loss and the held-out next-token accuracy on speech tokens, beside
the accuracy of always guessing each slot's most frequent training code.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

CONFIG = Path(__file__).resolve().parents[2] / "stages" / "configs" / "tts_demo.yaml"
NOTICE = ("The codec has random weights (no trained codec can be downloaded offline): the sample audio is not "
          "meant to be intelligible. The token pipeline (encode, layout, training, constrained decoding) is real.")
SPLITS = {"train": "pretrain.jsonl", "heldout": "heldout_pretrain.jsonl"}
# Rows used per split: the first ones of the corpus's transcription rows, so encoding (~15 ms a clip) and
# training fit the demo's ~2 minutes on 2 cores.
ROWS = {"train": 2000, "heldout": 300}


def tts_manifest(corpus: Path, name: str, out: Path, limit: int) -> Path:
    """The first ``limit`` transcription rows of a corpus manifest as {"audio", "text"} rows (absolute paths)."""
    rows = [json.loads(line) for line in (corpus / name).read_text(encoding="utf-8").splitlines() if line]
    kept = [{"audio": str((corpus / r["audio"]).resolve()), "text": r["text"]} for r in rows
            if r["task"] == "asr"][:limit]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return out


@torch.no_grad()
def token_accuracy(model, dataset, speech_start: int, batch: int = 16) -> float:
    """Share of speech tokens (codes and SPEECH_END) whose argmax prediction is right, teacher forced. SPEECH_START
    itself always follows TEXT_END, so it is left out (as in the baseline)."""
    from audiollm.tts.data import IGNORE_INDEX, TokenCollator

    right = total = 0
    collate = TokenCollator(0)
    for start in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = (labels != IGNORE_INDEX) & (labels != speech_start)
        right += int(((logits.argmax(-1) == labels) & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def majority_accuracy(train, heldout, code_offset: int, codebook_size: int, per_frame: int) -> float:
    """Accuracy of predicting each slot's most frequent training code (and the end token) on held-out rows."""
    def slots(dataset):
        for i in range(len(dataset)):
            labels = dataset[i]["labels"]
            speech = labels[labels != -100][1:]  # drop SPEECH_START itself (it is a fixed, always-right token)
            for k, token in enumerate(speech.tolist()):
                yield (k % per_frame if token >= code_offset else "end"), token

    best = {}
    for slot, counts in _group(slots(train)).items():
        best[slot] = counts.most_common(1)[0][0]
    pairs = list(slots(heldout))
    return sum(best.get(slot) == token for slot, token in pairs) / max(len(pairs), 1)


def _group(pairs) -> dict:
    groups: dict = {}
    for slot, token in pairs:
        groups.setdefault(slot, Counter())[token] += 1
    return groups


def train_tts_demo(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0, max_steps: int | None = None) -> dict:
    """Train the tiny TTS decoder on ``corpus_dir`` into ``out_dir``; returns (and writes tts_results.json) the
    loss curve, held-out token accuracy and its majority baseline, and a sample wav's path."""

    corpus, out = Path(corpus_dir), Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # One intra-op thread: a model this small gains nothing from more, and on a busy 2-core machine OpenMP's
    # thread sync made a training step 25x slower (1.16 s vs 0.045 s measured).
    torch.set_num_threads(1)
    try:
        return _train_and_measure(corpus, out, seed, max_steps)
    finally:
        torch.set_num_threads(threads)


def _train_and_measure(corpus: Path, out: Path, seed: int, max_steps: int | None) -> dict:
    import importlib

    from audiollm.tts.tiny import tiny_codec, tiny_lm

    manifests = {split: tts_manifest(corpus, name, out / "data" / f"tts_{split}.jsonl", ROWS[split])
                 for split, name in SPLITS.items()}
    codec, lm = tiny_codec("mimi", out / "init" / "codec", seed), tiny_lm(out / "init" / "lm", "test", seed)
    argv = ["--config", str(CONFIG), "--model_name_or_path", str(lm), "--codec_name_or_path", str(codec),
            "--train_files", str(manifests["train"]), "--eval_files", str(manifests["heldout"]),
            "--output_dir", str(out / "tts"), "--cache_dir", str(out / "cache"), "--seed", str(seed)]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps), "--logging_steps", "1"]
    importlib.import_module("stages.tts").main(argv)
    return measure(out, manifests)


def measure(out: Path, manifests: dict) -> dict:
    """The demo's figures from the trained folder; writes tts_results.json and sample.wav."""
    from audiollm.tts.data import token_dataset
    from audiollm.tts.generate import load_tts, speak

    tts = load_tts(out / "tts")
    vocab = tts.vocab
    state = json.loads((out / "tts" / "trainer_state.json").read_text())
    data = {split: token_dataset([str(path)], tts.tokenizer, vocab, tts.codec.key, lambda: tts.codec, 512,
                                 out / "cache") for split, path in manifests.items()}
    layout = vocab.token_layout
    heldout_text = json.loads(manifests["heldout"].read_text().splitlines()[0])["text"]
    sample = speak(tts, heldout_text, out_wav=str(out / "sample.wav"))
    results = {
        "loss_curve": [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h],
        "heldout_token_accuracy": token_accuracy(tts.model, data["heldout"], vocab.speech_start),
        "heldout_majority_baseline": majority_accuracy(data["train"], data["heldout"], vocab.code_offset,
                                                       layout.codebook_size, layout.per_frame),
        "train_rows": len(data["train"]), "heldout_rows": len(data["heldout"]),
        "sample_wav": str(out / "sample.wav"), "sample_text": heldout_text, "sample_seconds": sample.seconds,
        "notice": NOTICE,
    }
    (out / "tts_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{NOTICE}\nheld-out speech-token accuracy {results['heldout_token_accuracy']:.3f} (majority baseline "
          f"{results['heldout_majority_baseline']:.3f}); wrote {out / 'tts_results.json'}")
    return results
