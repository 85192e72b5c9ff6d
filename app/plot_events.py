"""The page's script for its plots (`plot_events.js`) and the hidden Textboxes it writes into.

Hovering a gallery point shows its thumbnail next to the cursor; clicking a point of the map,
the kNN graph or the failure browser's per-query AP plot writes `"<file>|<nonce>"` into the
Textbox CLICK_ELEM_ID (the nonce makes a second click on the same point a new value, so
`.input` fires again); a box or lasso selection on the map writes a JSON list of the selected
files into SELECTION_ELEM_ID (`"[]"` when the selection is cleared). `clicked_file` and
`selected_files` read those values back.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

MAP_ELEM_ID = "embedding-map"
KNN_ELEM_ID = "knn-plot"
QUERY_AP_ELEM_ID = "query-ap-plot"
CLICK_ELEM_ID = "plot-click"
SELECTION_ELEM_ID = "plot-selection"
TOOLTIP_ID = "plot-hover-image"
SCRIPT = Path(__file__).with_name("plot_events.js")
PLOT_EVENTS = {
    MAP_ELEM_ID: ["plotly_hover", "plotly_unhover", "plotly_click", "plotly_selected",
                  "plotly_deselect"],
    KNN_ELEM_ID: ["plotly_hover", "plotly_unhover", "plotly_click"],
    QUERY_AP_ELEM_ID: ["plotly_hover", "plotly_unhover", "plotly_click"],
}
"""The plotly events the script handles on each gr.Plot (by elem_id)."""


def plot_events_js() -> str:
    """The script for `Blocks.launch(js=...)` (Gradio 6 takes `js` there, not in gr.Blocks):
    `plot_events.js` called with the page's element ids. Gradio runs it once the page is ready.
    """
    config = {"plots": PLOT_EVENTS, "click": CLICK_ELEM_ID, "selection": SELECTION_ELEM_ID,
              "tooltip": TOOLTIP_ID}
    return f"() => (\n{SCRIPT.read_text(encoding='utf-8').strip()}\n)({json.dumps(config)})"


def event_box(elem_id: str) -> gr.Textbox:
    """A Textbox the script writes into: in the DOM (so it has a field to write) but never
    shown. `visible=False` would leave it out of the DOM; `visible="hidden"` keeps it there
    without taking space. Listen to its `.input`."""
    return gr.Textbox(elem_id=elem_id, visible="hidden", interactive=True, show_label=False,
                      container=False)


def clicked_file(value: str | None) -> str | None:
    """The file name of a click value `"<file>|<nonce>"`; None for an empty or bad value."""
    file, bar, _ = (value or "").rpartition("|")
    return file if bar and file else None


def selected_files(value: str | None) -> list[str]:
    """The file names of a selection value (a JSON list); [] for an empty or bad value."""
    try:
        files = json.loads(value or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(files, list):
        return []
    return [file for file in files if isinstance(file, str) and file]
