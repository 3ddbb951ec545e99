"""Tiny random codecs and a tiny decoder LM, written to folders, for tests, the CPU demo and the benchmark.

The codecs keep each real codec's sample rate, hop and level structure (so frame rates and layouts are the real
ones) with widths of a few channels; random weights give codes that are a deterministic function of the audio but
carry no meaning, and decoded audio that is not speech.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from audiollm.tiny import tiny_text_config, tiny_tokenizer

# Real SNAC 24 kHz strides and rates ([2, 4, 8, 8] -> hop 512; vq strides 4/2/1), tiny widths; no attention, and
# no noise blocks, so decoding is a pure convolution of the codes.
TINY_SNAC = dict(sampling_rate=24000, encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=16,
                 decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=64, codebook_dim=4,
                 vq_strides=[4, 2, 1], noise=False, depthwise=True)
# XCodec2's hop (2*2*4*4*5 = 320 at 16 kHz: 50 Hz) with a 1-layer semantic encoder; FSQ levels 4^3 = 64 codes.
TINY_SEMANTIC = dict(model_type="wav2vec2-bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, feature_projection_input_dim=160, output_hidden_size=16,
                     conv_depthwise_kernel_size=3)
TINY_XCODEC2 = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, encoder_hidden_size=4, semantic_model_config=TINY_SEMANTIC,
                    quantization_dim=48, quantization_levels=[4, 4, 4])
# Mimi's 24 kHz / hop 1920 (12.5 Hz), 4 RVQ levels of 32 codes.
TINY_MIMI = dict(hidden_size=16, num_filters=4, num_residual_layers=1, codebook_size=32, codebook_dim=8,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8, intermediate_size=32,
                 num_quantizers=4, num_semantic_quantizers=1, sliding_window=16, upsample_groups=16,
                 vector_quantization_hidden_dimension=8)
# The descript DAC releases' rates and encoder strides (hop 320 at 16 and 24 kHz, 512 at 44.1 kHz), 1- to 16-channel
# convolutions and 4 RVQ levels of 64 codes: ~14k parameters.
TINY_DAC_STRIDES = {16000: [2, 4, 5, 8], 24000: [2, 4, 5, 8], 44100: [2, 4, 8, 8]}
TINY_DAC = dict(encoder_hidden_size=1, decoder_hidden_size=16, n_codebooks=4, codebook_size=64, codebook_dim=4)


# The codec trained here (audiollm/tts/melcodec.py) at its real rates (16 kHz, 512 samples per frame), 3 levels of
# 4 x 4 = 16 codes, 16 channels; 4 Griffin-Lim iterations keep decoding fast.
TINY_MELCODEC = dict(n_mels=20, hidden_size=16, encoder_layers=1, decoder_layers=1, num_quantizers=3,
                     fsq_levels=[4, 4], griffin_lim_iters=4)


def tiny_codec(kind: str, out: str | os.PathLike, seed: int = 0, sample_rate: int | None = None) -> Path:
    """Write a random ``kind`` codec (xcodec2, snac, mimi, dac, melcodec) to ``out``; same seed, same weights.

    ``sample_rate`` picks the DAC release whose rate and strides the tiny DAC copies: 16000, 24000 or 44100
    (default); the other codecs have one rate each."""
    out = Path(out)
    if sample_rate is not None and (kind != "dac" or sample_rate not in TINY_DAC_STRIDES):
        raise ValueError(f"sample_rate {sample_rate} for {kind!r}: only dac takes one, of {sorted(TINY_DAC_STRIDES)}")
    torch.manual_seed(seed)
    if kind == "snac":
        from snac import SNAC

        from audiollm.tts.codecs import save_snac

        return save_snac(SNAC(**TINY_SNAC), out, TINY_SNAC)
    if kind == "xcodec2":
        from transformers import Xcodec2Config, Xcodec2Model

        Xcodec2Model(Xcodec2Config(**TINY_XCODEC2)).save_pretrained(out)
    elif kind == "mimi":
        from transformers import MimiConfig, MimiModel

        model = MimiModel(MimiConfig(**TINY_MIMI))
        for name, buffer in model.named_buffers():  # a fresh Mimi's codebooks are all zeros: every code alike
            if name.endswith("codebook.embed_sum"):
                buffer.copy_(torch.randn_like(buffer))
        model.save_pretrained(out)
    elif kind == "melcodec":
        from audiollm.tts.melcodec import MelCodecConfig, MelCodecModel

        MelCodecModel(MelCodecConfig(**TINY_MELCODEC)).save_pretrained(out)
    elif kind == "dac":
        from transformers import DacConfig, DacModel

        sample_rate = sample_rate or 44100
        config = DacConfig(**TINY_DAC, sampling_rate=sample_rate, downsampling_ratios=TINY_DAC_STRIDES[sample_rate])
        DacModel(config).save_pretrained(out)
    else:
        raise ValueError(f"unknown codec {kind!r}")
    return out


def tiny_lm(out: str | os.PathLike, size: str = "test", seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM with the tiny tokenizer (no TTS tokens yet: the tts stage adds them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_text_config(len(tokenizer), size=size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
