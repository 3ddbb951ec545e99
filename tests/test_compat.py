"""Compatibility with stock transformers' Qwen2-Audio: the same folder, the same inputs, the same logits.

Measured here (tiny fp32 model, 5 s clip; printed with -s):
- stock 30 s-padded input through both models: identical up to float rounding (asserted < 1e-4);
- the project's unpadded input (5 s = 502 frames instead of 3000) vs stock padded input: identical token ids, and
  the same logits up to float rounding (asserted < 1e-4): the unpadded features carry the 2 frames past the clip
  that the encoder's convolutions read, with the stock values, and attention masks the rest in both.
"""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from audiollm.audio import SAMPLE_RATE, featurize
from audiollm.build import build_tiny
from audiollm.collator import ChatCollator
from audiollm.model.modeling import AudioLLMForConditionalGeneration

QUESTION = "What is three plus four?"


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * np.cumsum(f0 * k) / SAMPLE_RATE) / k for k in (1, 2, 3, 4))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_linear")
    build_tiny(out, projector="linear", seed=0)
    return out


@pytest.fixture(scope="module")
def models(folder):
    ours = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    stock = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, stock, AutoProcessor.from_pretrained(folder)


def stock_inputs(processor, clip):
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                                 {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return processor(text=prompt, audio=[clip], sampling_rate=SAMPLE_RATE, return_tensors="pt")


def test_stock_loads_our_folder_and_matches_on_padded_input(models):
    ours, stock, processor = models
    inputs = stock_inputs(processor, speech_like(5.0))
    assert inputs["input_features"].shape[-1] == 3000  # the stock processor pads every clip to 30 s
    with torch.no_grad():
        expected = stock(**inputs).logits
        got = ours(**inputs).logits
    diff = (expected - got).abs().max().item()
    print(f"stock vs project, stock 30 s-padded input: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_unpadded_input_matches_stock_padded_input(models):
    ours, stock, processor = models
    clip = speech_like(5.0)
    padded = stock_inputs(processor, clip)
    row = {"messages": [{"role": "user", "content": f"<audio>{QUESTION}"}], "audios": [clip]}
    unpadded = ChatCollator(processor.tokenizer, generation=True)([row])
    assert torch.equal(unpadded["input_ids"], padded["input_ids"])  # same template, same token count (125)
    assert unpadded["input_features"].shape[-1] == 502  # 5 s (+2 edge frames), not 30 s
    with torch.no_grad():
        expected = stock(**padded).logits
        got = ours(**unpadded).logits
    diff = (expected - got).abs().max().item()
    scale = expected.abs().max().item()
    print(f"project unpadded vs stock padded: max |logit diff| = {diff:.2e} (max |logit| {scale:.2f})")
    assert diff < 1e-4


def test_batched_generation_with_left_padding_matches_one_by_one(folder):
    ours = AudioLLMForConditionalGeneration.from_pretrained(folder).eval()
    collator = ChatCollator(AutoProcessor.from_pretrained(folder).tokenizer, generation=True)
    rows = [
        {"messages": [{"role": "user", "content": f"<audio>{QUESTION}"}], "audios": [speech_like(1.0, 1)]},
        {"messages": [{"role": "user", "content": "Say it. <audio> Now."}], "audios": [speech_like(3.0, 2)]},
    ]
    batch = collator(rows)
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    together = ours.generate(**batch, max_new_tokens=6, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        alone_batch = collator([row])
        alone = ours.generate(**alone_batch, max_new_tokens=6, do_sample=False)
        assert together[i, width:].tolist() == alone[0, alone_batch["input_ids"].shape[1]:].tolist()


def test_chunks_of_long_audio_fill_one_placeholder_run(models):
    ours, _, processor = models
    clip = speech_like(65.0)
    row = {"messages": [{"role": "user", "content": "<audio>Transcribe."}], "audios": [clip]}
    batch = ChatCollator(processor.tokenizer, generation=True)([row])
    assert featurize([clip]).tokens_per_clip == [1625]
    ids = batch["input_ids"][0].tolist()
    audio_id = ours.config.audio_token_id
    first = ids.index(audio_id)
    assert ids[first : first + 1625] == [audio_id] * 1625 and ids.count(audio_id) == 1625
    with torch.no_grad():
        assert torch.isfinite(ours(**batch).logits).all()
