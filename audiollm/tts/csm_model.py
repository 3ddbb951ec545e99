"""The CSM architecture of the tts stage: transformers' ``CsmForConditionalGeneration`` over any RVQ codec's codes.

A backbone transformer steps once per *frame* (text tokens are positions too) and predicts codebook 0 of the next
frame; a small depth decoder, started from the backbone's hidden state, predicts codebooks 1..K-1 of that frame.
A frame's K codes enter the backbone as one position: the sum of K codebook embeddings. A sequence:

    [bos] TEXT_START text TEXT_END SPEECH_START  F1 F2 ... FN  EOS-frame
    \\---------------- text ids ---------------/  \\---- audio positions (codes, K per position) ----/

In stock terms (``CsmProcessor``): frame positions hold ``audio_token_id`` in ``input_ids`` and the EOS frame holds
``audio_eos_token_id`` (our SPEECH_END), whose embedding is the frame of K ``codebook_eos_token_id`` codes. Each
codebook has ``codebook_size + 2`` ids: the codes, then EOS (= codebook_size), then PAD; so unlike Sesame's
CSM-1b (EOS = code 0), no real code doubles as the end.

The folder the stage writes is a stock ``CsmForConditionalGeneration`` checkpoint (``from_pretrained`` loads it
without audiollm) plus the tokenizer and ``tts_config.json``. The stock class builds a ``codec_model`` from
``codec_config``: for a transformers codec (Mimi, DAC) that is the codec itself, weights copied in; for the codec
trained here (``audiollm_melcodec``, unknown to stock transformers) it is a placeholder tiny Mimi that stock
``generate(output_audio=True)`` cannot speak with: the real codec is the folder named in ``tts_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from audiollm.tts.codecs import Codec
from audiollm.tts.layout import CONTROL_TOKENS, SPEECH_END, TTSVocab, make_layout

AUDIO_FRAME = "<|AUDIO_FRAME|>"  # input_ids placeholder of a frame position (stock config.audio_token_id)
STOCK_CODECS = ("mimi", "dac")  # codec model types stock transformers can build inside the checkpoint
# The placeholder codec sub-config for a codec stock transformers does not know: Mimi's layout, ~20k parameters.
PLACEHOLDER_MIMI = dict(hidden_size=16, num_filters=4, num_residual_layers=1, codebook_size=32, codebook_dim=8,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                        intermediate_size=32, num_quantizers=2, num_semantic_quantizers=1, sliding_window=16,
                        upsample_groups=16, vector_quantization_hidden_dimension=8)


def is_csm_folder(path: str | Path) -> bool:
    config = Path(path, "config.json")
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "csm"


def codec_sub_config(codec: Codec):
    """(config, state_dict or None): the codec's own transformers config and weights (as transformers loads them:
    a checkpoint's names may differ from the module's), or the placeholder's config."""
    from transformers import AutoModel, MimiConfig

    path = Path(codec.folder, "config.json")
    raw = json.loads(path.read_text()) if path.is_file() else {}
    if raw.get("model_type") in STOCK_CODECS:
        loaded = AutoModel.from_pretrained(codec.folder)
        return loaded.config, loaded.state_dict()
    return MimiConfig(**PLACEHOLDER_MIMI), None


def backbone_sizes(lm_folder: str | Path) -> dict:
    """The backbone's width and depth, taken from a causal-LM config (the flat architecture's starting LM), so the
    two architectures compare at one size."""
    from transformers import AutoConfig

    lm = AutoConfig.from_pretrained(lm_folder)
    return dict(hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                num_key_value_heads=lm.num_key_value_heads,
                head_dim=getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads)


def csm_config(sizes: dict, codebooks: int, codebook_size: int, text_vocab: int, ids: dict, codec_config,
               depth_layers: int):
    """A CsmConfig: backbone of ``sizes``; depth decoder as wide, ``depth_layers`` deep (CSM-1b: 4 layers)."""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    vocab = codebook_size + 2  # codes, EOS, PAD
    depth = CsmDepthDecoderConfig(num_codebooks=codebooks, backbone_hidden_size=sizes["hidden_size"],
                                  vocab_size=vocab, **{**sizes, "num_hidden_layers": depth_layers},
                                  max_position_embeddings=codebooks + 1)
    return CsmConfig(num_codebooks=codebooks, vocab_size=vocab, text_vocab_size=text_vocab, **sizes,
                     max_position_embeddings=4096, codebook_eos_token_id=codebook_size,
                     codebook_pad_token_id=codebook_size + 1, depth_decoder_config=depth.to_dict(),
                     codec_config=codec_config.to_dict(), **ids)


def add_csm_tokens(tokenizer) -> dict:
    """The 4 control tokens and AUDIO_FRAME in ``tokenizer``; returns the stock config's token ids."""
    missing = [t for t in (*CONTROL_TOKENS, AUDIO_FRAME) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_FRAME),
                audio_eos_token_id=tokenizer.convert_tokens_to_ids(SPEECH_END),
                bos_token_id=tokenizer.bos_token_id, pad_token_id=pad)


def new_csm_model(lm_folder: str | Path, codec: Codec, depth_layers: int, dtype=torch.float32):
    """(model, tokenizer, vocab): a fresh CSM the size of the LM at ``lm_folder``, with its tokenizer."""
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    if set(codec.level_rates) != {1} or len(codec.level_rates) < 2:
        raise ValueError(f"architecture csm needs a codec with 2+ RVQ levels all at the frame rate; {codec.name} "
                         f"has level rates {codec.level_rates} (Mimi, DAC or the codec trained here fit)")
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    ids = add_csm_tokens(tokenizer)
    codec_config, codec_weights = codec_sub_config(codec)
    config = csm_config(backbone_sizes(lm_folder), len(codec.level_rates), codec.codebook_size, len(tokenizer),
                        ids, codec_config, depth_layers)
    model = CsmForConditionalGeneration(config).to(dtype)
    if codec_weights is not None:
        model.codec_model.load_state_dict(codec_weights)
    vocab = csm_vocab(tokenizer, codec, config.text_vocab_size)
    return model, tokenizer, vocab


def csm_vocab(tokenizer, codec: Codec, text_vocab: int) -> TTSVocab:
    """The tts_config.json of a CSM: the rvq layout (one code per level per frame) and the control token ids."""
    layout = make_layout("rvq", codec.codebook_size, codec.level_rates)
    ids = tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))
    return TTSVocab(layout.name, layout.codebook_size, [list(s) for s in layout.slots], text_vocab, *ids,
                    codec=str(Path(codec.folder).resolve()), sample_rate=codec.sample_rate,
                    frame_rate=codec.frame_rate, architecture="csm")


def freeze_codec(model) -> None:
    """The codec inside the checkpoint never trains (codes come from the cache, not from it)."""
    for p in model.codec_model.parameters():
        p.requires_grad_(False)


def load_csm(folder: str | Path, dtype=torch.float32):
    """(model, tokenizer, vocab) of a CSM folder written by this stage."""
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    vocab = TTSVocab.load(folder)
    if vocab.architecture != "csm":
        raise ValueError(f"{folder}: tts_config.json says architecture {vocab.architecture!r}, not csm")
    model = CsmForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(folder), vocab


def frame_embeddings(model, input_ids: torch.Tensor, codes: torch.Tensor, ids) -> torch.Tensor:
    """(B, S) ids + (B, S, K) codes -> (B, S, D): a text position's token embedding, an audio position's sum of
    its K codebook embeddings (what the stock model computes from ``input_values`` with its codec). ``ids``: the
    sequence's ``csm_data.CsmIds``."""
    text = model.embed_text_tokens(input_ids)
    audio = model.backbone_model.embed_tokens(codes)  # (B, S, K) -> (B, S, D)
    is_audio = (input_ids == ids.audio_token) | (input_ids == ids.audio_eos)
    return torch.where(is_audio[..., None], audio, text)
