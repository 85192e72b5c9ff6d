"""How the engine's errors and progress reach the user: typed errors as Gradio messages, the
engine's (fraction, message) progress callback as a Gradio progress bar."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gradio as gr

from engine.errors import EngineError

logger = logging.getLogger(__name__)


@contextmanager
def engine_errors_as_gradio() -> Iterator[None]:
    """Turn the engine's typed errors into messages shown to the user (logged, no traceback)."""
    try:
        yield
    except EngineError as error:
        logger.info("request refused: %s", error)
        raise gr.Error(str(error), print_exception=False) from error


def gradio_progress(progress: gr.Progress) -> Callable[[float, str], None]:
    """The engine's progress callback, shown on `progress` (a handler's gr.Progress)."""
    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)
    return report


def owner(request: gr.Request | None) -> str | None:
    """The browser session a request comes from (None without one)."""
    return None if request is None else request.session_hash
