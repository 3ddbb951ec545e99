"""The listening model: audio tower -> projector -> any Hugging Face causal LM.

Attribute names give Qwen2-Audio's checkpoint names (``audio_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``), so a linear-projector model saved here is a stock
Qwen2-Audio checkpoint, and a released Qwen2-Audio folder loads here unchanged.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast

from audiollm.collator import IGNORE_INDEX
from audiollm.ctc import CTC_DIVISOR, CTC_KEYS, CTC_LENGTHS, CTC_TARGETS, HEAD_PREFIX, ctc_loss
from audiollm.distill import distill_loss
from audiollm.loss import DEFAULT_CHUNK_TOKENS, chunked_causal_lm_loss
from audiollm.model.config import AudioLLMConfig
from audiollm.model.encoder import AudioEncoder
from audiollm.model.projector import build_projector
from audiollm.packing import pack_rows, plan_rows, unpack_rows


class AudioLLMForConditionalGeneration(PreTrainedModel):
    config_class = AudioLLMConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen2AudioEncoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"]
    # Labelled tokens per chunk of the memory-lean loss (audiollm/loss.py); 0: the LLM's own loss over full logits.
    # A training switch (ModelArguments.lean_loss_chunk_tokens), not saved in the config.
    loss_chunk_tokens: int = 0
    # The CTC loss's weight beside the answer loss when a stage adds ``ctc_head`` (audiollm/ctc.py); a training
    # switch too. ``save_ctc_head``: False while a stage writes its final folder, which stays a stock checkpoint.
    ctc_weight: float = 0.0
    save_ctc_head: bool = True

    def __init__(self, config: AudioLLMConfig):
        super().__init__(config)
        self.audio_tower = AudioEncoder(config.audio_config)
        self.multi_modal_projector = build_projector(
            config.projector_type, config.audio_config.d_model, config.text_config.hidden_size, config.projector_stack
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self.generation_config = self.language_model.generation_config  # generate() runs the LLM's

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Stock ``from_pretrained``, with the LLM's class imported first (before any ZeRO-3 ``zero.Init``).

        Why: ``__init__`` builds the LLM with ``AutoModelForCausalLM.from_config``, which imports its modeling
        module on first use. Under ZeRO-3 that first use happens inside DeepSpeed's ``zero.Init``, which wraps the
        ``__init__`` of every nn.Module class defined while it is active and, on exit, puts back the ``__init__`` it
        saw at class creation. transformers >= 5.25 decorates Qwen2/Qwen3 attention with kernels' (0.19)
        ``use_kernelized_func``, whose ``__init__`` (it sets ``_kernel_funcs``) is installed after class creation,
        so the exit drops it while the decorated ``forward`` stays: every model built afterwards (the DPO
        reference, the second of two loads) fails in forward with "'Qwen2Attention' object has no attribute
        '_kernel_funcs'" (DeepSpeed 0.19.8, transformers 5.25.0, kernels 0.19.1). Importing the class here, outside
        ``zero.Init``, leaves it unwrapped. Stock ``AutoModelForCausalLM.from_pretrained`` imports before it
        enters ``zero.Init`` too; composite models like this one (and stock Qwen2-Audio) do not.
        """
        # transformers >= 5.25 kernelizes every loaded model unless told not to (use_kernels defaults to True), and
        # on a GPU the first model.train() / .eval() then fetches kernels from the Hub ("kernels-community/rotary"):
        # offline, or from a publisher it cannot verify, that raises, and the SFT stage stopped at its first step
        # on an H200 (transformers 5.25.0, kernels 0.19.1). Hub kernels are downloaded code: off unless asked for.
        kwargs.setdefault("use_kernels", False)
        config = kwargs.get("config")
        if not isinstance(config, AudioLLMConfig):
            config = AudioLLMConfig.from_pretrained(pretrained_model_name_or_path,
                                                    trust_remote_code=kwargs.get("trust_remote_code", False))
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]  # the lookup imports the LLM's modeling module
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def enable_input_require_grads(self):
        """Hook only the LLM's token embeddings (used by checkpointing and peft).

        The stock version hooks every sub-model's input layer, the audio tower's conv1 included: a frozen encoder
        would then build a graph, be recomputed in backward and backpropagate into nothing.
        """

        def require_grad(module, args, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(require_grad)]
        self._require_grads_hook = self._require_grads_hooks[0]

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        """Save as usual, but write the LM head even when it is tied to the input embeddings.

        Stock Qwen2AudioForConditionalGeneration never ties its ``lm_head``, so a tied LLM (Qwen2.5-0.5B/1.5B,
        Qwen3-0.6B...) saved without the head would load there with a random one.
        """
        head, embed = self.get_output_embeddings(), self.get_input_embeddings()
        if head is not None and head.weight is embed.weight:
            names = {module: name for name, module in self.named_modules()}
            state_dict = dict(state_dict if state_dict is not None else self.state_dict())
            state_dict[f"{names[head]}.weight"] = state_dict[f"{names[embed]}.weight"].clone()
        if not self.save_ctc_head:
            state_dict = {k: v for k, v in (state_dict if state_dict is not None else self.state_dict()).items()
                          if not k.startswith(HEAD_PREFIX)}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)

    def encode_audio(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(C, n_mels, T) chunks -> (sum of real tokens over chunks, hidden), chunk by chunk in order."""
        return self.project_audio(*self.audio_frames(input_features, feature_attention_mask))

    def audio_frames(self, input_features, feature_attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, n_mels, T) chunks -> the encoder's (C, N, D) 25 Hz frames, zero past each chunk's (C,) lengths."""
        frames, lengths = self.audio_tower(input_features, feature_attention_mask)  # (C, N, D), (C,)
        real = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
        return frames * real[..., None].to(frames.dtype), lengths  # a stack projector's last group sees zeros

    def project_audio(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(C, N, D) frames, (C,) lengths -> (sum of real tokens over chunks, hidden)."""
        tokens = self.multi_modal_projector(frames)  # (C, ceil(N / k), hidden)
        stacked = (lengths + self.config.projector_stack - 1) // self.config.projector_stack
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < stacked[:, None]
        return tokens[keep]

    def _silent_chunk(self) -> torch.Tensor:
        """The smallest input that yields one audio token: 3 mel frames of zeros, (1, n_mels, 3)."""
        weight = self.audio_tower.conv1.weight
        return torch.zeros(1, self.config.audio_config.num_mel_bins, 3, dtype=weight.dtype, device=weight.device)

    def embed(self, input_ids, input_features=None, feature_attention_mask=None) -> torch.Tensor:
        """Token embeddings with the audio tokens written into the ``<|AUDIO|>`` positions, in order."""
        return self._embed(input_ids, input_features, feature_attention_mask)[0]

    def _embed(self, input_ids, input_features, feature_attention_mask) -> tuple:
        """(B, S, hidden) embeddings, and the encoder's (C, N, D) frames with their (C,) lengths (None when the
        batch has no audio outside training)."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, S, hidden)
        slots = input_ids == self.config.audio_token_id
        if input_features is None:
            if slots.any():
                raise ValueError(f"input_ids hold {int(slots.sum())} <|AUDIO|> tokens but no input_features")
            if self.training:  # a text-only batch still runs the audio path: ZeRO-3 / DDP ranks must agree
                frames, lengths = self.audio_frames(self._silent_chunk(), None)
                return embeds + 0.0 * self.project_audio(frames, lengths).sum(), frames, lengths
            return embeds, None, None
        frames, lengths = self.audio_frames(input_features, feature_attention_mask)
        audio = self.project_audio(frames, lengths)
        if audio.shape[0] != int(slots.sum()):
            raise ValueError(
                f"the audio gives {audio.shape[0]} tokens but input_ids hold {int(slots.sum())} <|AUDIO|> "
                "placeholders: expand each clip's placeholder to audio_token_count() copies"
            )
        return embeds.masked_scatter(slots[..., None], audio.to(embeds.dtype)), frames, lengths

    def _ctc_term(self, frames, lengths, ctc: dict) -> torch.Tensor:
        """The CTC loss of this batch's frames (0, still touching the head, for chunks without targets)."""
        targets = ctc.get(CTC_TARGETS, torch.zeros(0, dtype=torch.long))
        target_lengths = ctc.get(CTC_LENGTHS, torch.zeros(frames.shape[0], dtype=torch.long))
        if self.audio_tower.tap_layer:  # intermediate CTC: an inner layer's frames, same lengths
            frames = self.audio_tower.tapped
        return ctc_loss(self.ctc_head, frames, lengths, targets, target_lengths)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Same inputs as Qwen2AudioForConditionalGeneration; the LLM computes the loss from ``labels``.

        Packed batches (audiollm/packing.py) come with ``position_ids`` restarting at 0 per row and no
        ``attention_mask``; both go on to the LLM, whose mask builder then isolates the rows. With
        ``loss_chunk_tokens`` set, the loss is the memory-lean one and no logits are returned.
        ``pack_rows=N`` (a right-padded batch, as TRL's DPO hands it over): the LLM runs the rows packed into
        sequences of at most N tokens (0: one sequence) and its per-token outputs come back in the padded layout.
        """
        ctc = {key: kwargs.pop(key) for key in (*CTC_KEYS, CTC_DIVISOR) if key in kwargs}  # audiollm/ctc.py
        aux = None
        if inputs_embeds is None:
            inputs_embeds, frames, lengths = self._embed(input_ids, input_features, feature_attention_mask)
            if getattr(self, "ctc_head", None) is not None and self.training and labels is not None:
                aux = self._ctc_term(frames, lengths, ctc)
        out = self._llm_forward(inputs_embeds, attention_mask, labels, **kwargs)
        if aux is not None:
            out.loss = out.loss + self.ctc_weight * aux / ctc.get(CTC_DIVISOR, 1)
            self.last_ctc_loss = aux.detach()  # logged by the stage's trainer
        return out

    def _llm_forward(self, inputs_embeds, attention_mask, labels, **kwargs):
        """The LLM on the embedded batch: packed rows, the lean or distillation loss, or its own."""
        pack_rows = kwargs.pop("pack_rows", None)
        distill = kwargs.pop("distill", None)  # a TeacherOutput (audiollm/distill.py): the distillation loss
        if pack_rows is not None and attention_mask is not None:
            return self._packed_rows_forward(inputs_embeds, attention_mask, labels, int(pack_rows), **kwargs)
        if attention_mask is None and kwargs.get("position_ids") is not None:
            # A packed batch: transformers detects the rows only when no cache exists, and a model in its default
            # use_cache=True state would create one (and silently let the rows attend to each other).
            kwargs["use_cache"] = False
        if labels is not None and not kwargs.get("fused_lm_head") and not bool((labels[:, 1:] != -100).any()):
            # Nothing to learn (the collator skipped every row of the batch): a zero loss through the whole model
            # where the LLM's mean would be 0 / 0; every rank still runs forward and backward in step.
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
            out.loss = out.logits.float().sum() * 0.0
            return out
        if labels is not None and distill is not None:
            return self._distill_forward(inputs_embeds, attention_mask, labels, distill, **kwargs)
        if labels is not None and self.loss_chunk_tokens > 0 and not kwargs.get("fused_lm_head"):
            return self._lean_loss_forward(inputs_embeds, attention_mask, labels, **kwargs)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _packed_rows_forward(self, inputs_embeds, attention_mask, labels, max_tokens: int, **kwargs):
        """(R, S) padded rows -> the LLM on (P, W) packed sequences -> outputs in the (R, S) layout.

        Per-token outputs of W - 1 predictions (TRL's fused ``log_probs``, ``entropy``, ...) come back as (R, S - 1),
        per-position ones (``logits``) as (R, S), zero where the padded batch has padding; a row's values are the
        ones it gets alone. The loss covers the same labelled tokens (each row's first token is never labelled).
        """
        plan = plan_rows(attention_mask, max_tokens)
        labels = labels if labels is not None else torch.full_like(attention_mask, IGNORE_INDEX, dtype=torch.long)
        embeds, positions, packed_labels = pack_rows(inputs_embeds, labels, plan)
        kwargs["use_cache"] = False  # as for any packed batch: a cache would hide the row boundaries
        out = self.language_model(inputs_embeds=embeds, position_ids=positions, labels=packed_labels, **kwargs)
        for key, value in list(out.items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == plan.shape[0]:
                if value.shape[1] in (plan.shape[1] - 1, plan.shape[1]):
                    out[key] = unpack_rows(value, plan, shifted=value.shape[1] == plan.shape[1] - 1)
        return out

    def _backbone(self, inputs_embeds, attention_mask, **kwargs) -> torch.Tensor:
        """The LLM without its head: (B, S, hidden) final hidden states."""
        kwargs["use_cache"] = False
        backbone = self.language_model.get_decoder()
        return backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).last_hidden_state

    def _lean_loss_forward(self, inputs_embeds, attention_mask, labels, num_items_in_batch=None, **kwargs):
        """The LLM's backbone, then the chunked loss over labelled positions only: (B, S, V) logits never exist."""
        hidden = self._backbone(inputs_embeds, attention_mask, **kwargs)
        loss = chunked_causal_lm_loss(hidden, labels, self.language_model.get_output_embeddings(),
                                      num_items_in_batch, self.loss_chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    def _distill_forward(self, inputs_embeds, attention_mask, labels, distill, num_items_in_batch=None, **kwargs):
        """The backbone, then distillation on the teacher's answer tokens and cross-entropy on the rest, chunked
        like the lean loss (logits only for labelled positions)."""
        hidden = self._backbone(inputs_embeds, attention_mask, **kwargs)
        loss = distill_loss(hidden, labels, self.language_model.get_output_embeddings(), distill,
                            num_items_in_batch, self.loss_chunk_tokens or DEFAULT_CHUNK_TOKENS)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None, **kwargs):
        """Batched generation (pad on the left). Returns prompt ids followed by new ids, like stock ``generate``."""
        embeds = self.embed(input_ids, input_features, feature_attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new_ids = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new_ids.to(input_ids.device)], dim=1)
