"""Debian's Firefox ESR, driven over WebDriver BiDi: the protocol Firefox itself speaks
(`--remote-debugging-port`), so no geckodriver (not packaged for Debian) and no
Playwright build of Firefox (a download) is needed. Only what the dashboard tests use."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from app.launcher import free_port

PREFS = {  # a quiet, offline profile
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "extensions.update.enabled": False,
    "browser.newtabpage.enabled": False,
}


def firefox_path() -> str | None:
    return os.environ.get("LQF_FIREFOX") or shutil.which("firefox-esr") \
        or shutil.which("firefox")


class BidiError(RuntimeError):
    pass


class Firefox:
    """One headless Firefox with one tab; `errors` collects the page's console errors and
    uncaught exceptions."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60):
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text("".join(
            f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items()))
        port = free_port()
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-remote", "--profile", str(profile),
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ws = connect(f"ws://127.0.0.1:{port}/session", open_timeout=5,
                                  max_size=64 << 20)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.5)
        self.send("session.new", {"capabilities": {}})
        self.context = self.send("browsingContext.getTree", {})["contexts"][0]["context"]
        self.send("session.subscribe", {"events": ["log.entryAdded"]})

    def send(self, method: str, params: dict[str, Any], timeout: float = 60) -> Any:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("type") == "event":
                params_ = message.get("params", {})
                if message.get("method") == "log.entryAdded" and params_.get("level") == "error":
                    self.errors.append(str(params_.get("text")))
                continue
            if message.get("id") != ident:
                continue
            if message.get("type") == "error":
                raise BidiError(f"{method}: {message.get('error')}: {message.get('message')}")
            return message["result"]

    def goto(self, url: str) -> None:
        self.send("browsingContext.navigate", {"context": self.context, "url": url,
                                               "wait": "complete"})

    def js(self, expression: str) -> Any:
        """The value of a JS expression in the page (promises awaited)."""
        result = self.send("script.evaluate", {
            "expression": expression, "target": {"context": self.context},
            "awaitPromise": True, "resultOwnership": "none"})
        if result.get("type") == "exception":
            raise BidiError(result["exceptionDetails"].get("text"))
        return _value(result["result"])

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
                if value:
                    return value
            except BidiError:  # e.g. the page navigated while evaluating
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"never true in Firefox: {expression}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        data = self.send("browsingContext.captureScreenshot", {"context": self.context})
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _value(remote: dict[str, Any]) -> Any:
    """A BiDi RemoteValue as Python (the primitives and arrays the tests ask for)."""
    kind = remote.get("type")
    if kind in {"undefined", "null"}:
        return None
    if kind == "array":
        return [_value(v) for v in remote.get("value", [])]
    return remote.get("value")
