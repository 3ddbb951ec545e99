"""Decode codes to audio while they are being generated: a sliding window over frames.

Every ``hop`` new frames, the window [emitted - left, emitted + hop + right) is decoded and the samples of frames
[emitted, emitted + hop) are yielded. When ``left`` and ``right`` cover how far the codec's decoder looks around a
frame (``codecs.stream_context`` measures it), each yielded sample is computed from the same inputs as in the
one-shot decode, so the concatenated stream equals ``codec.decode(all codes)``. For SNAC's convolutional decoder
that is a few frames each side. A decoder with unbounded look-back (Mimi's transformer: 250 frames) gets the
whole past as left context, still exact. A decoder with unbounded look-ahead (XCodec2's global attention) cannot
be streamed exactly: it gets ``APPROX_RIGHT`` frames of look-ahead (Orpheus's 4-frame window does the same) and
``exact`` is False.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from audiollm.tts.codecs import Codec, slice_frames, stream_context

APPROX_RIGHT = 4  # frames of look-ahead for a decoder whose look-ahead has no bound (not exact)
DEFAULT_HOP = 4  # frames per yielded chunk


class FrameStreamer:
    """Collects frames (one code tensor per level each) and yields audio chunks as soon as they are final."""

    def __init__(self, codec: Codec, hop: int = DEFAULT_HOP, context: tuple[int | None, int | None] | None = None,
                 prefix: list[torch.Tensor] | None = None):
        self.codec, self.hop = codec, hop
        left, right = context if context is not None else stream_context(codec)
        self.exact = right is not None
        self.left, self.right = left, APPROX_RIGHT if right is None else right
        rates = codec.level_rates
        self.levels = [list(p.tolist()) for p in prefix] if prefix else [[] for _ in rates]
        self.emitted = self.frames  # a prompt's frames are context, not output

    @property
    def frames(self) -> int:
        return len(self.levels[0]) // self.codec.level_rates[0]

    def _decode(self, stop: int) -> np.ndarray:
        """Samples of frames [emitted, stop) from a window with the context around them."""
        start = 0 if self.left is None else max(0, self.emitted - self.left)
        end = min(self.frames, stop + self.right)
        codes = slice_frames([torch.tensor(level) for level in self.levels], self.codec.level_rates, start, end)
        wav = self.codec.decode(codes)
        spf = self.codec.samples_per_frame
        return wav[(self.emitted - start) * spf : (stop - start) * spf]

    def push(self, frame: list[torch.Tensor]) -> Iterator[np.ndarray]:
        """Add one frame; yield a chunk when ``hop`` frames have their right context."""
        for level, codes in zip(self.levels, frame):
            level.extend(int(c) for c in codes)
        while self.frames >= self.emitted + self.hop + self.right:
            chunk = self._decode(self.emitted + self.hop)
            self.emitted += self.hop
            yield chunk

    def finish(self) -> Iterator[np.ndarray]:
        """The frames not yet yielded, decoded up to the real end."""
        if self.frames > self.emitted:
            chunk = self._decode(self.frames)
            self.emitted = self.frames
            yield chunk


def stream_frames(codec: Codec, frames: Iterable[list[torch.Tensor]], **options) -> Iterator[np.ndarray]:
    """Audio chunks for a stream of frames (see FrameStreamer)."""
    streamer = FrameStreamer(codec, **options)
    for frame in frames:
        yield from streamer.push(frame)
    yield from streamer.finish()
