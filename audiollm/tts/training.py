"""What the tts stage (stages/tts.py) composes: its argument dataclasses, the decoder LM with TTS tokens, the token
datasets and the final save. Works in one plain process; DeepSpeed arrives through TrainingArguments.deepspeed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiollm.crash_safety import final_save, save_trainer_state
from audiollm.tts.codecs import codec_key, load_codec
from audiollm.tts.data import TokenCollator, token_dataset
from audiollm.tts.layout import TTS_CONFIG, TTSVocab, add_tts_tokens, make_layout

log = logging.getLogger(__name__)


@dataclass
class TTSModelArguments:
    """The decoder LM to fine-tune and the codec whose codes it learns to speak."""

    model_name_or_path: str = field(metadata={"help": "Any local HF causal-LM folder (TTS tokens are added), or a "
                                              "previous tts output (its tts_config.json is kept)."})
    codec_name_or_path: str | None = field(default=None, metadata={"help": "Local XCodec2, SNAC, Mimi, DAC or "
                                           "trained-here codec folder; default: the one in the model's "
                                           "tts_config.json."})
    architecture: str = field(default="flat", metadata={"help": "flat: one LM over the layout's token stream "
                              "(LLaSA, Orpheus); csm: a backbone per frame + a depth decoder for the codebooks "
                              "(CSM, Moshi; needs an RVQ codec: see audiollm/tts/csm_model.py)."})
    layout: str = field(default="single", metadata={"help": "single (XCodec2, LLaSA), snac7 (SNAC, Orpheus) or rvq "
                        "(Mimi, DAC, the codec trained here); ignored when the model already has a tts_config.json."})
    interleave: str = field(default="none", metadata={"help": "none, or words: each word's text inside the speech "
                            "before its frames (rows need \"words\" start times; see audiollm/tts/layout.py); "
                            "ignored when the model already has a tts_config.json."})
    codec_codebooks: int | None = field(default=None, metadata={"help": "Mimi, DAC, the codec trained here: RVQ "
                                        "levels kept (default all)."})
    model_dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16 weights."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code in the LM folder."})


@dataclass
class TTSDataArguments:
    """(text, audio) manifests and how they become token rows."""

    train_files: list[str] = field(metadata={"help": "JSONL manifests of {\"audio\": path, \"text\": ...} rows, "
                                             "audio paths relative to the manifest."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "Manifests for evaluation loss."})
    max_length: int = field(default=2048, metadata={"help": "Tokens per row (text + speech); longer rows are "
                            "skipped and counted, never cut."})
    cache_dir: str | None = field(default=None, metadata={"help": "Codec codes and token memmaps; default "
                                  "OUTPUT_DIR/tts_cache. Share it between runs to encode each clip once."})


def codec_options(model_args: TTSModelArguments) -> dict:
    return {"codebooks": model_args.codec_codebooks} if model_args.codec_codebooks else {}


def load_tts_model(model_args: TTSModelArguments):
    """(model, tokenizer, vocab): the LM with TTS tokens added (or kept, for a tts folder), and its vocab."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, model_args.model_dtype),
                                                 attn_implementation=model_args.attn_implementation,
                                                 trust_remote_code=model_args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if Path(path, TTS_CONFIG).is_file():
        vocab = TTSVocab.load(path)
        if model_args.codec_name_or_path:
            vocab.codec = str(Path(model_args.codec_name_or_path).resolve())
        return model, tokenizer, vocab
    if not model_args.codec_name_or_path:
        raise ValueError(f"{path} has no {TTS_CONFIG}: give codec_name_or_path (and layout) to add TTS tokens")
    codec = load_codec(model_args.codec_name_or_path, **codec_options(model_args))
    vocab = add_tts_tokens(model, tokenizer, make_layout(model_args.layout, codec.codebook_size, codec.level_rates),
                           codec, model_args.interleave)
    controls = [vocab.text_start, vocab.text_end, vocab.speech_start, vocab.speech_end]
    log.info("tts: %s layout, interleave %s, speech ids %d..%d, control ids %s", vocab.layout, vocab.interleave,
             vocab.code_offset, vocab.code_offset + vocab.token_layout.vocab_size - 1, controls)
    return model, tokenizer, vocab


def load_token_datasets(model_args: TTSModelArguments, data_args: TTSDataArguments, args, tokenizer,
                        vocab: TTSVocab):
    """(train, eval or None) TokenDatasets. The main process encodes and writes the cache first; the other ranks
    then read it (each clip is encoded once, whatever the number of ranks)."""
    cache_dir = data_args.cache_dir or os.path.join(args.output_dir, "tts_cache")
    folder = Path(vocab.codec)
    key = codec_key(folder) + (f"-k{model_args.codec_codebooks}" if model_args.codec_codebooks else "")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def loader():
        return load_codec(folder, device, **codec_options(model_args))

    with args.main_process_first(desc="encode audio to codec tokens"):
        make = lambda files: token_dataset(files, tokenizer, vocab, key, loader, data_args.max_length,  # noqa: E731
                                           cache_dir)
        train = make(data_args.train_files)
        evals = make(data_args.eval_files) if data_args.eval_files else None
    if len(train) == 0:
        raise ValueError(f"no usable training rows in {data_args.train_files}: see the skip reasons logged above")
    return train, evals


def collator(tokenizer) -> TokenCollator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenCollator(pad)


def save_tts(trainer, tokenizer, vocab: TTSVocab) -> None:
    """Model, tokenizer and tts_config.json into output_dir: a folder ``speak`` loads and this stage can resume.
    Written into ``.saving/final`` and moved in with tts_config.json last (``audiollm.crash_safety.final_save``)."""
    with final_save(trainer, last=("config.json", TTS_CONFIG)) as staging:
        save_trainer_state(trainer, staging)  # the loss curve
        trainer.save_model(staging)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staging)
            vocab.save(staging)
    # Closing the group on every rank together avoids a gloo abort at exit.
    trainer.accelerator.end_training()
