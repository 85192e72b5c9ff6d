"""Number inputs that clamp a typed value into their range instead of refusing the event.

Gradio's Slider and Number raise when a value typed into their box is outside [minimum,
maximum]; the event then fails and every output shows an "Error" badge. `clamped` keeps
Gradio's widget and clamps in its `preprocess`; a handler that also returns the value to its
control shows the clamped value in the box. (An instance's preprocess is replaced rather than
the class subclassed: Gradio writes a .pyi stub beside every component subclass it sees.)
"""

from __future__ import annotations

import types
from typing import TypeVar

import gradio as gr

NumberInput = TypeVar("NumberInput", gr.Slider, gr.Number)


def clamp(value: float | None, minimum: float | None, maximum: float | None) -> float | None:
    """`value` inside [minimum, maximum] (an open end does not clamp; None stays None)."""
    if value is None:
        return None
    if minimum is not None and value < minimum:
        return minimum
    if maximum is not None and value > maximum:
        return maximum
    return value


def _clamping_preprocess(self: gr.Slider | gr.Number, payload: float | None
                         ) -> float | int | None:
    if payload is None:
        return None
    return gr.Number.round_to_precision(clamp(payload, self.minimum, self.maximum),
                                        self.precision)


def clamped(component: NumberInput) -> NumberInput:
    """`component` (a Slider or Number) with typed values clamped into its range."""
    component.preprocess = types.MethodType(_clamping_preprocess, component)  # type: ignore[method-assign]
    return component
