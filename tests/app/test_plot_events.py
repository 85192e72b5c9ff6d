"""The plots' script (`app/plot_events.js`) in a real browser, on a minimal page.

A gr.Plot of `embedding_figure` over nine points with real PNG thumbnails, the two hidden
event Textboxes and visible outputs their `.input` handlers write. Playwright moves the mouse
over the plot (plotly's own hover, click and box-select events): the thumbnail appears next to
the cursor and loads, a click reaches the handler with its file, a redraw of the plot does not
bind the script twice, a box selection reaches the handler with the files inside it. The
browser test skips like tests/app/test_browser.py where chromium or Playwright is missing; the
value formats are checked without a browser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from app.plot_events import (
    CLICK_ELEM_ID,
    KNN_ELEM_ID,
    MAP_ELEM_ID,
    PLOT_EVENTS,
    QUERY_AP_ELEM_ID,
    SCRIPT,
    SELECTION_ELEM_ID,
    TOOLTIP_ID,
    clicked_file,
    event_box,
    plot_events_js,
    selected_files,
)
from app.plots import embedding_figure, file_url, knn_figure
from engine.core.knn import knn_graph
from engine.views.neighbourhood import neighbourhood_graph
from tests.app.browser import needs_browser, open_browser
from tests.app.conftest import free_port

STEP_MS = 30_000
GRID = np.array([(x, y) for y in (0.0, 1.0, 2.0) for x in (0.0, 1.0, 2.0)])
"""Nine points on a 3 x 3 grid; row r at (r % 3, r // 3)."""
FILES = [f"flower_{row}.jpg" for row in range(len(GRID))]


pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(no_silent_downcasting|copy keyword):Warning")


def test_click_and_selection_values_read_back():
    assert clicked_file("a|b.jpg|1796610632293-5") == "a|b.jpg"      # the last bar splits
    assert clicked_file("") is clicked_file(None) is clicked_file("no-nonce") is None
    assert selected_files('["x.jpg", "y z.jpg"]') == ["x.jpg", "y z.jpg"]
    assert selected_files("[]") == selected_files("") == selected_files("{bad") == []
    assert selected_files('{"x": 1}') == [] and selected_files('["x", 3, ""]') == ["x"]


def test_the_script_is_called_with_the_page_ids():
    script = plot_events_js()
    assert script.startswith("() => (\n") and SCRIPT.read_text().strip() in script
    config = json.loads(script.rsplit(")(", 1)[1][:-1])
    assert config == {"plots": PLOT_EVENTS, "click": CLICK_ELEM_ID,
                      "selection": SELECTION_ELEM_ID, "tooltip": TOOLTIP_ID}
    assert set(PLOT_EVENTS) == {MAP_ELEM_ID, KNN_ELEM_ID, QUERY_AP_ELEM_ID}
    assert "plotly_click" in PLOT_EVENTS[QUERY_AP_ELEM_ID]
    assert "plotly_selected" in PLOT_EVENTS[MAP_ELEM_ID]
    assert "plotly_selected" not in PLOT_EVENTS[KNN_ELEM_ID]
    handled = set(re.findall(r"^    (plotly_\w+):", SCRIPT.read_text(), flags=re.M))
    assert handled == {event for events in PLOT_EVENTS.values() for event in events}


def figure(urls: list[str], title: str) -> Any:
    labels = np.arange(len(GRID)) % 2
    return embedding_figure(GRID, files=FILES, labels=labels, class_names=["iris", "tulip"],
                            query_xy=(1.5, 0.5), result_rows=[4, 8],
                            result_distances=[0.1, 0.2], thumbnail_urls=urls, title=title)


def graph_figure(urls: list[str]) -> Any:
    """The kNN graph of a query among the nine rows (features: the grid on a sphere cap)."""
    features = np.concatenate([GRID, np.full((len(GRID), 1), 4.0)], axis=1)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    query = features[4] + 0.01
    graph = neighbourhood_graph(query / np.linalg.norm(query), features, [4, 1, 5], knn_graph(
        features.astype(np.float32), 4), edge_k=2)
    return knn_figure(graph, [4, 1, 5], [0.1, 0.2, 0.3], files=FILES, labels=None,
                      class_names=[], thumbnail_urls=urls)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The minimal page served on 127.0.0.1; yields its URL, the thumbnail URLs and the
    values each hidden Textbox's handler received."""
    import gradio as gr
    from PIL import Image

    folder = tmp_path_factory.mktemp("thumbs")
    urls = []
    for row in range(len(GRID)):
        path = folder / f"thumb {row}.png"                        # a space to percent-encode
        Image.new("RGB", (40 + row, 30), (20 * row, 120, 200)).save(path)
        urls.append(file_url(path))
    received: dict[str, list[str]] = {"click": [], "selection": []}

    def on_click(value: str) -> str:
        received["click"].append(value)
        return f"{clicked_file(value)} #{len(received['click'])}"

    def on_selection(value: str) -> str:
        received["selection"].append(value)
        return json.dumps(sorted(selected_files(value)))

    with gr.Blocks() as demo:
        plot = gr.Plot(figure(urls, "first"), elem_id=MAP_ELEM_ID)
        gr.Plot(graph_figure(urls), elem_id=KNN_ELEM_ID)
        clicks, selections = event_box(CLICK_ELEM_ID), event_box(SELECTION_ELEM_ID)
        clicked = gr.Textbox(label="clicked", elem_id="clicked")
        selected = gr.Textbox(label="selected", elem_id="selected")
        redraw = gr.Button("redraw", elem_id="redraw")
        clicks.input(on_click, clicks, clicked)
        selections.input(on_selection, selections, selected)
        redraw.click(lambda: figure(urls, "second"), None, plot)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, allowed_paths=[str(folder)], js=plot_events_js())
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "thumbnails": urls, "received": received}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[str]]]:
    """A page of headless chromium on a fresh profile, and its uncaught errors."""
    with open_browser(tmp_path_factory.mktemp("chromium-profile"), 1200, 900,
                      STEP_MS) as found:
        yield found.page, found.errors


def pixel(page: Any, x: float, y: float) -> tuple[float, float]:
    """Where data point (x, y) of the map is on the page: the plot area (plotly's drag layer)
    plus the axes' data-to-pixel maps (the gallery points are WebGL, not DOM elements)."""
    return tuple(page.evaluate(
        """([id, x, y]) => {
               const plot = document.querySelector(`#${id} .js-plotly-plot`);
               const area = plot.querySelector(".nsewdrag").getBoundingClientRect();
               const layout = plot._fullLayout;
               return [area.left + layout.xaxis.d2p(x), area.top + layout.yaxis.d2p(y)];
           }""", [MAP_ELEM_ID, x, y]))


def click(page: Any, x: float, y: float) -> None:
    """Click at (x, y) as a user does: move there (plotly picks the point on hover), click."""
    page.mouse.move(x, y, steps=3)
    page.wait_for_timeout(100)
    page.mouse.click(x, y)


def output(page: Any, elem_id: str, expected: str) -> None:
    try:
        page.wait_for_function(
            "([id, expected]) => document.querySelector(`#${id} textarea`)?.value === expected",
            arg=[elem_id, expected], polling=50, timeout=10_000)
    except Exception as error:
        boxes = page.evaluate("""() => [...document.querySelectorAll('textarea, input')].map(
            f => (f.closest('[id]')?.id ?? '') + '=' + f.value)""")
        raise AssertionError(f"#{elem_id} did not get {expected!r}; fields {boxes}") from error


@needs_browser
def test_hover_click_and_box_select_reach_the_page(page_url, browser) -> None:
    page, errors = browser
    page.goto(page_url["url"], wait_until="load")
    page.locator(f"#{MAP_ELEM_ID} .js-plotly-plot .nsewdrag").wait_for()
    for box in (CLICK_ELEM_ID, SELECTION_ELEM_ID):                 # in the DOM, never seen
        assert page.locator(f"#{box} textarea, #{box} input").count() == 1
        assert not page.locator(f"#{box}").is_visible()
    # SVG points: the results (rows 4 and 8) then the query; they sit where the axes map them
    results = page.locator(f"#{MAP_ELEM_ID} .scatterlayer .point")
    assert results.count() == 3
    box = results.first.bounding_box()
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert np.allclose(centre, pixel(page, *GRID[4]), atol=2)

    # hover a WebGL gallery point: its thumbnail floats next to the cursor and loads
    page.mouse.move(*pixel(page, *GRID[0]), steps=5)
    tooltip = page.locator(f"#{TOOLTIP_ID}")
    tooltip.wait_for(state="visible")
    assert tooltip.get_attribute("src") == page_url["thumbnails"][0]
    page.wait_for_function(f"document.getElementById('{TOOLTIP_ID}').naturalWidth === 40",
                           polling=50)
    image, cursor = tooltip.bounding_box(), pixel(page, *GRID[0])
    assert 0 < cursor[0] - (image["x"] + image["width"]) < 40               # left of the cursor
    assert abs(image["y"] + image["height"] / 2 - cursor[1]) < 2          # centred on it
    page.mouse.move(*pixel(page, *GRID[1]), steps=5)               # another point, its image
    page.wait_for_function(
        "([id, url]) => document.getElementById(id).getAttribute('src') === url",
        arg=[TOOLTIP_ID, page_url["thumbnails"][1]], polling=50)
    page.mouse.move(*pixel(page, 1.5, 1.5), steps=5)               # off every point: gone
    tooltip.wait_for(state="hidden")

    # click a gallery point, then a result point, then the same point again
    received = page_url["received"]["click"]
    click(page, *pixel(page, *GRID[2]))
    output(page, "clicked", f"{FILES[2]} #1")
    click(page, *centre)
    output(page, "clicked", f"{FILES[4]} #2")
    click(page, *centre)
    output(page, "clicked", f"{FILES[4]} #3")
    assert received[1] != received[2] and clicked_file(received[2]) == FILES[4]
    click(page, *pixel(page, 1.5, 0.5))                        # the query: no file
    click(page, *pixel(page, *GRID[6]))
    output(page, "clicked", f"{FILES[6]} #4")

    # a redraw replaces the figure; the script binds to it once, not twice
    page.locator("#redraw").click()
    page.wait_for_function(
        f"document.querySelector('#{MAP_ELEM_ID} .gtitle')?.textContent === 'second'",
        polling=50)
    click(page, *pixel(page, *GRID[3]))
    output(page, "clicked", f"{FILES[3]} #5")
    page.wait_for_timeout(300)                                      # a second call would be late
    assert len(received) == 5

    # box-select the lower-right four points (rows 1, 2, 4, 5; row 4 is also a result)
    page.mouse.move(*pixel(page, 1.0, 1.0))
    page.locator(f"#{MAP_ELEM_ID} .modebar-btn[data-val='select']").click()
    start, end = pixel(page, 0.5, -0.05), pixel(page, 2.05, 1.5)    # inside the plot area
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=10)
    page.mouse.up()
    output(page, "selected", json.dumps(sorted(FILES[row] for row in (1, 2, 4, 5))))
    assert json.loads(page_url["received"]["selection"][-1]).count(FILES[4]) == 1
    page.mouse.dblclick(*pixel(page, 0.5, 1.5))                   # clears the selection
    output(page, "selected", "[]")

    # the kNN graph: its nodes (numbered by rank) are clickable too
    node = page.locator(f"#{KNN_ELEM_ID} .scatterlayer .point").first
    node.scroll_into_view_if_needed()
    box = node.bounding_box()
    click(page, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    output(page, "clicked", f"{FILES[4]} #6")
    assert not errors, f"uncaught page errors {errors}"
