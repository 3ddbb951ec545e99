"""Word interleaving (``interleave: words``): each word's text inside the speech before its frames, from word start
times in the manifest (espeak gives them for the demo's clips). Tiny trained-here codec and tiny Qwen2, random."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.cli import main as cli
from audiollm.tts.data import IGNORE_INDEX, TokenDataset, WordTimesError, word_frames
from audiollm.tts.generate import build_prompt, load_tts, speak, speak_stream
from audiollm.tts.layout import TTSVocab, interleave_words, make_layout, word_ids
from audiollm.tts.sampling import Sampling, SpeechConstraint, sample_speech, speech_tokens
from audiollm.tts.tiny import tiny_codec, tiny_lm

TEXTS = ["one two three", "red green", "seven eight nine", "cat"]
RATE = 16000


def words(text: str, step: float = 0.2) -> list[dict]:
    return [{"word": w, "start": round(step * k, 3)} for k, w in enumerate(text.split())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Four rows with word times, one whose words do not match its text, one without word times."""
    root = tmp_path_factory.mktemp("words")
    rows = []
    for i, text in enumerate(TEXTS):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int(0.8 * RATE))
        sf.write(root / f"c{i}.wav", wav.astype(np.float32), RATE)
        rows.append({"audio": f"c{i}.wav", "text": text, "words": words(text)})
    rows += [{"audio": "c0.wav", "text": "one two", "words": words("one three")}, {"audio": "c1.wav", "text": "red"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    codec, lm = tiny_codec("melcodec", root / "codec"), tiny_lm(root / "lm")
    cli(["train", "tts", "--config", "stages/configs/tts_demo.yaml", "--model_name_or_path", str(lm),
         "--codec_name_or_path", str(codec), "--codec_codebooks", "2", "--train_files", str(root / "m.jsonl"),
         "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache"), "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--use_cpu", "true", "--logging_steps", "1",
         "--eval_files", str(root / "e.jsonl")])
    return root


def test_word_frames_checks_the_times():
    assert word_frames(words("a b c", 0.5), "a b c", 10.0, 20) == [0, 5, 10]
    assert word_frames([{"word": "a", "start": 0.3}], "a", 10.0, 20) == [0]  # the lead-in belongs to the first word
    # wrong words, none, decreasing, past the audio's end, a start missing or not a number
    for bad in (words("a c"), None, [{"word": "a", "start": 0.5}, {"word": "b", "start": 0.2}],
                words("a b", 5.0), [{"word": "a"}, {"word": "b", "start": "x"}]):
        with pytest.raises(WordTimesError):
            word_frames(bad, "a b", 10.0, 20)
    with pytest.raises(WordTimesError):
        word_frames([], "", 10.0, 20)  # an empty text has no word to interleave


def test_interleave_puts_each_word_before_its_frames():
    layout = make_layout("rvq", 10, (1, 1))
    vocab = TTSVocab("rvq", 10, [list(s) for s in layout.slots], 100, 1, 2, 3, 4, "codec", RATE, 31.25, "words")
    speech = torch.arange(100, 112)  # 6 frames of 2 tokens
    ids = interleave_words(vocab, [[7], [8, 9]], speech, [0, 2])
    assert ids == [1, 7, 100, 101, 102, 103, 1, 8, 9, *range(104, 112)]
    assert torch.equal(speech_tokens([torch.tensor([i]) for i in ids + [4]], vocab)[0], speech - 100)


def test_training_skips_bad_word_times_and_learns_no_given_word(trained):
    vocab = TTSVocab.load(trained / "out")
    assert vocab.words and vocab.layout == "rvq"
    [memmap] = [m for m in (trained / "cache" / "tokens").iterdir() if "m.jsonl" in m.joinpath("meta.json").read_text()]
    meta = json.loads((memmap / "meta.json").read_text())
    assert (meta["kept"], meta["skipped"]) == (4, {"word_times": 2})
    row = TokenDataset(memmap, vocab)[0]
    ids, labels = row["input_ids"], row["labels"]
    speech = int((ids == vocab.speech_start).nonzero()[0])
    inside = torch.arange(len(ids)) > speech
    markers = inside & (ids == vocab.text_start)
    assert int(markers.sum()) == 3  # "one two three"
    given = inside & (ids < vocab.code_offset) & ~markers & (ids != vocab.speech_end)
    assert int(given.sum()) >= 3 and (labels[given] == IGNORE_INDEX).all()
    learnt = inside & ~given
    assert torch.equal(labels[learnt], ids[learnt])


def test_sampling_says_every_word_in_order(trained):
    """Nearly random model, high temperature: each row gets every word's tokens in order after its TEXT_START,
    codes of the right slot between them, and ends only after the last word."""
    tts = load_tts(trained / "out")
    text = "seven eight nine"
    prompt = build_prompt(tts, text)
    expected = [t for w in word_ids(tts.tokenizer, text) for t in (tts.vocab.text_start, *w)]
    for seed in range(3):
        steps = list(sample_speech(tts.model, prompt.ids, tts.vocab, Sampling(temperature=1.5, seed=seed),
                                   prompt.max_frames, rows=4, words=prompt.words))
        grid = torch.stack(steps, dim=1)
        for row, tokens in zip(grid, speech_tokens(steps, tts.vocab)):
            end = int((row == tts.vocab.speech_end).nonzero()[0])
            text_part = row[:end][row[:end] < tts.vocab.code_offset].tolist()
            assert text_part == expected
            assert len(tokens) % 2 == 0 and ((tokens.reshape(-1, 2) // 1000) < 2).all()


def test_a_word_past_its_cap_is_ended():
    layout = make_layout("rvq", 10, (1,))
    vocab = TTSVocab("rvq", 10, [list(s) for s in layout.slots], 100, 1, 2, 3, 4, "codec", RATE, 10.0, "words")
    constraint = SpeechConstraint(vocab, max_frames=100, words=[[7], [8]])
    forced = []
    for _ in range(2):
        [token] = constraint.allowed(0, 200).nonzero().flatten().tolist()
        forced.append(token)
        constraint.update(torch.tensor([token]))
    assert forced == [1, 7]  # TEXT_START and the first word are given
    assert constraint.allowed(0, 200).nonzero().flatten().tolist() == list(range(100, 110))  # then a frame at least
    frames = 0
    while constraint.allowed(0, 200)[100]:  # codes go on until the word's cap forces the next word
        constraint.update(torch.tensor([100]))
        frames += 1
    assert constraint.allowed(0, 200).nonzero().flatten().tolist() == [1]
    assert frames == 7  # 1 character: (0.5 s + 0.2 s) x 10 Hz


def test_speak_and_stream_give_audio_only(trained):
    tts = load_tts(trained / "out")
    result = speak(tts, "one two", sampling=Sampling(temperature=1.0, seed=0))
    streamed = np.concatenate(list(speak_stream(tts, "one two", sampling=Sampling(temperature=1.0, seed=0))))
    frames = len(result.tokens) // 2
    assert result.wav.shape[0] == frames * tts.codec.samples_per_frame and frames > 0
    assert len(streamed) == len(result.wav)
    cloned = speak(tts, "three", prompt_audio=str(trained / "c1.wav"), prompt_text="red green",
                   sampling=Sampling(temperature=1.0, seed=0))
    assert cloned.prompt_frames > 0 and len(cloned.wav) > 0


def test_espeak_gives_a_start_per_word():
    from audiollm.synth.espeak import Espeak

    engine = Espeak()
    wav, starts = engine.synth_words("fifteen three thirteen", "en+f3", 170, 50)
    assert len(starts) == 3 and starts[0] == 0.0 and starts == sorted(starts) and starts[-1] < len(wav) / RATE
    assert 0.2 < starts[1] < 0.8  # "fifteen" takes about half a second


def test_demo_rows_get_word_times_only_when_they_match():
    from audiollm.tts.demo import word_times

    assert word_times("a b", [0.0, 0.4]) == {"words": [{"word": "a", "start": 0.0}, {"word": "b", "start": 0.4}]}
    assert word_times("a b", [0.0]) == {}
