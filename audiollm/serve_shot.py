"""Drive the ``audiollm serve`` page in a real headless Chromium, as a person would; save screenshots.

    python -m audiollm.serve_shot --model runs/demo/export --tts runs/demo/voice/tts --wav question.wav \\
        --out docs/serve.png

starts the page on a free loopback port, uploads the wav, asks, waits for the text (and spoken) answer and saves a
screenshot of the whole answered page. The tests drive the page with the same ``Page`` class.

The browser is the system's Chromium and its chromedriver (Debian: ``apt-get install chromium chromium-driver``),
found on PATH; Selenium is pointed at both and told to stay offline, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
BUSY = ("Answering…", "Speaking…")  # status texts while an answer is on its way (audiollm/serve.py)


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) executables found on PATH, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = next((path for name in DRIVERS if (path := shutil.which(name))), None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_browser(browser: str, driver: str, width: int = 1280, height: int = 1000):
    """A headless Chromium under Selenium, from these executables only (Selenium Manager kept offline)."""
    os.environ.setdefault("SE_OFFLINE", "true")  # never download a browser or driver
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the page is our own, on loopback.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


class Page:
    """The serve page in a browser: ask a question, read the answer and the message, take screenshots."""

    def __init__(self, driver, url: str, timeout: float = 60.0):
        self.driver, self.url, self.timeout = driver, url, timeout

    def open(self) -> "Page":
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ready
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(self.url)
        WebDriverWait(self.driver, self.timeout).until(ready.element_to_be_clickable((By.ID, "ask")))
        return self

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def answers(self) -> list[str]:
        """The assistant's messages shown in the conversation, oldest first."""
        return [element.text for element in self._find("#history [data-testid='bot']")]

    def status(self) -> str:
        """The message under the buttons (its text only: not the progress timer shown over it while busy)."""
        found = self._find("#status [data-testid='markdown']")
        return found[0].text.strip() if found else ""

    def streamed_seconds(self) -> float | None:
        """The length in seconds of the streamed spoken answer's audio element, once it has some audio; else None
        (no streamed player: the answer is spoken in one piece, or not yet)."""
        return self.driver.execute_script(
            "const a = document.querySelector('#spoken audio');"
            "return a && a.src && a.duration > 0 && isFinite(a.duration) ? a.duration : null;")

    def spoken_src(self) -> str | None:
        """The URL of the spoken answer (the player's download link: a wav file, or the streamed answer as one AAC
        file), or None while no player holds audio."""
        one_piece = self._find("#spoken [data-testid='waveform-controls'] button[aria-label='Play']")
        if not one_piece and self.streamed_seconds() is None:
            return None
        links = self._find("#spoken a[data-testid='download-link']")
        return links[0].get_attribute("href") if links else None

    def upload(self, wav: str | os.PathLike) -> None:
        """Choose the upload source of the question (the microphone is the default) and give it the file."""
        from selenium.webdriver.support.ui import WebDriverWait

        source = self._find("#question button[aria-label='Upload file']")
        if source:
            source[0].click()
        WebDriverWait(self.driver, self.timeout).until(lambda _: self._find("#question input[type=file]"))
        self._find("#question input[type=file]")[0].send_keys(str(Path(wav).resolve()))
        # The upload is done once the page shows the clip's player instead of the drop area.
        WebDriverWait(self.driver, self.timeout).until(lambda _: not self._find("#question input[type=file]"))

    def ask(self, wav: str | os.PathLike | None, instruction: str = "", voiced: bool = False) -> tuple[str, str]:
        """Upload ``wav`` (if any), type the instruction, press Ask; wait until a new answer (with ``voiced``, its
        spoken player too) or a new message shows. Returns (last answer, status message)."""
        from selenium.webdriver.support.ui import WebDriverWait

        before = len(self.answers()), self.status()
        if wav is not None:
            self.upload(wav)
        if instruction:
            self._find("#instruction textarea")[0].send_keys(instruction)
        self._find("#ask")[0].click()

        def settled(_) -> bool:
            status = self.status()
            if status in BUSY:
                return False
            if len(self.answers()) > before[0] and not status:
                return not voiced or self.spoken_src() is not None
            return bool(status) and status != before[1]

        WebDriverWait(self.driver, self.timeout, poll_frequency=0.2).until(settled)
        answers = self.answers()
        return (answers[-1] if answers else ""), self.status()

    def screenshot(self, path: str | os.PathLike) -> Path:
        """The whole page (not only the window) as a PNG."""
        width, height = self.driver.execute_script(
            "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
        # A headless window cannot outgrow its screen; a device-metrics override can, so the shot holds it all.
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": int(width), "height": int(height), "deviceScaleFactor": 1,
                                     "mobile": False})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def shoot(model: str, wav: str, out: str, tts: str | None = None, instruction: str = "") -> tuple[str, str]:
    """Serve ``model`` on a free loopback port, ask with ``wav`` in Chromium, save the answered page to ``out``.

    Returns (answer, status). Raises RuntimeError when no browser is installed.
    """
    from audiollm.serve import build_app, launch, quiet_gradio
    from audiollm.serve_model import Responder

    found = find_browser()
    if found is None:
        raise RuntimeError(f"no browser: install Chromium and its driver (one of {BROWSERS} and chromedriver on "
                           "PATH; Debian: apt-get install chromium chromium-driver)")
    quiet_gradio()
    app = build_app(Responder(model, tts))
    url = launch(app, "127.0.0.1", free_port(), block=False)
    driver = open_browser(*found)
    try:
        page = Page(driver, url).open()
        result = page.ask(wav, instruction, voiced=tts is not None)
        time.sleep(0.5)  # the player draws its waveform after its source is set
        page.screenshot(out)
        return result
    finally:
        driver.quit()
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audiollm.serve_shot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder (as for audiollm serve)")
    parser.add_argument("--tts", metavar="DIR", help="tts folder to speak the answer")
    parser.add_argument("--wav", required=True, help="the spoken question")
    parser.add_argument("--instruction", default="", help="typed instruction sent with the question")
    parser.add_argument("--out", required=True, metavar="PNG", help="where the screenshot goes")
    args = parser.parse_args(argv)
    from audiollm.serve_model import ServeError

    try:
        answer, status = shoot(args.model, args.wav, args.out, args.tts, args.instruction)
    except (ServeError, RuntimeError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(f"answer: {answer}" + (f"\nmessage: {status}" if status else "") + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
