"""Export a trained model as a Hugging Face folder (and optionally push it to the Hub): ``export()``.

The command line (``audiollm export ...``) is in ``audiollm.export_cli``.

Inputs (read by ``audiollm.export_sources``): a model folder, a Trainer ``checkpoint-N`` with ZeRO shards, or a
peft LoRA adapter on a base folder (merged with ``--merge-lora``; stock transformers needs full weights).

Formats: ``qwen2_audio`` is a stock Qwen2-Audio checkpoint (linear projector, a causal LM that transformers knows):
``Qwen2AudioForConditionalGeneration`` and the ``AutoModelForMultimodalLM`` / ``AutoModelForSeq2SeqLM`` /
``AutoModelForPreTraining`` classes load it with ``AutoProcessor``, no custom code. ``native`` keeps the other
projectors and loads with ``audiollm.model.modeling.AudioLLMForConditionalGeneration``.

The folder is written into a temporary sibling and renamed into place, so ``--out`` is either complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from audiollm import model_card
from audiollm.build import DTYPES, parameter_counts
from audiollm.export_choices import FORMATS
from audiollm.export_sources import ExportError, Source, load_source, source_config
from audiollm.model.config import STOCK_ARCHITECTURE, STOCK_MODEL_TYPE
from audiollm.model.modeling import AudioLLMForConditionalGeneration

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"  # the Hub's recommended shard size; a 7B model in bf16 is 4 shards
PROJECTOR_KEYS = ("projector_type", "projector_stack")  # AudioLLMConfig's additions; stock ignores them
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # Gemma-2, Cohere, Granite
PATH_KEYS = ("_name_or_path", "name_or_path")  # where transformers records the folder a config was loaded from
HUB_CONNECT_TIMEOUT_S = 10  # seconds the Hub may take to answer before an upload is given up
CHECK_SECONDS = 5.0  # the padding check's synthetic clip: 500 mel frames unpadded vs 3000 padded


# --------------------------------------------------------------------------------------------------- format


def _llm_misfit(config, model) -> str | None:
    """Why stock Qwen2-Audio could not run this LLM as trained.

    The stock class builds ``AutoModel.from_config(text_config)`` plus its own bias-free ``lm_head`` and computes
    ``logits = lm_head(hidden)``: the LLM must be a base model under ``.model`` with a plain Linear head, and must
    not rescale or soft-cap its logits (Gemma-2, Cohere and Granite do; stock Qwen2-Audio would skip it).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    text = config.text_config
    if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or text.model_type not in MODEL_MAPPING_NAMES:
        return f"the LLM's model_type {text.model_type!r} is not a causal LM that stock transformers knows"
    transforms = [key for key in LOGIT_TRANSFORM_KEYS if getattr(text, key, None) not in (None, 1, 1.0)]
    if transforms:
        return f"the LLM ({text.model_type}) transforms its logits ({', '.join(transforms)}); Qwen2-Audio does not"
    if model is not None:
        llm = model.language_model
        head = getattr(llm, "lm_head", None)
        if not (hasattr(llm, "model") and isinstance(head, torch.nn.Linear) and head.bias is None):
            return (f"the LLM ({type(llm).__name__}) is not a base model under .model with a bias-free lm_head, "
                    "the layout Qwen2-Audio's weights use")
    return None


def stock_misfit(config, model=None) -> str | None:
    """Why Qwen2-Audio's architecture cannot hold this model, or None when it can (``model`` adds layout checks)."""
    if config.projector_type == "mlp":
        return "projector 'mlp' has two layers (Linear, GELU, Linear); Qwen2-Audio's projector is one Linear"
    if config.projector_type == "stack":
        return (f"projector 'stack' concatenates {config.projector_stack} frames per token and has two layers; "
                "Qwen2-Audio's projector is one Linear on each 25 Hz frame")
    return _llm_misfit(config, model)


def resolve_format(config, requested: str, model=None) -> str:
    """"auto" -> qwen2_audio when the model fits it, else native; "qwen2_audio" on a misfit is an error."""
    if requested not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {requested!r}")
    misfit = stock_misfit(config, model)
    if requested == "qwen2_audio" and misfit:
        raise ExportError(f"cannot export as qwen2_audio: {misfit}; use --format native (loads with audiollm)")
    if requested == "auto":
        return "native" if misfit else "qwen2_audio"
    return requested


# ------------------------------------------------------------------------------------------------- writing


def _first_with(folders: list[Path], name: str) -> Path | None:
    return next((folder for folder in folders if (folder / name).is_file()), None)


def load_processor_parts(folders: list[Path], n_mels: int):
    """(tokenizer, feature extractor, generation config) from the first folder that has each.

    A mid-run checkpoint has a tokenizer but no processor files until the run's final save: the feature
    extractor then falls back to Whisper's defaults for ``n_mels`` bins (what ``audiollm init`` writes).
    """
    from transformers import AutoTokenizer, GenerationConfig, WhisperFeatureExtractor

    from audiollm.build import _generation_config

    tokenizer_dir = _first_with(folders, "tokenizer_config.json")
    if tokenizer_dir is None:
        raise ExportError(f"no tokenizer in {', '.join(map(str, folders))}; pass --base PATH (the folder the run "
                          "started from)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extractor_dir = _first_with(folders, "preprocessor_config.json")
    if extractor_dir is not None:
        extractor = WhisperFeatureExtractor.from_pretrained(extractor_dir)
    else:
        log.info("no preprocessor_config.json in %s: Whisper's defaults for %d mel bins", folders, n_mels)
        extractor = WhisperFeatureExtractor(feature_size=n_mels)
    generation_dir = _first_with(folders, "generation_config.json")
    generation = GenerationConfig.from_pretrained(generation_dir) if generation_dir else _generation_config(tokenizer)
    return tokenizer, extractor, generation


def _drop_keys(value, keys: tuple[str, ...]):
    """``value`` (JSON) with ``keys`` removed at every depth."""
    if isinstance(value, dict):
        return {k: _drop_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_drop_keys(v, keys) for v in value]
    return value


def _scrub_json(path: Path, keys: tuple[str, ...]) -> None:
    if path.is_file():
        path.write_text(json.dumps(_drop_keys(json.loads(path.read_text()), keys), indent=2) + "\n")


def write_folder(model, parts, folder: Path, fmt: str) -> None:
    """Weights (safetensors shards), config, tokenizer with chat template, processor, generation config."""
    from transformers import Qwen2AudioProcessor

    from audiollm.chat import CHAT_TEMPLATE

    tokenizer, extractor, generation = parts
    model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    extractor.save_pretrained(folder)  # preprocessor_config.json, for readers that load it on its own
    template = tokenizer.chat_template or CHAT_TEMPLATE
    tokenizer.chat_template = template
    Qwen2AudioProcessor(extractor, tokenizer, chat_template=template).save_pretrained(folder)
    generation.save_pretrained(folder)
    # A published config must not name the trainer's local folders; a stock config needs no projector keys.
    drop = PATH_KEYS + (PROJECTOR_KEYS if fmt == "qwen2_audio" else ())
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"):
        _scrub_json(folder / name, drop)
    config = json.loads((folder / "config.json").read_text())
    if fmt == "qwen2_audio" and (config["model_type"], config["architectures"]) != (STOCK_MODEL_TYPE,
                                                                                     [STOCK_ARCHITECTURE]):
        raise ExportError(f"internal: the written config is {config['model_type']}, not Qwen2-Audio")


@contextmanager
def atomic_folder(out: Path):
    """Yield a temporary sibling of ``out``; rename it to ``out`` on success, delete it on failure."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty folder; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # same filesystem: rename works
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------------- padding check


def synthetic_clip(seconds: float = CHECK_SECONDS, seed: int = 0) -> np.ndarray:
    """A speech-like 16 kHz clip (harmonics of a drifting pitch under a syllable envelope, light noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 5))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _unpadded_logits(folder: Path, clip: np.ndarray, question: str):
    """The project's path: unpadded features (the clip's frames + 2 edge frames) through audiollm's model."""
    from transformers import AutoTokenizer

    from audiollm.collator import ChatCollator

    model = AudioLLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    collator = ChatCollator(AutoTokenizer.from_pretrained(folder), stack=model.config.projector_stack,
                            generation=True)
    batch = collator([{"messages": [{"role": "user", "content": f"<audio>{question}"}], "audios": [clip]}])
    with torch.no_grad():
        return model(**batch).logits, batch, model


def _padded_logits_stock(folder: Path, clip: np.ndarray, question: str):
    """Stock transformers end to end: AutoProcessor pads to 30 s, Qwen2AudioForConditionalGeneration runs it."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                                 {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, audio=[clip], sampling_rate=16000, return_tensors="pt")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits, inputs


def _padded_logits_native(folder: Path, clip: np.ndarray, model, unpadded: dict):
    """audiollm's model on stock 30 s-padded features (the projector's own token count stays)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    features = extractor(clip, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                         return_tensors="pt")
    inputs = dict(unpadded, input_features=features["input_features"],
                  feature_attention_mask=features["attention_mask"])
    with torch.no_grad():
        return model(**inputs).logits, inputs


def padding_check(folder: str | os.PathLike, seconds: float = CHECK_SECONDS,
                  question: str = "What does the speaker say?") -> dict:
    """Max |logit difference| between the project's unpadded forward and a 30 s-padded forward, in fp32.

    A qwen2_audio folder is run padded by stock transformers (AutoProcessor + Qwen2AudioForConditionalGeneration),
    exactly as a user of the export would; a native folder by audiollm's model on the stock feature extractor's
    padded features. Both sides load the same exported weights.
    """
    folder = Path(folder)
    clip = synthetic_clip(seconds)
    stock = json.loads((folder / "config.json").read_text())["model_type"] == STOCK_MODEL_TYPE
    ours, unpadded, model = _unpadded_logits(folder, clip, question)
    if stock:
        del model  # one model in memory at a time: a 7B fp32 model is 30 GB
        padded, inputs = _padded_logits_stock(folder, clip, question)
        if not torch.equal(inputs["input_ids"], unpadded["input_ids"]):
            raise ExportError(f"{folder}: the stock processor and audiollm's collator tokenize the prompt "
                              "differently; check the chat template and the audio token count")
    else:
        padded, inputs = _padded_logits_native(folder, clip, model, unpadded)
    return {"max_abs_logit_diff": (ours - padded).abs().max().item(), "max_abs_logit": padded.abs().max().item(),
            "clip_seconds": seconds, "unpadded_frames": unpadded["input_features"].shape[-1],
            "padded_frames": inputs["input_features"].shape[-1],
            "padded_with": "stock Qwen2AudioForConditionalGeneration + AutoProcessor" if stock
            else "audiollm with stock 30 s features"}


# ------------------------------------------------------------------------------------------------- hub upload


def _check_reachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT_S) -> None:
    """Raise ConnectionError unless ``endpoint`` answers within ``timeout`` seconds.

    huggingface_hub's HTTP client has no timeout (``timeout=None``), so on a network that drops packets its first
    call would wait for the OS's TCP timeout (minutes). urllib honours the same proxy variables.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # any HTTP status means the Hub answered
    except OSError as err:  # DNS failure, refused connection, timeout (URLError is an OSError)
        raise ConnectionError(f"cannot reach {endpoint} within {timeout:g} s: {err}") from err


def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
         endpoint: str | None = None) -> str:
    """Upload ``folder`` to the Hub repo ``repo_id`` (created if missing); returns its URL.

    The token comes from huggingface_hub's usual places (HF_TOKEN, ``hf auth login``). Any failure (no network,
    offline mode, no token, no permission) becomes one ExportError that says the local folder is complete.
    """
    from huggingface_hub import HfApi, constants

    api = HfApi(endpoint=endpoint)
    try:
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _check_reachable(api.endpoint)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                          commit_message="Upload audiollm export")
    except Exception as err:  # network, auth and Hub errors come from several libraries; all mean "not uploaded"
        raise ExportError(f"upload to {repo_id} failed ({type(err).__name__}: {err}); the local folder {folder} "
                          f"is complete: retry later with `hf upload {repo_id} {folder}`") from err
    return f"{url}/tree/{revision}" if revision else str(url)


# ------------------------------------------------------------------------------------------------- the export


def _card_facts(source: Source, name: str, fmt: str, dtype: str, results, padding, license_, base_models):
    config = source.model.config
    training = model_card.training_record(source.folders)
    # Explicit --base-model ids win; otherwise what the folders recorded, kept only when it looks like a Hub id
    # (a relative local path like "models/qwen" can pass that test: --base-model settles it).
    recorded = [*(training or {}).get("base_model", []), *source.base_models,
                getattr(config.text_config, "_name_or_path", None), getattr(config.audio_config, "_name_or_path", None)]
    bases = list(dict.fromkeys(b for b in (base_models or recorded) if model_card.is_hub_id(b)))
    return model_card.CardFacts(
        name=name, format=fmt, dtype=dtype, projector=config.projector_type, projector_stack=config.projector_stack,
        encoder={"layers": config.audio_config.encoder_layers, "d_model": config.audio_config.d_model,
                 "mel_bins": config.audio_config.num_mel_bins},
        llm={"model_type": config.text_config.model_type, "layers": config.text_config.num_hidden_layers,
             "hidden_size": config.text_config.hidden_size, "vocab_size": config.text_config.vocab_size},
        parameters=parameter_counts(source.model), source_kind=source.kind, base_models=bases,
        datasets=model_card.datasets_of(training), license=license_, training=training, adapter=source.adapter,
        results=results, padding=padding)


def _read_results(results) -> dict | None:
    """An eval results.json (path or already-loaded dict), checked for the fields the card's table reads."""
    if results is None or isinstance(results, dict):
        return results
    path = Path(results)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: cannot read the eval results ({err}); pass eval's results.json") from err
    if not isinstance(data.get("tasks"), dict):
        raise ExportError(f"{path}: no 'tasks' object; pass the results.json that `audiollm eval` writes")
    return data


def export(model_path, out, format: str = "auto", dtype: str = "bf16", merge_lora: bool = False, results=None,
           push_to_hub: str | None = None, private: bool = False, revision: str | None = None, *,
           base: str | None = None, check: bool = False, license: str | None = None,
           base_models: list[str] | None = None) -> Path:
    """Export ``model_path`` to the new folder ``out``; see the module docstring. Returns ``out``.

    ``check`` runs ``padding_check`` on the written folder and records the number in the card. With
    ``push_to_hub`` the finished folder is uploaded; an upload failure raises after ``out`` is complete.
    """
    out = Path(out)
    if dtype not in DTYPES:  # the CLI's choices are export_choices.DTYPE_NAMES
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before minutes of loading
        raise ExportError(f"{out}: already exists and is not an empty folder; choose a new --out or remove it")
    results = _read_results(results)
    if not Path(model_path).is_dir():
        raise ExportError(f"{model_path}: not found; pass a model folder, a checkpoint-N folder or a LoRA adapter")
    resolve_format(source_config(model_path, base, merge_lora), format)  # fail before minutes of loading
    source = load_source(model_path, base, merge_lora)
    fmt = resolve_format(source.model.config, format, source.model)  # now with the loaded LLM's layout
    parts = load_processor_parts(source.folders, source.model.config.audio_config.num_mel_bins)
    with atomic_folder(out) as tmp:
        write_folder(source.model.to(DTYPES[dtype]), parts, tmp, fmt)
        padding = padding_check(tmp) if check else None
        if padding:
            log.info("unpadded vs 30 s-padded max |logit diff| = %.2e", padding["max_abs_logit_diff"])
        facts = _card_facts(source, push_to_hub or out.name, fmt, dtype, results, padding, license, base_models)
        (tmp / "README.md").write_text(model_card.render_card(facts), encoding="utf-8")
    log.info("wrote %s (%s format, %s)", out, fmt, dtype)
    if push_to_hub:
        log.info("uploaded: %s", push(out, push_to_hub, private, revision))
    return out
