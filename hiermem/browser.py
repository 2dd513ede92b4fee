"""A headless Chromium driven over the DevTools protocol, for the report's and the explorer's checks.

`find_chromium()` finds Debian's `chromium` (or $CHROMIUM); `Browser` is a small client over
websocket-client (headless, a private profile, `--no-sandbox` as root); `check_page` loads a page and
returns every <img> with its naturalWidth and every console error, optionally saving a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = "install Debian's chromium (`apt-get install -y chromium`) or set $CHROMIUM to a Chrome/Chromium binary"

def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium/Chrome on PATH, else None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() or shutil.which(explicit) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """A headless Chromium driven over the DevTools protocol (one page; `with Browser() as b: ...`)."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError(f"no Chromium found: {INSTALL_HINT}")
        self.width, self.height, self.timeout = width, height, timeout
        self._next_id = 0
        self.events: list[dict] = []
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "Browser":
        import websocket  # websocket-client

        self._profile = tempfile.mkdtemp(prefix="hiermem-chromium-")
        args = [self.binary, "--headless=new", "--disable-gpu", "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                f"--window-size={self.width},{self.height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = self._devtools_url()
        browser = websocket.create_connection(url, timeout=self.timeout, suppress_origin=True)
        self._ws = browser
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001
            pass
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout
        lines = []
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if not line:
                if self._proc.poll() is not None:
                    break
                continue
            lines.append(line.rstrip())
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                threading.Thread(target=self._drain, daemon=True).start()
                return match.group(1)
        self._proc.kill()
        raise BrowserError(f"{self.binary} did not start its DevTools endpoint: " + " | ".join(lines[-5:]))

    def _drain(self) -> None:
        for _ in self._proc.stderr:  # keep the pipe from filling up
            pass

    # -- protocol --------------------------------------------------------------------------
    def _call(self, method: str, params: dict | None = None, session: str | None = None,
              timeout: float | None = None) -> dict:
        self._next_id += 1
        msg_id = self._next_id
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            reply = self._receive(deadline)
            if reply is None:
                continue
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
        raise BrowserError(f"{method}: no reply within {timeout or self.timeout:.0f} s")

    def _receive(self, deadline: float) -> dict | None:
        import websocket
        self._ws.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            reply = json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            return None
        if "method" in reply:
            self.events.append(reply)
        return reply

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        """A command to the page."""
        return self._call(method, params, self._session, timeout)

    def wait_event(self, method: str, timeout: float | None = None, since: int = 0) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in self.events[since:]:
                if event.get("method") == method:
                    return event
            if time.monotonic() > deadline:
                raise BrowserError(f"no {method} within {timeout or self.timeout:.0f} s")
            self._receive(deadline)

    def pump(self, seconds: float) -> None:
        """Collect events for a while (console messages arriving after load)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive(deadline)

    # -- pages -----------------------------------------------------------------------------
    def open(self, url: str, timeout: float | None = None) -> None:
        """Navigate and wait for the load event."""
        since = len(self.events)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout, since)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if result.get("exceptionDetails"):
            raise BrowserError(f"evaluating {expression[:80]!r}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.5) -> Any:
        """Evaluate `expression` until it is truthy; returns its value (BrowserError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {expression[:120]!r}")
            self.pump(interval)

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                             "height": min(size["height"], 16000), "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        """Every error seen so far (see `console_errors`)."""
        return console_errors(self.events)


def console_errors(events: list[dict]) -> list[str]:
    """The errors among DevTools events: console.error calls, uncaught exceptions, failed loads (Log)."""
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                     for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


IMAGES_JS = """Promise.all(Array.from(document.images).map(img => (img.complete ? Promise.resolve() :
  new Promise(r => { img.addEventListener('load', r); img.addEventListener('error', r); }))))
  .then(() => Array.from(document.images).map(img => ({src: img.getAttribute('src').slice(0, 200),
                                                        naturalWidth: img.naturalWidth})))"""


def check_page(url: str, screenshot: str | Path | None = None, browser: Browser | None = None,
               full_page: bool = True, settle: float = 0.5) -> dict:
    """Load `url` in headless Chromium: {"images": [{src, naturalWidth}], "broken": [src of images with
    naturalWidth 0], "errors": [console errors], "links": [relative hrefs], "screenshot": path or None}."""
    own = browser is None
    browser = browser or Browser().__enter__()
    try:
        since = len(browser.events)
        browser.open(url)
        images = browser.evaluate(IMAGES_JS) or []
        browser.pump(settle)
        links = browser.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))")
        shot = browser.screenshot(screenshot, full_page=full_page) if screenshot else None
        errors = console_errors(browser.events[since:])
        return {"images": images, "broken": [i["src"] for i in images if not i["naturalWidth"]], "errors": errors,
                "links": links or [], "screenshot": shot}
    finally:
        if own:
            browser.__exit__(None, None, None)
