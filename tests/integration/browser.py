"""Headless Chromium for the dashboard tests: Debian's chromium, driven by Playwright.

Playwright's own browser download cannot run here, so the test gives it the system
executable. axe-core comes from npm (tests/browser/package.json, `make browser-deps`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
AXE_JS = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
# CI sets it: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("LQF_REQUIRE_BROWSER") == "1"


def chromium_path() -> str | None:
    return os.environ.get("LQF_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")


def require_browser() -> tuple[str, str]:
    """(chromium executable, axe-core source), or skip (fail under LQF_REQUIRE_BROWSER)."""
    missing = []
    exe = chromium_path()
    if exe is None:
        missing.append("chromium (apt-get install -y chromium)")
    if not AXE_JS.is_file():
        missing.append("axe-core (make browser-deps)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip, the dev extra)")
    if missing:
        message = "dashboard browser tests need " + ", ".join(missing)
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    assert exe is not None
    return exe, AXE_JS.read_text()


def serious_violations(page: Any, axe_source: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        # Evaluated through the DevTools protocol, which the page's CSP (no inline
        # scripts) does not govern; a <script> tag would be refused, as it should be.
        page.evaluate(axe_source + "\n;undefined")
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"]][:5]}
            for v in result["violations"] if v["impact"] in {"serious", "critical"}]
