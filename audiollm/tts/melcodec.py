"""A small speech codec that trains in minutes on a CPU: log-mel frames -> residual VQ codes -> magnitude spectrogram
-> Griffin-Lim. It is the demo's codec (no trained codec can be downloaded offline) and a baseline for real ones.

    wav (16 kHz) --STFT n_fft 1024, hop 256--> |X| (513, T) --mel filterbank--> log-mel (80, T)        62.5 Hz
      --encoder: convs, then `stride` frames stacked--> (hidden, T/stride)                              31.25 Hz
      --RVQ: num_quantizers levels of codebook_size codes--> codes (num_quantizers, T/stride)
      --decoder: convs, frames unstacked--> log|X| (513, T) --Griffin-Lim (librosa)--> wav

Why this design (measured on the demo corpus, see README "The voice"): a waveform codec (DAC) needs far longer
training than a CPU affords before it is intelligible, while a magnitude spectrogram inverted by Griffin-Lim keeps
speech intelligible, and quantising mel frames is cheap to learn. The decoder predicts the full 513-bin magnitude,
not the mel, so Griffin-Lim does not also have to undo the mel filterbank.

Quantiser: DAC's factorised, l2-normalised codes (each level projects to ``codebook_dim`` dimensions and looks up
the nearest code by cosine), which keeps codebooks in use without k-means or EMA updates; quantiser dropout trains
the first k levels to decode on their own, so a TTS may use fewer levels (``MelCodec(codebooks=k)``).
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
    num_quantizers: int = 4  # RVQ levels
    codebook_size: int = 256  # codes per level
    codebook_dim: int = 8  # each level's lookup space (l2-normalised)
    quantizer_dropout: float = 0.5  # share of rows trained with a random number of levels 1..num_quantizers
    commitment_loss_weight: float = 0.25
    codebook_loss_weight: float = 1.0
    griffin_lim_iters: int = 64  # decode: more iterations, cleaner phase (32 -> 64 is audible; 128 barely)

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * self.stride


@dataclass
class MelCodecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None
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
    """One RVQ level: project to ``dim``, nearest code by cosine, project back (DAC's factorised codes)."""

    def __init__(self, hidden: int, dim: int, size: int):
        super().__init__()
        self.down, self.up = nn.Conv1d(hidden, dim, 1), nn.Conv1d(dim, hidden, 1)
        self.codebook = nn.Embedding(size, dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) codes -> (B, hidden, T)."""
        return self.up(self.codebook(codes).transpose(1, 2))

    def forward(self, z: torch.Tensor):
        """(B, hidden, T) -> (quantised (B, hidden, T) with a straight-through gradient, codes (B, T), losses)."""
        e = self.down(z)  # (B, dim, T)
        flat = F.normalize(e.transpose(1, 2), dim=-1)  # (B, T, dim)
        codes = (flat @ F.normalize(self.codebook.weight, dim=-1).T).argmax(-1)  # (B, T)
        q = self.codebook(codes).transpose(1, 2)  # (B, dim, T)
        commitment = F.mse_loss(e, q.detach(), reduction="none").mean(dim=(1, 2))  # (B,)
        codebook = F.mse_loss(q, e.detach(), reduction="none").mean(dim=(1, 2))
        q = e + (q - e).detach()
        return self.up(q), codes, commitment, codebook


class MelCodecModel(PreTrainedModel):
    """The codec: ``forward`` trains on (B, n) waveforms; ``encode`` / ``decode_magnitude`` / ``decode`` serve."""

    config_class = MelCodecConfig
    main_input_name = "input_values"

    def __init__(self, config: MelCodecConfig):
        super().__init__(config)
        import librosa

        c = config
        mel = librosa.filters.mel(sr=c.sampling_rate, n_fft=c.n_fft, n_mels=c.n_mels)  # (n_mels, n_fft//2 + 1)
        self.register_buffer("mel_basis", torch.from_numpy(mel).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.encoder = nn.Sequential(nn.Conv1d(c.n_mels, c.hidden_size, 5, padding=2),
                                     *[ResBlock(c.hidden_size, 3 ** i) for i in range(c.encoder_layers)])
        self.stack = nn.Conv1d(c.hidden_size * c.stride, c.hidden_size, 1)
        self.quantizers = nn.ModuleList(Quantizer(c.hidden_size, c.codebook_dim, c.codebook_size)
                                        for _ in range(c.num_quantizers))
        self.unstack = nn.Conv1d(c.hidden_size, c.hidden_size * c.stride, 1)
        self.decoder = nn.Sequential(*[ResBlock(c.hidden_size, 3 ** i) for i in range(c.decoder_layers)],
                                     nn.GELU(), nn.Conv1d(c.hidden_size, c.n_fft // 2 + 1, 1))
        self.post_init()

    def _init_weights(self, module):
        """PyTorch's own layer initialisation, kept: the stock one would zero the codebooks' spread."""

    def spectrogram(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) with n a multiple of hop * stride -> log|X| (B, 513, n / hop), log-mel (B, n_mels, n / hop)."""
        c = self.config
        spec = torch.stft(wav.float(), c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True)
        mag = spec.abs()[..., :-1]  # centred frames: n / hop + 1; the last one starts past the clip's end
        return self.log(mag), self.log(self.mel_basis @ mag)

    @staticmethod
    def log(x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.clamp(min=LOG_FLOOR))

    def latents(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, n) -> (B, hidden, n / (hop * stride)): the encoder's output, before quantising."""
        _, log_mel = self.spectrogram(wav)
        h = self.encoder(log_mel)  # (B, H, T)
        b, ch, t = h.shape
        h = h.reshape(b, ch, t // self.config.stride, self.config.stride).permute(0, 1, 3, 2)
        return self.stack(h.reshape(b, ch * self.config.stride, t // self.config.stride))

    def quantize(self, z: torch.Tensor, levels: torch.Tensor | None = None):
        """RVQ of (B, H, F) latents -> (sum of kept levels' vectors, codes (B, L, F), vq loss (B,)).

        ``levels`` (B,): how many levels each row keeps (quantiser dropout); None keeps all."""
        residual, total = z, torch.zeros_like(z)
        codes, loss = [], torch.zeros(z.shape[0], device=z.device)
        c = self.config
        for i, quantizer in enumerate(self.quantizers):
            q, idx, commitment, codebook = quantizer(residual)
            keep = torch.ones_like(loss) if levels is None else (i < levels).float()  # (B,)
            total = total + q * keep[:, None, None]
            residual = residual - q
            loss = loss + keep * (c.commitment_loss_weight * commitment + c.codebook_loss_weight * codebook)
            codes.append(idx)
        return total, torch.stack(codes, 1), loss

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, F) -> predicted log|X| (B, 513, F * stride)."""
        b, ch, f = q.shape
        h = self.unstack(q).reshape(b, ch, self.config.stride, f).permute(0, 1, 3, 2).reshape(b, ch, f * self.config.stride)
        return self.decoder(h)

    def forward(self, input_values: torch.Tensor, **kwargs) -> MelCodecOutput:
        """(B, n) waveforms, n a multiple of hop * stride -> loss = L1(log|X|) + L1(log-mel) + vq terms."""
        log_mag, log_mel = self.spectrogram(input_values)
        z = self.latents(input_values)
        levels = None
        if self.training and self.config.quantizer_dropout > 0:
            n = len(self.quantizers)
            dropped = torch.rand(z.shape[0], device=z.device) < self.config.quantizer_dropout
            levels = torch.where(dropped, torch.randint(1, n + 1, (z.shape[0],), device=z.device), n)
        q, codes, vq_loss = self.quantize(z, levels)
        pred = self.decode_latents(q)  # (B, 513, T)
        pred_mel = self.log(self.mel_basis @ pred.exp())
        reconstruction = F.l1_loss(pred, log_mag) + F.l1_loss(pred_mel, log_mel)
        vq = vq_loss.mean()
        return MelCodecOutput(loss=reconstruction + vq, reconstruction_loss=reconstruction.detach(),
                              vq_loss=vq.detach(), codes=codes)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """(B, n) waveforms, n a multiple of hop * stride -> (B, levels, frames) codes."""
        _, codes, _ = self.quantize(self.latents(wav))
        return codes[:, : levels or len(self.quantizers)]

    @torch.no_grad()
    def decode_magnitude(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, k, frames) codes of the first k levels -> magnitude |X| (B, 513, frames * stride)."""
        q = sum(self.quantizers[i].lookup(codes[:, i]) for i in range(codes.shape[1]))
        return self.decode_latents(q).exp()

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


__all__ = ["MelCodecConfig", "MelCodecModel"]
