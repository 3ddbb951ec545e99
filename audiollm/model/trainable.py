"""Which parts of the model train: the one place that sets ``requires_grad`` on encoder / projector / LLM.

Stages pick a policy per recipe (typical: pretrain = projector (+ encoder), SFT = projector + LLM, DPO = LLM) and
call ``set_trainable`` once, after building or loading the model and before handing it to the trainer or to peft.
peft marks its own adapter weights trainable when it wraps the model, so call this first, then attach LoRA.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

# The model's three parts, by attribute name (they are also the checkpoint prefixes).
PARTS = ("audio_tower", "multi_modal_projector", "language_model")


def set_trainable(model: nn.Module, encoder: bool, projector: bool, llm: bool) -> dict[str, int]:
    """Turn training on or off for the audio tower, the projector and the LLM; return trainable counts per part.

    The encoder's positional table (``audio_tower.embed_positions``, 1500 x d_model) stays frozen whatever
    ``encoder`` says: Whisper's positions are a fixed sinusoid, and Qwen2-Audio keeps them fixed too.

    Returns:
        ``{"audio_tower": n, "multi_modal_projector": n, "language_model": n}``, trainable parameters per part
        (a tied embedding / LM-head matrix counted once).
    """
    wanted = dict(zip(PARTS, (encoder, projector, llm)))
    for part, train in wanted.items():
        getattr(model, part).requires_grad_(train)
    model.audio_tower.embed_positions.requires_grad_(False)
    counts = {part: info["trainable"] for part, info in trainable_summary(model).items()}
    log.info(
        "trainable parameters: %s",
        ", ".join(f"{part} {count:,}" + ("" if wanted[part] else " (frozen)") for part, count in counts.items()),
    )
    return counts


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "total": n}}`` for each of the three parts, shared weights counted once."""
    summary = {}
    for part in PARTS:
        params = list(getattr(model, part).parameters())  # .parameters() yields a tied matrix once
        summary[part] = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params),
        }
    return summary
