"""Whisper encoder as Qwen2-Audio uses it (conv s2 -> transformer -> AvgPool(2) -> LayerNorm), unpadded.

The stock ``Qwen2AudioEncoder`` accepts only 3000-frame (30 s) input. This subclass keeps its weights and names
and takes any length up to 3000 frames: positions are the first T' rows of the 1500-row table and padded frames
are masked in self-attention, so a 5 s clip costs 250 encoder positions instead of 1500.

A batch is still padded to its longest clip: on clips of mixed length (LibriSpeech: 2-25 s) that is ~1.8 computed
frames per real one. With ``packed`` set, the transformer layers run on the real frames only, all clips of the
batch in one sequence, attention kept within each clip (varlen kernels: flash-attention's, or
``audiollm.packing``'s per-clip sdpa); each clip's encoding is the same as alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
from transformers.models.whisper.modeling_whisper import sinusoids

from audiollm.audio import EDGE_FRAMES, MAX_FRAMES, audio_token_count
from audiollm.packing import PACKED_SDPA

# Attention kernels that take a packed sequence's clip boundaries (cu_seqlens) and attend per clip in
# sum(length^2); any other kernel gets a block-diagonal mask over the whole sequence, (sum of lengths)^2.
VARLEN_ATTENTION = ("flash_attention_2", PACKED_SDPA)


class AudioEncoder(Qwen2AudioEncoder):
    """Qwen2-Audio's audio tower with variable-length input.

    Takes the stock layout (every clip padded to 3000 frames, as transformers' processor does) and the project's
    (``audio.log_mel``: padded only to the longest clip + the 2 frames the convolutions read past a clip's end,
    which hold the same values as in the stock layout). Either way a clip's real frames get the same encoding.
    """

    # A training switch (ModelArguments.packed_encoder), not saved in the config: encode the real frames only.
    packed: bool = False
    # Another (ModelArguments.ctc_layer, audiollm/ctc.py): after each forward, ``tapped`` holds this layer's
    # (1-based) output pooled to 25 Hz like the last one's, (C, N, D), for an intermediate CTC loss. 0: none.
    tap_layer: int = 0

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

    def set_dropout(self, p: float) -> None:
        """Dropout ``p`` on the positions-added input and every layer's residual branches (Whisper's ``dropout``;
        attention and activation dropout untouched), for training only: the config, and so a saved folder, keeps
        its own value. The layers read their rate from attributes copied at build time, so it is set on each."""
        self.dropout = p
        for layer in self.layers:
            layer.dropout = p

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        """(C, n_mels, T) mel chunks, T <= 3000, mask (C, T) -> hidden (C, N, d_model), token lengths (C,).

        Row i has ``lengths[i] = audio_token_count(mask[i].sum())`` real tokens; the rest of it is padding
        (N = audio_token_count(T) when padded, the longest clip's count when ``packed``).
        """
        chunks, _, frames = input_features.shape
        if frames > MAX_FRAMES:
            raise ValueError(f"the encoder takes at most {MAX_FRAMES} mel frames (30 s) per chunk, got {frames}")
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(chunks, frames, dtype=torch.long, device=input_features.device)
        mel_lengths = feature_attention_mask.sum(-1)
        x = input_features.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        conv_lengths = (mel_lengths - 1) // 2 + 1
        if self.packed:
            x = self._encode_packed(x, conv_lengths)
        else:
            x = self._encode_padded(x, conv_lengths)
        return self.layer_norm(x), audio_token_count(mel_lengths)

    def _stem(self, mel: torch.Tensor) -> torch.Tensor:
        """(C, n_mels, T) -> (C, T', D): the two convolutions (T' = (T - 1) // 2 + 1) plus positions."""
        x = nn.functional.gelu(self.conv1(mel))  # (C, D, T)
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)  # (C, T', D)
        x = x + self.embed_positions.weight[: x.shape[1]]
        return nn.functional.dropout(x, p=self.dropout, training=self.training)

    def _layers(self, x: torch.Tensor, attn_mask, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformer layers: the last one's output, and ``tap_layer``'s (None when off)."""
        tapped = None
        for number, layer in enumerate(self.layers, 1):
            if not (self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop):
                x = layer(x, attn_mask, **attn_kwargs)
            if number == self.tap_layer:
                tapped = x
        return x, tapped

    def _encode_padded(self, mel: torch.Tensor, conv_lengths: torch.Tensor) -> torch.Tensor:
        """(C, n_mels, T) padded to the longest clip -> (C, T'//2, D) pooled frames, padding masked out."""
        x = self._stem(mel)
        frame_mask = torch.arange(x.shape[1], device=x.device)[None, :] < conv_lengths[:, None]  # (C, T')
        attn_mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=frame_mask)
        x, tapped = self._layers(x, attn_mask)
        self.tapped = None if tapped is None else self._pool_padded(tapped)
        return self._pool_padded(x)

    def _pool_padded(self, x: torch.Tensor) -> torch.Tensor:
        """(C, T', D) -> (C, T'//2, D): 25 Hz, 40 ms per token."""
        return self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)

    def _encode_packed(self, mel: torch.Tensor, conv_lengths: torch.Tensor) -> torch.Tensor:
        """The same, on the real frames only: (C, n_mels, T) -> (C, max T'_i // 2, D).

        The convolutions run clip by clip on the clip's frames + the 2 they read past its end (so the outputs are
        those of the padded layout); the layers run on (1, sum T'_i, D) with attention within each clip.
        """
        lengths = conv_lengths.tolist()
        mel_frames = (conv_lengths - 1) * 2 + 1  # the fewest mel frames giving T'_i conv frames
        clips = [self._stem(mel[i : i + 1, :, : min(mel.shape[-1], int(n) + EDGE_FRAMES)])[0, :t]
                 for i, (n, t) in enumerate(zip(mel_frames.tolist(), lengths))]
        x = torch.cat(clips)[None]  # (1, sum T'_i, D)
        mask, attn_kwargs = self._packed_attention(x, conv_lengths)
        x, tapped = self._layers(x, mask, **attn_kwargs)
        self.tapped = None if tapped is None else self._pool_packed(tapped, lengths)
        return self._pool_packed(x, lengths)

    @staticmethod
    def _pool_packed(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """(1, sum T'_i, D) -> (C, max T'_i // 2, D): AvgPool1d(2, 2) per clip as a pairwise mean, which also takes
        a 1-frame clip (0 tokens)."""
        width = x.shape[-1]
        pooled = [clip[: t - t % 2].reshape(t // 2, 2, width).mean(1) for clip, t in zip(x[0].split(lengths), lengths)]
        return nn.utils.rnn.pad_sequence(pooled, batch_first=True)

    def _packed_attention(self, x: torch.Tensor, conv_lengths: torch.Tensor) -> tuple:
        """(mask, kwargs) that keep attention within each clip of a packed (1, sum T'_i, D) sequence."""
        if self.config._attn_implementation in VARLEN_ATTENTION:
            bounds = nn.functional.pad(conv_lengths.cumsum(0), (1, 0)).to(device=x.device, dtype=torch.int32)
            longest = int(conv_lengths.max())
            return None, {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest,
                          "max_length_k": longest}
        clip_ids = torch.repeat_interleave(torch.arange(len(conv_lengths), device=x.device),
                                           conv_lengths.to(x.device))[None]  # (1, sum T'_i)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=None,
                                         and_mask_function=packed_sequence_mask_function(clip_ids),
                                         allow_is_bidirectional_skip=False)
        return mask, {}
