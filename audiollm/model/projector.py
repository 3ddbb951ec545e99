"""Projectors from encoder frames (d_model = 1280 for Whisper-large-v3) to the LLM's hidden size."""

from __future__ import annotations

import torch
from torch import nn


class LinearProjector(nn.Module):
    """Qwen2-Audio's projector: one Linear with bias. Weights: ``multi_modal_projector.linear.*``."""

    stack = 1

    def __init__(self, d_audio: int, d_text: int):
        super().__init__()
        self.linear = nn.Linear(d_audio, d_text, bias=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (C, N, d_audio) -> (C, N, d_text)
        return self.linear(frames)


class MLPProjector(nn.Module):
    """Two layers (LLaVA-1.5 style): Linear -> GELU -> Linear."""

    stack = 1

    def __init__(self, d_audio: int, d_text: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_audio, d_text)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_text, d_text)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(frames)))


class StackProjector(MLPProjector):
    """Ultravox style: concatenate k consecutive frames (25 Hz -> 25/k Hz), then the 2-layer MLP.

    The caller zeroes padded frames first, so a chunk's last, partial group is completed with zeros whether the
    chunk is alone or in a batch.
    """

    def __init__(self, d_audio: int, d_text: int, stack: int):
        super().__init__(d_audio * stack, d_text)
        self.stack = stack

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (C, N, D) -> (C, ceil(N / k), d_text)
        chunks, n, dim = frames.shape
        frames = nn.functional.pad(frames, (0, 0, 0, -n % self.stack))
        return super().forward(frames.reshape(chunks, -1, dim * self.stack))


def build_projector(kind: str, d_audio: int, d_text: int, stack: int = 1) -> nn.Module:
    if kind == "linear":
        return LinearProjector(d_audio, d_text)
    if kind == "mlp":
        return MLPProjector(d_audio, d_text)
    if kind == "stack":
        return StackProjector(d_audio, d_text, stack)
    raise ValueError(f"unknown projector {kind!r}: use linear, mlp or stack")
