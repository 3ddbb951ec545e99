"""The codec trained here: the model's shapes and losses, the ``load_codec`` adapter, and the codec stage
(stages/codec.py) on a manifest of clips written in the test, bad clips included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.tts.codecs import CodecError, load_codec
from audiollm.tts.layout import make_layout
from audiollm.tts.melcodec import MelCodecConfig, MelCodecModel
from audiollm.tts.tiny import TINY_MELCODEC, tiny_codec

SPF = 512  # samples per codec frame at the defaults: hop 256 x stride 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_codec("melcodec", tmp_path_factory.mktemp("melcodec") / "codec")


def test_model_shapes_and_loss(tmp_path):
    torch.manual_seed(0)
    model = MelCodecModel(MelCodecConfig(**TINY_MELCODEC))
    wav = 0.1 * torch.randn(2, 4 * SPF)
    out = model(wav)
    assert out.codes.shape == (2, 3, 4) and torch.isfinite(out.loss)
    out.loss.backward()  # the straight-through estimator reaches the encoder
    assert model.encoder[0].weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)  # analysis constants and FSQ radices are rebuilt on load, never left empty
    assert torch.equal(MelCodecModel.from_pretrained(tmp_path).encode(wav), model.encode(wav))
    assert model.decode_magnitude(model.encode(wav)).shape == (2, 513, 8)  # 2 spectrogram frames per codec frame
    assert model.decode(model.encode(wav, levels=2)).shape == (2, 4 * SPF)


def test_spectral_envelope_keeps_the_envelope_and_drops_the_ripple(tmp_path):
    """The encoder's envelope input (``envelope_coefficients``): a slow curve over the mel bins stays, a fast ripple
    (what harmonics draw across low mel bins) goes; all coefficients give the input back."""
    from audiollm.tts.melcodec import spectral_envelope

    bins = torch.arange(80, dtype=torch.float64)
    slow, ripple = (torch.cos(torch.pi / 80 * (bins + 0.5) * q) for q in (3, 40))
    log_mel = (slow + 0.5 * ripple + 2.0)[None, :, None].repeat(1, 1, 5)  # (1, 80, 5)
    assert torch.allclose(spectral_envelope(log_mel, 28), (slow + 2.0)[None, :, None].expand(1, 80, 5), atol=1e-9)
    assert torch.allclose(spectral_envelope(log_mel, 80), log_mel, atol=1e-9)
    torch.manual_seed(0)
    model = MelCodecModel(MelCodecConfig(**TINY_MELCODEC, envelope_coefficients=12))
    wav = 0.1 * torch.randn(2, 4 * SPF)
    assert torch.isfinite(model(wav).loss)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = MelCodecModel.from_pretrained(tmp_path)
    assert loaded.config.envelope_coefficients == 12 and torch.equal(loaded.encode(wav), model.encode(wav))
    plain = MelCodecModel(MelCodecConfig(**TINY_MELCODEC))
    plain.load_state_dict(model.state_dict())  # the same weights reading the full log-mel encode otherwise
    assert not torch.equal(plain.eval().encode(wav), model.encode(wav))


def test_adapter_frames_levels_and_codebooks(folder, speech_like):
    codec = load_codec(folder)
    assert (codec.sample_rate, codec.samples_per_frame, codec.level_rates, codec.codebook_size) == (16000, SPF,
                                                                                                    (1, 1, 1), 16)
    wav = speech_like(1.1)
    codes = codec.encode(wav)
    frames = int(np.ceil(len(wav) / SPF))  # padded to whole frames, never cut
    assert [c.shape for c in codes] == [(frames,)] * 3
    out = codec.decode(codes)
    assert out.shape == (frames * SPF,) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, codec.decode(codes))  # Griffin-Lim starts from a fixed phase
    first_two = load_codec(folder, codebooks=2)
    assert first_two.level_rates == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first_two.encode(wav), codes[:2]))
    assert first_two.decode(codes[:2]).shape == (frames * SPF,)
    with pytest.raises(CodecError, match="codebooks must be 1..3"):
        load_codec(folder, codebooks=4)


def test_rvq_layout_round_trips_codes(folder, speech_like):
    codec = load_codec(folder)
    layout = make_layout("rvq", codec.codebook_size, codec.level_rates)
    codes = codec.encode(speech_like(0.7))
    assert all(torch.equal(a, b) for a, b in zip(layout.tokens_to_codes(layout.codes_to_tokens(codes)), codes))


def test_folder_without_weights_is_refused(folder, tmp_path):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CodecError, match=str(tmp_path)):
        load_codec(tmp_path)


def write_clips(root, speech_like) -> str:
    """A manifest of 6 speech-like clips (one at 48 kHz stereo) and one corrupt file; returns its path."""
    rows = []
    for i in range(6):
        wav = speech_like(0.6 + 0.2 * i, seed=i)
        if i == 5:  # resampled and mixed down on the way in
            wav = np.stack([np.interp(np.arange(0, len(wav), 1 / 3), np.arange(len(wav)), wav)] * 2, axis=1)
            sf.write(root / f"clip{i}.wav", wav.astype(np.float32), 48000)
        else:
            sf.write(root / f"clip{i}.wav", wav, 16000)
        rows.append({"audio": f"clip{i}.wav", "text": "ignored"})
    (root / "broken.wav").write_bytes(b"RIFF not really a wav file")
    rows.append({"audio": "broken.wav"})
    manifest = root / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(manifest)


def test_stage_trains_a_codec_that_load_codec_reads(tmp_path, speech_like):
    from stages.codec import main

    manifest = write_clips(tmp_path, speech_like)
    sizes = [w for k, v in TINY_MELCODEC.items() for w in (f"--{k}", *map(str, v if isinstance(v, list) else [v]))]
    out = tmp_path / "codec"
    main(["--train_files", manifest, "--eval_files", manifest, "--output_dir", str(out), "--max_steps", "30",
          "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
          "--segment_seconds", "0.5", "--max_bad_fraction", "0.5", "--report_to", "none", "--save_strategy", "no",
          "--use_cpu", "true", *sizes])
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])  # it learns the clips
    skipped = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert skipped and {s["id"] for s in skipped} == {f"{manifest}:7"} and skipped[0]["kind"] == "unreadable"
    codec = load_codec(out)
    assert codec.decode(codec.encode(speech_like(0.5))).shape == (16 * SPF,)


def test_two_runs_of_one_recipe_train_the_same_codec(tmp_path, speech_like):
    """The seed is set before the codec's weights are drawn (not only once the Trainer is built), so the second run
    in this process, whose random state the first one moved, trains the same weights."""
    from safetensors.torch import load_file

    from stages.codec import main

    manifest = write_clips(tmp_path, speech_like)
    sizes = [w for k, v in TINY_MELCODEC.items() for w in (f"--{k}", *map(str, v if isinstance(v, list) else [v]))]
    for run in ("a", "b"):
        main(["--train_files", manifest, "--output_dir", str(tmp_path / run), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--segment_seconds", "0.5", "--max_bad_fraction", "0.5",
              "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", *sizes])
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
