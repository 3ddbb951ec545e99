"""Intelligibility of generated speech: transcribe it with a listener (an ASR model), score the transcript against
the text it was asked to say (WER after Whisper's normaliser; CER for zh/ja), as TTS papers report "WER by Whisper".

Listeners on disk (``load_transcriber``):
- an OpenAI Whisper ``.pt`` (``{"dims", "model_state_dict"}``), read with ``torch.load(weights_only=True)`` (a
  pickle can run code; weights-only refuses anything but tensors and plain containers) and run with openai-whisper;
- a Hugging Face Whisper folder (``WhisperForConditionalGeneration`` + ``WhisperProcessor``);
- an audio-LLM folder (ours or a stock Qwen2-Audio export), asked ``eval.tasks.ASR_PROMPT`` about each clip.

Every listener has ``.name`` and ``transcribe(wavs, language) -> list[str]`` over 16 kHz mono waveforms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from audiollm.audio import MIN_CHUNK_SAMPLES, SAMPLE_RATE
from eval import metrics
from eval.items import EvalError, Item

HF_CHUNK_SAMPLES = 30 * SAMPLE_RATE  # longer clips go through transformers' long-form (sequential) decoding
LISTENER_MODEL_TYPES = ("qwen2_audio", "audiollm")  # config.json model_type of folders eval.generate loads
LISTENER_ANSWER_TOKENS = 128  # transcript length cap: a seed-tts-eval sentence is ~20-40 tokens


class OpenAIWhisper:
    """An OpenAI-format checkpoint run by openai-whisper's own ``transcribe`` (greedy, no temperature fallback)."""

    def __init__(self, path: str, device: str | None = None):
        import whisper.model

        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            dims = whisper.model.ModelDimensions(**checkpoint["dims"])
        except Exception as err:
            raise EvalError(f"{path}: not an OpenAI Whisper checkpoint readable weights-only ({err})") from err
        self.model = whisper.model.Whisper(dims)
        self.model.load_state_dict(checkpoint["model_state_dict"], strict=True)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        self.name = Path(path).name

    def transcribe(self, wavs: Sequence[np.ndarray], language: str | None = "en") -> list[str]:
        import whisper

        on_gpu = next(self.model.parameters()).is_cuda
        return [
            whisper.transcribe(self.model, np.asarray(wav, dtype=np.float32), language=language, temperature=0.0,
                               fp16=on_gpu, condition_on_previous_text=False, verbose=None)["text"].strip()
            for wav in wavs
        ]


class HFWhisper:
    """A Hugging Face Whisper folder, batched through ``generate``."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 8):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        self.batch_size = batch_size
        self.name = Path(path).resolve().name

    def transcribe(self, wavs: Sequence[np.ndarray], language: str | None = "en") -> list[str]:
        texts = []
        for start in range(0, len(wavs), self.batch_size):
            texts += self._batch([np.asarray(w, dtype=np.float32) for w in wavs[start : start + self.batch_size]],
                                 language)
        return texts

    def _batch(self, wavs: list[np.ndarray], language: str | None) -> list[str]:
        long_form = max(len(w) for w in wavs) > HF_CHUNK_SAMPLES  # whole clips, not the first 30 s
        features = self.processor.feature_extractor(
            wavs, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
            **({"truncation": False, "padding": "longest"} if long_form else {}),
        )
        options = {}
        if getattr(self.model.generation_config, "is_multilingual", False):  # English-only models take no language
            options = {"language": language, "task": "transcribe"} if language else {"task": "transcribe"}
        with torch.no_grad():
            ids = self.model.generate(
                features["input_features"].to(self.model.device, self.model.dtype),
                attention_mask=features["attention_mask"].to(self.model.device), **options,
            )
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class AudioLLMTranscriber:
    """An audio-LLM folder (anything ``eval.generate.load_model`` loads) asked ``ASR_PROMPT`` about each clip, in
    batches, greedily: the prompt an eval asr item gets, so the transcripts are what ``audiollm eval`` would score.
    ``language`` is not told to the model (the trained ASR prompt names none); it only picks the scoring rule."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = LISTENER_ANSWER_TOKENS, dtype: str | None = None):
        from eval.generate import load_model

        self.model, self.tokenizer = load_model(path, device, dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.name = Path(path).resolve().name

    def transcribe(self, wavs: Sequence[np.ndarray], language: str | None = "en") -> list[str]:
        from eval.generate import GenerationSettings, generate_answers

        items = [Item(id=f"clip {i}", kind="asr", audios=[audible(wav)], language=language)
                 for i, wav in enumerate(wavs)]
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens)
        return generate_answers(self.model, self.tokenizer, items, settings, self.batch_size, desc="transcribe")


def audible(wav: np.ndarray) -> np.ndarray:
    """(n,) 16 kHz float32, zero-padded to the 25 ms that make one audio token: a TTS may stop after one short
    frame (XCodec2: 20 ms), and the listener's collator refuses anything shorter."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    return np.pad(wav, (0, max(0, MIN_CHUNK_SAMPLES - len(wav))))


def folder_model_type(folder: Path) -> str | None:
    """``model_type`` of a model folder's config.json (None when it names none)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise EvalError(f"{folder / 'config.json'}: not a readable model config ({err})") from err


def load_transcriber(path: str, device: str | None = None, batch_size: int = 8):
    """A listener -> an object with ``.name`` and ``transcribe(wavs, language)``: an OpenAI Whisper ``.pt`` file, a
    Hugging Face Whisper folder, or an audio-LLM folder (config.json model_type qwen2_audio or audiollm)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return OpenAIWhisper(path, device)
    if p.is_dir() and (p / "config.json").is_file():
        model_type = folder_model_type(p)
        if model_type in LISTENER_MODEL_TYPES:
            return AudioLLMTranscriber(path, device, batch_size)
        if model_type == "whisper":
            return HFWhisper(path, device, batch_size)
        raise EvalError(f"{p / 'config.json'}: model_type {model_type!r} is neither Whisper nor an audio LLM "
                        f"({', '.join(LISTENER_MODEL_TYPES)})")
    raise EvalError(f"{path}: not a listener; pass an OpenAI Whisper .pt file, a Hugging Face Whisper folder or "
                    "an audio-LLM folder (audiollm init / training output, or a stock Qwen2-Audio)")


def to_listener_rate(wavs: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    """Waveforms at ``sample_rate`` -> (n',) float32 at the listeners' 16 kHz (librosa's default soxr resampler)."""
    return [resample(wav, sample_rate, SAMPLE_RATE) for wav in wavs]


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """(n,) float32 at ``orig_sr`` -> (n * target_sr / orig_sr,) float32; unchanged when the rates agree."""
    import librosa

    wav = np.asarray(wav, dtype=np.float32)
    return wav if orig_sr == target_sr else librosa.resample(wav, orig_sr=orig_sr, target_sr=target_sr)


def transcript_wer(texts: Sequence[str], transcripts: Sequence[str], language: str | None = "en",
                   normalizer: str | None = None) -> dict:
    """Corpus WER (CER for zh/ja) of transcripts against the texts the speech was meant to say, after the
    normaliser ``normalizer`` (``eval.metrics.ASR_NORMALIZERS``; None: by language).

    Returns {"wer", "errors", "words", "n", "items": [{"text", "transcript", "errors", "words"}]}; "words" counts
    characters for zh/ja.
    """
    if len(texts) != len(transcripts):
        raise EvalError(f"{len(texts)} texts but {len(transcripts)} transcripts")
    items = []
    for text, transcript in zip(texts, transcripts):
        errors, words = metrics.asr_counts(text, transcript, language, normalizer)
        items.append({"text": text, "transcript": transcript, "errors": errors, "words": words})
    errors, words = sum(i["errors"] for i in items), sum(i["words"] for i in items)
    return {"wer": metrics.error_rate(errors, words), "errors": errors, "words": words, "n": len(items),
            "items": items}


def intelligibility(transcriber, wavs: Sequence[np.ndarray], texts: Sequence[str],
                    language: str | None = "en", normalizer: str | None = None) -> dict:
    """Transcribe 16 kHz mono waveforms and score them against ``texts`` (see ``transcript_wer``)."""
    result = transcript_wer(texts, transcriber.transcribe(list(wavs), language), language, normalizer)
    result["transcriber"] = transcriber.name
    return result
