"""Sequence packing: padding-free batches for SFT and pretraining.

A padded batch of B rows costs B x (longest row) positions in the LLM; with the mixed lengths of audio rows (a 2 s
clip is 50 audio tokens, a 25 s clip 625) most of them can be padding. ``PackingCollator`` takes the chat
collator's padded batch and concatenates its rows into one sequence (or into a few sequences of at most
``max_tokens``), with ``position_ids`` restarting at 0 for every row and no ``attention_mask``:

- the LLM sees the same positions (RoPE) per row as when the row runs alone;
- transformers' mask builder detects the restarts (``masking_utils.find_packed_sequence_indices``, used only when
  ``attention_mask`` is None) and makes a block-diagonal causal mask for sdpa / eager, so a row never attends to
  another; flash-attention takes the same position ids as varlen ``cu_seqlens``, but only for a batch of one
  sequence, so with flash-attention ``max_tokens`` must stay 0;
- each row's first label is dropped: in the packed sequence it would be predicted from the previous row's last
  token, and alone it is never predicted (nothing precedes it), so the loss covers exactly the same tokens;
- rows keep their order, so the audio chunks (``input_features``, clip by clip in row order) still fill the
  ``<|AUDIO|>`` placeholders in order: the model's scatter needs no change.

sdpa with a block-diagonal mask still computes every (query, key) pair of the packed sequence, (sum of lengths)^2,
and the mask keeps it off the fused causal kernels: on CPU a batch packed into one sequence was 1.4x slower than
the padded batch. ``attn_implementation: sdpa_packed`` (registered here) runs sdpa once per packed row with
``is_causal=True`` instead, sum(length^2), like flash-attention's varlen kernel; batches that are not packed go to
transformers' own sdpa unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from audiollm.bad_rows import TALLY_KEY
from audiollm.collator import IGNORE_INDEX
from audiollm.ctc import CTC_KEYS
from audiollm.distill import KD_COUNTS, KD_LABELS, TEACHER_KEYS

# Audio keys (already in row order), the row ids the crash-safe trainer reports on a non-finite loss and the
# batch's bad-row tally.
# The teacher's text rows and row counts (audiollm/distill.py) pass through too: the teacher runs them padded; so
# do the clips' CTC targets (audiollm/ctc.py), which follow the audio.
PASSED_THROUGH = ("input_features", "feature_attention_mask", "row_ids", TALLY_KEY, *TEACHER_KEYS, KD_COUNTS,
                  *CTC_KEYS)
# Per-token labels packed like ``labels``: the distilled rows' labels pair with the teacher's by answer order.
PACKED_LABELS = ("labels", KD_LABELS)
PACKED_SDPA = "sdpa_packed"  # the attn_implementation name of packed_sdpa_attention


def packed_row_starts(position_ids: torch.Tensor | None, length: int) -> list[list[int]] | None:
    """Start offsets of the packed rows in each sequence, or None when the batch is not a packed one.

    Packed: (B, S) positions that start at 0 and either step by 1 or restart at 0, with at least one restart.
    Anything else (a plain 0..S-1 batch, left-padded generation positions, a decoding step) returns None.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != length or length < 2:
        return None
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    restarts = position_ids[:, 1:] == 0
    if not bool((position_ids[:, 0] == 0).all() and ((steps == 1) | restarts).all() and restarts.any()):
        return None
    return [[0] + (row.nonzero().flatten() + 1).tolist() for row in restarts]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """sdpa per packed row: (B, H, S, D) queries, (B, H_kv, S, D) keys/values -> (B, S, H, D).

    Two kinds of packed batch: the LLM's (``position_ids`` restarting at 0 per row: causal attention per row)
    and the packed encoder's (one sequence of clips with boundaries ``cu_seq_lens_q``, as flash-attention's
    varlen kernel takes them: bidirectional attention per clip). Anything else (padded batches, generation with a
    cache) goes to transformers' sdpa.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None and query.shape[0] == 1 and key.shape[2] == query.shape[2]:
        starts, causal = [bounds[:-1].tolist()], bool(getattr(module, "is_causal", False))
    else:
        starts, causal = packed_row_starts(kwargs.get("position_ids"), query.shape[2]), True
        if starts is None or key.shape[2] != query.shape[2] or not getattr(module, "is_causal", True):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # GQA: (B, H, S, D)
    rows = []
    for b, row_starts in enumerate(starts):
        sizes = [e - s for s, e in zip(row_starts, row_starts[1:] + [query.shape[2]])]
        # split, not a slice per piece: a slice's backward writes its gradient into a zero tensor of the whole
        # sequence, so n pieces cost n full-size tensors; split's backward is one cat.
        q, k, v = (t[b : b + 1].split(sizes, dim=2) for t in (query, key, value))
        pieces = [F.scaled_dot_product_attention(*qkv, dropout_p=dropout, is_causal=causal, scale=scaling)
                  for qkv in zip(q, k, v)]
        rows.append(torch.cat(pieces, dim=2))  # (1, H, S, D)
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
# Padded batches (evaluation, generation) still need sdpa's mask; packed ones ignore it.
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def bins_in_order(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive row indices grouped so that each group's total length stays <= ``max_tokens`` (0: one group).

    Next-fit keeps the row order (the audio order); a row longer than ``max_tokens`` gets a group of its own.
    """
    if max_tokens <= 0:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if bins[-1] and used + n > max_tokens:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def pack_batch(batch: dict[str, torch.Tensor], pad_id: int, max_tokens: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch -> a packed one.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (and distillation's ``kd_labels``) (B, S),
            right-padded; audio keys and the teacher's rows pass through.
        pad_id: token id written after the last row of a shorter packed sequence.
        max_tokens: tokens per packed sequence; 0 packs the whole batch into one sequence.
    Returns:
        ``input_ids``, ``labels`` (``kd_labels``), ``position_ids`` of shape (P, W), P packed sequences of W = the
        longest's length, no ``attention_mask``. A padding tail gets positions 0, 1, ... (a block of its own) and no
        labels.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1).tolist()
    if not all(mask[i, :n].all() for i, n in enumerate(lengths)):
        raise ValueError("pack_batch needs right-padded rows (a training batch, not generation's left padding)")
    bins = bins_in_order(lengths, max_tokens)
    width = max(sum(lengths[i] for i in group) for group in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    label_keys = [key for key in PACKED_LABELS if key in batch]
    labels = {key: torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long) for key in label_keys}
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for k, group in enumerate(bins):
        at = 0
        for i in group:
            n = lengths[i]
            ids[k, at : at + n] = batch["input_ids"][i, :n]
            for key in label_keys:
                labels[key][k, at + 1 : at + n] = batch[key][i, 1:n]  # the row's first token has no predecessor
            positions[k, at : at + n] = torch.arange(n)
            at += n
        positions[k, at:] = torch.arange(width - at)
    packed = {"input_ids": ids, **labels, "position_ids": positions}
    packed.update({key: batch[key] for key in PASSED_THROUGH if key in batch})
    return packed


@dataclass
class PackingCollator:
    """Wraps a training collator (``ChatCollator``): its padded batch, packed by ``pack_batch``.

    Whatever the wrapped collator does per row (audio decoding, over-long rows dropped, bad rows skipped) happens
    first, unchanged; packing only rearranges the kept rows.
    """

    collator: object
    max_tokens: int = 0  # tokens per packed sequence; 0: the whole batch in one sequence (padding-free)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        return pack_batch(batch, self.collator.tokenizer.pad_token_id, self.max_tokens)

    def set_epoch(self, epoch: int) -> None:
        self.collator.set_epoch(epoch)

    @property
    def skipped(self):
        """The wrapped collator's counts of dropped / trimmed rows."""
        return self.collator.skipped


@dataclass
class RowPlan:
    """Where the real tokens of a right-padded (R, S) batch go in its packed form (P, W).

    ``real`` (R, S) marks real tokens; ``seq`` and ``offset`` (R,) give each row's packed sequence and start;
    ``used`` (P,) the tokens of each packed sequence (the rest of its W is a padding tail).
    """

    real: torch.Tensor
    seq: torch.Tensor
    offset: torch.Tensor
    used: torch.Tensor
    shape: tuple[int, int]

    def places(self, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, sequence, position) of the real tokens in row-major order; ``shifted``: of the next-token
        predictions instead, (R, S - 1): position j of a row predicts its token j + 1."""
        real = self.real[:, 1:] if shifted else self.real
        t = torch.arange(real.shape[1], device=real.device)
        return real, self.seq[:, None].expand_as(real)[real], (self.offset[:, None] + t)[real]


def plan_rows(attention_mask: torch.Tensor, max_tokens: int = 0) -> RowPlan:
    """The packing of ``pack_batch`` (rows in order, next-fit into sequences of ``max_tokens``; 0: one sequence)
    for a right-padded (R, S) mask."""
    real = attention_mask.bool()
    lengths = real.sum(-1).tolist()
    if not all(real[i, :n].all() for i, n in enumerate(lengths)):
        raise ValueError("packing needs right-padded rows (a training batch, not generation's left padding)")
    seq, offset, totals = [0] * len(lengths), [0] * len(lengths), []
    for k, group in enumerate(bins_in_order(lengths, max_tokens)):
        at = 0
        for i in group:
            seq[i], offset[i], at = k, at, at + lengths[i]
        totals.append(at)
    device = real.device
    return RowPlan(real, torch.tensor(seq, device=device), torch.tensor(offset, device=device),
                   torch.tensor(totals, device=device), (len(totals), max(totals)))


def pack_rows(embeds: torch.Tensor, labels: torch.Tensor, plan: RowPlan):
    """Right-padded (R, S, H) embeddings and (R, S) labels -> packed (P, W, H), ``position_ids`` and labels (P, W).

    The same layout as ``pack_batch`` (each row's first label dropped, positions restarting at 0 per row, a
    padding tail in a block of its own), built from embeddings so that a model whose batch arrives padded (TRL's
    DPO) can run its LLM packed. Differentiable in ``embeds``.
    """
    real, seq, pos = plan.places()
    width = plan.shape[1]
    packed = embeds.new_zeros(*plan.shape, embeds.shape[-1]).index_put((seq, pos), embeds[real])
    t = torch.arange(real.shape[1], device=real.device)[None, :].expand_as(real)
    tails = torch.arange(width, device=real.device)[None, :] - plan.used[:, None]  # a tail counts from 0
    positions = tails.clamp(min=0).index_put((seq, pos), t[real])
    first = t[real] == 0  # a row's first token is predicted from the previous row's last one: no label
    packed_labels = labels.new_full(plan.shape, IGNORE_INDEX).index_put((seq, pos), labels[real].masked_fill(
        first, IGNORE_INDEX))
    return packed, positions, packed_labels


def unpack_rows(values: torch.Tensor, plan: RowPlan, shifted: bool = True) -> torch.Tensor:
    """Packed per-token values (P, W - 1, ...) (``shifted``: per next-token prediction, e.g. log-probs) or
    (P, W, ...) -> the padded batch's layout (R, S - 1, ...) / (R, S, ...), zeros where the padded batch has no
    token. A row's values are the ones it would get alone: its positions restart at 0 and attend only to it."""
    real, seq, pos = plan.places(shifted)
    picked = values[seq, pos]  # (real tokens, ...)
    out = values.new_zeros(*real.shape, *values.shape[2:])
    return out.index_put(torch.nonzero(real, as_tuple=True), picked)
