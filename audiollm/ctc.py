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

from audiollm.ranks import summed_over_ranks

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


CTC_DIVISOR = "ctc_divisor"  # what a micro-batch's CTC mean is divided by to be its share of the step's mean


class CtcMixin:
    """Trainer mixin for a model with ``ctc_head``: the CTC loss is scaled like the answer loss and logged.

    With the Trainer's ``num_items_in_batch`` the answer loss of a micro-batch is its sum over the whole step's
    labelled tokens, counted over every micro-batch and rank (the Trainer then does not divide by the accumulation
    steps, and multiplies each rank's loss by the rank count, which the gradient all-reduce's average divides out).
    CTC is counted the same way: ``get_batch_samples`` counts the step's chunks with a target over every
    micro-batch (and rank, as the Trainer counts tokens), and a micro-batch's CTC mean over its n chunks is scaled
    by n / that count: the gradient is the step's mean over all its chunks, however they fall on micro-batches and
    ranks (a mean of micro-batch means would weigh a lone chunk like a batch of them). The logs get ``ctc_loss``
    (the mean over the chunks with a target since the last log, on every rank) and the chunks with and without a
    CTC target (no transcript, or a clip over 30 s), so that a manifest without transcripts shows as
    ``ctc_chunks_without_target``, not as a quiet no-op.
    """

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's step of micro-batches; also counts their chunks with a CTC target over every rank (every
        rank draws its step here at the same time, so the all-reduce meets)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if getattr(self.accelerator.unwrap_model(self.model), "ctc_head", None) is not None:
            here = sum(int((batch[CTC_LENGTHS] > 0).sum()) for batch in batches if CTC_LENGTHS in batch)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:  # as the Trainer's tokens
                here = int(summed_over_ranks([here], device)[0])
            self._ctc_step_chunks = here
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self.accelerator.unwrap_model(model)
        if getattr(core, "ctc_head", None) is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            here = int((inputs[CTC_LENGTHS] > 0).sum()) if CTC_LENGTHS in inputs else 0
            step = getattr(self, "_ctc_step_chunks", 0)
            # its share of the step's mean; the Trainer's x rank count and the all-reduce's average cancel
            inputs[CTC_DIVISOR] = step / here if here and step else 1
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tally = self.__dict__.setdefault("_ctc_tally", {"sum": 0.0, "with": 0, "without": 0})
        if CTC_LENGTHS in inputs:
            with_target = int((inputs[CTC_LENGTHS] > 0).sum())
            if with_target and getattr(core, "last_ctc_loss", None) is not None:
                tally["sum"] += float(core.last_ctc_loss) * with_target  # the micro-batch's mean x its chunks
            tally["with"] += with_target
            tally["without"] += inputs[CTC_LENGTHS].numel() - with_target
        return out

    def log(self, logs: dict, *args, **kwargs) -> None:
        tally = self.__dict__.get("_ctc_tally")
        if "loss" in logs and tally is not None:  # every rank logs the loss at the same step: sum the tallies
            loss_sum, with_target, without = summed_over_ranks(
                [tally["sum"], tally["with"], tally["without"]], self.args.device)
            if with_target:
                logs = logs | {"ctc_loss": round(loss_sum / with_target, 4)}
            if with_target or without:
                logs = logs | {"ctc_chunks": with_target, "ctc_chunks_without_target": without}
            tally.update({"sum": 0.0, "with": 0, "without": 0})
        super().log(logs, *args, **kwargs)
