"""Whisper encoder as Qwen2-Audio uses it (conv s2 -> transformer -> AvgPool(2) -> LayerNorm), unpadded.

The stock ``Qwen2AudioEncoder`` accepts only 3000-frame (30 s) input. This subclass keeps its weights and names
and takes any length up to 3000 frames: positions are the first T' rows of the 1500-row table and padded frames
are masked in self-attention, so a 5 s clip costs 250 encoder positions instead of 1500.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
from transformers.models.whisper.modeling_whisper import sinusoids

from audiollm.audio import MAX_FRAMES, audio_token_count


class AudioEncoder(Qwen2AudioEncoder):
    """Qwen2-Audio's audio tower with variable-length input.

    Takes the stock layout (every clip padded to 3000 frames, as transformers' processor does) and the project's
    (``audio.log_mel``: padded only to the longest clip + the 2 frames the convolutions read past a clip's end,
    which hold the same values as in the stock layout). Either way a clip's real frames get the same encoding.
    """

    def _init_weights(self, module):
        """Standard init, except where a random encoder could not learn to hear (only new encoders; checkpoints
        keep their weights):

        - positions: Whisper's fixed sinusoids (std 0.68), not a frozen table of noise;
        - the two convolutions: He init for GELU, std sqrt(2 / fan_in). At std 0.02 their output (std 0.02) is
          drowned by the positions: every clip encodes alike (cosine 0.999 between clips) and the encoder gets
          almost no gradient.
        """
        if module is self.embed_positions:
            init.copy_(module.weight, sinusoids(*module.weight.shape))
        elif module is self.conv1 or module is self.conv2:
            init.kaiming_normal_(module.weight, nonlinearity="relu")  # GELU's gain is close to ReLU's
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        """(C, n_mels, T) mel chunks, T <= 3000, mask (C, T) -> hidden (C, N, d_model), token lengths (C,).

        N = audio_token_count(T); row i has ``lengths[i] = audio_token_count(mask[i].sum())`` real tokens.
        """
        chunks, _, frames = input_features.shape
        if frames > MAX_FRAMES:
            raise ValueError(f"the encoder takes at most {MAX_FRAMES} mel frames (30 s) per chunk, got {frames}")
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(chunks, frames, dtype=torch.long, device=input_features.device)
        mel_lengths = feature_attention_mask.sum(-1)
        x = input_features.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)

        x = nn.functional.gelu(self.conv1(x))  # (C, D, T)
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)  # (C, T', D), T' = (T - 1) // 2 + 1
        x = x + self.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=self.dropout, training=self.training)

        conv_lengths = (mel_lengths - 1) // 2 + 1
        frame_mask = torch.arange(x.shape[1], device=x.device)[None, :] < conv_lengths[:, None]  # (C, T')
        attn_mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=frame_mask)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, attn_mask)

        x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)  # (C, T'//2, D): 25 Hz, 40 ms per token
        return self.layer_norm(x), audio_token_count(mel_lengths)
