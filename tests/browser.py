"""Open a page in headless Chromium and ask it what it did, over the DevTools protocol.

Not part of the package: tests import it as ``from browser import open_page``. Chromium speaks
the protocol over a pipe (``--remote-debugging-pipe``: commands in on fd 3, replies and events
out on fd 4, each a JSON message ended by a NUL byte), the transport Puppeteer and Playwright
use, so no websocket library is needed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    images: int = 0
    images_decoded: bool = False
    title: str = ""
    body_text: str = ""
    screenshot: Path | None = None
    # Each image as the browser drew it: (alt text, shown width, shown height, the fraction of
    # its pixels in colour): axes, ticks and titles are grey and black, so a figure whose
    # panels are blank draws almost no colour; its curves, bars and heatmap cells do.
    drawn: list[tuple[str, int, int, float]] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)  # h1-h3, in page order


# The colour of each image: drawn onto a canvas at its natural size, the share of its pixels whose
# channels differ by more than 60 (not white, grey or black). Images are data: URIs, so the
# canvas stays readable.
INK = """JSON.stringify(Array.from(document.images).map(img => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
    if (Math.max(r, g, b) - Math.min(r, g, b) > 60) ink++;
  }
  return [img.alt, img.width, img.height, ink / Math.max(1, pixels.length / 4)];
}))"""


class DevTools:
    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def onto_3_and_4() -> None:  # in the child, before exec: the browser reads fd 3, writes 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=onto_3_and_4,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self, method: str, session: str | None = None, timeout: float = 30.0, **params: Any
    ) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        result: dict[str, Any] = json.loads(message)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class Page:
    """One tab, attached: evaluate JavaScript in it, wait for the page to get somewhere."""

    def __init__(self, browser: DevTools, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (a promise is awaited); a JavaScript error raises."""
        result = self.browser.send("Runtime.evaluate", self.session, expression=expression,
                                   returnByValue=True, awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"]["exception"]["description"])
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until its value is truthy and return that value (a page that
        renders with JavaScript fills in after its load event)."""
        deadline = time.monotonic() + timeout
        value = self.evaluate(expression)
        while not value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {value!r} after {timeout:.0f} s: {expression}")
            time.sleep(0.2)
            value = self.evaluate(expression)
        return value


@contextlib.contextmanager
def browse(url: str, profile: Path, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A headless Chromium tab that has loaded ``url``, its network requests recorded in
    ``page.browser.events``; the browser is closed on exit."""
    binary = chromium()
    assert binary is not None, "chromium is not installed"
    browser = DevTools(binary, profile)
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Network.enable", session)
        browser.send("Page.enable", session)
        browser.send(
            "Emulation.setDeviceMetricsOverride", session,
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        browser.send("Page.navigate", session, url=url)
        browser.wait_for("Page.loadEventFired", timeout=60)
        yield Page(browser, session)
    finally:
        browser.close()


def open_page(
    page: Path, profile: Path, screenshot: Path | None = None, width: int = 1280
) -> PageVisit:
    """Load ``page`` from disk, record every network request it attempts, check its images, and
    save a full-page screenshot."""
    with browse(page.resolve().as_uri(), profile, width) as tab:
        browser, session, evaluate = tab.browser, tab.session, tab.evaluate
        visit = PageVisit(
            images=int(evaluate("document.images.length")),
            images_decoded=bool(
                evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            ),
            title=str(evaluate("document.title")),
            body_text=str(evaluate("document.body.innerText")),
            drawn=[tuple(i) for i in json.loads(evaluate(INK))],
            headings=list(
                evaluate("[...document.querySelectorAll('h1,h2,h3')].map(h => h.innerText)")
            ),
        )
        if screenshot is not None:
            height = int(evaluate("document.documentElement.scrollHeight"))
            browser.send(
                "Emulation.setDeviceMetricsOverride", session,
                width=width, height=min(height, 16000), deviceScaleFactor=1, mobile=False,
            )  # fmt: skip
            shot = browser.send("Page.captureScreenshot", session, format="png", timeout=60)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            visit.screenshot = screenshot
        visit.requests = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        return visit
