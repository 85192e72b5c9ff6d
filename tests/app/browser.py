"""Headless chromium for the page's browser tests: Debian's chromium driven by Playwright.

Playwright cannot download its own browser here; without the background-networking flags
chromium keeps calling home on a closed network. A test module marks itself with
`needs_browser`, which skips it (with the reason) where chromium or Playwright is missing; CI
(.ci/run) installs both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("RETRIEVAL_EXPLORER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def missing_browser() -> str:
    """Why the browser cannot run here ('' when it can); checked before any server starts."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -r requirements-dev.txt)"
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no chromium at {CHROMIUM} (apt-get install chromium, or set "
                "RETRIEVAL_EXPLORER_CHROMIUM)")
    return ""


needs_browser = pytest.mark.skipif(bool(missing_browser()), reason=missing_browser() or "-")


@dataclass
class Browser:
    """A chromium page, with its uncaught errors (asserted) and console warnings (printed)."""

    page: Any
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_browser(profile: Path, width: int, height: int, step_ms: int) -> Iterator[Browser]:
    """A page of headless chromium on a fresh profile folder, `step_ms` its default timeout."""
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height})
        context.set_default_timeout(step_ms)
        found = Browser(context.pages[0] if context.pages else context.new_page())
        found.page.on("pageerror", lambda error: found.errors.append(str(error)))
        found.page.on("console", lambda message: message.type in ("error", "warning")
                      and found.console.append(f"{message.type}: {message.text}"))
        try:
            yield found
        finally:
            context.close()


def thumbnails(page: Any, elem_id: str) -> Any:
    """The thumbnails of a gr.Gallery."""
    return page.locator(f"#{elem_id} .thumbnail-item")


def signature(page: Any, elem_id: str) -> str:
    """The captions and image sources of a gallery: changes when its results change."""
    return page.eval_on_selector_all(
        f"#{elem_id} .thumbnail-item",
        "items => items.map(i => (i.querySelector('img')?.src ?? '') + '|' + i.innerText)"
        ".join('\\n')")
