"""``audiollm serve``: a web page to talk to a model folder, built with Gradio.

    audiollm serve --model runs/demo/export [--tts runs/demo/voice/tts] [--host 127.0.0.1 --port 7860]

The Chat tab takes a recorded or uploaded question and an optional typed instruction, keeps the conversation (each
turn's clip stays in the prompt, as in a multi-clip training row), streams the text answer as it is generated and,
with ``--tts``, then speaks it: streamed as the codec decodes it where ffmpeg is on PATH (Gradio encodes streamed
audio with it), else in one piece once decoded. The Transcribe tab asks the listener for a transcript. Both are
Gradio API endpoints too (``/answer``, ``/transcribe``); ``/answer`` gives the spoken answer as one wav file. A bad
recording gets a message on the page, never a traceback.
Model events share one queue (``concurrency_id="model"``) and run one at a time: the others wait in line with
their position shown, and the page itself stays responsive.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np

from audiollm.chat import AUDIO_MARKER
from audiollm.serve_model import DEFAULT_MAX_SECONDS, Conversation, Responder, read_question, seconds

log = logging.getLogger(__name__)
WARNING = "⚠️ "  # every problem message on the page starts with this (and the tests look for it)
# What to do about each kind of unusable recording (kinds: audiollm.audio_checks.AUDIO_KINDS).
HINTS = {
    "too_long": "Trim it or record a shorter question.",
    "silent": "Nothing was heard: check the microphone and record again.",
    "empty": "The recording is empty: record again.",
    "too_short": "Record a longer question.",
    "unreadable": "Upload a wav, flac, mp3 or ogg file.",
    "absurd_header": "The file is damaged: export it again.",
}
MODEL_QUEUE = "model"  # concurrency id shared by every event that runs the model
ANSWERING, SPEAKING = "Answering…", "Speaking…"  # the status while the text, then the voice, is on its way


def problem(err: Exception, path: str | None = None) -> str:
    """The page's message for a refused recording: what is wrong (temporary paths shown as the file's name)."""
    text = str(err).replace(path, Path(path).name) if path else str(err)
    hint = HINTS.get(getattr(err, "kind", ""), "")
    return f"{WARNING}This recording cannot be used: {text}. {hint}".strip()


def pcm16(voice: tuple[int, np.ndarray] | None) -> tuple[int, np.ndarray] | None:
    """(rate, float waveform in [-1, 1]) -> (rate, int16 waveform): what the player's wav file holds, as is."""
    if voice is None:
        return None
    rate, wav = voice
    return rate, (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16)


def chat_view(conversation: Conversation) -> list[dict]:
    """The Chatbot's messages: each clip shown as ``[recording 2.1 s]`` in front of its turn's text."""
    clips = iter(conversation.audios)
    view = []
    for message in conversation.messages:
        pieces = message["content"].split(AUDIO_MARKER)
        content = pieces[0] + "".join(f"[recording {seconds(next(clips)):.1f} s] {p}" for p in pieces[1:])
        view.append({"role": message["role"], "content": content.strip()})
    return view


def answer_text(responder: Responder, max_seconds: float, path: str | None, instruction: str,
                conversation: Conversation | None) -> Iterator[tuple]:
    """The text half of the Ask button: yields (chat view, conversation, spoken answer, status) while it grows.

    The conversation only takes the new turn once answered, so a refused recording leaves it as it was. The last
    status is ``SPEAKING`` when a voice is to follow (``speak_answer``), "" without a tts folder, a warning after a
    problem (the spoken answer then stays as it was: only an accepted question clears it).
    """
    import gradio as gr

    conversation = conversation or Conversation()
    instruction = (instruction or "").strip()
    if not path and not instruction:
        yield gr.skip(), gr.skip(), gr.skip(), f"{WARNING}Record or upload a question (or type one) first."
        return
    try:
        wav = read_question(path, max_seconds) if path else None
    except (ValueError, FileNotFoundError) as err:  # AudioError is a ValueError
        yield gr.skip(), gr.skip(), gr.skip(), problem(err, path)  # the last answer and its voice stay
        return
    asked = conversation.ask(instruction, wav)
    text = None
    try:
        for text in responder.stream(asked):
            yield chat_view(asked.reply(text)), gr.skip(), None, ANSWERING
    except Exception as err:  # a model failure must reach the page as a message, never as a broken page
        log.exception("answering failed")
        yield chat_view(conversation), gr.skip(), None, f"{WARNING}The model failed on this question: {err}"
        return
    answered = asked.reply(text or "")
    yield chat_view(answered), answered, None, SPEAKING if responder.tts else ""


def speak_answer(responder: Responder, conversation: Conversation, status: str, stream: bool) -> Iterator[tuple]:
    """The voice half: yields (spoken answer, status) for the conversation's last answer, if ``status`` says one
    is due (``SPEAKING``). ``stream``: int16 chunks as the codec decodes them (the player joins them), then the
    status cleared; else the whole answer once, as (rate, int16 waveform), with the status cleared.
    """
    import gradio as gr

    if status != SPEAKING:  # refused, failed, or no tts folder: nothing to say
        yield gr.skip(), gr.skip()
        return
    text = conversation.messages[-1]["content"]
    try:
        if stream:
            # closing(): a page closed mid-answer ends the decoding (and frees the model) here, at once
            with closing(responder.voice_stream(text)) as chunks:
                for chunk in chunks:
                    yield pcm16(chunk), SPEAKING
            yield gr.skip(), ""  # the player keeps the streamed chunks
        else:
            yield pcm16(responder.voice(text)), ""
    except Exception as err:  # the text answer stands; only the voice is missing
        log.exception("voicing failed")
        yield None, f"{WARNING}The answer could not be spoken: {err}"


def respond(responder: Responder, max_seconds: float, path: str | None, instruction: str,
            conversation: Conversation | None) -> Iterator[tuple]:
    """The ``/answer`` endpoint: ``answer_text``, then the whole spoken answer in one piece (an API client sees
    only the last yield, so it gets the text and a wav file together)."""
    outputs = None
    for outputs in answer_text(responder, max_seconds, path, instruction, conversation):
        yield outputs
    view, answered, _, status = outputs
    if status == SPEAKING:
        for voice, status in speak_answer(responder, answered, status, stream=False):
            yield view, answered, voice, status


def transcribe(responder: Responder, max_seconds: float, path: str | None) -> Iterator[tuple[str, str]]:
    """The Transcribe button: yields (transcript so far, status)."""
    if not path:
        yield "", f"{WARNING}Record or upload a clip first."
        return
    try:
        wav = read_question(path, max_seconds)
    except (ValueError, FileNotFoundError) as err:
        yield "", problem(err, path)
        return
    try:
        for text in responder.transcribe(wav):
            yield text, ""
    except Exception as err:  # as in respond: a message, not a broken page
        log.exception("transcribing failed")
        yield "", f"{WARNING}The model failed on this clip: {err}"


def clear_inputs(status: str) -> tuple:
    """After an answer, empty the question and the instruction for the next turn; after a problem, keep them."""
    import gradio as gr

    return (gr.skip(), gr.skip()) if status.startswith(WARNING) else (None, "")


def ffmpeg_found() -> bool:
    """Whether Gradio can stream audio here: it encodes the streamed chunks with an ``ffmpeg`` process."""
    return shutil.which("ffmpeg") is not None


def voice_streams(responder: Responder) -> bool:
    """Whether the page can stream the spoken answer: a tts folder and ffmpeg on PATH. Logs why not when only
    ffmpeg is missing (call it once, at startup)."""
    if responder.tts is None:
        return False
    if not ffmpeg_found():
        log.warning("No ffmpeg on PATH: the spoken answer comes in one piece once it is decoded, not while it is "
                    "(install ffmpeg to stream it).")
        return False
    return True


def build_app(responder: Responder, max_seconds: float = DEFAULT_MAX_SECONDS, stream_voice: bool | None = None):
    """The page: a Chat tab and a Transcribe tab over one responder. Returns the (not yet launched) ``gr.Blocks``.

    ``stream_voice``: the spoken answer plays while it is decoded (None: when ffmpeg is on PATH), else it comes in
    one piece once decoded.
    """
    import gradio as gr

    stream_voice = (ffmpeg_found() if stream_voice is None else stream_voice) and responder.tts is not None
    with gr.Blocks(title=f"audiollm · {responder.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## audiollm · {responder.name}\nAsk by voice (record or upload, up to {max_seconds:g} s), "
                    "with an optional typed instruction; the conversation is kept until *New conversation*.")
        with gr.Tab("Chat"):
            history = gr.Chatbot(label="Conversation", elem_id="history", height=300)
            spoken = gr.Audio(label="Spoken answer", elem_id="spoken", interactive=False, streaming=stream_voice,
                              autoplay=stream_voice, visible=responder.tts is not None)
            with gr.Row():
                question = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Spoken question",
                                    elem_id="question")
                with gr.Column():
                    instruction = gr.Textbox(label="Instruction (optional)", elem_id="instruction", lines=2)
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    restart = gr.Button("New conversation", elem_id="restart")
            status = gr.Markdown(elem_id="status")
        with gr.Tab("Transcribe"):
            clip = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Clip", elem_id="clip")
            run = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
            transcript = gr.Textbox(label="Transcript", elem_id="transcript", interactive=False)
            clip_status = gr.Markdown(elem_id="clip-status")
        # /answer's spoken answer as one wav file: a streamed player gives API clients a playlist, not a file.
        whole_voice = gr.Audio(visible=False, interactive=False)
        conversation = gr.State(None)
        _wire_chat(responder, max_seconds, stream_voice, (ask, restart), [question, instruction, conversation],
                   [history, conversation, spoken, status], whole_voice)

        def transcribe_fn(path):
            yield from transcribe(responder, max_seconds, path)

        run.click(transcribe_fn, [clip], [transcript, clip_status], api_name="transcribe",
                  concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    return app


def _wire_chat(responder: Responder, max_seconds: float, stream_voice: bool, buttons: tuple, inputs: list,
               outputs: list, whole_voice) -> None:
    """The Chat tab's events. buttons: (Ask, New conversation); inputs: (question, instruction, conversation
    state); outputs: (chat view, conversation state, spoken answer player, status).

    Ask streams the text (one queued model event), then the voice (a second one, so the text is final on the page
    while it is spoken). ``/answer`` is an API-only event doing both in one, with the voice as a wav file.
    """
    import gradio as gr

    ask, restart = buttons
    question, instruction, conversation = inputs
    history, _, spoken, status = outputs

    def text_fn(path, text, conv):
        yield from answer_text(responder, max_seconds, path, text, conv)

    def voice_fn(conv, state):
        yield from speak_answer(responder, conv, state, stream_voice)

    def answer_fn(path, text, conv):
        yield from respond(responder, max_seconds, path, text, conv)

    model = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}
    answered = ask.click(text_fn, inputs, outputs, api_visibility="private", **model)
    answered.then(voice_fn, [conversation, status], [spoken, status], api_visibility="private", **model)
    answered.then(clear_inputs, [status], [question, instruction], api_visibility="private", queue=False)
    gr.on([], answer_fn, inputs, [history, conversation, whole_voice, status], api_name="answer", **model)
    restart.click(lambda: ([], None, None, ""), None, outputs, api_name="new_conversation", queue=False)


def launch(app, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve the page on ``host:port`` (None: Gradio picks a free port from 7860); returns the page's URL.

    Nothing leaves the machine: no share link, no analytics, no server-side rendering (no Node), system fonts.
    ``block=False`` returns at once with the server running in a thread (``app.close()`` stops it).
    """
    import gradio as gr

    theme = gr.themes.Default(font=["Helvetica", "Arial", "sans-serif"], font_mono=["monospace"])
    app.queue(max_size=64)  # more waiting requests than this are refused with "queue full" rather than piling up
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                           ssr_mode=False, mcp_server=False, max_file_size="100mb", theme=theme, quiet=not block)
    return url


def quiet_gradio() -> None:
    """Keep Gradio offline: no analytics or version check. Set before gradio is imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="a web page to talk to a model: spoken questions in, streamed text (and spoken) answers out",
        description="Serves a Gradio page (and its API) for any model folder `audiollm eval` accepts. Binds to "
        "127.0.0.1: to expose it on a network, pass --host 0.0.0.0 knowingly.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="audiollm model folder or Qwen2-Audio folder")
    p.add_argument("--tts", metavar="DIR", help="tts folder (audiollm train tts) to speak the answers")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"longest question accepted, in seconds (default {DEFAULT_MAX_SECONDS:g})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest text answer, in tokens (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when there is one)")
    p.set_defaults(run=run_serve, parser=p)


def run_serve(args) -> int:
    from audiollm.serve_model import ServeError

    quiet_gradio()
    if importlib.util.find_spec("gradio") is None:
        args.parser.exit(1, "audiollm serve: error: gradio is not installed; pip install 'audiollm[serve]'\n")
    try:
        responder = Responder(args.model, args.tts, args.device, args.max_new_tokens)
    except ServeError as err:
        args.parser.exit(1, f"audiollm serve: error: {err}\n")
    launch(build_app(responder, args.max_seconds, voice_streams(responder)), args.host, args.port)
    return 0
