"""Neural audio codecs behind one interface: waveform -> discrete codes -> waveform.

    codec = load_codec("xcodec2-folder/")          # or a SNAC, Mimi or DAC folder
    codes = codec.encode(wav)                        # wav: (n,) float32 at codec.sample_rate
    wav = codec.decode(codes)                        # (frames * codec.samples_per_frame,) float32

Codes are a list with one 1-D LongTensor per codebook level. A *frame* is the coarsest time step; level ``l`` has
``level_rates[l]`` codes per frame:

    XCodec2 (LLaSA)   16 kHz, 1 level of 65,536 (FSQ 4^8), 50 frames/s, 320 samples/frame, rates (1,)
    SNAC 24 kHz       3 levels of 4,096 at ~12/23/47 Hz, 2,048 samples/frame, rates (1, 2, 4)
    Mimi (CSM/Moshi)  24 kHz, K RVQ levels of 2,048 at 12.5 Hz, 1,920 samples/frame, rates (1,) * K
    DAC (Dia)         16 / 24 / 44.1 kHz, K RVQ levels of 1,024 at 50 / 75 / ~86 Hz, 320 / 320 / 512 samples/frame,
                      rates (1,) * K
    trained here      16 kHz, K RVQ levels (4 of 256 in the demo) at 31.25 Hz, 512 samples/frame, rates (1,) * K:
                      ``audiollm train codec`` (mel frames -> RVQ -> magnitude -> Griffin-Lim; melcodec.py)

Each loads from a local folder: ``config.json`` plus ``*.safetensors`` (or a ``.bin`` / ``.pt`` read with
``torch.load(weights_only=True)``). Nothing is downloaded.
"""

from __future__ import annotations

import abc

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

CODECS = ("xcodec2", "snac", "mimi", "dac", "audiollm_melcodec")
SNAC_CONFIG_KEYS = {"encoder_rates", "decoder_rates", "vq_strides"}  # snac's config.json has no model_type
SNAC_WEIGHTS = "model.safetensors"


class CodecError(ValueError):
    """A codec folder or an audio file that cannot be used; the message names the file."""


def read_audio(path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode an audio file to mono float32 at ``sample_rate``, shape (n,), with the same checks as the listening
    side (``audiollm.audio_checks``: corrupt, empty, silent, NaN, longer than ``max_seconds``...). Raises
    CodecError naming the file and why (the AudioError, with its ``kind``, is the cause)."""
    from audiollm.audio import AudioError
    from audiollm.audio_checks import read_checked

    try:
        return read_checked(path, max_seconds, sample_rate=sample_rate)[0]
    except (AudioError, FileNotFoundError) as err:
        raise CodecError(str(err)) from err


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``*.safetensors`` of ``folder``, or else one ``.bin``/``.pt`` read weights-only."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if not pickles:
        raise CodecError(f"{folder}: no *.safetensors, *.bin or *.pt weights")
    return torch.load(pickles[0], map_location="cpu", weights_only=True)


class Codec(abc.ABC):
    """The common interface. Subclasses set the attributes below and implement ``_encode`` / ``_decode``."""

    name: str
    sample_rate: int  # Hz of the waveforms encode takes and decode returns
    samples_per_frame: int  # waveform samples per (coarsest) frame
    codebook_size: int  # codes per codebook
    level_rates: tuple[int, ...]  # codes per frame of each level

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)

    @property
    def frame_rate(self) -> float:
        """Frames per second."""
        return self.sample_rate / self.samples_per_frame

    @property
    def key(self) -> str:
        return codec_key(self.folder)

    def frames(self, codes: list[torch.Tensor]) -> int:
        return codes[0].shape[-1] // self.level_rates[0]

    @torch.no_grad()
    def encode(self, wav: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """(n,) float waveform at ``sample_rate`` -> one (frames * rate_l,) LongTensor per level, on the CPU.

        The waveform is zero-padded to whole frames (the codecs' own padding), so frames = ceil(n / samples_per_frame)
        (SNAC pads further, to a multiple of its coarsest stride)."""
        wav = torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(self.device)
        return [c.long().cpu() for c in self._encode(wav)]

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor]) -> np.ndarray:
        """One (frames * rate_l,) code tensor per level -> (frames * samples_per_frame,) float32 waveform."""
        if len(codes) != len(self.level_rates):
            raise CodecError(f"{self.name}: expected {len(self.level_rates)} code levels, got {len(codes)}")
        wav = self._decode([torch.as_tensor(c).long().to(self.device) for c in codes])
        return wav.float().cpu().numpy().reshape(-1)[: self.frames(codes) * self.samples_per_frame]

    @abc.abstractmethod
    def _encode(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """(n,) waveform on the device -> one code tensor per level (each subclass calls its codec model)."""

    @abc.abstractmethod
    def _decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """One code tensor per level on the device -> waveform (each subclass calls its codec model)."""


def pad_to_frames(wav: torch.Tensor, samples_per_frame: int) -> torch.Tensor:
    """(n,) -> (ceil(n / spf) * spf,) with trailing zeros."""
    return torch.nn.functional.pad(wav, (0, (-wav.shape[-1]) % samples_per_frame))


class XCodec2Codec(Codec):
    """LLaSA's codec through ``transformers.Xcodec2Model``: semantic (Wav2Vec2-BERT) + acoustic encoders, one FSQ
    codebook, a Vocos decoder. The semantic features are SeamlessM4T's 80-bin fbank stacked in pairs (what the
    original XCodec2 code computes; transformers' own extractor needs torchaudio for the same features)."""

    name = "xcodec2"

    def __init__(self, folder, device="cpu"):
        super().__init__(folder, device)
        from transformers import SeamlessM4TFeatureExtractor, Xcodec2Model

        self.model = Xcodec2Model.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        config = self.model.config
        self.sample_rate, self.samples_per_frame = config.sampling_rate, config.hop_length
        self.codebook_size, self.level_rates = int(np.prod(config.quantization_levels)), (1,)
        self.features = SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, sampling_rate=self.sample_rate,
                                                    stride=2, padding_value=1.0)

    def _encode(self, wav):
        wav = pad_to_frames(wav, self.samples_per_frame)
        # Half a hop of zeros each side centres the 100 Hz fbank frames so that pairs of them line up with the
        # acoustic encoder's 50 Hz frames: n samples -> n / 320 frames from both encoders.
        half = self.samples_per_frame // 2
        padded = torch.nn.functional.pad(wav, (half, half)).cpu().numpy()
        feats = self.features(padded, sampling_rate=self.sample_rate, return_tensors="pt")["input_features"]
        out = self.model.encode(wav[None, None], input_features=feats.to(self.device))
        return [out.audio_codes[0, 0]]  # (1, 1, frames) -> (frames,)

    def _decode(self, codes):
        return self.model.decode(audio_codes=codes[0][None, None]).audio_values


class SnacCodec(Codec):
    """Orpheus's codec through the ``snac`` package: 3 levels of 4,096 codes at vq strides (4, 2, 1).

    ``deterministic`` (default) decodes without the decoder's noise blocks: they add ``randn * conv(x)``, a learned
    dither that makes every decode of the same codes differ. Without it, decoding is a pure function of the codes,
    so a streamed decode equals the one-shot decode; set False to hear the codec exactly as trained."""

    name = "snac"

    def __init__(self, folder, device="cpu", deterministic: bool = True):
        super().__init__(folder, device)
        from snac import SNAC
        from snac.layers import NoiseBlock

        config = json.loads((self.folder / "config.json").read_text())
        self.model = SNAC(**config)
        self.model.load_state_dict(load_state_dict(self.folder))
        if deterministic:
            for name, module in list(self.model.named_modules()):
                if isinstance(module, NoiseBlock):
                    parent, _, child = name.rpartition(".")
                    setattr(self.model.get_submodule(parent), child, torch.nn.Identity())
        self.model.to(self.device).eval()
        strides = list(self.model.vq_strides)
        self.sample_rate, self.codebook_size = int(self.model.sampling_rate), int(self.model.codebook_size)
        self.samples_per_frame = int(self.model.hop_length) * strides[0]
        self.level_rates = tuple(strides[0] // s for s in strides)

    def _encode(self, wav):
        return [c[0] for c in self.model.encode(wav[None, None])]

    def _decode(self, codes):
        return self.model.decode([c[None] for c in codes])


def save_snac(model, folder: str | os.PathLike, config: dict) -> Path:
    """Write a ``snac.SNAC`` as ``config.json`` + safetensors (what SnacCodec loads)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / SNAC_WEIGHTS))
    return folder


class MimiCodec(Codec):
    """CSM / Moshi's codec through ``transformers.MimiModel``: split RVQ (1 semantic + K-1 acoustic levels) at
    12.5 Hz. ``codebooks`` keeps the first k levels (Moshi uses 8 of 32; CSM 32)."""

    name = "mimi"

    def __init__(self, folder, device="cpu", codebooks: int | None = None):
        super().__init__(folder, device)
        from transformers import MimiModel

        self.model = MimiModel.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        config = self.model.config
        self.codebooks = kept_codebooks(folder, codebooks, config.num_quantizers)
        self.sample_rate, self.codebook_size = config.sampling_rate, config.codebook_size
        self.samples_per_frame = round(config.sampling_rate / config.frame_rate)
        self.level_rates = (1,) * self.codebooks

    def _encode(self, wav):
        wav = pad_to_frames(wav, self.samples_per_frame)
        codes = self.model.encode(wav[None, None], num_quantizers=self.codebooks).audio_codes  # (1, K, frames)
        return list(codes[0])

    def _decode(self, codes):
        return self.model.decode(torch.stack(codes)[None]).audio_values


class DacCodec(Codec):
    """Descript Audio Codec through ``transformers.DacModel`` (Dia's audio tokenizer, 44.1 kHz with 9 levels):
    convolutional encoder and decoder around K residual-VQ levels, every level at the frame rate. The descript
    releases, as converted to transformers (``descript/dac_16khz``, ``dac_24khz``, ``dac_44khz``):

        16 kHz    encoder strides [2, 4, 5, 8]: hop 320, 50 frames/s, 12 levels of 1,024
        24 kHz    encoder strides [2, 4, 5, 8]: hop 320, 75 frames/s, 32 levels of 1,024
        44.1 kHz  encoder strides [2, 4, 8, 8]: hop 512, ~86.1 frames/s, 9 levels of 1,024

    ``codebooks`` keeps the first k levels: encode stops the residual VQ after k levels (so the k codes equal the
    first k of a full encode) and decode sums those k quantizers' vectors (``DacModel.decode(audio_codes=...)``
    reads any number of levels up to K), a coarser reconstruction.

    The hop is the product of the encoder strides, not ``config.hop_length``: a config.json's stored hop_length
    wins over the one transformers derives from the strides, even where the two disagree. The decoder's
    transposed convolutions give one sample short at an odd stride (upsampling [8, 5, 4, 2]: frames * 320 - 8), so
    decode pads the end with zeros to whole frames, as encode pads the input.
    """

    name = "dac"

    def __init__(self, folder, device="cpu", codebooks: int | None = None):
        super().__init__(folder, device)
        from transformers import DacModel

        try:
            self.model = DacModel.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        except OSError as err:  # missing or unreadable weights
            raise CodecError(f"{folder}: cannot load the DAC weights ({err})") from err
        config = self.model.config
        self.samples_per_frame = math.prod(config.downsampling_ratios)
        if math.prod(config.upsampling_ratios) != self.samples_per_frame:
            raise CodecError(f"{folder}: decoder upsampling {config.upsampling_ratios} does not undo encoder "
                             f"downsampling {config.downsampling_ratios}")
        self.codebooks = kept_codebooks(folder, codebooks, config.n_codebooks)
        self.sample_rate, self.codebook_size = config.sampling_rate, config.codebook_size
        self.level_rates = (1,) * self.codebooks

    def _encode(self, wav):
        wav = pad_to_frames(wav, self.samples_per_frame)
        codes = self.model.encode(wav[None, None], n_quantizers=self.codebooks).audio_codes  # (1, K, frames)
        return list(codes[0])

    def _decode(self, codes):
        wav = self.model.decode(audio_codes=torch.stack(codes)[None]).audio_values  # (1, <= frames * hop)
        return pad_to_frames(wav, self.samples_per_frame)


class MelCodec(Codec):
    """The codec trained here (``audiollm train codec``, audiollm/tts/melcodec.py): log-mel frames -> RVQ codes ->
    magnitude spectrogram -> Griffin-Lim. 16 kHz, 512 samples per frame (31.25 frames/s), 4 levels of 1,000 codes in
    the demo's recipe; ``codebooks`` keeps the first k levels (quantiser dropout trained them to decode alone).

    Decoding is deterministic (Griffin-Lim starts from a fixed random phase) but not local: every iteration
    re-analyses the whole signal, so a windowed (streamed) decode is close to, not equal to, the one-shot decode.
    """

    name = "audiollm_melcodec"

    def __init__(self, folder, device="cpu", codebooks: int | None = None):
        super().__init__(folder, device)
        from audiollm.tts.melcodec import MelCodecModel

        try:
            self.model = MelCodecModel.from_pretrained(folder).to(self.device).eval()
        except OSError as err:
            raise CodecError(f"{folder}: cannot load the codec weights ({err})") from err
        config = self.model.config
        self.codebooks = kept_codebooks(folder, codebooks, config.num_quantizers)
        self.sample_rate, self.codebook_size = config.sampling_rate, config.codebook_size
        self.samples_per_frame, self.level_rates = config.samples_per_frame, (1,) * self.codebooks

    def _encode(self, wav):
        return list(self.model.encode(pad_to_frames(wav, self.samples_per_frame)[None], self.codebooks)[0])

    def _decode(self, codes):
        return torch.from_numpy(self.model.decode(torch.stack(codes)[None]))


def kept_codebooks(folder: str | os.PathLike, codebooks: int | None, available: int) -> int:
    """The number of RVQ levels an adapter keeps: ``codebooks`` (1..available), or all of them when None."""
    kept = codebooks or available
    if not 1 <= kept <= available:
        raise CodecError(f"{folder}: codebooks must be 1..{available}, got {codebooks}")
    return kept


def codec_key(folder: str | os.PathLike) -> str:
    """Names a codec's weights in caches, without loading them: its kind and a hash of its config and file sizes."""
    folder = Path(folder)
    digest = hashlib.sha1((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{codec_kind(folder)}-{digest.hexdigest()[:16]}"


def codec_kind(folder: Path) -> str:
    """xcodec2, mimi, snac or dac, from the folder's config.json."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CodecError(f"{folder}: no config.json; pass a local XCodec2, SNAC, Mimi or DAC folder")
    config = json.loads(config_file.read_text())
    kind = config.get("model_type") or ("snac" if SNAC_CONFIG_KEYS <= config.keys() else None)
    if kind not in CODECS:
        raise CodecError(f"{folder}: codec {kind!r} is not one of {CODECS}")
    return kind


def load_codec(folder: str | os.PathLike, device: str | None = None, **options) -> Codec:
    """The adapter for a local codec folder (kind read from its config.json)."""
    folder = Path(folder)
    classes = {"xcodec2": XCodec2Codec, "snac": SnacCodec, "mimi": MimiCodec, "dac": DacCodec,
               "audiollm_melcodec": MelCodec}
    return classes[codec_kind(folder)](folder, device or "cpu", **options)


def slice_frames(codes: list[torch.Tensor], rates: tuple[int, ...], start: int, stop: int) -> list[torch.Tensor]:
    """Frames [start, stop) of every level."""
    return [c[start * r : stop * r] for c, r in zip(codes, rates)]


def decode_reach(codec: Codec, probe_frames: int = 24, seed: int = 0) -> tuple[int | None, int | None]:
    """(left, right): how many frames before and after a frame the decoder reads to make that frame's samples.

    Measured: random codes are decoded twice, differing only in the middle frame; the changed output samples show
    how far one frame's influence spreads (influence forward = dependence on the past, and the reverse). A side
    that reaches the probe's edge is unbounded (None): global attention (XCodec2's decoder) or a long causal
    context (Mimi's transformer reads 250 frames back). A convolutional decoder (SNAC) gives small bounds.
    """
    g = torch.Generator().manual_seed(seed)
    n, mid = 2 * probe_frames + 1, probe_frames
    codes = [torch.randint(0, codec.codebook_size, (n * r,), generator=g) for r in codec.level_rates]
    changed = [c.clone() for c in codes]
    for c, r in zip(changed, codec.level_rates):
        c[mid * r : (mid + 1) * r] = (c[mid * r : (mid + 1) * r] + 1) % codec.codebook_size
    a, b = codec.decode(codes), codec.decode(changed)
    moved = np.flatnonzero(np.abs(a - b) > 1e-6 * max(np.abs(a).max(), 1e-12))
    if moved.size == 0:
        return 0, 0
    first, last = int(moved[0]) // codec.samples_per_frame, int(moved[-1]) // codec.samples_per_frame
    reads_ahead = None if first == 0 else mid - first  # frames before mid that mid changes read mid: look-ahead
    reads_back = None if last == n - 1 else last - mid
    return reads_back, reads_ahead


def stream_context(codec: Codec) -> tuple[int | None, int | None]:
    """Frames of left/right context a windowed decode needs to equal the one-shot decode (one frame of margin)."""
    left, right = decode_reach(codec)
    return (None if left is None else left + 1), (None if right is None else right + 1)


def seconds(frames: int, codec: Codec) -> float:
    return frames * codec.samples_per_frame / codec.sample_rate


def frames_for(seconds_: float, codec: Codec) -> int:
    return math.ceil(seconds_ * codec.frame_rate)
