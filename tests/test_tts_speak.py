"""The tts stage in one process (through `audiollm train tts`), then speaking with what it wrote: constrained
sampling, streaming, cloning, best-of-N, speech to speech and the CLI. Tiny SNAC codec and tiny Qwen2, random."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.cli import main as cli
from audiollm.tts.codecs import read_audio
from audiollm.tts.data import IGNORE_INDEX, TokenDataset, token_dataset
from audiollm.tts.generate import load_tts, speak, speak_stream
from audiollm.tts.layout import TTSVocab, make_layout
from audiollm.tts.sampling import Sampling, SpeechConstraint, frame_cap, sample_speech, speech_tokens
from audiollm.tts.tiny import tiny_codec, tiny_lm
from audiollm.tts.training import TTSModelArguments, load_tts_model

from tests.test_eval_run import tiny_openai_whisper  # a 1-layer OpenAI Whisper .pt, random weights

TEXTS = ["one two three", "red green blue", "seven eight", "hello world", "good morning", "cat and dog"]
MAX_LENGTH = 160  # tokens: the 1.4 s rows fit (~12 frames x 7 + text), the long-text row does not


def write_rows(root: Path) -> Path:
    """Six good rows (0.6-1.4 s of noise), a missing file, a corrupt file and a text longer than MAX_LENGTH."""
    rows = []
    for i, text in enumerate(TEXTS):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int((0.6 + 0.15 * i) * 22050))
        sf.write(root / f"clip{i}.wav", wav.astype(np.float32), 22050)
        rows.append({"audio": f"clip{i}.wav", "text": text})
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    rows += [{"audio": "gone.wav", "text": "x"}, {"audio": "corrupt.wav", "text": "x"},
             {"audio": "clip0.wav", "text": " ".join(["one two three"] * 60)}]
    (root / "tts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "tts.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tts")
    codec, lm, manifest = tiny_codec("snac", root / "codec"), tiny_lm(root / "lm"), write_rows(root)
    cli(["train", "tts", "--config", "stages/configs/tts_demo.yaml", "--model_name_or_path", str(lm),
         "--codec_name_or_path", str(codec), "--layout", "snac7", "--interleave", "none",
         "--train_files", str(manifest), "--eval_files", str(manifest),
         "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache"), "--max_steps", "2",
         "--per_device_train_batch_size", "3", "--max_length", str(MAX_LENGTH), "--use_cpu", "true",
         "--logging_steps", "1"])
    return root


@pytest.fixture(scope="module")
def tts(trained):
    return load_tts(trained / "out")


def test_training_wrote_a_tts_folder_and_counted_skips(trained):
    out = trained / "out"
    vocab = TTSVocab.load(out)
    assert (vocab.layout, vocab.sample_rate) == ("snac7", 24000)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses and all(np.isfinite(losses))
    [memmap] = (trained / "cache" / "tokens").iterdir()
    meta = json.loads((memmap / "meta.json").read_text())
    assert meta["rows"] == 9 and meta["kept"] == 6
    assert meta["skipped"] == {"unreadable_audio": 2, "too_long": 1}


def test_rows_label_speech_only_and_codes_are_cached(trained, tts):
    [memmap] = (trained / "cache" / "tokens").iterdir()
    data = TokenDataset(memmap)
    row = data[0]
    ids, labels = row["input_ids"], row["labels"]
    start = int((ids == tts.vocab.speech_start).nonzero()[0])
    assert (labels[:start] == IGNORE_INDEX).all() and torch.equal(labels[start:], ids[start:])
    assert ids[-1] == tts.vocab.speech_end
    codes = tts.codec.encode(read_audio(trained / "clip0.wav", 24000))
    expected = tts.vocab.token_layout.codes_to_tokens(codes) + tts.vocab.code_offset
    assert torch.equal(ids[start + 1:-1], expected)
    # A second build with another max_length re-tokenises but encodes no clip again: the codes come from the cache
    # (the corrupt file is tried again, and skipped again).
    again = token_dataset([str(trained / "tts.jsonl")], tts.tokenizer, tts.vocab, tts.codec.key, lambda: tts.codec,
                          MAX_LENGTH + 1, trained / "cache")
    assert again.meta["encoded"] == 0 and again.meta["cache_hits"] == 7


def test_control_tokens_added_to_any_causal_lm(trained):
    model, tokenizer, vocab = load_tts_model(TTSModelArguments(str(trained / "lm"), str(trained / "codec"),
                                                               layout="snac7"))
    assert vocab.code_offset >= len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] >= vocab.code_offset + 7 * 64
    assert tokenizer.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>") == vocab.speech_end


def test_constraint_masks_by_slot():
    layout = make_layout("snac7", 64, (1, 2, 4))
    vocab = TTSVocab("snac7", 64, [list(s) for s in layout.slots], 100, 1, 2, 3, 4, "codec", 24000, 11.7)
    constraint = SpeechConstraint(vocab, max_frames=2)
    for emitted in range(15):
        allowed = constraint.allowed(0, 600).nonzero().flatten().tolist()
        constraint.update(torch.tensor([allowed[-1]]))  # a code of the slot (the last id allowed is one)
        slot, frames = emitted % 7, emitted // 7
        codes = list(range(100 + slot * 64, 164 + slot * 64))
        if frames == 2:
            assert allowed == [4]  # the cap: only end of speech
        elif slot == 0 and frames > 0:
            assert allowed == [4] + codes  # a frame boundary: end allowed
        else:
            assert allowed == codes


def test_sampling_emits_only_valid_codes_and_ends_on_a_frame(tts):
    """64 sampled sequences from the (nearly random) model at a high temperature: every token lies in its slot's
    range, every row ends with SPEECH_END at a frame boundary within the cap."""
    from audiollm.tts.layout import text_ids

    prompt = text_ids(tts.tokenizer, tts.vocab, "one two three")
    cap = frame_cap("one two three", tts.codec.frame_rate)
    for seed in range(4):
        steps = list(sample_speech(tts.model, prompt, tts.vocab, Sampling(temperature=1.5, seed=seed), cap,
                                   rows=16))
        grid = torch.stack(steps, dim=1)
        for row, tokens in zip(grid, speech_tokens(steps, tts.vocab)):
            assert vocab_end_count(row, tts.vocab) >= 1
            assert len(tokens) % 7 == 0 and 0 < len(tokens) // 7 <= cap
            slots = (tokens.reshape(-1, 7) // 64)
            assert torch.equal(slots, torch.arange(7).expand_as(slots))
            assert ((tokens.reshape(-1, 7) % 64) < 64).all() and (tokens >= 0).all()


def vocab_end_count(row: torch.Tensor, vocab: TTSVocab) -> int:
    return int((row == vocab.speech_end).sum())


def test_cap_stops_a_model_that_never_ends(tts):
    """With SPEECH_END's logit pushed far down, the cap still ends the speech, at exactly max_frames."""
    bias = torch.zeros(tts.model.lm_head.weight.shape[0])
    bias[tts.vocab.speech_end] = -1e4
    handle = tts.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        result = speak(tts, "hi")
    finally:
        handle.remove()
    assert len(result.tokens) == 7 * frame_cap("hi", tts.codec.frame_rate)


def test_stream_equals_non_streamed(tts):
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=3)
    whole = speak(tts, "seven eight nine", sampling=sampling)
    chunks = list(speak_stream(tts, "seven eight nine", sampling=sampling, hop=2))
    assert len(chunks) > 1
    stream = np.concatenate(chunks)
    assert stream.shape == whole.wav.shape
    np.testing.assert_allclose(stream, whole.wav, rtol=0, atol=1e-5 * np.abs(whole.wav).max())


def test_cloning_prefills_the_prompt_codes(tts, trained):
    prompt = trained / "clip2.wav"
    result = speak(tts, "one two", prompt_audio=str(prompt), prompt_text=TEXTS[2])
    prefix = tts.vocab.token_layout.codes_to_tokens(tts.codec.encode(read_audio(prompt, 24000)))
    assert result.prompt_frames == len(prefix) // 7 > 0
    assert torch.equal(result.tokens[:len(prefix)], prefix)
    new_frames = len(result.tokens) // 7 - result.prompt_frames
    assert len(result.wav) == new_frames * tts.codec.samples_per_frame
    streamed = np.concatenate(list(speak_stream(tts, "one two", prompt_audio=str(prompt), prompt_text=TEXTS[2])))
    np.testing.assert_allclose(streamed, result.wav, rtol=0, atol=1e-5 * np.abs(result.wav).max())


def test_best_of_n_keeps_the_verifiers_best(tts):
    seen = {}

    def loudest(wavs, sample_rate, text):
        seen["wavs"], seen["args"] = list(wavs), (sample_rate, text)
        return [float(np.sqrt(np.mean(w ** 2))) if len(w) else -1.0 for w in wavs]

    result = speak(tts, "red green", best_of=5, verifier=loudest, sampling=Sampling(temperature=1.2, seed=1))
    assert len(seen["wavs"]) == 5 and seen["args"] == (24000, "red green")
    scores = loudest(seen["wavs"], 24000, "")
    assert len({round(s, 6) for s in scores}) > 1, "candidates should differ"
    assert result.chosen == int(np.argmax(scores)) and np.array_equal(result.wav, seen["wavs"][result.chosen])


def test_listener_verifier_scores_minus_wer(tts, tmp_path):
    from audiollm.tts.generate import ListenerVerifier

    verifier = ListenerVerifier(str(tiny_openai_whisper(tmp_path / "w.pt")))
    wavs = [0.1 * np.random.default_rng(i).standard_normal(12000).astype(np.float32) for i in range(2)]
    scores = verifier(wavs, 24000, "hello world")
    assert len(scores) == 2 and all(s <= 0 for s in scores)  # -WER; random Whisper hears garbage


def test_chat_and_cli_end_to_end(trained, tmp_path, capsys):
    from audiollm.build import build_tiny
    from audiollm.tts.chat import chat

    listener = tmp_path / "listener"
    build_tiny(listener)
    question = trained / "clip1.wav"
    reply = chat(str(listener), str(question), str(trained / "out"), str(tmp_path / "reply.wav"))
    assert isinstance(reply.text, str) and reply.transcript is None
    assert sf.info(tmp_path / "reply.wav").samplerate == 24000 and len(reply.wav) > 0

    whisper = tiny_openai_whisper(tmp_path / "w.pt")
    cascade = chat(str(listener), str(question), mode="cascade", asr_model=str(whisper))
    assert isinstance(cascade.transcript, str) and cascade.wav is None

    assert cli(["speak", "--model", str(trained / "out"), "--text", "one two", "--out", str(tmp_path / "a.wav"),
                "--stream"]) == 0
    assert "time to first audio" in capsys.readouterr().out
    assert cli(["speak", "--model", str(trained / "out"), "--text", "one two", "--out", str(tmp_path / "b.wav"),
                "--prompt-audio", str(question), "--prompt-text", TEXTS[1]]) == 0
    a, b = sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0]
    assert len(a) > 0 and len(b) > 0
    assert cli(["chat", "--model", str(listener), "--audio", str(question), "--tts", str(trained / "out"),
                "--out-wav", str(tmp_path / "c.wav")]) == 0
    assert "answer:" in capsys.readouterr().out and (tmp_path / "c.wav").is_file()
    with pytest.raises(SystemExit):
        cli(["speak", "--model", str(trained / "out"), "--text", "x", "--out", "x.wav", "--best-of", "3"])
