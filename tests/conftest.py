"""Shared fixtures: the tiny tokenizer, a tiny-model factory and deterministic speech-like audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.chat import AUDIO_TOKEN, CHAT_TEMPLATE
from audiollm.model.config import AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine OpenMP's thread sync made the model
# tests 5x slower (104 s vs 20 s at load 5), so one thread. Subprocess tests (DeepSpeed ranks) are unaffected.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE with Qwen's special tokens (825 ids), built once per session."""
    return tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """Factory: ``tiny_model(projector="linear", llm="qwen2", tie=False, stack=4, attn_implementation="sdpa")``.

    Every call seeds torch with ``seed`` (default 0) first, so two calls with the same arguments give the same
    weights. Returns the model in eval mode (about 0.4 M parameters, built in ~30 ms).
    """

    def build(
        projector: str = "linear",
        llm: str = "qwen2",
        tie: bool = False,
        stack: int = 4,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ) -> AudioLLMForConditionalGeneration:
        config = AudioLLMConfig(
            audio_config=tiny_audio_config(),
            text_config=tiny_text_config(len(tokenizer), llm, tie),
            audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
            projector_type=projector,
            projector_stack=stack if projector == "stack" else 1,
        )
        torch.manual_seed(seed)
        model = AudioLLMForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        return model.eval()

    return build


def make_speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllabic 16 kHz clip: shape (round(seconds * 16000),) float32, peak 0.5.

    Five harmonics of a 100-220 Hz pitch that drifts by +-5 %, under a ~2 Hz sin^2 envelope (about four
    syllable-like bursts per second), plus noise at -34 dB so silences are not digital zero.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    pitch = rng.uniform(100, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))  # Hz, per sample
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
    envelope = np.sin(np.pi * rng.uniform(1.5, 2.5) * t + rng.uniform(0, np.pi)) ** 2
    wav = voice * envelope + 0.01 * rng.standard_normal(n)
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


@pytest.fixture
def speech_like():
    """``speech_like(seconds, seed=0)`` -> deterministic speech-like waveform (see ``make_speech_like``)."""
    return make_speech_like


def build_untrained_tts(root, codec: str = "snac", layout: str = "snac7"):
    """A tts folder trained for nothing, under ``root``: a tiny random codec (``root/codec``) and a tiny random
    Qwen2 with the TTS tokens added, saved as ``audiollm train tts`` saves (``root/tts``). Returns that folder."""
    from pathlib import Path

    from audiollm.tts.tiny import tiny_codec, tiny_lm
    from audiollm.tts.training import TTSModelArguments, load_tts_model

    root = Path(root)
    codec_dir, lm = tiny_codec(codec, root / "codec"), tiny_lm(root / "lm")
    model, tokenizer, vocab = load_tts_model(TTSModelArguments(str(lm), str(codec_dir), layout=layout))
    model.save_pretrained(root / "tts")
    tokenizer.save_pretrained(root / "tts")
    vocab.save(root / "tts")
    return root / "tts"


@pytest.fixture(scope="session")
def untrained_tts_dir(tmp_path_factory):
    """A tiny random SNAC tts folder (see ``build_untrained_tts``), built once per session."""
    return build_untrained_tts(tmp_path_factory.mktemp("untrained_tts"))


def write_stock_qwen2_audio(folder):
    """A tiny random folder in stock transformers' Qwen2-Audio format (model, processor, chat template)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor
    from transformers import WhisperFeatureExtractor

    tokenizer = tiny_tokenizer()
    config = Qwen2AudioConfig(audio_config=tiny_audio_config(), text_config=tiny_text_config(len(tokenizer)),
                              audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder)
    Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer,
                        chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder
