"""Headless Chromium for the dashboard's browser tests, driven over the DevTools protocol.

No browser library and no websocket: Chromium is started with ``--remote-debugging-pipe``,
which makes it read DevTools commands on file descriptor 3 and write answers and events on
descriptor 4, each a JSON text followed by a NUL byte. A shell moves the pipes of the
child's standard input and output there. `Browser.open(url)` loads a page in a fresh tab and
returns a `Page` with everything the page did that a test asks about: console messages,
uncaught exceptions, log entries (Content-Security-Policy violations among them) and
JavaScript dialogs (each one dismissed at once, so that an ``alert`` cannot hang the test).

The flags are the ones this machine needs (docs of the test machines): headless, no
sandbox (root), no GPU, and no background networking, which on a closed network only fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    pass


@dataclass
class Page:
    """What one page load showed and did."""

    session: str
    url: str
    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown
    log: list[dict[str, Any]] = field(default_factory=list)  # Log.entryAdded entries
    dialogs: list[dict[str, Any]] = field(default_factory=list)  # Page.javascriptDialogOpening
    responses: list[dict[str, Any]] = field(default_factory=list)  # Network.responseReceived

    def problems(self) -> list[str]:
        """Every console message, exception, warning or error log entry and dialog."""
        out = [f"console.{c.get('type')}: {_args(c)}" for c in self.console]
        out += [f"exception: {e.get('exceptionDetails', {}).get('text')}" for e in self.exceptions]
        out += [
            f"log {e.get('level')} ({e.get('source')}): {e.get('text')}"
            for e in self.log
            if e.get("level") in ("warning", "error")
        ]
        out += [f"dialog {d.get('type')}: {d.get('message')}" for d in self.dialogs]
        return out


def _args(call: dict[str, Any]) -> str:
    return " ".join(str(a.get("value", a.get("description", ""))) for a in call.get("args", []))


class Browser:
    """One Chromium process; `close()` ends it (by its own process id)."""

    def __init__(self, binary: str, *, stderr: Path | None = None) -> None:
        self._profile = tempfile.mkdtemp(prefix="mxguard-chromium-")
        err = stderr.open("wb") if stderr else subprocess.DEVNULL
        command = [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"]
        # fd 3 <- our stdin pipe (commands), fd 4 -> our stdout pipe (answers and events)
        self._proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        self._next = 0
        self._lock = threading.Lock()
        self._answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("Browser.getVersion", timeout=30)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        buffer = b""
        while True:
            chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiting = self._answers.get(message["id"])
                    if waiting is not None:
                        waiting.put(message)
                else:
                    self._events.put(message)

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:  # fmt: skip
        with self._lock:
            self._next += 1
            ident = self._next
            answer: queue.Queue[dict[str, Any]] = queue.Queue()
            self._answers[ident] = answer
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message).encode() + b"\0")
        self._proc.stdin.flush()
        try:
            reply = answer.get(timeout=timeout)
        except queue.Empty:
            raise CdpError(f"no answer to {method} within {timeout} s") from None
        finally:
            with self._lock:
                self._answers.pop(ident, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def open(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        bypass_csp: bool = False,
        width: int = 1280,
        height: int = 900,
        settle: float = 0.15,
        timeout: float = 20.0,
    ) -> Page:
        """Load `url` in a new tab and wait for its load event (plus `settle` seconds, for
        anything a page would do late); the tab stays open for `evaluate` and `screenshot`."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(session, url)
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.call(method, session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        if headers:
            self.call("Network.setExtraHTTPHeaders", {"headers": headers}, session=session)
        if bypass_csp:
            self.call("Page.setBypassCSP", {"enabled": True}, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + timeout
        loaded_at: float | None = None
        while True:
            now = time.monotonic()
            if loaded_at is not None and now >= loaded_at + settle:
                return page
            if now >= deadline:
                raise CdpError(f"{url} did not load within {timeout} s")
            wait = min(deadline, (loaded_at + settle) if loaded_at else deadline) - now
            try:
                event = self._events.get(timeout=max(wait, 0.01))
            except queue.Empty:
                continue
            if event.get("sessionId") != session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Page.loadEventFired":
                loaded_at = time.monotonic()
            elif method == "Runtime.consoleAPICalled":
                page.console.append(params)
            elif method == "Runtime.exceptionThrown":
                page.exceptions.append(params)
            elif method == "Log.entryAdded":
                page.log.append(params.get("entry", {}))
            elif method == "Network.responseReceived":
                page.responses.append(params.get("response", {}))
            elif method == "Page.javascriptDialogOpening":
                page.dialogs.append(params)
                self.call("Page.handleJavaScriptDialog", {"accept": False}, session=session)

    def evaluate(self, page: Page, expression: str) -> Any:
        """The value of `expression` in the page (DevTools evaluation, not subject to CSP)."""
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True},
            session=page.session,
        )  # fmt: skip
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, page: Page, path: Path, *, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=page.session)["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                              "scale": 1}  # fmt: skip
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params, session=page.session, timeout=30)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(CdpError, OSError, ValueError):
            self.call("Browser.close", timeout=5)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
