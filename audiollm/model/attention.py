"""Which attention kernel to load the model with."""

from __future__ import annotations

import torch
from transformers.utils import is_flash_attn_2_available


def pick_attn_implementation() -> str:
    """``"flash_attention_2"`` on a CUDA machine with flash-attn installed, else ``"sdpa"``.

    Pass the result as ``attn_implementation=`` to ``from_pretrained``. flash-attn runs only in fp16/bf16, so load
    the model in bf16 with it. The tests check sdpa against eager on CPU (same logits for padded batches); flash-attn
    needs a GPU and is not covered there.
    """
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"
