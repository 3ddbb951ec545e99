"""The model's config: Qwen2-Audio's (audio_config + text_config + audio token id) plus the projector choice."""

from __future__ import annotations

from transformers import Qwen2AudioConfig

PROJECTORS = ("linear", "mlp", "stack")
STOCK_MODEL_TYPE = "qwen2_audio"  # what stock transformers (and vLLM) load as Qwen2AudioForConditionalGeneration
STOCK_ARCHITECTURE = "Qwen2AudioForConditionalGeneration"


class AudioLLMConfig(Qwen2AudioConfig):
    """Qwen2AudioConfig plus the projector settings.

    projector_type: "linear" (Qwen2-Audio: one Linear d_model -> hidden), "mlp" (Linear, GELU, Linear) or "stack"
        (Ultravox: stack ``projector_stack`` consecutive 25 Hz frames, then the MLP).
    projector_stack: k for "stack"; the audio-token rate becomes 25 / k Hz.

    A linear-projector config is written with Qwen2-Audio's model_type and architecture, so the saved folder is a
    stock Qwen2-Audio checkpoint; the other projectors are written as model_type "audiollm", which stock
    transformers refuses instead of loading with a random projector.
    """

    model_type = "audiollm"
    projector_type: str = "linear"
    projector_stack: int = 1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"projector_type must be one of {PROJECTORS}, got {self.projector_type!r}")
        if self.projector_type != "stack":
            self.projector_stack = 1
        if self.projector_stack < 1:
            raise ValueError(f"projector_stack must be >= 1, got {self.projector_stack}")

    @property
    def stock_compatible(self) -> bool:
        return self.projector_type == "linear"

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == STOCK_MODEL_TYPE:  # a stock Qwen2-Audio folder: linear projector
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    def to_dict(self):
        out = super().to_dict()
        if self.stock_compatible:
            out["model_type"] = STOCK_MODEL_TYPE
            out["architectures"] = [STOCK_ARCHITECTURE]
        return out
