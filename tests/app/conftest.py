"""Fixtures of the page tests: the page served on 127.0.0.1 over the shared explorer
(`tests/galleries.py`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from engine.explorer import Explorer, GallerySession


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def server(explorer: Explorer) -> Iterator[str]:
    """The page served on 127.0.0.1 for the session; yields its URL."""
    from app.page import build_app, launch_options

    demo = build_app(explorer)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, **launch_options(explorer))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def handlers(explorer: Explorer):  # -> app.handlers.PageHandlers
    """The handlers of a built (not served) page: `build_app` fills their components."""
    from app.handlers import PageHandlers
    from app.page import build_app

    handlers = PageHandlers(explorer)
    build_app(explorer, handlers=handlers)
    return handlers


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    """The shared explorer's first gallery (the tiny one)."""
    return explorer.session(None)
