"""Tallies summed over the ranks of a distributed run, as they would be in one process (one all-reduce)."""

from __future__ import annotations

import torch


def summed_over_ranks(values: list[float], device) -> list[float]:
    """``values`` of this process summed over every rank; unchanged in a single process. Every rank must call it at
    the same point (the Trainer logs the loss, draws a step's batches and runs each micro-step on all of them).
    float64, so counts stay exact integers."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.tolist()
