"""Codec adapters on tiny random codecs written to folders here, token layouts round-trip, streaming windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import DacConfig, DacModel

from audiollm.tts.codecs import CodecError, decode_reach, load_codec, pad_to_frames, read_audio
from audiollm.tts.layout import LayoutError, TokenLayout, make_layout
from audiollm.tts.streaming import FrameStreamer
from audiollm.tts.tiny import TINY_DAC, tiny_codec

# kind -> (sample rate, samples per frame, level rates): the real codecs' structure, kept by the tiny configs.
# dac16/dac24/dac44 are the tiny DAC at each descript release's rate and strides.
EXPECTED = {"xcodec2": (16000, 320, (1,)), "snac": (24000, 2048, (1, 2, 4)), "mimi": (24000, 1920, (1, 1, 1, 1)),
            "dac16": (16000, 320, (1,) * 4), "dac24": (24000, 320, (1,) * 4), "dac44": (44100, 512, (1,) * 4)}
DACS = ("dac16", "dac24", "dac44")


def write_tiny(kind, folder):
    """The tiny codec folder for an EXPECTED kind."""
    if kind in DACS:
        return tiny_codec("dac", folder, sample_rate=EXPECTED[kind][0])
    return tiny_codec(kind, folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    return {kind: write_tiny(kind, root / kind) for kind in EXPECTED}


@pytest.fixture(scope="module")
def codecs(folders):
    return {kind: load_codec(folder) for kind, folder in folders.items()}


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
    dac = tmp_path / "dac-without-weights"
    dac.mkdir()
    (dac / "config.json").write_text('{"model_type": "dac"}')
    with pytest.raises(CodecError, match="dac-without-weights"):
        load_codec(dac)
    (tmp_path / "x.wav").write_bytes(b"not audio")
    with pytest.raises(CodecError, match="x.wav"):
        read_audio(tmp_path / "x.wav", 16000)


def dac_reference(codec, wav: np.ndarray, levels: int) -> tuple[torch.Tensor, np.ndarray]:
    """DacModel's own encode -> decode of ``wav`` padded to whole frames: codes (levels, frames), waveform."""
    padded = pad_to_frames(torch.from_numpy(wav), codec.samples_per_frame)
    with torch.no_grad():
        codes = codec.model.encode(padded[None, None], n_quantizers=levels).audio_codes
        return codes[0], codec.model.decode(audio_codes=codes).audio_values[0].numpy()


@pytest.mark.parametrize("kind", DACS)
def test_dac_round_trip_is_dacmodels(codecs, kind):
    """Codes and audio are DacModel's own; decode adds zeros to whole frames (the stride-5 decoders end 8 short)."""
    codec = codecs[kind]
    wav = 0.1 * np.random.default_rng(1).standard_normal(codec.sample_rate // 3).astype(np.float32)
    codes = codec.encode(wav)
    ref_codes, ref_wav = dac_reference(codec, wav, levels=4)
    assert torch.equal(torch.stack(codes), ref_codes)
    out = codec.decode(codes)
    short = {"dac16": 8, "dac24": 8, "dac44": 0}[kind]
    assert len(ref_wav) == len(out) - short
    np.testing.assert_array_equal(out[: len(ref_wav)], ref_wav)
    assert not out[len(ref_wav):].any()


@pytest.mark.parametrize("kind", DACS)
def test_dac_keeps_first_codebooks(codecs, folders, kind):
    """codebooks=2: the first two levels of the full encode; decode sums only those two quantizers."""
    codec = load_codec(folders[kind], codebooks=2)
    assert codec.level_rates == (1, 1)
    wav = 0.1 * np.random.default_rng(2).standard_normal(codec.sample_rate // 5).astype(np.float32)
    codes = codec.encode(wav)
    assert all(torch.equal(a, b) for a, b in zip(codes, codecs[kind].encode(wav)[:2]))
    _, ref_wav = dac_reference(codec, wav, levels=2)
    np.testing.assert_array_equal(codec.decode(codes)[: len(ref_wav)], ref_wav)
    with pytest.raises(CodecError, match="codebooks must be 1..4"):
        load_codec(folders[kind], codebooks=5)


def test_dac_hop_is_the_encoder_strides(tmp_path):
    """A stale hop_length in config.json is ignored; a decoder that upsamples by other than the hop is refused."""
    folder = tiny_codec("dac", tmp_path / "stale", sample_rate=16000)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hop_length": 512}))
    assert load_codec(folder).samples_per_frame == 320
    config = DacConfig(**TINY_DAC, downsampling_ratios=[2, 4, 5, 8])
    config.upsampling_ratios = [8, 8, 4, 2]
    DacModel(config).save_pretrained(tmp_path / "asymmetric")
    with pytest.raises(CodecError, match="does not undo"):
        load_codec(tmp_path / "asymmetric")


def test_dac_codes_round_trip_through_rvq_layout(codecs, folders):
    """DAC levels all run at the frame rate: the rvq layout takes them (one slot per level) and gives them back, and
    the layouts of other level structures refuse them. Training with 3 of 4 levels (``codec_codebooks``) gives a
    3-slot layout, and the codec that ``load_tts`` loads for it (``codebooks=per_frame``) has those 3 levels."""
    for codec in (codecs["dac24"], load_codec(folders["dac24"], codebooks=3)):
        codes = codec.encode(0.1 * np.random.default_rng(3).standard_normal(4000).astype(np.float32))
        layout = make_layout("rvq", codec.codebook_size, codec.level_rates)
        tokens = layout.codes_to_tokens(codes)
        assert tokens.shape == (codec.frames(codes) * codec.codebooks,)
        assert all(torch.equal(a, b) for a, b in zip(codes, layout.tokens_to_codes(tokens)))
        reloaded = load_codec(folders["dac24"], codebooks=layout.per_frame)
        assert reloaded.level_rates == layout.level_rates
    for name in ("single", "snac7"):
        with pytest.raises(LayoutError, match="does not fit"):
            make_layout(name, codec.codebook_size, codec.level_rates)


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
    """SNAC and DAC (convolutional) read a few frames each side; Mimi (causal) reads back only, 16 frames of
    attention window at most in the tiny config; XCodec2's global attention reads everything."""
    for kind in ("snac", *DACS):
        left, right = decode_reach(codecs[kind])
        assert 0 < left < 24 and 0 < right < 24, kind
    left, right = decode_reach(codecs["mimi"])
    assert 0 < left <= 16 + 2 and right == 0
    assert decode_reach(codecs["xcodec2"]) == (None, None)


@pytest.mark.parametrize("kind,layout_name,hop", [("snac", "snac7", 1), ("snac", "snac7", 3), ("mimi", "rvq", 2),
                                                   ("dac16", "rvq", 3), ("dac44", "rvq", 2)])
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
