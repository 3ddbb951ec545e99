"""``audiollm serve`` on tiny models: the page in a real headless Chromium (answer text, spoken answer, a corrupt
upload's message, screenshots), the Gradio client API, bad recordings, multi-turn history, a stock Qwen2-Audio
folder and a folder that is no model.

The browser tests start the real command (``python -m audiollm.cli serve``, default host) on a free loopback port
and are skipped only where no Chromium and chromedriver are on PATH. Screenshots go to ``$AUDIOLLM_TEST_ARTIFACTS``
when set, else to the test's tmp_path.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiollm.audio import SAMPLE_RATE
from audiollm.build import build_tiny
from audiollm.chat import AUDIO_MARKER
from audiollm.serve import SPEAKING, WARNING, answer_text, chat_view, ffmpeg_found, pcm16, respond, speak_answer
from audiollm.serve import voice_streams
from audiollm.serve_model import Conversation, Responder, read_question
from audiollm.serve_shot import Page, find_browser, free_port, open_browser
from audiollm.tts.chat import answer
from tests.conftest import build_untrained_tts, make_speech_like, write_stock_qwen2_audio

REPO = Path(__file__).resolve().parents[1]
MAX_SECONDS = 30.0
ANSWER_TOKENS = 12
SPOKEN = "one two three four five"  # long enough for the tiny voice to take several chunks
# file -> words the page's message must contain (besides the file's name)
BAD_FILES = {
    "corrupt.wav": "cannot decode audio (Error in WAV/W64/RF64 file. Malformed 'fmt ' chunk)",  # libsndfile's words
    "silent.wav": "all silent",
    "empty.wav": "empty",
    "long.wav": f"longer than the maximum of {MAX_SECONDS:g} s",
}
needs_browser = pytest.mark.skipif(find_browser() is None, reason="no Chromium and chromedriver on PATH (Debian: "
                                   "apt-get install chromium chromium-driver); the page is not tested in a browser")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny listener, an untrained tiny tts folder, a spoken question and the bad recordings."""
    root = tmp_path_factory.mktemp("serve")
    build_tiny(root / "model")
    tts = build_untrained_tts(root / "voice")
    sf.write(root / "question.wav", make_speech_like(1.0), SAMPLE_RATE)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64)))  # a header, then junk
    sf.write(root / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    sf.write(root / "long.wav", make_speech_like(MAX_SECONDS + 1), SAMPLE_RATE)
    return {"root": root, "model": root / "model", "tts": tts, **{name: root / name for name in BAD_FILES},
            "question": root / "question.wav"}


@pytest.fixture(scope="module")
def responder(folders) -> Responder:
    return Responder(str(folders["model"]), str(folders["tts"]), max_new_tokens=ANSWER_TOKENS)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("AUDIOLLM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def last(outputs) -> tuple:
    """The final (chat view, conversation, spoken answer, status) a handler yielded."""
    return list(outputs)[-1]


# ------------------------------------------------------------------------------------------- without a browser


@pytest.mark.parametrize("name", [*BAD_FILES, None])
def test_bad_recordings_get_a_message_and_leave_the_chat_alone(responder, folders, name):
    import gradio as gr

    path = str(folders[name]) if name else None
    view, conversation, spoken, status = last(respond(responder, MAX_SECONDS, path, "", None))
    assert status.startswith(WARNING) and view == conversation == spoken == gr.skip()  # the page keeps its chat
    if name:
        assert BAD_FILES[name] in status and name in status
        assert str(folders["root"]) not in status  # the server's temporary folder is not shown, the file's name is
    else:
        assert "Record or upload" in status


def test_streamed_multi_turn_answers_equal_greedy_answers(responder, folders):
    outputs = list(respond(responder, MAX_SECONDS, str(folders["question"]), "What is this?", None))
    streamed = [view[-1]["content"] for view, *_, status in outputs if status == "Answering…"]
    assert streamed and all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # the text grows
    view, first, (rate, wav), status = outputs[-1]
    assert status == "" and rate == 24000 and wav.dtype == np.int16 and wav.size > 0
    clip = read_question(str(folders["question"]), MAX_SECONDS)
    question = [{"role": "user", "content": AUDIO_MARKER + "What is this?"}]
    expected = answer(responder.model, responder.tokenizer, question, [clip], ANSWER_TOKENS)
    assert first.messages[-1] == {"role": "assistant", "content": expected}
    assert view[0] == {"role": "user", "content": "[recording 1.0 s] What is this?"}

    view, second, _, status = last(respond(responder, MAX_SECONDS, None, "And then?", first))
    expected = answer(responder.model, responder.tokenizer, first.messages + [{"role": "user", "content": "And then?"}],
                      [clip], ANSWER_TOKENS)
    assert status == "" and len(second.messages) == 4 and len(second.audios) == 1
    assert second.messages[-1]["content"] == expected and view == chat_view(second)


@pytest.fixture
def long_speech(responder):
    """The untrained tiny voice ends after a few frames; with SPEECH_END's logit pushed far down it speaks until
    the text's frame cap (about 6 s for ``SPOKEN``), so the stream has many chunks."""
    tts = responder.tts
    bias = torch.zeros(tts.model.lm_head.weight.shape[0])
    bias[tts.vocab.speech_end] = -1e4
    handle = tts.model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    yield
    handle.remove()


def test_the_voice_stream_joins_into_the_one_piece_voice(responder, long_speech):
    """The chunks are the one-piece waveform cut up, up to float rounding: the streamer decodes windows of frames
    with all the context each sample depends on, but a shorter convolution input sums in another order. As int16
    (what the player gets), a rounding step of a sample near a boundary moves it by one unit at most."""
    chunks = list(responder.voice_stream(SPOKEN))
    rate, whole = responder.voice(SPOKEN)
    assert len(chunks) > 10 and {r for r, _ in chunks} == {rate}
    joined = np.concatenate([chunk for _, chunk in chunks])
    assert joined.shape == whole.shape
    np.testing.assert_allclose(joined, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    played = np.concatenate([pcm16((rate, chunk))[1] for _, chunk in chunks]).astype(int)
    assert np.abs(played - pcm16((rate, whole))[1]).max() <= 1


def test_a_voice_stream_closed_early_lets_the_model_go(responder):
    stream = responder.voice_stream(SPOKEN)
    next(stream)
    assert responder.lock.locked()  # held while the voice decodes: no other generation meanwhile
    stream.close()  # the page went away after the first chunk
    assert not responder.lock.locked()
    assert len(list(responder.voice_stream(SPOKEN))) > 1  # and the next answer is spoken whole


def test_the_page_streams_the_text_then_the_voice(responder, folders):
    import gradio as gr

    outputs = list(answer_text(responder, MAX_SECONDS, str(folders["question"]), "", None))
    view, answered, spoken, status = outputs[-1]
    assert status == SPEAKING and spoken is None and answered.messages[-1]["role"] == "assistant"
    voiced = list(speak_answer(responder, answered, status, stream=True))
    chunks = [chunk for chunk, status in voiced[:-1] if status == SPEAKING]
    assert len(chunks) == len(voiced) - 1 > 1 and voiced[-1] == (gr.skip(), "")
    rate, whole = pcm16(responder.voice(answered.messages[-1]["content"]))
    assert {r for r, _ in chunks} == {rate} and sum(len(c) for _, c in chunks) == len(whole)
    # Without ffmpeg the same answer comes once, whole; a refused question is not spoken at all.
    (once, status), = speak_answer(responder, answered, SPEAKING, stream=False)
    assert status == "" and np.array_equal(once[1], whole)
    assert list(speak_answer(responder, answered, f"{WARNING}refused", stream=True)) == [(gr.skip(), gr.skip())]
    closed = speak_answer(responder, answered, SPEAKING, stream=True)
    next(closed)
    assert responder.lock.locked()
    closed.close()  # the page went away while the voice was decoding
    assert not responder.lock.locked()


def test_without_ffmpeg_the_voice_comes_in_one_piece(responder, monkeypatch, caplog):
    import audiollm.serve as serve

    assert voice_streams(responder) == ffmpeg_found()
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    with caplog.at_level("WARNING", logger="audiollm.serve"):
        assert not voice_streams(responder)
    assert "No ffmpeg on PATH" in caplog.text
    players = [block for block in serve.build_app(responder).blocks.values()
               if getattr(block, "elem_id", None) == "spoken"]
    assert len(players) == 1 and not players[0].streaming


def test_a_stream_closed_early_stops_its_generation(folders, monkeypatch):
    import audiollm.serve_model as serve_model

    class CountingStreamer(serve_model._StoppableStreamer):
        """Counts the tokens generate() hands over, slowly, so the reader is never far behind."""

        puts = 0

        def put(self, value):
            time.sleep(0.02)
            super().put(value)
            CountingStreamer.puts += 1

    monkeypatch.setattr(serve_model, "_StoppableStreamer", CountingStreamer)
    long_answers = Responder(str(folders["model"]), max_new_tokens=60)
    asked = Conversation().ask("What is this?", read_question(str(folders["question"]), MAX_SECONDS))
    stream = long_answers.stream(asked)
    next(stream)
    stream.close()  # the page went away after the first piece
    assert not long_answers.lock.locked() and CountingStreamer.puts < 30  # stopped well before 60 tokens
    full = list(long_answers.stream(asked))[-1]
    assert full == answer(long_answers.model, long_answers.tokenizer, asked.messages, asked.audios, 60)


def test_stock_qwen2_audio_folder_answers(tmp_path, folders):
    folder = write_stock_qwen2_audio(tmp_path / "Qwen2-Audio-tiny")
    stock = Responder(str(folder), max_new_tokens=6)
    asked = Conversation().ask("What is this?", read_question(str(folders["question"]), MAX_SECONDS))
    streamed = list(stock.stream(asked))
    assert streamed[-1] == answer(stock.model, stock.tokenizer, asked.messages, asked.audios, 6)
    assert stock.voice("hello") is None  # no tts folder: text only


def test_a_folder_that_is_no_model_is_a_startup_error(tmp_path, folders, capsys):
    from audiollm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tmp_path)])
    assert exit_.value.code == 1 and f"{tmp_path}: no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_audio"}')
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tmp_path)])
    assert "cannot load a model from this folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(folders["model"]), "--tts", str(tmp_path)])
    assert f"{tmp_path}: no tts_config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the running server


@pytest.fixture(scope="module")
def server(folders):
    """``audiollm serve`` in a subprocess on a free loopback port (default host); yields its URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "audiollm.cli", "serve", "--model", str(folders["model"]), "--tts",
               str(folders["tts"]), "--port", str(port), "--max-new-tokens", str(ANSWER_TOKENS)]
    log = folders["root"] / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"audiollm serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"audiollm serve did not answer on {url} within {timeout:.0f} s:\n{log.read_text()}")


@needs_browser
def test_page_in_a_browser(server, folders, artifacts):
    started = time.monotonic()
    driver = open_browser(*find_browser())
    try:
        page = Page(driver, server).open()
        text, status = page.ask(folders["question"], "What is this?", voiced=True)
        page.screenshot(artifacts / "serve_answered.png")
        assert text and status == "" and page.answers() == [text]
        if ffmpeg_found():  # the server streams the voice: a browser <audio> player fed the chunks as they come
            assert page.streamed_seconds() > 0 and page.spoken_src().endswith("/playlist-file")
        else:  # the one-piece fallback: the waveform player of a wav file
            assert page.streamed_seconds() is None
            with urllib.request.urlopen(page.spoken_src(), timeout=10) as response:  # what the player plays
                wav, rate = sf.read(io.BytesIO(response.read()))
            assert rate == 24000 and len(wav) > 0

        text, status = page.ask(folders["corrupt.wav"])
        page.screenshot(artifacts / "serve_corrupt.png")
        assert status.startswith(WARNING.strip()) and "corrupt.wav" in status and "cannot decode" in status
        assert len(page.answers()) == 1 and page.spoken_src()  # no new turn; the last answer's voice stays
    finally:
        driver.quit()
    assert (artifacts / "serve_answered.png").stat().st_size > 0
    print(f"browser test: {time.monotonic() - started:.1f} s")


def test_gradio_client_api(server, folders):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, analytics_enabled=False, download_files=False)
    assert {"/answer", "/transcribe", "/new_conversation"} <= set(client.view_api(print_info=False,
                                                                                   return_format="dict")
                                                                     ["named_endpoints"])
    transcript, status = client.predict(handle_file(str(folders["question"])), api_name="/transcribe")
    assert isinstance(transcript, str) and status == ""
    chat, spoken, status = client.predict(handle_file(str(folders["question"])), "", api_name="/answer")
    assert status == "" and [m["role"] for m in chat] == ["user", "assistant"] and spoken["path"].endswith(".wav")
    assert not spoken.get("is_stream") and sf.info(spoken["path"]).frames > 0  # one wav file, even when streaming
    chat, spoken, status = client.predict(None, "And then?", api_name="/answer")  # the client's session: turn 2
    assert status == "" and len(chat) == 4
    _, _, status = client.predict(handle_file(str(folders["silent.wav"])), "", api_name="/answer")
    assert status.startswith(WARNING) and "silent" in status
    # The server says at startup when it cannot stream the voice, and only then.
    assert ("No ffmpeg on PATH" in (folders["root"] / "server.log").read_text()) != ffmpeg_found()
