"""Build a model folder from parts: a Whisper encoder + a causal LLM + a fresh projector, written as one HF folder.

Sources the encoder can come from:
- a Hugging Face Whisper folder (``WhisperForConditionalGeneration`` or ``WhisperModel``, safetensors or a
  ``pytorch_model.bin`` read with ``weights_only=True``);
- an OpenAI Whisper ``.pt`` (``{"dims": ..., "model_state_dict": ...}``), read with ``weights_only=True``.

The Qwen2-Audio audio tower uses the Hugging Face WhisperEncoder's parameter names, so an HF encoder maps by
stripping its prefix and an OpenAI one by a fixed renaming table. The written folder holds the model (safetensors),
the tokenizer with the audio tokens and ``CHAT_TEMPLATE``, a stock ``Qwen2AudioProcessor`` and a generation config;
a linear-projector folder is a stock Qwen2-Audio checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    Qwen2AudioEncoderConfig,
    Qwen2AudioProcessor,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from audiollm.audio import MAX_FRAMES
from audiollm.chat import AUDIO_SPECIAL_TOKENS, AUDIO_TOKEN, CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START
from audiollm.model.config import AudioLLMConfig
from audiollm.model.encoder import AudioEncoder
from audiollm.model.modeling import AudioLLMForConditionalGeneration
from audiollm.model.projector import build_projector
from audiollm.tiny import tiny_audio_config, tiny_text_config, tiny_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODER_POSITIONS = MAX_FRAMES // 2  # 1500: conv2 has stride 2 and the encoder must cover a 30 s chunk
HF_WHISPER_PREFIXES = ("model.encoder.", "encoder.", "")  # ForConditionalGeneration, WhisperModel, bare encoder
EMBED_ROW_MULTIPLE = 64  # a grown vocabulary is rounded up so the (hidden x vocab) lm_head matmul stays aligned

# OpenAI Whisper encoder name -> HF / Qwen2-Audio audio_tower name (regex on the name without "encoder.").
OPENAI_ENCODER_RENAMES = (
    (r"^conv([12])\.(weight|bias)$", r"conv\1.\2"),
    (r"^positional_embedding$", "embed_positions.weight"),
    (r"^blocks\.(\d+)\.attn\.query\.(weight|bias)$", r"layers.\1.self_attn.q_proj.\2"),
    (r"^blocks\.(\d+)\.attn\.key\.weight$", r"layers.\1.self_attn.k_proj.weight"),  # Whisper's key has no bias
    (r"^blocks\.(\d+)\.attn\.value\.(weight|bias)$", r"layers.\1.self_attn.v_proj.\2"),
    (r"^blocks\.(\d+)\.attn\.out\.(weight|bias)$", r"layers.\1.self_attn.out_proj.\2"),
    (r"^blocks\.(\d+)\.attn_ln\.(weight|bias)$", r"layers.\1.self_attn_layer_norm.\2"),
    (r"^blocks\.(\d+)\.mlp\.0\.(weight|bias)$", r"layers.\1.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.2\.(weight|bias)$", r"layers.\1.fc2.\2"),
    (r"^blocks\.(\d+)\.mlp_ln\.(weight|bias)$", r"layers.\1.final_layer_norm.\2"),
    (r"^ln_post\.(weight|bias)$", r"layer_norm.\1"),
)


class BuildError(ValueError):
    """A source or destination that cannot be used; the message names the path and what to do."""


def _check_new_folder(out: Path) -> None:
    """Refuse a non-empty destination: stale shards or an old index next to new weights would load wrongly."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out}: already exists and is not an empty folder; choose a new --out or remove it")


# ----------------------------------------------------------------------------------------------------- encoders


def _check_encoder(config: Qwen2AudioEncoderConfig, state_dict: dict, source: Path) -> None:
    """Refuse an encoder the audio tower cannot run as trained, and names that do not fill it exactly."""
    if config.max_source_positions != ENCODER_POSITIONS:
        raise BuildError(
            f"{source}: the encoder has {config.max_source_positions} positions; the audio tower needs "
            f"{ENCODER_POSITIONS} (30 s chunks at 50 Hz), as every Whisper size has"
        )
    with torch.device("meta"):  # names and shapes only: no memory for a 635M-parameter large-v3 tower
        tower = AudioEncoder(config)
    try:
        tower.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise BuildError(f"{source}: the encoder weights do not fit the audio tower:\n{err}") from err


def _hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: a sharded index's shards, else the single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise BuildError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded or not) in this folder")


def _read_tensors(file: Path, keep) -> dict[str, torch.Tensor]:
    """Tensors whose names pass ``keep``; safetensors reads only those, a .bin is unpickled weights-only."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys() if keep(name)}
    try:  # weights_only: a pickle can run code; this refuses anything but tensors and plain containers
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise BuildError(f"{file}: not a plain weights file (torch.load weights_only=True refused it: {err})") from err
    return {name: tensor for name, tensor in state.items() if keep(name)}


def encoder_from_hf_whisper(path: str | os.PathLike) -> tuple[Qwen2AudioEncoderConfig, dict[str, torch.Tensor]]:
    """A local HF Whisper folder -> (audio tower config, audio tower state dict).

    The Qwen2-Audio tower has the HF WhisperEncoder's names, so mapping is stripping the encoder prefix
    (``model.encoder.`` for WhisperForConditionalGeneration, ``encoder.`` for WhisperModel).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BuildError(f"{folder}: no config.json; pass a Hugging Face Whisper folder or an OpenAI Whisper .pt")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "whisper":
        raise BuildError(f"{config_file}: model_type is {model_type!r}, expected 'whisper'")
    whisper_config = WhisperConfig.from_pretrained(folder)
    if whisper_config.scale_embedding:
        raise BuildError(
            f"{config_file}: scale_embedding=true is not supported by the audio tower (Whisper uses false)"
        )
    config = Qwen2AudioEncoderConfig(
        num_mel_bins=whisper_config.num_mel_bins,
        encoder_layers=whisper_config.encoder_layers,
        encoder_attention_heads=whisper_config.encoder_attention_heads,
        encoder_ffn_dim=whisper_config.encoder_ffn_dim,
        d_model=whisper_config.d_model,
        max_source_positions=whisper_config.max_source_positions,
        activation_function=whisper_config.activation_function,
        dropout=whisper_config.dropout,
        attention_dropout=whisper_config.attention_dropout,
        activation_dropout=whisper_config.activation_dropout,
        initializer_range=whisper_config.init_std,
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(folder):
        tensors.update(_read_tensors(file, lambda name: "decoder." not in name and not name.startswith("proj_out")))
    prefix = next((p for p in HF_WHISPER_PREFIXES if f"{p}conv1.weight" in tensors), None)
    if prefix is None:
        raise BuildError(f"{folder}: no encoder.conv1.weight in the weights; is this a Whisper checkpoint?")
    state_dict = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
    _check_encoder(config, state_dict, folder)
    log.info("encoder: %s (HF Whisper, %d tensors under %r)", folder, len(state_dict), prefix)
    return config, state_dict


def _openai_encoder_name(name: str) -> str | None:
    """OpenAI encoder parameter name (without ``encoder.``) -> audio tower name; None when no rule matches."""
    for pattern, target in OPENAI_ENCODER_RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _load_openai_whisper(file: Path):
    """Load an OpenAI Whisper .pt weights-only and validate it strictly against a ``Whisper`` built from its dims."""
    import whisper.model
    from transformers.initialization import no_init_weights

    try:  # never weights_only=False: an arbitrary pickle runs code on load
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BuildError(
            f"{file}: torch.load(weights_only=True) refused this file; an OpenAI Whisper checkpoint holds only "
            f"'dims' and tensors ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        raise BuildError(f"{file}: expected a dict with 'dims' and 'model_state_dict' (an OpenAI Whisper .pt)")
    try:
        dims = whisper.model.ModelDimensions(**checkpoint["dims"])
    except TypeError as err:
        raise BuildError(f"{file}: 'dims' is not Whisper's ModelDimensions: {err}") from err
    with no_init_weights():  # the random init would be overwritten at once: large-v3 is 1.55B parameters
        model = whisper.model.Whisper(dims)
    try:
        model.load_state_dict(checkpoint["model_state_dict"], strict=True, assign=True)
    except RuntimeError as err:
        raise BuildError(f"{file}: the weights do not match the checkpoint's own dims {dims}:\n{err}") from err
    return model


def encoder_from_openai_pt(path: str | os.PathLike) -> tuple[Qwen2AudioEncoderConfig, dict[str, torch.Tensor]]:
    """An OpenAI Whisper checkpoint (``large-v3.pt``: ``{"dims", "model_state_dict"}``) -> (config, state dict).

    The whole checkpoint is validated first, so a truncated or mismatched file fails here, naming the file, not
    later in training; then the encoder's tensors are renamed by ``OPENAI_ENCODER_RENAMES``.
    """
    file = Path(path)
    whisper_model = _load_openai_whisper(file)
    dims = whisper_model.dims
    state_dict = {}
    for name, tensor in whisper_model.encoder.state_dict().items():
        target = _openai_encoder_name(name)
        if target is None:
            raise BuildError(f"{file}: encoder tensor {name!r} has no audio tower counterpart")
        state_dict[target] = tensor
    config = Qwen2AudioEncoderConfig(
        num_mel_bins=dims.n_mels,
        encoder_layers=dims.n_audio_layer,
        encoder_attention_heads=dims.n_audio_head,
        encoder_ffn_dim=4 * dims.n_audio_state,  # Whisper's MLP is always 4x wide
        d_model=dims.n_audio_state,
        max_source_positions=dims.n_audio_ctx,
    )
    _check_encoder(config, state_dict, file)
    log.info("encoder: %s (OpenAI Whisper, %d tensors)", file, len(state_dict))
    return config, state_dict


# --------------------------------------------------------------------------------------------------------- LLM


def load_llm(path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False):
    """A local HF causal-LM folder -> (model, tokenizer). Remote code runs only when the user asks for it."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BuildError(f"{folder}: no config.json; pass a local Hugging Face causal-LM folder (e.g. Qwen2.5-7B)")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                               use_kernels=False)  # no Hub kernels (downloaded code)
    log.info("LLM: %s (%s, %s)", folder, type(llm).__name__, dtype)
    return llm, tokenizer


def add_audio_tokens(tokenizer, llm: PreTrainedModel) -> int:
    """Add ``<|audio_bos|> <|AUDIO|> <|audio_eos|>`` where missing; grow the embeddings only if they must.

    Qwen2.5's embedding matrix has spare rows (151,936 rows for 151,665 tokens), so the new ids usually fit; an LLM
    without spare rows is resized (mean-initialised rows, rounded up to a multiple of 64). Returns the
    ``<|AUDIO|>`` id.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in AUDIO_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        log.info("tokenizer: added %s as special tokens (ids %s)", missing, tokenizer.convert_tokens_to_ids(missing))
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBED_ROW_MULTIPLE)
        new_rows = llm.get_input_embeddings().weight.shape[0]
        log.info("LLM: embeddings resized from %d to %d rows for %d tokens", rows, new_rows, len(tokenizer))
    return tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)


# ------------------------------------------------------------------------------------------------ the whole model


def assemble(
    encoder_config: Qwen2AudioEncoderConfig,
    encoder_state_dict: dict[str, torch.Tensor],
    llm: PreTrainedModel,
    tokenizer,
    projector: str = "linear",
    stack: int = 4,
    seed: int = 0,
) -> AudioLLMForConditionalGeneration:
    """Encoder weights + a loaded LLM + a random projector -> one model. Call ``add_audio_tokens`` first.

    The shell is built on the meta device, so no random 7B LLM is ever allocated: the encoder weights are loaded
    into it strictly and the loaded LLM module itself takes the language model's place.
    """
    audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_token_id is None or audio_token_id == tokenizer.unk_token_id:
        raise BuildError(f"the tokenizer has no {AUDIO_TOKEN} token: call add_audio_tokens first")
    config = AudioLLMConfig(
        audio_config=encoder_config.to_dict(),
        text_config=llm.config,
        audio_token_index=audio_token_id,
        projector_type=projector,
        projector_stack=stack,
    )
    with torch.device("meta"):
        model = AudioLLMForConditionalGeneration(config)
    model.audio_tower.load_state_dict(encoder_state_dict, strict=True, assign=True)
    model.language_model = llm
    model.config.text_config = llm.config  # one config object, so a later resize shows in the saved config
    torch.manual_seed(seed)
    model.multi_modal_projector = build_projector(
        config.projector_type, encoder_config.d_model, llm.config.hidden_size, config.projector_stack
    )
    model.multi_modal_projector.apply(model._init_weights)  # HF init: normal(0, initializer_range), zero bias
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise BuildError(f"tensors without values after assembly: {left_on_meta[:5]}")
    return model


def parameter_counts(model: AudioLLMForConditionalGeneration) -> dict[str, int]:
    """Parameters per part; a tied lm_head counts once (``parameters()`` skips shared tensors)."""
    parts = {
        "audio_tower": model.audio_tower,
        "multi_modal_projector": model.multi_modal_projector,
        "language_model": model.language_model,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _generation_config(tokenizer) -> GenerationConfig:
    """Stop on ``<|im_end|>`` (end of a chat turn) or ``<|endoftext|>`` (end of a document), like Qwen2-Audio."""
    vocab = tokenizer.get_vocab()
    eos = [vocab[token] for token in (IM_END, ENDOFTEXT) if token in vocab]
    eos = eos or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def save_model_folder(model: AudioLLMForConditionalGeneration, tokenizer, out: str | os.PathLike) -> Path:
    """Write model, tokenizer, processor and generation config into one new (or empty) folder."""
    out = Path(out)
    _check_new_folder(out)
    vocab = tokenizer.get_vocab()
    for token in (IM_START, IM_END):
        if token not in vocab:
            log.warning("tokenizer has no %s token: the ChatML template will be tokenized as plain text", token)
    if tokenizer.pad_token is None:  # Qwen pads with <|endoftext|>; batching needs some pad id
        tokenizer.pad_token = ENDOFTEXT if ENDOFTEXT in vocab else tokenizer.eos_token
        log.info("tokenizer: pad token set to %s", tokenizer.pad_token)
    tokenizer.chat_template = CHAT_TEMPLATE

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=model.config.audio_config.num_mel_bins)
    feature_extractor.save_pretrained(out)  # preprocessor_config.json, for readers that load it on its own
    # The processor also writes the tokenizer files and chat_template.jinja, so AutoProcessor/AutoTokenizer load.
    Qwen2AudioProcessor(feature_extractor, tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    _generation_config(tokenizer).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------- entry points


def from_qwen2_audio(path: str | os.PathLike, out: str | os.PathLike) -> AudioLLMForConditionalGeneration:
    """A released Qwen2-Audio folder (config model_type qwen2_audio) -> a folder written by this package."""
    folder = Path(path)
    _check_new_folder(Path(out))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BuildError(f"{folder}: no config.json; pass a local Qwen2-Audio folder (e.g. Qwen2-Audio-7B-Instruct)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "qwen2_audio":
        raise BuildError(f"{config_file}: model_type is {model_type!r}, expected 'qwen2_audio'")
    model = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype="auto")  # keep the stored dtype
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if token_id != model.config.audio_token_id:
        raise BuildError(
            f"{folder}: the tokenizer's {AUDIO_TOKEN} id is {token_id} but config.json's audio_token_index is "
            f"{model.config.audio_token_id}"
        )
    save_model_folder(model, tokenizer, out)
    return model


def build_tiny(
    out: str | os.PathLike,
    projector: str = "linear",
    stack: int = 4,
    llm_type: str = "qwen2",
    tie: bool = False,
    seed: int = 0,
    size: str = "test",
) -> AudioLLMForConditionalGeneration:
    """A tiny random model for tests ("test": width 64, 2 layers) and the CPU demo ("demo": width 128, 4 layers).

    Same seed, same weights."""
    tokenizer = tiny_tokenizer()
    config = AudioLLMConfig(
        audio_config=tiny_audio_config(size),
        text_config=tiny_text_config(len(tokenizer), llm_type, tie, size),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        projector_type=projector,
        projector_stack=stack,
    )
    torch.manual_seed(seed)
    model = AudioLLMForConditionalGeneration(config)
    save_model_folder(model, tokenizer, out)
    return model


def init_model(
    encoder: str | os.PathLike,
    llm: str | os.PathLike,
    out: str | os.PathLike,
    projector: str = "linear",
    stack: int = 4,
    dtype: str = "bf16",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> AudioLLMForConditionalGeneration:
    """Whisper encoder (HF folder or OpenAI .pt) + LLM folder -> a new model folder at ``out``."""
    encoder, llm, out = Path(encoder), Path(llm), Path(out)
    if dtype not in DTYPES:
        raise BuildError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for path, what in ((encoder, "encoder"), (llm, "LLM")):
        if not path.exists():
            raise BuildError(f"{path}: {what} not found")
    _check_new_folder(out)  # before minutes of loading, not only when saving
    if encoder.is_dir():
        encoder_config, encoder_state_dict = encoder_from_hf_whisper(encoder)
    elif encoder.suffix == ".pt":
        encoder_config, encoder_state_dict = encoder_from_openai_pt(encoder)
    else:
        raise BuildError(f"{encoder}: unknown encoder kind; pass a Hugging Face Whisper folder or an OpenAI .pt file")
    llm_model, tokenizer = load_llm(llm, DTYPES[dtype], trust_remote_code)
    add_audio_tokens(tokenizer, llm_model)
    model = assemble(encoder_config, encoder_state_dict, llm_model, tokenizer, projector, stack, seed)
    model.to(DTYPES[dtype])  # the encoder arrives in its file's dtype (fp16 for OpenAI large-v3)
    save_model_folder(model, tokenizer, out)
    return model
