"""Fixtures of the page tests: the page served on 127.0.0.1 over the shared explorer
(`tests/galleries.py`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from engine.explorer import Explorer


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
