"""The pretraining and SFT trainer, and the frozen teacher that ``loss: kd`` distils from (``audiollm.distill``).

Kept apart from ``audiollm.training`` (what every stage shares): only the two cross-entropy stages train with a
teacher.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from audiollm.batching import TokenBudgetTrainer
from audiollm.ctc import CtcMixin
from audiollm.distill import DistillArguments, DistillMixin, freeze
from audiollm.model.config import STOCK_MODEL_TYPE, AudioLLMConfig
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.stage_args import ModelArguments
from audiollm.training import zero3_paused

log = logging.getLogger(__name__)


class StageTrainer(CtcMixin, DistillMixin, TokenBudgetTrainer):
    """The pretraining and SFT trainer: crash-safe, token-budget batches, distillation when given a ``teacher``,
    CTC on the encoder when the model has a head for it."""


def make_teacher(kd_args: DistillArguments, model_args: ModelArguments):
    """The frozen distillation teacher for ``loss: kd`` (``kd_teacher``, or the starting model's own LLM), in the
    student's dtype and attention; None for the cross-entropy."""
    if not kd_args.enabled:
        return None
    path = kd_args.kd_teacher or model_args.model_name_or_path
    teacher = load_teacher(path, getattr(torch, model_args.model_dtype), model_args.attn_implementation)
    log.info("distillation: teacher %s, T=%g, cross-entropy share %g", path, kd_args.kd_temperature,
             kd_args.kd_ce_weight)
    return teacher


def load_teacher(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The frozen teacher LLM from ``path``: an audiollm folder's ``language_model``, or any causal LM folder.

    Loaded as a full copy on every rank (also under ZeRO-3: it is never sharded, never optimised)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"kd_teacher {path}: no config.json; give a model folder")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with zero3_paused():
        if model_type in (AudioLLMConfig.model_type, STOCK_MODEL_TYPE):
            teacher = AudioLLMForConditionalGeneration.from_pretrained(path, **kwargs).language_model
        else:
            teacher = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return freeze(teacher)
