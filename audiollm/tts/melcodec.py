"""A small speech codec that trains in minutes on a CPU: log-mel frames -> residual VQ codes -> magnitude spectrogram
-> Griffin-Lim. It is the demo's codec (no trained codec can be downloaded offline) and a baseline for real ones.

    wav (16 kHz) --STFT n_fft 1024, hop 256--> |X| (513, T) --mel filterbank--> log-mel (80, T)        62.5 Hz
      [--first k cepstral coefficients--> its envelope, the harmonics (pitch) gone: envelope_coefficients]
      --encoder: convs, then `stride` frames stacked--> (hidden, T/stride)                              31.25 Hz
      --RVQ: num_quantizers levels of codebook_size codes--> codes (num_quantizers, T/stride)
      --decoder: convs, frames unstacked--> log|X| (513, T) --Griffin-Lim (librosa)--> wav

Why this design (measured on the demo corpus, see README "The voice"): a waveform codec (DAC) needs far longer
training than a CPU affords before it is intelligible, while a magnitude spectrogram inverted by Griffin-Lim keeps
speech intelligible, and quantising mel frames is cheap to learn. The decoder predicts the full 513-bin magnitude,
not the mel, so Griffin-Lim does not also have to undo the mel filterbank.

Quantiser: residual levels of finite scalar quantisation (FSQ: each level projects the residual to a few
dimensions and rounds each to one of L values), which has no codebook to collapse and no auxiliary loss;
quantiser dropout trains the first k levels to decode on their own, so a TTS may use fewer levels
(``MelCodec(codebooks=k)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

LOG_FLOOR = 1e-5  # magnitude floor before the log: -100 dB under a full-scale sine's bin
# Natural-log mel magnitudes of speech at -20..-30 dBFS span about -11.5 (the floor) to +3: shifted and scaled to
# roughly zero mean and unit spread before the encoder.
MEL_CENTER, MEL_SCALE = -4.0, 4.0
LOG_CEILING = 8.0  # predicted log|X| is capped here before exp: a full-scale sine's bin is n_fft / 4 = 256 (5.5)


@strict
class MelCodecConfig(PreTrainedConfig):
    """Sizes of the codec; every default is what the demo trains (stages/configs/codec_demo.yaml)."""

    model_type = "audiollm_melcodec"

    sampling_rate: int = 16000  # Hz
    n_fft: int = 1024  # samples per STFT window: 64 ms
    hop_length: int = 256  # samples between spectrogram frames: 16 ms, 62.5 frames/s
    n_mels: int = 80  # encoder input bins
    stride: int = 2  # spectrogram frames per codec frame: 512 samples, 31.25 codec frames/s
    hidden_size: int = 256
    encoder_layers: int = 2  # residual conv blocks before stacking
    decoder_layers: int = 3  # residual conv blocks after unstacking
    num_quantizers: int = 4  # residual levels
    fsq_levels: list[int] | tuple[int, ...] = (4, 4, 4, 4)  # values per FSQ dimension: 4^4 = 256 codes per level
    quantizer_dropout: float = 0.5  # share of rows trained with a random number of levels 1..num_quantizers
    griffin_lim_iters: int = 64  # decode: more iterations, cleaner phase (32 -> 64 is audible; 128 barely)
    # The encoder reads the log-mel smoothed to its first k cepstral (DCT) coefficients: the spectral envelope
    # without the harmonics, i.e. without the speaker's pitch, which the decoder does not reproduce anyway. 0: off.
    envelope_coefficients: int = 0

    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.fsq_levels))

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * self.stride


@dataclass
class MelCodecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    codes: torch.Tensor | None = None  # (B, num_quantizers, frames)


class ResBlock(nn.Module):
    """x + conv1x1(gelu(dilated conv3(gelu(x)))): (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))


class Quantizer(nn.Module):
    """One residual level, a finite scalar quantiser (FSQ): project to ``len(levels)`` dimensions, squash each to
    [0, L-1], round. A code is the digits read in mixed radix: prod(levels) codes, every one reachable, no codebook
    to learn, so none collapses (l2-normalised learnt codebooks collapsed to 1 code of 256 here within 15 steps)."""

    def __init__(self, hidden: int, levels: tuple[int, ...]):
        super().__init__()
        self.down, self.up = nn.Conv1d(hidden, len(levels), 1), nn.Conv1d(len(levels), hidden, 1)
        self.levels = levels

    def constants(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(each digit's largest value, its mixed-radix place value), both (d, 1). Made per call, not kept as
        buffers: ``from_pretrained`` builds modules on the meta device and leaves non-persistent buffers empty."""
        top = torch.tensor(self.levels, device=device)[:, None] - 1
        radix = torch.cumprod(torch.tensor((1, *self.levels[:-1]), device=device), 0)[:, None]
        return top, radix

    def vectors(self, digits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """(B, d, T) digits in [0, L-1] -> (B, hidden, T), each digit scaled to [-1, 1] first."""
        return self.up(digits / top * 2 - 1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) codes -> (B, hidden, T)."""
        top, radix = self.constants(codes.device)
        digits = torch.div(codes[:, None], radix, rounding_mode="floor") % (top + 1)
        return self.vectors(digits.float(), top)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, hidden, T) -> (quantised (B, hidden, T) with a straight-through gradient, codes (B, T))."""
        top, radix = self.constants(z.device)
        x = torch.sigmoid(self.down(z)) * top  # (B, d, T) in (0, L-1)
        digits = x.round()
        codes = (digits.long() * radix).sum(1)
        return self.vectors(x + (digits - x).detach(), top), codes


class MelCodecModel(PreTrainedModel):
    """The codec: ``forward`` trains on (B, n) waveforms; ``encode`` / ``decode_magnitude`` / ``decode`` serve."""

    config_class = MelCodecConfig
    main_input_name = "input_values"

    def __init__(self, config: MelCodecConfig):
        super().__init__(config)
        c = config
        self.encoder = nn.Sequential(nn.Conv1d(c.n_mels, c.hidden_size, 5, padding=2),
                                     *[ResBlock(c.hidden_size, 3 ** i) for i in range(c.encoder_layers)])
        # Normalised latents keep the quantisers' sigmoids off their flat tails (unnormalised, every frame got the
        # same code within 15 steps).
        self.stack = nn.Sequential(nn.Conv1d(c.hidden_size * c.stride, c.hidden_size, 1),
                                   nn.GroupNorm(1, c.hidden_size))
        self.quantizers = nn.ModuleList(Quantizer(c.hidden_size, tuple(c.fsq_levels))
                                        for _ in range(c.num_quantizers))
        self.unstack = nn.Conv1d(c.hidden_size, c.hidden_size * c.stride, 1)
        self.decoder = nn.Sequential(*[ResBlock(c.hidden_size, 3 ** i) for i in range(c.decoder_layers)],
                                     nn.GELU(), nn.Conv1d(c.hidden_size, c.n_fft // 2 + 1, 1))
        self.post_init()

    def _init_weights(self, module):
        """PyTorch's own layer initialisation, kept (the stock one re-draws every Linear/Conv at std 0.02)."""

    def spectrogram(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) with n a multiple of hop * stride -> log|X| (B, 513, n / hop), log-mel (B, n_mels, n / hop)."""
        c = self.config
        window, mel_basis = self.analysis(wav.device)
        spec = torch.stft(wav.float(), c.n_fft, c.hop_length, window=window, center=True, return_complex=True)
        mag = spec.abs()[..., :-1]  # centred frames: n / hop + 1; the last one starts past the clip's end
        return self.log(mag), self.log(mel_basis @ mag)

    def analysis(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hann window (n_fft,), mel filterbank (n_mels, n_fft // 2 + 1)) on ``device``, made on first use and
        kept. Not buffers: ``from_pretrained`` builds modules on the meta device and leaves those empty."""
        import librosa

        cached = getattr(self, "_analysis", None)
        if cached is None or cached[0].device != torch.device(device):
            c = self.config
            mel = librosa.filters.mel(sr=c.sampling_rate, n_fft=c.n_fft, n_mels=c.n_mels)
            self._analysis = (torch.hann_window(c.n_fft, device=device), torch.from_numpy(mel).to(device))
        return self._analysis

    @staticmethod
    def log(x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.clamp(min=LOG_FLOOR))

    def latents(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, n) -> (B, hidden, n / (hop * stride)): the encoder's output, before quantising."""
        _, log_mel = self.spectrogram(wav)
        if self.config.envelope_coefficients:
            log_mel = spectral_envelope(log_mel, self.config.envelope_coefficients)
        h = self.encoder((log_mel - MEL_CENTER) / MEL_SCALE)  # (B, H, T)
        b, ch, t = h.shape
        h = h.reshape(b, ch, t // self.config.stride, self.config.stride).permute(0, 1, 3, 2)
        return self.stack(h.reshape(b, ch * self.config.stride, t // self.config.stride))

    def quantize(self, z: torch.Tensor, levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual quantisation of (B, H, F) latents -> (sum of kept levels' vectors, codes (B, L, F)).

        ``levels`` (B,): how many levels each row keeps (quantiser dropout); None keeps all."""
        residual, total, codes = z, torch.zeros_like(z), []
        for i, quantizer in enumerate(self.quantizers):
            q, idx = quantizer(residual)
            keep = 1.0 if levels is None else (i < levels).to(z.dtype)[:, None, None]  # (B, 1, 1)
            total = total + q * keep
            residual = residual - q
            codes.append(idx)
        return total, torch.stack(codes, 1)

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, F) -> predicted log|X| (B, 513, F * stride)."""
        b, ch, f = q.shape
        stride = self.config.stride
        h = self.unstack(q).reshape(b, ch, stride, f).permute(0, 1, 3, 2).reshape(b, ch, f * stride)
        return self.decoder(h)

    def forward(self, input_values: torch.Tensor, **kwargs) -> MelCodecOutput:
        """(B, n) waveforms, n a multiple of hop * stride -> loss = L1(log|X|) + L1(log-mel) (FSQ needs no other)."""
        log_mag, log_mel = self.spectrogram(input_values)
        z = self.latents(input_values)
        levels = None
        if self.training and self.config.quantizer_dropout > 0:
            n = len(self.quantizers)
            dropped = torch.rand(z.shape[0], device=z.device) < self.config.quantizer_dropout
            levels = torch.where(dropped, torch.randint(1, n + 1, (z.shape[0],), device=z.device), n)
        q, codes = self.quantize(z, levels)
        pred = self.decode_latents(q)  # (B, 513, T)
        pred_mel = self.log(self.analysis(pred.device)[1] @ pred.clamp(max=LOG_CEILING).exp())
        return MelCodecOutput(loss=F.l1_loss(pred, log_mag) + F.l1_loss(pred_mel, log_mel), codes=codes)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """(B, n) waveforms, n a multiple of hop * stride -> (B, levels, frames) codes."""
        _, codes = self.quantize(self.latents(wav))
        return codes[:, : levels or len(self.quantizers)]

    @torch.no_grad()
    def decode_magnitude(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, k, frames) codes of the first k levels -> magnitude |X| (B, 513, frames * stride)."""
        q = sum(self.quantizers[i].lookup(codes[:, i]) for i in range(codes.shape[1]))
        return self.decode_latents(q).clamp(max=LOG_CEILING).exp()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """(B, k, frames) codes -> (B, frames * hop * stride) float32 waveforms, phase by Griffin-Lim."""
        import librosa

        c = self.config
        mag = self.decode_magnitude(codes).float().cpu().numpy()  # (B, 513, T)
        # Centred STFT of T * hop samples has T + 1 frames: the last (dropped in ``spectrogram``) repeats its
        # neighbour, so Griffin-Lim's re-analysis shapes agree.
        mag = np.concatenate([mag, mag[..., -1:]], axis=-1)
        return librosa.griffinlim(mag, n_iter=c.griffin_lim_iters, hop_length=c.hop_length, n_fft=c.n_fft,
                                  win_length=c.n_fft, center=True, length=(mag.shape[-1] - 1) * c.hop_length,
                                  random_state=0).astype(np.float32)


def spectral_envelope(log_mel: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n_mels, T) log-mel -> the same, keeping only its first ``k`` DCT-II coefficients along the mel axis
    (low quefrency: the envelope; the harmonics' ripple lies higher)."""
    n = log_mel.shape[1]
    bins = torch.arange(n, dtype=log_mel.dtype, device=log_mel.device)
    dct = torch.cos(torch.pi / n * (bins[None, :] + 0.5) * bins[:k, None]) * (2.0 / n) ** 0.5  # (k, n)
    dct[0] /= 2**0.5  # orthonormal rows: projecting onto them and back keeps exactly their span
    return torch.einsum("kn,bkt->bnt", dct, torch.einsum("kn,bnt->bkt", dct, log_mel))


__all__ = ["MelCodecConfig", "MelCodecModel"]
