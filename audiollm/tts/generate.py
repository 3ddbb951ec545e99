"""Speak: text -> speech tokens (constrained sampling) -> codec codes -> waveform.

    result = speak("runs/tts", "hello world")                                   # SpeechResult(wav, sample_rate..)
    result = speak(tts, text, prompt_audio="ref.wav", prompt_text="what ref says")   # zero-shot voice cloning
    result = speak(tts, text, best_of=4, verifier=ListenerVerifier("whisper.pt"))     # keep the best of 4
    for chunk in speak_stream(tts, text): ...                                       # audio as it is generated

Cloning follows LLaSA: the prompt transcript goes before the target text, and the prompt audio's tokens are
prefilled after SPEECH_START, so the model continues in that voice; the returned audio is the new part only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from audiollm.tts.codecs import Codec, load_codec, read_audio
from audiollm.tts.layout import TTSVocab, text_ids, word_ids
from audiollm.tts.sampling import Sampling, default_sampling, frame_cap, sample_speech, speech_tokens
from audiollm.tts.streaming import DEFAULT_HOP, FrameStreamer

# A verifier scores candidate waveforms for a text; higher is better: (wavs, sample_rate, text) -> scores.
Verifier = Callable[[Sequence[np.ndarray], int, str], Sequence[float]]


@dataclass
class TTSModel:
    """A trained tts folder, loaded: decoder LM, tokenizer, vocab (tts_config.json) and codec."""

    model: object
    tokenizer: object
    vocab: TTSVocab
    codec: Codec

    @property
    def per_frame(self) -> int:
        return self.vocab.token_layout.per_frame


def load_tts(model_dir: str | os.PathLike, codec_dir: str | None = None, device: str | None = None) -> TTSModel:
    """Load a folder written by ``audiollm train tts``; ``codec_dir`` overrides the codec path it recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = TTSVocab.load(model_dir)
    options = {"codebooks": vocab.token_layout.per_frame} if vocab.layout == "rvq" else {}
    codec = load_codec(codec_dir or vocab.codec, device, **options)
    if vocab.architecture == "csm":
        from audiollm.tts.csm_model import load_csm

        model, tokenizer, _ = load_csm(model_dir)
        return TTSModel(model.to(device).eval(), tokenizer, vocab, codec)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return TTSModel(model, AutoTokenizer.from_pretrained(model_dir), vocab, codec)


def as_tts(model: TTSModel | str | os.PathLike) -> TTSModel:
    return model if isinstance(model, TTSModel) else load_tts(model)


@dataclass
class Prompt:
    """What sampling starts from: prompt ids (ending with any prefilled speech tokens) and the cap."""

    ids: list[int]
    prefix_tokens: torch.Tensor  # (prompt_frames * per_frame,) layout indices of the cloning prompt
    max_frames: int
    words: list[list[int]] | None = None  # an interleaving vocab's per-word tokens of the text to speak

    @property
    def prefilled(self) -> int:
        return len(self.prefix_tokens)


def build_prompt(tts: TTSModel, text: str, prompt_audio: str | None = None, prompt_text: str | None = None,
                 ) -> Prompt:
    """The prompt ids for ``text`` (and a cloning prompt); the frame cap counts the prompt's frames too. With an
    interleaving vocab the cloning prompt's words go before its codes as one word (its word times are unknown)."""
    if (prompt_audio is None) != (prompt_text is None):
        raise ValueError("voice cloning needs both prompt_audio and prompt_text (the words of the prompt audio)")
    layout, prefix = tts.vocab.token_layout, torch.zeros(0, dtype=torch.long)
    full_text = text
    if prompt_audio is not None:
        prefix = layout.codes_to_tokens(tts.codec.encode(read_audio(prompt_audio, tts.codec.sample_rate)))
        full_text = f"{prompt_text.strip()} {text}"
    ids = text_ids(tts.tokenizer, tts.vocab, full_text)
    if tts.vocab.words and prompt_audio is not None:
        ids += [tts.vocab.text_start, *sum(word_ids(tts.tokenizer, prompt_text), [])]
    ids += (prefix + tts.vocab.code_offset).tolist()
    prompt_frames = len(prefix) // layout.per_frame
    words = word_ids(tts.tokenizer, text) if tts.vocab.words else None
    return Prompt(ids, prefix, prompt_frames + frame_cap(text, tts.codec.frame_rate), words)


@dataclass
class SpeechResult:
    """One spoken text: waveform (new speech only), codes and tokens, and best-of-N scores when used."""

    wav: np.ndarray  # (samples,) float32 at sample_rate
    sample_rate: int
    tokens: torch.Tensor  # all speech tokens (layout indices), cloning prompt first
    prompt_frames: int
    scores: list[float] = field(default_factory=list)
    chosen: int = 0

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


def decode_tokens(tts: TTSModel, tokens: torch.Tensor, prompt_frames: int) -> np.ndarray:
    """Layout tokens (prompt + new) -> waveform of the new frames. The prompt is decoded too, as context."""
    codes = tts.vocab.token_layout.tokens_to_codes(tokens)
    wav = tts.codec.decode(codes) if len(tokens) else np.zeros(0, dtype=np.float32)
    return wav[prompt_frames * tts.codec.samples_per_frame :]


def flat_candidates(tts: TTSModel, text: str, prompt_audio, prompt_text, sampling: Sampling, rows: int
                    ) -> tuple[list[torch.Tensor], int]:
    """(``rows`` sampled candidates as layout tokens, cloning prompt first; the prompt's frames)."""
    prompt = build_prompt(tts, text, prompt_audio, prompt_text)
    steps = list(sample_speech(tts.model, prompt.ids, tts.vocab, sampling, prompt.max_frames, rows=rows,
                               prefilled=prompt.prefilled, words=prompt.words))
    candidates = [torch.cat([prompt.prefix_tokens, new]) for new in speech_tokens(steps, tts.vocab)]
    return candidates, prompt.prefilled // tts.per_frame


def check_turns(tts: TTSModel, turns) -> None:
    if turns and tts.vocab.architecture != "csm":
        raise ValueError("conversational context (earlier turns) needs a csm model; a flat one clones by "
                         "prompt_audio / prompt_text")


def speak(model: TTSModel | str | os.PathLike, text: str, prompt_audio: str | None = None,
          prompt_text: str | None = None, best_of: int = 1, verifier: Verifier | None = None,
          sampling: Sampling | None = None, out_wav: str | None = None, turns: list | None = None
          ) -> SpeechResult:
    """Speak ``text``; with best_of > 1, sample that many candidates in one batch and keep the verifier's best.
    ``turns`` (csm only): earlier turns of the conversation, [(text, audio path or waveform), ...]."""
    tts = as_tts(model)
    if best_of > 1 and verifier is None:
        raise ValueError("best_of > 1 needs a verifier (e.g. ListenerVerifier) to choose among the candidates")
    check_turns(tts, turns)
    sampling = sampling or default_sampling(tts.vocab.layout)
    if tts.vocab.architecture == "csm":
        from audiollm.tts.csm_generate import csm_candidates

        candidates, frames = csm_candidates(tts, text, prompt_audio, prompt_text, sampling, best_of, turns)
    else:
        candidates, frames = flat_candidates(tts, text, prompt_audio, prompt_text, sampling, best_of)
    wavs = [decode_tokens(tts, tokens, frames) for tokens in candidates]
    scores = list(verifier(wavs, tts.codec.sample_rate, text)) if best_of > 1 else []
    best = int(np.argmax(scores)) if scores else 0
    result = SpeechResult(wavs[best], tts.codec.sample_rate, candidates[best], frames, scores, best)
    if out_wav:
        write_wav(out_wav, result.wav, result.sample_rate)
    return result


def flat_stream(tts: TTSModel, text: str, prompt_audio, prompt_text, sampling: Sampling):
    """(the cloning prompt's codes per level or None, an iterator of new frames as one code tensor per level)."""
    prompt = build_prompt(tts, text, prompt_audio, prompt_text)
    layout = tts.vocab.token_layout
    prefix = layout.tokens_to_codes(prompt.prefix_tokens) if prompt.prefilled else None

    def frames():
        frame: list[int] = []
        for step in sample_speech(tts.model, prompt.ids, tts.vocab, sampling, prompt.max_frames,
                                  prefilled=prompt.prefilled, words=prompt.words):
            token = int(step[0])
            if token == tts.vocab.speech_end:
                return
            if token < tts.vocab.code_offset:  # an interleaved word: not audio
                continue
            frame.append(token - tts.vocab.code_offset)
            if len(frame) == tts.per_frame:
                yield layout.tokens_to_codes(torch.tensor(frame))
                frame = []

    return prefix, frames()


def speak_stream(model: TTSModel | str | os.PathLike, text: str, prompt_audio: str | None = None,
                 prompt_text: str | None = None, sampling: Sampling | None = None, hop: int = DEFAULT_HOP,
                 context: tuple[int | None, int | None] | None = None, turns: list | None = None
                 ) -> Iterator[np.ndarray]:
    """Yield waveform chunks while sampling; their concatenation is the new speech (see ``streaming``).
    ``context``: the codec's stream context (left, right frames); ``turns`` (csm only): earlier turns."""
    tts = as_tts(model)
    check_turns(tts, turns)
    sampling = sampling or default_sampling(tts.vocab.layout)
    if tts.vocab.architecture == "csm":
        from audiollm.tts.csm_generate import csm_stream

        prefix_frames, frames = csm_stream(tts, text, prompt_audio, prompt_text, sampling, turns)
        prefix = list(prefix_frames.T) if len(prefix_frames) else None
    else:
        prefix, frames = flat_stream(tts, text, prompt_audio, prompt_text, sampling)
    streamer = FrameStreamer(tts.codec, hop, context, prefix)
    for frame in frames:
        yield from streamer.push(frame)
    yield from streamer.finish()


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int) -> None:
    import soundfile

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.asarray(wav, dtype=np.float32), sample_rate)


@dataclass
class StreamTiming:
    """Time to first audio and real-time factor of one streamed utterance."""

    first_audio_s: float
    total_s: float
    audio_s: float

    @property
    def rtf(self) -> float:
        """Wall seconds per second of audio (below 1: faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s else float("inf")


def timed_stream(chunks: Iterator[np.ndarray], sample_rate: int) -> tuple[np.ndarray, StreamTiming]:
    """Drain a chunk stream, timing the first chunk and the whole."""
    start, first, parts = time.perf_counter(), None, []
    for chunk in chunks:
        first = first if first is not None else time.perf_counter() - start
        parts.append(chunk)
    total = time.perf_counter() - start
    wav = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return wav, StreamTiming(first if first is not None else total, total, len(wav) / sample_rate)


class ListenerVerifier:
    """Scores candidates by a listener's WER against the text they were asked to say (lower WER, higher score:
    -WER), plus optionally ``speaker_weight * speaker_similarity(wav, sample_rate)`` (e.g. cosine similarity of
    speaker embeddings to the cloning prompt's; any callable).

    ``listener``: a path ``eval.speech.load_transcriber`` loads (Whisper .pt, HF Whisper folder, audio-LLM folder)
    or any object with ``transcribe(wavs, language)``. It hears only the candidates and is scored only against
    ``text``, never against a reference transcript (LLaSA's protocol). ``heard`` holds the last call's transcripts,
    so a caller can report the chosen candidate's without transcribing it again. ``normalizer``: the WER's text
    normaliser (``eval.metrics.ASR_NORMALIZERS``; None: by language).
    """

    def __init__(self, listener: str | os.PathLike | object, language: str | None = "en",
                 speaker_similarity: Callable[[np.ndarray, int], float] | None = None, speaker_weight: float = 1.0,
                 normalizer: str | None = None):
        from eval.speech import load_transcriber

        self.transcriber = load_transcriber(listener) if isinstance(listener, (str, os.PathLike)) else listener
        self.language, self.similarity, self.weight = language, speaker_similarity, speaker_weight
        self.normalizer = normalizer
        self.heard: list[str] = []

    def __call__(self, wavs: Sequence[np.ndarray], sample_rate: int, text: str) -> list[float]:
        from eval.speech import to_listener_rate, transcript_wer

        self.heard = self.transcriber.transcribe(to_listener_rate(wavs, sample_rate), self.language)
        scores = []
        for wav, transcript in zip(wavs, self.heard):
            wer = transcript_wer([text], [transcript], self.language, self.normalizer)["wer"]
            extra = self.weight * self.similarity(wav, sample_rate) if self.similarity else 0.0
            scores.append(-wer + extra)
        return scores
