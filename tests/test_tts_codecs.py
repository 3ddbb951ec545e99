"""Codec adapters on tiny random codecs written to folders here, token layouts round-trip, streaming windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiollm.tts.codecs import CodecError, decode_reach, load_codec, read_audio
from audiollm.tts.layout import LayoutError, TokenLayout, make_layout
from audiollm.tts.streaming import FrameStreamer
from audiollm.tts.tiny import tiny_codec

# kind -> (sample rate, samples per frame, level rates): the real codecs' structure, kept by the tiny configs.
EXPECTED = {"xcodec2": (16000, 320, (1,)), "snac": (24000, 2048, (1, 2, 4)), "mimi": (24000, 1920, (1, 1, 1, 1))}


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    return {kind: load_codec(tiny_codec(kind, root / kind)) for kind in EXPECTED}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_codec_encode_decode_shapes(codecs, kind):
    codec = codecs[kind]
    rate, spf, rates = EXPECTED[kind]
    assert (codec.sample_rate, codec.samples_per_frame, codec.level_rates) == (rate, spf, rates)
    assert codec.frame_rate == pytest.approx(rate / spf)
    wav = 0.1 * np.random.default_rng(0).standard_normal(int(1.3 * rate)).astype(np.float32)
    codes = codec.encode(wav)
    frames = codec.frames(codes)
    assert frames >= int(np.ceil(len(wav) / spf))  # padded to whole frames, never cut
    assert [c.shape[0] for c in codes] == [frames * r for r in rates]
    assert all(c.dtype == torch.long and 0 <= int(c.min()) and int(c.max()) < codec.codebook_size for c in codes)
    out = codec.decode(codes)
    assert out.shape == (frames * spf,) and out.dtype == np.float32 and np.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(codes, codec.encode(wav)))  # encoding is deterministic


def test_codec_folder_errors(tmp_path):
    with pytest.raises(CodecError, match="no config.json"):
        load_codec(tmp_path)
    (tmp_path / "x.wav").write_bytes(b"not audio")
    with pytest.raises(CodecError, match="x.wav"):
        read_audio(tmp_path / "x.wav", 16000)


def random_codes(layout: TokenLayout, frames: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, layout.codebook_size, (frames * r,), generator=g) for r in layout.level_rates]


@pytest.mark.parametrize("name,size,rates", [("single", 65536, (1,)), ("snac7", 4096, (1, 2, 4)),
                                             ("rvq", 2048, (1,) * 8)])
def test_layout_round_trip(name, size, rates):
    layout = make_layout(name, size, rates)
    codes = random_codes(layout, 13, seed=len(rates))
    tokens = layout.codes_to_tokens(codes)
    assert tokens.shape == (13 * layout.per_frame,)
    slots = tokens.reshape(13, layout.per_frame) // size  # every token lies in its own slot's range
    assert torch.equal(slots, torch.arange(layout.per_frame).expand(13, -1))
    back = layout.tokens_to_codes(tokens)
    assert all(torch.equal(a, b) for a, b in zip(codes, back))


def test_snac7_is_orpheus_order():
    layout = make_layout("snac7", 4096, (1, 2, 4))
    codes = [torch.tensor([1]), torch.tensor([2, 3]), torch.tensor([4, 5, 6, 7])]
    expected = [1, 2 + 4096, 4 + 2 * 4096, 5 + 3 * 4096, 3 + 4 * 4096, 6 + 5 * 4096, 7 + 6 * 4096]
    assert layout.codes_to_tokens(codes).tolist() == expected


def test_layout_refuses_bad_input():
    with pytest.raises(LayoutError, match="does not fit"):
        make_layout("snac7", 4096, (1,))
    layout = make_layout("snac7", 4096, (1, 2, 4))
    with pytest.raises(LayoutError, match="whole number"):
        layout.tokens_to_codes(torch.arange(5))
    with pytest.raises(LayoutError, match="outside its slot"):
        layout.tokens_to_codes(torch.zeros(7, dtype=torch.long))  # slot 1 given a slot-0 id


def test_decode_reach(codecs):
    """SNAC (convolutional) reads a few frames each side; Mimi (causal) reads back only, 16 frames of attention
    window at most in the tiny config; XCodec2's global attention reads everything."""
    left, right = decode_reach(codecs["snac"])
    assert 0 < left < 24 and 0 < right < 24
    left, right = decode_reach(codecs["mimi"])
    assert 0 < left <= 16 + 2 and right == 0
    assert decode_reach(codecs["xcodec2"]) == (None, None)


@pytest.mark.parametrize("kind,layout_name,hop", [("snac", "snac7", 1), ("snac", "snac7", 3), ("mimi", "rvq", 2)])
def test_streamed_decode_equals_one_shot(codecs, kind, layout_name, hop):
    """Bounded-reach decoders: the chunks, concatenated, are the one-shot decode (float summation order aside)."""
    codec = codecs[kind]
    layout = make_layout(layout_name, codec.codebook_size, codec.level_rates)
    codes = random_codes(layout, 17, seed=hop)
    streamer = FrameStreamer(codec, hop=hop)
    assert streamer.exact
    chunks = []
    for f in range(17):
        chunks += list(streamer.push([c[f * r:(f + 1) * r] for c, r in zip(codes, codec.level_rates)]))
    assert len(chunks) == (17 - streamer.right) // hop > 0  # audio flows once a hop has its right context
    chunks += list(streamer.finish())
    full = codec.decode(codes)
    stream = np.concatenate(chunks)
    assert stream.shape == full.shape
    np.testing.assert_allclose(stream, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_unbounded_look_ahead_is_not_exact(codecs):
    """XCodec2's decoder attends to the whole sequence: the streamer says its output is approximate."""
    streamer = FrameStreamer(codecs["xcodec2"])
    assert not streamer.exact and streamer.left is None and streamer.right > 0
