"""A memory-lean causal-LM cross-entropy: logits only for labelled positions, a chunk of tokens at a time.

The plain loss (transformers' ``ForCausalLMLoss``) projects every position through the LM head and upcasts the
(B, S, V) logits to fp32 before the cross-entropy. With Qwen's 151,936-token vocabulary that is 0.6 MB per token in
fp32, and autograd keeps the logits, their log-softmax and their gradient: a 4,096-token batch holds ~7 GB for the
loss alone, more than a 1.5 B model's weights. In an audio-language model most positions are audio placeholders or
prompt, never labelled, so most of those logits are not even needed.

``chunked_causal_lm_loss`` gives the same loss (per-token mean over the same labelled tokens, or a sum divided by the
Trainer's ``num_items_in_batch``) and the same gradients, while holding at most ``chunk_tokens`` rows of logits: it
picks the labelled positions, then runs the LM head and the cross-entropy on them chunk by chunk under activation
checkpointing, so backward recomputes one chunk's logits at a time. The head is called as a module, so LoRA on the
head, weight tying, autocast and ZeRO-3's parameter gathering work as in the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value the cross-entropy skips (the collator's)
DEFAULT_CHUNK_TOKENS = 1024  # rows of logits alive at once: 1024 x 151,936 x 4 B = 0.6 GB in fp32


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S) next-token targets: position t predicts token t + 1; the last predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (n, H) hidden states against (n,) targets; logits upcast to fp32 like the plain loss."""
    logits = lm_head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Next-token cross-entropy of an LM's final hidden states, equal to transformers' ``ForCausalLMLoss``.

    Args:
        hidden_states: (B, S, H) output of the LM's backbone (before the head).
        labels: (B, S) token ids, IGNORE_INDEX where no loss is taken (unshifted, as the collator writes them).
        lm_head: the module mapping (n, H) -> (n, V) logits.
        num_items_in_batch: the Trainer's count of labelled tokens over the accumulated micro-batches; the loss is
            the sum divided by it. None: the mean over this batch's labelled tokens.
        chunk_tokens: labelled positions per chunk; peak logits memory is chunk_tokens x V x 4 bytes (x2 in backward).
    Returns:
        A scalar loss. A batch without labelled tokens gives 0 connected to the graph (every rank still backpropagates).
    """
    targets = shift_labels(labels).to(hidden_states.device)
    keep = targets != IGNORE_INDEX  # (B, S)
    picked = hidden_states[keep]  # (N, H): only the positions that predict a labelled token
    picked_targets = targets[keep]  # (N,)
    total = hidden_states.new_zeros((), dtype=torch.float32) + 0.0 * hidden_states.sum()
    for start in range(0, picked.shape[0], chunk_tokens):
        span = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and picked.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping (chunk, V) logits per chunk alive.
            total = total + checkpoint(_chunk_loss_sum, lm_head, picked[span], picked_targets[span],
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, picked[span], picked_targets[span])
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
