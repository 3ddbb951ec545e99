"""Audio augmentation: every transform keeps audio finite and in range, draws follow (seed, row, clip, epoch) only,
the recipe's mapping is checked, and only training rows are augmented."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from audiollm.audio import SAMPLE_RATE
from audiollm.augment import RANGES, Augmentation, AugmentationError, CollatorEpochs
from audiollm.chat import AUDIO_TOKEN
from audiollm.tiny import tiny_tokenizer
from audiollm.stage_args import DataArguments
from audiollm.training import make_collator

# One setting per transform, at p = 1 so that it always runs.
EVERY = {"speed": {"p": 1.0, "factor": [0.9, 1.1]}, "reverb": {"p": 1.0, "rt60_s": [0.2, 0.6]},
         "telephone": {"p": 1.0}, "lowpass": {"p": 1.0, "hz": [2000, 7000]},
         "resample": {"p": 1.0, "hz": [8000, 8000]}, "mp3": {"p": 1.0, "kbps": [16, 64]},
         "noise": {"p": 1.0, "snr_db": [10, 40]}, "gain": {"p": 1.0, "db": [-6, 6]},
         "pitch": {"p": 1.0, "semitones": [-2, 2]}, "band_stop": {"p": 1.0, "hz": [300, 4000]},
         "eq": {"p": 1.0, "db": [-12, 12]}, "time_mask": {"p": 1.0, "part": [0.05, 0.1]}}


def speech_like(seconds=1.0, peak=0.5, seed=0):
    """A 150 Hz buzz with harmonics and some noise, scaled to ``peak``: shape (seconds * 16000,)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wav = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 20))
    wav = wav + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return (peak * wav / np.abs(wav).max()).astype(np.float32)


def band_energy(wav, low_hz, high_hz):
    spectrum = np.abs(np.fft.rfft(wav)) ** 2
    hz = np.fft.rfftfreq(len(wav), 1 / SAMPLE_RATE)
    return spectrum[(hz >= low_hz) & (hz < high_hz)].sum() / spectrum.sum()


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("source", ["speech", "silence", "full_scale"])
def test_each_transform_keeps_audio_finite_and_in_range(name, source):
    wav = {"speech": speech_like(), "silence": np.zeros(SAMPLE_RATE, np.float32),
           "full_scale": speech_like(peak=1.0)}[source]
    out = Augmentation({name: EVERY[name]}).augment(wav, "rows.jsonl:1")
    assert out.dtype == np.float32 and np.isfinite(out).all() and np.abs(out).max() <= 1.0
    if name == "speed":
        assert abs(len(out) - len(wav)) <= 0.12 * len(wav)
    else:
        assert len(out) == len(wav)
    if source == "speech" and name not in ("gain", "speed"):  # gain may draw ~0 dB; speed changed the length
        assert not np.allclose(out, wav, atol=1e-3), f"{name} left the clip as it was"


def test_band_limiting_transforms_remove_the_high_band():
    wav = speech_like()
    assert band_energy(wav, 4500, 8000) > 0.001
    for name in ("telephone", "resample"):
        out = Augmentation({name: EVERY[name]}).augment(wav, "r")
        assert band_energy(out, 4500, 8000) < 0.1 * band_energy(wav, 4500, 8000), name


def test_the_spec_augment_masks_remove_a_band_and_a_stretch():
    """band_stop notches the band around its centre; time_mask silences part of the clip, the rest kept."""
    wav = speech_like()
    out = Augmentation({"band_stop": {"p": 1.0, "hz": [2000, 2000]}}).augment(wav, "r")
    assert band_energy(out, 1900, 2100) < 0.1 * band_energy(wav, 1900, 2100)
    assert band_energy(out, 500, 1000) > 0.5 * band_energy(wav, 500, 1000)
    out = Augmentation({"time_mask": {"p": 1.0, "part": [0.1, 0.1]}}).augment(wav, "r")
    silent, changed = np.abs(out) < 1e-6, np.abs(out - wav) > 1e-6
    assert 0.08 * len(wav) < silent.sum() and changed.sum() <= 0.1 * len(wav) + 1  # the mask, its 5 ms fades in it


def test_draws_follow_seed_row_clip_and_epoch_only():
    wav = speech_like()
    aug = Augmentation(EVERY, seed=3)
    state = random.getstate(), np.random.get_state()[1].copy()
    first = aug.augment(wav, "rows.jsonl:7", clip=1)
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()  # global RNGs untouched
    assert np.array_equal(first, Augmentation(EVERY, seed=3).augment(wav, "rows.jsonl:7", clip=1))
    changed = [Augmentation(EVERY, seed=4).augment(wav, "rows.jsonl:7", clip=1),
               aug.augment(wav, "rows.jsonl:8", clip=1), aug.augment(wav, "rows.jsonl:7", clip=0)]
    aug.epoch = 1
    changed.append(aug.augment(wav, "rows.jsonl:7", clip=1))
    for other in changed:
        assert len(other) != len(first) or not np.allclose(other, first)


def test_probability_zero_never_applies_and_half_applies_about_half():
    wav = speech_like()
    assert np.array_equal(Augmentation({"noise": {"p": 0.0, "snr_db": [0, 0]}}).augment(wav, "r"), wav)
    half = Augmentation({"noise": {"p": 0.5, "snr_db": [0, 0]}})
    applied = sum(not np.array_equal(half.augment(wav, f"r{i}"), wav) for i in range(200))
    assert 70 < applied < 130


@pytest.mark.parametrize("spec, message", [
    ({}, "must map"),
    ({"echo": {"p": 1.0}}, "unknown transform 'echo'"),
    ({"noise": {"snr_db": [1, 2]}}, r"augmentation.noise takes exactly \['p', 'snr_db'\]"),
    ({"noise": {"p": 1.5, "snr_db": [1, 2]}}, "noise.p must be a probability"),
    ({"gain": {"p": 1.0, "db": [6, -6]}}, r"gain.db must be two numbers \[low, high\]"),
    ({"speed": {"p": 1.0, "factor": [0.1, 1.0]}}, "speed.factor must lie within"),
    ({"telephone": {"p": 1.0, "hz": [300, 3400]}}, r"telephone takes exactly \['p'\]"),
])
def test_wrong_settings_are_refused_by_name(spec, message):
    with pytest.raises(AugmentationError, match=message):
        Augmentation(spec)


def test_only_training_rows_are_augmented_and_the_epoch_reaches_the_collator(tmp_path):
    tok = tiny_tokenizer()
    row = {"messages": [{"role": "user", "content": "<audio>Hi"}, {"role": "assistant", "content": "Hello."}],
           "audios": [speech_like(2.0)], "id": "rows.jsonl:1"}
    model = SimpleNamespace(config=SimpleNamespace(projector_stack=1, _attn_implementation="sdpa"))
    args = DataArguments(train_files=["x.jsonl"], augmentation='{"speed": {"p": 1.0, "factor": [0.5, 0.8]}}')
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN)
    tokens = lambda batch: int((batch["input_ids"] == audio_id).sum())  # noqa: E731
    train, plain = make_collator(tok, model, args, seed=1), make_collator(tok, model, args, train=False)
    assert tokens(plain([row])) == 50  # 2 s, as it is
    slow = train([row])
    assert 50 / 0.8 - 1 <= tokens(slow) <= 50 / 0.5 + 1  # played slower: longer
    assert tokens(train([row])) == tokens(slow)  # the same draw for the same row and epoch
    callback = CollatorEpochs(train)
    lengths = set()
    for epoch in range(6):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=float(epoch)), None)
        assert train.augment.epoch == epoch
        lengths.add(tokens(train([row])))
    assert len(lengths) > 1  # a new draw each epoch
    with pytest.raises(AugmentationError, match="not a JSON mapping"):
        make_collator(tok, model, DataArguments(train_files=["x.jsonl"], augmentation="speed"))


def test_persistent_dataloader_workers_follow_the_epoch():
    import torch

    aug = Augmentation({"noise": {"p": 1.0, "snr_db": [0, 30]}})
    wav = speech_like(0.1)
    loader = torch.utils.data.DataLoader([wav], batch_size=1, num_workers=1, persistent_workers=True,
                                         collate_fn=lambda rows: aug.augment(rows[0], "r"))
    seen = []
    for epoch in range(3):
        aug.epoch = epoch
        seen.append(next(iter(loader)))
        assert np.array_equal(seen[-1], aug.augment(wav, "r"))  # the worker drew what the main process draws
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


@pytest.mark.parametrize("recipe", ["pretrain.yaml", "sft.yaml"])
def test_the_recipes_commented_example_is_a_valid_setting(recipe):
    """The augmentation block the full recipes show (commented out) parses and runs as written."""
    from pathlib import Path

    import yaml

    lines = (Path(__file__).parents[1] / "stages" / "configs" / recipe).read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("# augmentation:")))
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    spec = yaml.safe_load("\n".join(block))["augmentation"]
    assert set(spec) == set(RANGES)
    out = Augmentation(spec).augment(speech_like(), "rows.jsonl:1")
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0


def test_reverb_at_the_shortest_allowed_time_works_in_every_drawn_room():
    aug = Augmentation({"reverb": {"p": 1.0, "rt60_s": [0.15, 0.15]}})
    for i in range(30):
        out = aug.augment(speech_like(0.3), f"r{i}")
        assert np.isfinite(out).all() and not np.allclose(out, speech_like(0.3), atol=1e-3)


def test_a_transform_that_fails_on_a_clip_is_skipped_with_a_warning(caplog):
    aug = Augmentation({"noise": {"p": 1.0, "snr_db": [10, 10]}, "gain": {"p": 1.0, "db": [-6, -6]}})
    aug.chain[0] = ("noise", lambda wav, rng: 1 / 0)
    wav = speech_like()
    out = aug.augment(wav, "rows.jsonl:3")
    assert np.allclose(out, wav * 10 ** (-6 / 20), atol=1e-6)  # gain still ran
    assert "rows.jsonl:3 audio 0: augmentation noise skipped (ZeroDivisionError" in caplog.text


def test_a_row_keeps_what_it_asks_about_while_other_rows_are_augmented(tmp_path):
    from audiollm.data import pretrain_to_chat

    spec = {"speed": {"p": 1.0, "factor": [0.5, 0.8]}, "pitch": {"p": 1.0, "semitones": [4, 6]}}
    aug, wav = Augmentation(spec, seed=3), speech_like(1.0)
    for task in ("pitch", "sex"):  # speed and pitch shift would make the answer wrong: the clip as it is
        assert np.array_equal(aug.augment(wav, "r:1", 0, task), wav)
    rate = aug.augment(wav, "r:1", 0, "rate")  # pitch shift keeps the tempo: only speed is left out
    assert len(rate) == len(wav) and not np.allclose(rate, wav)
    assert len(aug.augment(wav, "r:1", 0, "asr")) > len(wav) * 1.2  # slowed down: what it says is unchanged
    assert len(aug.augment(wav, "r:1", 0)) > len(wav) * 1.2  # a row without a task is augmented

    # Pretraining rows keep their task as chat rows, so the collator passes it on.
    chat = pretrain_to_chat({"id": "p.jsonl:1", "audio": "a.wav", "task": "rate", "text": "slow"})
    assert chat["task"] == "rate"
    tok = tiny_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(projector_stack=1, _attn_implementation="sdpa"))
    collate = make_collator(tok, model, DataArguments(train_files=["x.jsonl"], augmentation=spec), seed=1)
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN)
    row = {**chat, "audios": [speech_like(2.0)]}
    assert int((collate([row])["input_ids"] == audio_id).sum()) == 50  # 2 s as recorded
    assert int((collate([{**row, "task": "asr"}])["input_ids"] == audio_id).sum()) > 60  # slowed down
