"""How the engine's errors and progress reach the user: typed errors as one message on the
page, the engine's (fraction, message) progress callback as a Gradio progress bar.

A handler raises `gr.Error` (the engine's typed errors become one through
`engine_errors_as_gradio`); the wiring wraps every user event with `shown_in`, which turns that
error into the text of the page's single message area and leaves every other output as it was.
Gradio's own handling would mark each output of the event with an "Error" badge.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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


def message_text(error: gr.Error) -> str:
    """What the message area shows for a refused request."""
    return f"⚠️ {error.message}"


def shown_in(message: gr.components.Component, function: Callable[..., Any],
             outputs: Sequence[Any]) -> Callable[..., Any]:
    """`function` as an event handler whose refusals (`gr.Error`) go to `message` alone.

    The wrapped handler returns a {component: value} dict: a dict result gains an empty
    `message` (a successful action clears the last refusal); a tuple or list result is keyed by
    `outputs`, a single value by the only output. A generator stays a generator (cancelling the
    event closes the wrapped one). Gradio inspects the signature for gr.Progress and
    gr.Request parameters: `functools.wraps` keeps it.
    """
    outputs = list(outputs)

    def keyed(result: Any) -> dict[Any, Any]:
        if isinstance(result, dict):
            return {message: "", **result}
        if len(outputs) == 1:
            return {message: "", outputs[0]: result}
        if not isinstance(result, (tuple, list)) or len(result) != len(outputs):
            raise TypeError(f"{function} returned {type(result).__name__} for {len(outputs)} "
                            "outputs")
        return {message: "", **dict(zip(outputs, result, strict=True))}

    def refused(error: gr.Error) -> dict[Any, Any]:
        logger.info("shown to the user: %s", error.message)
        return {message: message_text(error)}

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def generator(*args: Any, **kwargs: Any) -> Iterator[dict[Any, Any]]:
            inner = function(*args, **kwargs)
            try:
                for result in inner:
                    yield keyed(result)
            except gr.Error as error:
                yield refused(error)
            finally:
                inner.close()
        return generator

    @functools.wraps(function)
    def handler(*args: Any, **kwargs: Any) -> dict[Any, Any]:
        try:
            return keyed(function(*args, **kwargs))
        except gr.Error as error:
            return refused(error)
    return handler


def gradio_progress(progress: gr.Progress) -> Callable[[float, str], None]:
    """The engine's progress callback, shown on `progress` (a handler's gr.Progress)."""
    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)
    return report


def owner(request: gr.Request | None) -> str | None:
    """The browser session a request comes from (None without one)."""
    return None if request is None else request.session_hash
