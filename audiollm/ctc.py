"""CTC on the audio tower: an auxiliary loss that gives every encoder frame a target from the clip's transcript.

Why: an encoder that starts from random weights (the CPU demo's, or any new audio tower) learns to hear only
through the answer loss, which reaches it through every LLM layer and the projector. Hybrid CTC/attention ASR
(Watanabe et al., 2017) and speech LLMs with a CTC branch on the encoder add a direct per-frame objective: a
linear head on the encoder's output, trained with CTC against the transcript. The LLM then reads frames that
already separate the sounds of the words.

Targets are the transcript's UTF-8 bytes (any language, no tokenizer): class 0 is CTC's blank, byte b is class
b + 1, so the head is d_model x 257 (329 k parameters at large-v3's 1,280). It reads the encoder's 25 Hz frames,
the ones the projector turns into audio tokens: about 25 bytes a second, enough for speech (the demo's clips need
0.68 of that at the median; a clip whose bytes do not fit adds 0, ``zero_infinity``).

Which clips: those whose row carries ``transcripts`` (one per audio; ``audiollm data synth`` writes them, for
pretraining rows as ``transcript``). Others, and the chunks of clips over 30 s, get no CTC target.

The head trains with the stage and stays out of its final folder (a stock Qwen2-Audio checkpoint); the Trainer's
checkpoints keep it, so a resumed run continues exactly. A stage with CTC on starts a new head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CTC_BLANK = 0
CTC_CLASSES = 257  # the blank + 256 byte values
CTC_TARGETS = "ctc_targets"  # (sum of target lengths,) classes 1..256, every clip's bytes in clip order
CTC_LENGTHS = "ctc_lengths"  # (chunks,) bytes per chunk of input_features; 0: no CTC target
CTC_KEYS = (CTC_TARGETS, CTC_LENGTHS)
HEAD_PREFIX = "ctc_head."  # its weights' names in the model's state dict


def ctc_batch(transcripts: list[str | None], chunks_per_clip: list[int]) -> dict[str, torch.Tensor]:
    """The batch's CTC targets, aligned with ``input_features``' chunks.

    Args:
        transcripts: what each clip of the batch says (None: unknown), in the collator's clip order.
        chunks_per_clip: how many 30 s chunks each clip became (over 1: no target, the split is not aligned).
    Returns:
        ``ctc_targets`` (sum L,) and ``ctc_lengths`` (chunks,), L = the transcript's byte count.
    """
    targets, lengths = [], []
    for text, chunks in zip(transcripts, chunks_per_clip, strict=True):
        data = text.strip().encode("utf-8") if text is not None and chunks == 1 else b""
        targets.extend(byte + 1 for byte in data)
        lengths.extend([len(data)] + [0] * (chunks - 1))
    return {CTC_TARGETS: torch.tensor(targets, dtype=torch.long), CTC_LENGTHS: torch.tensor(lengths, dtype=torch.long)}


def add_ctc_head(model, weight: float, layer: int = 0) -> None:
    """Give ``model`` (an AudioLLMForConditionalGeneration) a new head on its encoder and turn CTC on.

    ``layer``: 0 reads the encoder's output (the frames the projector gets); k in 1..layers-1 reads the output of
    layer k (intermediate CTC, Lee & Watanabe 2021), which leaves the layers above free to keep what the
    transcript does not say (who speaks, how high).
    """
    if weight <= 0:
        raise ValueError(f"ctc_weight must be > 0 to add a CTC head, got {weight}")
    layers = model.config.audio_config.encoder_layers
    if not 0 <= layer < layers:
        raise ValueError(f"ctc_layer must be 0 (the encoder's output) or a layer 1..{layers - 1}, got {layer}")
    width = model.config.audio_config.d_model
    weights = model.audio_tower.conv1.weight
    # The LayerNorm: an inner layer's output is the unnormalised residual stream.
    model.ctc_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, CTC_CLASSES))
    model.ctc_head.to(device=weights.device, dtype=weights.dtype)
    model.ctc_weight = weight
    model.audio_tower.tap_layer = layer


def ctc_loss(head: nn.Module, frames: torch.Tensor, frame_lengths: torch.Tensor, targets: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the chunks with a target of CTC(chunk) / its target length.

    Args:
        head: (D,) -> (CTC_CLASSES,) logits.
        frames: (C, N, D) encoder output, C chunks; ``frame_lengths`` (C,) of them are real.
        targets, target_lengths: from ``ctc_batch``.
    Returns:
        A scalar, 0 (connected to the head) when no chunk has a target.
    """
    frame_lengths = frame_lengths.to(frames.device)
    target_lengths = target_lengths.to(frames.device)
    keep = target_lengths > 0
    if not bool(keep.any()):
        return 0.0 * sum(p.sum() for p in head.parameters())
    starts = F.pad(target_lengths.cumsum(0), (1, 0))[:-1]
    picked = torch.cat([targets[int(s):int(s) + int(n)] for s, n in zip(starts[keep], target_lengths[keep])])
    log_probs = head(frames[keep]).float().log_softmax(-1).transpose(0, 1)  # (N, C', classes), as F.ctc_loss takes
    losses = F.ctc_loss(log_probs, picked.to(frames.device), frame_lengths[keep], target_lengths[keep],
                        blank=CTC_BLANK, reduction="none", zero_infinity=True)  # (C',)
    return (losses / target_lengths[keep]).mean()


def summed_over_ranks(values: list[float], device) -> list[float]:
    """Logged tallies of this process summed over every rank (one all-reduce; as they are in one process). Every
    rank must call it at the same step: the Trainer calls ``log`` with the loss on all of them."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.tolist()


CTC_DIVISOR = "ctc_divisor"  # the micro-batches a step accumulates, when the answer loss is divided across them


class CtcMixin:
    """Trainer mixin for a model with ``ctc_head``: the CTC loss is scaled like the answer loss and logged.

    With the Trainer's ``num_items_in_batch`` the answer loss of a micro-batch is its sum over the whole step's
    labelled tokens (the Trainer then does not divide by the accumulation steps), and on several ranks the Trainer
    multiplies each rank's loss by the rank count, as the gradient all-reduce averages over ranks. The CTC mean of a
    micro-batch is divided by both to match: the gradient is then the mean over ranks and micro-batches of their
    CTC means (without the rank count, 2 ranks trained CTC at twice its weight). The logs get ``ctc_loss`` (the
    mean since the last log, over every rank) and the chunks with and without a CTC target (no transcript, or a
    clip over 30 s), so that a manifest without transcripts shows as ``ctc_chunks_without_target``, not as a quiet
    no-op.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self.accelerator.unwrap_model(model)
        if getattr(core, "ctc_head", None) is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            inputs[CTC_DIVISOR] = self.current_gradient_accumulation_steps * self.ctc_rank_scale()
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tally = self.__dict__.setdefault("_ctc_tally", {"sum": 0.0, "steps": 0, "with": 0, "without": 0})
        if getattr(core, "last_ctc_loss", None) is not None:
            tally["sum"] += float(core.last_ctc_loss)
            tally["steps"] += 1
        if CTC_LENGTHS in inputs:
            with_target = int((inputs[CTC_LENGTHS] > 0).sum())
            tally["with"] += with_target
            tally["without"] += inputs[CTC_LENGTHS].numel() - with_target
        return out

    def ctc_rank_scale(self) -> int:
        """The factor the Trainer's ``compute_loss`` multiplies the loss by when it averages tokens across ranks
        (transformers 5.x: the process count over the tensor-parallel size, or ``n_gpu`` under DataParallel)."""
        if not self.args.average_tokens_across_devices:
            return 1
        return self.args.n_gpu if self.args.n_gpu > 1 else self.accelerator.num_processes // self.get_tp_size()

    def log(self, logs: dict, *args, **kwargs) -> None:
        tally = self.__dict__.get("_ctc_tally")
        if "loss" in logs and tally is not None:  # every rank logs the loss at the same step: sum the tallies
            loss_sum, steps, with_target, without = summed_over_ranks(
                [tally["sum"], tally["steps"], tally["with"], tally["without"]], self.args.device)
            if steps:
                logs = logs | {"ctc_loss": round(loss_sum / steps, 4), "ctc_chunks": with_target,
                               "ctc_chunks_without_target": without}
            tally.update({"sum": 0.0, "steps": 0, "with": 0, "without": 0})
        super().log(logs, *args, **kwargs)
