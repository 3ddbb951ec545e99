"""The stages' argument dataclasses: which model trains and how (``ModelArguments``), which rows and how they
become tokens (``DataArguments``). Each field's help is what ``audiollm train STAGE --help`` prints, and a recipe's
YAML keys are these names. Stages that take only some of the fields drop the rest with ``without_fields``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from audiollm.chat import DEFAULT_SYSTEM_PROMPT


@dataclass
class ModelArguments:
    """Which model to start from and which of its parts train."""

    model_name_or_path: str = field(metadata={"help": "Folder from `audiollm init` or a previous stage's output."})
    train_encoder: bool = field(default=False, metadata={"help": "Train the Whisper encoder's full weights."})
    train_projector: bool = field(default=True, metadata={"help": "Train the projector."})
    train_llm: bool = field(default=False, metadata={"help": "Train the LLM's full weights."})
    llm_lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM's linear layers; 0 = no LoRA."})
    encoder_lora_r: int = field(default=0, metadata={"help": "LoRA rank on the encoder's linear layers; 0 = none."})
    lora_alpha_ratio: float = field(default=2.0, metadata={"help": "LoRA alpha = ratio * r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    model_dtype: str = field(default="float32", metadata={"help": "Weights' dtype in memory: float32 (mixed "
                             "precision keeps fp32 masters), bfloat16 or float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager or flash_attention_2; "
                                            "default: flash-attention when installed on a GPU, else sdpa."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code in the tokenizer folder."})
    lean_loss_chunk_tokens: int = field(default=0, metadata={"help": "Memory-lean cross-entropy: logits only for "
                                        "labelled positions, this many at a time (1024 is a good start); 0 = the "
                                        "LLM's own loss over full (B, S, vocab) logits."})
    packed_encoder: bool = field(default=False, metadata={"help": "Encode only the clips' real mel frames: a "
                                 "batch's clips in one sequence, attention within each clip (fast with "
                                 "attn_implementation sdpa_packed or flash_attention_2)."})
    ctc_weight: float = field(default=0.0, metadata={"help": "CTC on the encoder beside the answer loss: a new "
                              "head reads the encoder's frames against each clip's transcript (rows' "
                              "'transcripts'), loss = answer + ctc_weight x CTC; 0 = off (audiollm/ctc.py). The "
                              "head stays out of the stage's final folder."})
    ctc_layer: int = field(default=0, metadata={"help": "Which encoder output the CTC head reads: 0 = the last "
                           "(what the projector gets), k = layer k's (intermediate CTC: the layers above stay free "
                           "for what the transcript does not say, such as who speaks)."})
    encoder_dropout: float | None = field(default=None, metadata={"help": "Dropout on the encoder's residual "
                                          "branches (Whisper's `dropout`) while this stage trains; not saved in "
                                          "the folder's config. None keeps the config's value (0 in Whisper and "
                                          "Qwen2-Audio)."})

    def __post_init__(self):
        if self.train_llm and self.llm_lora_r:
            raise ValueError("choose train_llm (full weights) or llm_lora_r > 0 (LoRA), not both")
        if self.train_encoder and self.encoder_lora_r:
            raise ValueError("choose train_encoder (full weights) or encoder_lora_r > 0 (LoRA), not both")
        if self.ctc_weight < 0:
            raise ValueError(f"ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.encoder_dropout is not None and not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.ctc_weight and (not self.train_encoder or self.uses_lora):
            raise ValueError("ctc_weight > 0 trains the encoder through a CTC head: it needs train_encoder: true "
                             "and no LoRA (the head would not reach a merged adapter folder)")

    @property
    def uses_lora(self) -> bool:
        return self.llm_lora_r > 0 or self.encoder_lora_r > 0


@dataclass
class DataArguments:
    """Where the rows come from and how they become tokens."""

    train_files: list[str] = field(metadata={"help": "Manifests: .jsonl/.json/.parquet, save_to_disk folders or "
                                             "Hub dataset names."})
    mix_weights: list[float] | None = field(default=None, metadata={"help": "Sampling weight per train file; "
                                            "omitted: the files are concatenated."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "Manifests for evaluation loss."})
    streaming: bool = field(default=False, metadata={"help": "Stream rows instead of loading the manifest "
                            "(needs max_steps); for data larger than the disk cache."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per row, audio included."})
    overflow: str = field(default="drop", metadata={"help": "Over-long rows: drop (counted) or trim_text "
                          "(cut after the last audio token)."})
    train_on: str = field(default="all", metadata={"help": "Assistant turns with loss: all or last."})
    max_audio_seconds: float = field(default=600.0, metadata={"help": "Longer audio files are bad rows, refused "
                                     "before decoding (30 s chunks are made up to this length)."})
    data_root: str | None = field(default=None, metadata={"help": "When set, audio paths must resolve inside "
                                  "this folder; rows pointing elsewhere are bad rows."})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "Bad rows (skipped, counted in "
                                    "bad_rows.jsonl) above this fraction stop the run, first on a sample "
                                    "before training, then as rows are met (counted over all ranks and "
                                    "dataloader workers)."})
    preflight_rows: int = field(default=256, metadata={"help": "Rows checked (decoded) before training starts "
                                "(a random sample; streamed: the first rows), to stop at once on a mostly broken "
                                "manifest; 0 = no preflight."})
    system_prompt: str | None = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System turn added "
                                      "when a conversation has none; empty string: no system turn."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the pretraining instruction draw."})
    packing: bool = field(default=False, metadata={"help": "Padding-free batches: a batch's rows concatenated "
                          "into one sequence, positions restarting per row, attention isolated per row."})
    packing_max_tokens: int = field(default=0, metadata={"help": "With packing: tokens per packed sequence "
                                    "(rows kept whole); 0 = the whole batch in one sequence (needed by "
                                    "flash-attention)."})
    batch_tokens: int = field(default=0, metadata={"help": "Batches by a budget instead of "
                              "per_device_train_batch_size: rows of similar length, as many as fit rows x longest "
                              "<= this many estimated tokens (audio 25/s + text); 0 = off (audiollm/batching.py)."})
    batch_audio_seconds: float = field(default=0.0, metadata={"help": "The budget in seconds of audio instead "
                                       "(rows x longest clip); 0 = off. Give batch_tokens or this, not both."})
    length_buckets: int = field(default=16, metadata={"help": "With a batch budget: length buckets (quantiles); "
                                "more buckets pad less but mix fewer rows of different lengths."})
    augmentation: dict | str | None = field(default=None, metadata={"help": "Training clips transformed per "
                                            "clip: {name: {p: probability, range: [low, high]}} for speed, reverb, "
                                            "telephone, lowpass, resample, mp3, noise, gain (audiollm/augment.py; "
                                            "a JSON string on the command line). Evaluation rows are left as "
                                            "they are."})


def without_fields(cls, names: set[str]):
    """A copy of dataclass ``cls`` without the fields ``names`` (same types, defaults and help)."""
    hints = typing.get_type_hints(cls)
    kept = [
        (f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                  metadata=f.metadata))
        for f in dataclasses.fields(cls) if f.name not in names
    ]
    return dataclasses.make_dataclass(cls.__name__, kept)
