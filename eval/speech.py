"""Intelligibility of generated speech: transcribe it with Whisper, score the transcript against the text it was
asked to say (WER after Whisper's normaliser; CER for zh/ja), as TTS papers report "WER by Whisper".

Any Whisper checkpoint on disk serves:
- an OpenAI ``.pt`` (``{"dims", "model_state_dict"}``), read with ``torch.load(weights_only=True)`` (a pickle can run
  code; weights-only refuses anything but tensors and plain containers) and run with openai-whisper;
- a Hugging Face Whisper folder (``WhisperForConditionalGeneration`` + ``WhisperProcessor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from audiollm.audio import SAMPLE_RATE
from eval import metrics
from eval.items import EvalError

HF_CHUNK_SAMPLES = 30 * SAMPLE_RATE  # longer clips go through transformers' long-form (sequential) decoding


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


def load_transcriber(path: str, device: str | None = None):
    """An OpenAI ``.pt`` file or a Hugging Face Whisper folder -> an object with ``transcribe(wavs, language)``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return OpenAIWhisper(path, device)
    if p.is_dir() and (p / "config.json").is_file():
        return HFWhisper(path, device)
    raise EvalError(f"{path}: not a Whisper checkpoint; pass an OpenAI .pt file or a Hugging Face Whisper folder")


def transcript_wer(texts: Sequence[str], transcripts: Sequence[str], language: str | None = "en") -> dict:
    """Corpus WER (CER for zh/ja) of transcripts against the texts the speech was meant to say.

    Returns {"wer", "errors", "words", "n", "items": [{"text", "transcript", "errors", "words"}]}; "words" counts
    characters for zh/ja.
    """
    if len(texts) != len(transcripts):
        raise EvalError(f"{len(texts)} texts but {len(transcripts)} transcripts")
    items = []
    for text, transcript in zip(texts, transcripts):
        errors, words = metrics.asr_counts(text, transcript, language)
        items.append({"text": text, "transcript": transcript, "errors": errors, "words": words})
    errors, words = sum(i["errors"] for i in items), sum(i["words"] for i in items)
    return {"wer": metrics.error_rate(errors, words), "errors": errors, "words": words, "n": len(items),
            "items": items}


def intelligibility(transcriber, wavs: Sequence[np.ndarray], texts: Sequence[str],
                    language: str | None = "en") -> dict:
    """Transcribe 16 kHz mono waveforms and score them against ``texts`` (see ``transcript_wer``)."""
    result = transcript_wer(texts, transcriber.transcribe(list(wavs), language), language)
    result["transcriber"] = transcriber.name
    return result
