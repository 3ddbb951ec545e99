"""Batches by a token (or audio-seconds) budget instead of a fixed row count, with length buckets.

A fixed ``per_device_train_batch_size`` on mixed-length audio (LibriSpeech: 2-25 s, 50-625 audio tokens) either
runs out of memory on the batch of long clips or leaves the GPU idle on the batch of short ones. Here rows are
sorted into ``buckets`` of similar estimated length (quantiles, so every bucket holds about as many rows), each
row costing its bucket's upper length L, and batches are filled in length order while rows x the largest L stays
within ``budget``: every batch costs at most ``budget`` padded positions (rows x longest, what a padded batch
holds in memory; a packed one holds fewer), whatever its lengths, and pads little because its rows are alike.

Each epoch the rows of every bucket are ordered by length with random jitter and cut into batches, and then all
batches are shuffled across buckets, from (seed, epoch) only: every rank builds the same list and takes every
world_size-th batch, so ranks get disjoint batches. The list is padded by repeating its first batches to a multiple of world_size, so every rank
runs the same number of steps. The number of batches depends on the bucket sizes only, never on the shuffle, so
the Trainer's step arithmetic (epochs, resume at step N mid-epoch by skipping the first batches) stays exact.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import numpy as np

from audiollm.crash_safety import CrashSafeTrainer
from audiollm.ranks import summed_over_ranks

log = logging.getLogger(__name__)
JITTER = 0.1  # relative noise on lengths when ordering a bucket's rows each epoch


def bucket_bounds(lengths: np.ndarray, buckets: int) -> np.ndarray:
    """Upper length of each bucket: the (i / buckets) quantiles of ``lengths``, deduplicated, ending at the max."""
    quantiles = np.quantile(lengths, np.arange(1, buckets + 1) / buckets, method="higher")
    return np.unique(quantiles)


def batch_sizes(bounds: np.ndarray, budget: float) -> list[int]:
    """Rows per batch when rows costing ``bounds`` (ascending: their buckets' upper lengths) fill batches in order
    while rows x the batch's largest bound <= ``budget`` (a row over the budget alone). Depends on the bucket sizes
    only, so every epoch's shuffle cuts the same number of batches; a bucket's last rows share a batch with the
    next bucket's first instead of leaving a small batch behind."""
    sizes, count, largest = [], 0, 0.0
    for bound in bounds:
        if count and (count + 1) * max(largest, bound) > budget:
            sizes.append(count)
            count, largest = 0, 0.0
        count, largest = count + 1, max(largest, bound)
    return sizes + [count] if count else sizes


class TokenBudgetBatchSampler:
    """Batches of row indices, each costing at most ``budget`` (rows x longest estimated length), for one rank.

    lengths: per-row cost estimate (tokens, or seconds of audio), e.g. ``audiollm.data.add_lengths``'s columns.
    A row longer than the budget gets a batch of its own (and is counted in ``over_budget``).
    """

    def __init__(self, lengths, budget: float, buckets: int = 16, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.float64)
        if self.lengths.size == 0 or budget <= 0:
            raise ValueError(f"a token budget needs rows and a budget > 0, got {self.lengths.size} rows, {budget}")
        self.budget, self.seed, self.rank, self.world_size, self.epoch = budget, seed, rank, world_size, 0
        bounds = bucket_bounds(self.lengths, buckets)
        which = np.searchsorted(bounds, self.lengths)  # bucket of each row: the first bound >= its length
        self.buckets = [np.flatnonzero(which == b) for b in range(len(bounds))]
        self.sizes = batch_sizes(np.repeat(bounds, [len(rows) for rows in self.buckets]), budget)
        self.over_budget = int((self.lengths > budget).sum())
        self.seen = {"batches": 0, "tokens": 0.0, "positions": 0.0}  # what this rank has yielded since the last log

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this before each epoch: a new shuffle, the same number of batches."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch`` in order, padded to a multiple of world_size (same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        rows = np.concatenate([self.jittered(bucket, rng) for bucket in self.buckets]).tolist()
        ends = np.cumsum(self.sizes).tolist()
        out = [rows[end - size : end] for size, end in zip(self.sizes, ends)]
        out = [out[i] for i in rng.permutation(len(out))]
        short = -len(out) % self.world_size
        return out + out[:short]

    def jittered(self, bucket: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A bucket's rows by length with each length scaled by a random factor in 1 +- JITTER: rows within ~20%
        of each other trade places from epoch to epoch (new batch partners), while a batch still holds rows of
        nearly one length (a plain shuffle of a wide bucket would pad up to the bucket's whole width)."""
        noisy = self.lengths[bucket] * rng.uniform(1 - JITTER, 1 + JITTER, len(bucket))
        return bucket[np.argsort(noisy, kind="stable")]

    def __iter__(self):
        for batch in self.batches(self.epoch)[self.rank :: self.world_size]:
            self.seen["batches"] += 1
            self.seen["tokens"] += float(self.lengths[batch].sum())
            self.seen["positions"] += float(self.lengths[batch].max()) * len(batch)
            yield batch

    def __len__(self) -> int:
        return math.ceil(len(self.sizes) / self.world_size)

    def describe(self) -> dict:
        """The plan of one epoch: batches per rank, mean estimated tokens per batch and padding fraction."""
        plan = self.batches(0)
        tokens = sum(float(self.lengths[b].sum()) for b in plan)
        positions = sum(float(self.lengths[b].max()) * len(b) for b in plan)
        return {"batches_per_rank": len(self), "tokens_per_batch": tokens / len(plan),
                "padding_fraction": 1 - tokens / positions, "buckets": len(self.buckets),
                "over_budget_rows": self.over_budget}

    def take_stats(self, total=None) -> dict:
        """Mean tokens per batch and padding fraction (estimated lengths) since the last call; then reset.

        total: sums [batches, tokens, positions] over ranks (every rank must call it at the same step), so that
        the figures are the step's, not rank 0's; None: this rank's. Counted as the DataLoader draws batches,
        which it does a few ahead of training (prefetch): a log covers about the batches trained since the
        previous one."""
        seen, self.seen = self.seen, {"batches": 0, "tokens": 0.0, "positions": 0.0}
        batches, tokens, positions = (total or list)([seen["batches"], seen["tokens"], seen["positions"]])
        if not batches:
            return {}
        return {"tokens_per_batch": tokens / batches, "padding_fraction": 1 - tokens / positions}


class TokenBudgetMixin:
    """Trainer mixin: the training DataLoader draws its batches from ``train_batch_sampler`` when one is given.

    The sampler already gives each rank its own batches, so the wrapper accelerate puts around a batch sampler
    (which would shard the batches again, leaving each rank 1 / world_size of its share) is made a passthrough,
    as transformers does for its own rank-aware ``BatchRebalanceSampler``.
    """

    def __init__(self, *args, train_batch_sampler: TokenBudgetBatchSampler | None = None, **kwargs):
        self.train_batch_sampler = train_batch_sampler
        super().__init__(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs get the sampler's ``tokens_per_batch`` and ``padding_fraction`` since the last log, over
        every rank's batches (the Trainer logs the loss on every rank at the same step)."""
        if self.train_batch_sampler is not None and "loss" in logs:
            logs = logs | self.train_batch_sampler.take_stats(partial(summed_over_ranks, device=self.args.device))
        super().log(logs, *args, **kwargs)

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        args = self.args
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.train_batch_sampler, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)
        if getattr(shard, "batch_sampler", None) is self.train_batch_sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader


class TokenBudgetTrainer(TokenBudgetMixin, CrashSafeTrainer):
    """``CrashSafeTrainer`` (pretraining, SFT) whose training batches may come from a ``TokenBudgetBatchSampler``."""
