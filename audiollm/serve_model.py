"""The model side of ``audiollm serve``: load a listener (and a voice), answer a chat as a text stream, transcribe.

Nothing here knows about the web page. Answers go through ``audiollm.tts.chat.answer`` (the prompt the training
collator builds, greedy decoding, the chat's stop tokens), so the page answers exactly as ``audiollm chat`` and
``audiollm eval`` do. Questions are read by ``audiollm.audio_sources.load_audio``, so a recording is refused for the
same reasons a training clip is (corrupt, empty, silent, too long...).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import TextIteratorStreamer

from audiollm.audio import SAMPLE_RATE
from audiollm.chat import AUDIO_MARKER

DEFAULT_MAX_SECONDS = 30.0  # one Whisper window: the length Qwen2-Audio was trained on


class ServeError(RuntimeError):
    """The page cannot start: a folder that is not a model or not a tts folder (the message names it)."""


@dataclass
class Conversation:
    """A chat so far, as the collator takes it: messages with ``<audio>`` markers and their clips (16 kHz)."""

    messages: list[dict] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)

    def ask(self, text: str, audio: np.ndarray | None) -> "Conversation":
        """This conversation plus a user turn (a new object: the page keeps the old one until the answer ends)."""
        content = (AUDIO_MARKER if audio is not None else "") + text
        audios = self.audios + ([audio] if audio is not None else [])
        return Conversation(self.messages + [{"role": "user", "content": content}], audios)

    def reply(self, text: str) -> "Conversation":
        return Conversation(self.messages + [{"role": "assistant", "content": text}], self.audios)


def read_question(path: str, max_seconds: float | None) -> np.ndarray:
    """A recorded or uploaded file -> 16 kHz mono float32 (n_samples,); ``AudioError`` names what is wrong."""
    from audiollm.audio_sources import load_audio

    return load_audio(path, max_seconds)


class Responder:
    """A loaded listener (and optional tts folder) answering chats; one generation at a time (see ``lock``)."""

    def __init__(self, model_dir: str, tts_dir: str | None = None, device: str | None = None,
                 max_new_tokens: int = 64):
        self.model, self.tokenizer = _load_listener(model_dir, device)
        self.tts = _load_voice(tts_dir, device) if tts_dir else None
        self.max_new_tokens = max_new_tokens
        self.name = Path(model_dir).name
        # The page's queue already runs one model event at a time; the lock keeps that true for any other caller
        # (two generate() calls sharing one model in threads would each run at half speed anyway).
        self.lock = threading.Lock()

    def stream(self, conversation: Conversation) -> Iterator[str]:
        """The answer to the conversation's last user turn, growing: each item is the whole text so far.

        Generation runs in a thread feeding a streamer. If the reader stops early (the page was closed), the
        thread is stopped at its next token before the lock is let go, so two generations never share the model.
        """
        from audiollm.tts.chat import answer

        streamer = _StoppableStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                answer(self.model, self.tokenizer, conversation.messages, conversation.audios, self.max_new_tokens,
                       streamer=streamer)
            except BaseException as err:  # handed to the reading side, which would otherwise wait forever
                failure.append(err)
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield text.strip()
            finally:
                streamer.stopped = True
                worker.join()
        if failure and not isinstance(failure[0], _Stopped):
            raise failure[0]

    def transcribe(self, wav: np.ndarray) -> Iterator[str]:
        """The listener's transcript of a clip, growing, asked with the instruction stage 1 trained on."""
        from eval.tasks import ASR_PROMPT

        yield from self.stream(Conversation().ask(ASR_PROMPT, wav))

    def voice(self, text: str) -> tuple[int, np.ndarray] | None:
        """(sample rate in Hz, float32 waveform (n,)) of the text spoken by the tts folder; None without one."""
        if self.tts is None or not text.strip():
            return None
        from audiollm.tts.generate import speak

        with self.lock:
            spoken = speak(self.tts, text)
        return spoken.sample_rate, spoken.wav

    def voice_stream(self, text: str) -> Iterator[tuple[int, np.ndarray]]:
        """The text spoken as it is decoded: (sample rate in Hz, float32 chunk (n,)) every few codec frames.

        Same sampling settings (and seed) as ``voice``, so the chunks join into ``voice(text)``'s waveform (up to
        float rounding: the codec decodes overlapping windows instead of the whole). Nothing without a tts folder.
        The lock is held until the last chunk; a reader that stops early (the page was closed) ends the sampling
        at the next chunk and lets the lock go, as ``stream`` does.
        """
        if self.tts is None or not text.strip():
            return
        from audiollm.tts.generate import speak_stream

        with self.lock:
            chunks = speak_stream(self.tts, text)
            try:
                for chunk in chunks:
                    yield self.tts.codec.sample_rate, chunk
            finally:
                chunks.close()  # at once, not whenever the garbage collector gets to it: the lock goes next


class _Stopped(Exception):
    """Raised inside generate() to end a generation nobody reads any more."""


class _StoppableStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that ends the generation feeding it once ``stopped`` is set."""

    stopped = False

    def put(self, value):
        if self.stopped:
            raise _Stopped
        super().put(value)


def _load_listener(model_dir: str, device: str | None):
    """(model, tokenizer) as ``audiollm eval`` loads them; any failure becomes a ``ServeError`` naming the folder."""
    from eval.generate import load_model
    from eval.items import EvalError

    try:
        return load_model(model_dir, device)
    except EvalError as err:
        raise ServeError(str(err)) from err
    except (OSError, ValueError, KeyError) as err:  # what from_pretrained raises for a folder that is no model
        raise ServeError(f"{model_dir}: cannot load a model from this folder ({type(err).__name__}: {err}); pass "
                         "an audiollm model folder (init, training output, export) or a Qwen2-Audio folder") from err


def _load_voice(tts_dir: str, device: str | None):
    from audiollm.tts.generate import load_tts
    from audiollm.tts.layout import TTS_CONFIG

    if not Path(tts_dir, TTS_CONFIG).is_file():
        raise ServeError(f"{tts_dir}: no tts_config.json; pass a folder written by `audiollm train tts`")
    try:
        return load_tts(tts_dir, device=device)
    except (OSError, ValueError, KeyError) as err:
        raise ServeError(f"{tts_dir}: cannot load the tts folder ({type(err).__name__}: {err})") from err


def seconds(wav: np.ndarray) -> float:
    return len(wav) / SAMPLE_RATE
