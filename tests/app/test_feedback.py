"""Refusals reach the page's one message area and nothing else; typed values are clamped."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pytest

from app.controls import clamp, clamped
from app.feedback import shown_in

MESSAGE, FIRST, SECOND = "message", "first", "second"


def refuse() -> dict[str, str]:
    raise gr.Error("not a recognised image: upload.jpg", print_exception=False)


def test_a_refusal_updates_only_the_message() -> None:
    handler = shown_in(MESSAGE, refuse, [FIRST, SECOND])
    assert handler() == {MESSAGE: "⚠️ not a recognised image: upload.jpg"}


def test_success_clears_the_message_and_keys_every_result() -> None:
    assert shown_in(MESSAGE, lambda: {FIRST: 1}, [FIRST])() == {MESSAGE: "", FIRST: 1}
    assert shown_in(MESSAGE, lambda: (1, 2), [FIRST, SECOND])() == {
        MESSAGE: "", FIRST: 1, SECOND: 2}
    assert shown_in(MESSAGE, lambda: [3], [FIRST])() == {MESSAGE: "", FIRST: [3]}
    with pytest.raises(TypeError):
        shown_in(MESSAGE, lambda: (1, 2, 3), [FIRST, SECOND])()


def test_a_generator_stays_one_and_is_closed_with_its_wrapper() -> None:
    closed = []

    def steps() -> Iterator[tuple[int, int]]:
        try:
            yield 1, 2
            yield 3, 4
            raise gr.Error("stopped", print_exception=False)
        finally:
            closed.append(True)

    wrapped = shown_in(MESSAGE, steps, [FIRST, SECOND])
    assert list(wrapped()) == [{MESSAGE: "", FIRST: 1, SECOND: 2},
                               {MESSAGE: "", FIRST: 3, SECOND: 4}, {MESSAGE: "⚠️ stopped"}]
    running = wrapped()
    next(running)
    running.close()  # what Gradio does when the event is cancelled
    assert closed == [True, True]


def test_the_wrapper_keeps_the_signature_gradio_reads() -> None:
    def handler(key: str, progress: gr.Progress = gr.Progress()) -> dict:
        return {}

    import inspect

    wrapped = shown_in(MESSAGE, handler, [FIRST])
    assert list(inspect.signature(wrapped).parameters) == ["key", "progress"]


def test_typed_values_are_clamped_into_the_range() -> None:
    assert clamp(100000, 1, 100) == 100 and clamp(-3, 0, None) == 0 and clamp(5, None, 4) == 4
    assert clamp(None, 0, 1) is None
    slider = clamped(gr.Slider(1, 100, value=20, step=1))
    assert slider.preprocess(100000) == 100 and slider.preprocess(0.2) == 1
    page = clamped(gr.Number(value=1, minimum=1, maximum=5, precision=0))
    assert page.preprocess(99) == 5 and isinstance(page.preprocess(2.4), int)
    assert gr.Slider(1, 100, value=20).get_block_name() == slider.get_block_name()
