"""What the tts stage composes for ``architecture: csm``: its loss controls, the model, the datasets and a trainer
whose loss weighs the backbone (codebook 0), the depth decoder (codebooks 1..K-1) and, optionally, the text.

    loss = first_codebook_weight * CE(codebook 0) + CE(codebooks 1..K-1 on the drawn frames)
           + text_loss_weight * CE(next text token)

The text loss reads the text embedding matrix as its output layer (tied, as small LMs are), so it adds no weights
and the checkpoint stays a stock ``CsmForConditionalGeneration``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiollm.crash_safety import CrashSafeTrainer
from audiollm.tts.codecs import codec_key, load_codec
from audiollm.tts.csm_data import CsmCollator, CsmDataset, CsmIds, csm_rows
from audiollm.tts.csm_model import frame_embeddings, freeze_codec, is_csm_folder, load_csm, new_csm_model
from audiollm.tts.data import IGNORE_INDEX, CodeCache

log = logging.getLogger(__name__)


@dataclass
class CsmArguments:
    """Shape and loss of the CSM architecture (``architecture: csm``); ignored by the flat one."""

    depth_layers: int = field(default=2, metadata={"help": "Depth decoder layers (as wide as the backbone). CSM-1b "
                              "has 4 for 32 codebooks; 2 suffice for a few."})
    depth_frame_fraction: float = field(default=1 / 16, metadata={"help": "Share of frames the depth decoder "
                                        "trains on per batch (CSM's compute amortization: 1/16); the backbone "
                                        "trains on every frame."})
    first_codebook_weight: float = field(default=1.0, metadata={"help": "Weight of codebook 0's loss (the "
                                         "backbone) against the depth decoder's; 1 is the stock sum."})
    text_loss_weight: float = field(default=0.0, metadata={"help": "Weight of a next-text-token loss on the "
                                    "prompt text (CSM trains none: 0)."})


def load_csm_model(model_args, csm_args: CsmArguments):
    """(model, tokenizer, vocab): a CSM folder of this stage as it is, or a fresh CSM the size of a causal LM."""
    path = model_args.model_name_or_path
    dtype = getattr(torch, model_args.model_dtype)
    if is_csm_folder(path):
        model, tokenizer, vocab = load_csm(path, dtype)
        if model_args.codec_name_or_path:
            vocab.codec = str(Path(model_args.codec_name_or_path).resolve())
    elif not model_args.codec_name_or_path:
        raise ValueError(f"{path} is not a csm folder of this stage: give codec_name_or_path to build a CSM the size "
                         "of this LM")
    else:
        codebooks = {"codebooks": model_args.codec_codebooks} if model_args.codec_codebooks else {}
        codec = load_codec(model_args.codec_name_or_path, **codebooks)
        model, tokenizer, vocab = new_csm_model(path, codec, csm_args.depth_layers, dtype)
    freeze_codec(model)
    log.info("tts csm: %d codebooks of %d, backbone %d x %d, depth decoder %d layers, %.2fM parameters",
             model.config.num_codebooks, vocab.codebook_size, model.config.num_hidden_layers,
             model.config.hidden_size, model.config.depth_decoder_config.num_hidden_layers,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return model, tokenizer, vocab


def load_csm_datasets(model_args, data_args, args, tokenizer, vocab, config):
    """(train, eval or None) CsmDatasets; the main process encodes the audio first, the other ranks read the cache."""
    cache_dir = data_args.cache_dir or os.path.join(args.output_dir, "tts_cache")
    folder, ids = Path(vocab.codec), CsmIds.of(config)
    key = codec_key(folder) + (f"-k{model_args.codec_codebooks}" if model_args.codec_codebooks else "")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"codebooks": model_args.codec_codebooks} if model_args.codec_codebooks else {}
    cache = CodeCache(cache_dir, key, lambda: load_codec(folder, device, **options))
    with args.main_process_first(desc="encode audio to codec codes"):
        make = lambda files: CsmDataset(csm_rows(files, tokenizer, vocab, ids, cache,  # noqa: E731
                                                 data_args.max_length))
        train = make(data_args.train_files)
        evals = make(data_args.eval_files) if data_args.eval_files else None
    if len(train) == 0:
        raise ValueError(f"no usable training rows in {data_args.train_files}: see the skip reasons logged above")
    return train, evals


def csm_collator(tokenizer, config, csm_args: CsmArguments, seed: int) -> CsmCollator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CsmCollator(pad, CsmIds.of(config), csm_args.depth_frame_fraction, seed)


def text_loss(model, hidden: torch.Tensor, text_labels: torch.Tensor) -> torch.Tensor:
    """Next-text-token cross-entropy with the text embeddings as the output layer: (B, S, D) -> scalar."""
    logits = hidden[:, :-1] @ model.embed_text_tokens.weight.T  # (B, S-1, text vocab)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), text_labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX)


def csm_loss(model, core, batch: dict, csm_args: CsmArguments) -> tuple[torch.Tensor, dict]:
    """(loss, parts). ``model``: what the trainer calls (maybe a DeepSpeed engine); ``core``: the unwrapped CSM."""
    ids = CsmIds.of(core.config)
    embeds = frame_embeddings(core, batch["input_ids"], batch["codes"], ids)
    with_text = csm_args.text_loss_weight > 0
    # use_cache stays on: without a cache, the stock depth decoder's mask code fails when the number of drawn
    # frames equals the number of codebooks (its 1-D position_ids are then not expanded to 2-D). The cache only
    # holds keys and values that backward keeps anyway.
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=with_text)
    loss = csm_args.first_codebook_weight * out.backbone_loss + out.depth_decoder_loss
    parts = {"backbone_loss": out.backbone_loss.detach(), "depth_loss": out.depth_decoder_loss.detach()}
    if with_text:
        hidden = out.hidden_states[-1]  # transformers hands the normed last state here: (B, S, D)
        text = text_loss(core, hidden, batch["text_labels"])
        loss, parts["text_loss"] = loss + csm_args.text_loss_weight * text, text.detach()
    return loss, parts


class CsmTrainer(CrashSafeTrainer):
    """The stage's trainer with the CSM loss; the loss parts are averaged into each log line."""

    def __init__(self, *args, csm_args: CsmArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.csm_args, self._parts = csm_args, {}
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: the trainer scales accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = csm_loss(model, self.accelerator.unwrap_model(model), inputs, self.csm_args)
        for name, value in parts.items():
            self._parts.setdefault(name, []).append(float(value))
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._parts:
            logs |= {name: round(sum(v) / len(v), 4) for name, v in self._parts.items()}
            self._parts = {}
        super().log(logs, *args, **kwargs)
