"""The explorer page in a real browser: Debian's headless chromium driven by Playwright.

Uploads a query, checks every result gallery, both plots and the Compare tab, clicks an example
and a plot toggle, saves a full-page screenshot and prints how long each step took (timings are
reported, not asserted). Skips, with the reason, where chromium or Playwright is missing
(`tests.app.browser`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.text import BASELINE_LABEL
from engine import read_csv_export
from engine.explorer import BASELINE, DEFAULT_TOP_N, method_title
from engine.explorer.results import BASELINE_TITLE
from engine.rerank import list_rerankers
from tests.app.browser import Browser, needs_browser, open_browser, signature, thumbnails
from tests.galleries import CLASSES, PER_CLASS, demo_file

FIRST_QUERY_MS = 240_000
"""The first query embeds with the backbone and compiles numba for the map transform."""
STEP_MS = 60_000
EVIDENCE_SENTENCE = re.compile(r"(moved from \S+( the top \d+)? to|stayed at) #3: ")
"""The evidence panel's sentence for the third result of a method's strip."""


pytestmark = [
    needs_browser,
    # gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """A page of headless chromium on a fresh profile."""
    with open_browser(tmp_path_factory.mktemp("chromium-profile"), 1920, 1000,
                      STEP_MS) as found:
        yield found


def wait_for_results(page: Any, elem_ids: list[str], before: dict[str, str], count: int,
                     timeout: float) -> None:
    """Wait until each gallery shows `count` thumbnails that differ from `before`."""
    page.wait_for_function(
        """([ids, before, count]) => ids.every(id => {
               const items = [...document.querySelectorAll(`#${id} .thumbnail-item`)];
               const now = items.map(i => (i.querySelector('img')?.src ?? '') + '|' + i.innerText)
                                .join('\\n');
               return items.length === count && now !== (before[id] ?? '');
           })""",
        arg=[elem_ids, before, count], timeout=timeout, polling=100)


def timed(timings: dict[str, float], name: str, action: Callable[[], None]) -> None:
    start = time.perf_counter()
    action()
    timings[name] = time.perf_counter() - start


def test_page_in_browser(server: str, browser: Browser, tmp_path: Path) -> None:
    screenshot = tmp_path / "explorer.png"
    timings: dict[str, float] = {}
    try:
        explore(browser.page, server, timings, f"(screenshot: {screenshot})")
        assert not browser.errors, f"uncaught page errors {browser.errors} (see {screenshot})"
    finally:
        browser.page.screenshot(path=str(screenshot), full_page=True)
        print(f"\nscreenshot: {screenshot}")
        print("timings (s): " + ", ".join(f"{name} {seconds:.2f}"
                                          for name, seconds in timings.items()))
        for line in browser.console:
            print(f"browser console {line}")


def explore(page: Any, server: str, timings: dict[str, float], shot: str) -> None:
    """Drive the page; `timings` gets the seconds of each step, `shot` ends failure messages."""
    methods = list_rerankers()
    assert methods, "no re-ranker registered"
    first = methods[0]
    galleries = [f"baseline-{first}", f"reranked-{first}"]

    def upload(image: Path, timeout: float) -> None:
        before = {elem_id: signature(page, elem_id) for elem_id in galleries}
        page.locator("#query-upload input[type=file]").set_input_files(str(image))
        wait_for_results(page, galleries, before, DEFAULT_TOP_N, timeout)

    timed(timings, "page load", lambda: (
        page.goto(server, wait_until="load"),
        page.locator("#query-upload input[type=file]").wait_for(state="attached"),
        thumbnails(page, "examples").first.wait_for()))

    # A demo image of the second class that the tiny gallery does not hold.
    timed(timings, "upload -> results", lambda: upload(demo_file(1, PER_CLASS), FIRST_QUERY_MS))
    for elem_id in galleries:
        count = thumbnails(page, elem_id).count()
        assert count == DEFAULT_TOP_N, f"#{elem_id} shows {count} results {shot}"

    for elem_id in ("knn-plot", "embedding-map"):
        page.locator(f"#{elem_id} .js-plotly-plot").wait_for()
    points = page.locator("#knn-plot .scatterlayer .point").count()
    # the plotted method's results and the query, at least
    assert points >= DEFAULT_TOP_N + 1, f"the kNN plot draws {points} points {shot}"
    title = page.locator("#knn-plot .gtitle").text_content() or ""
    assert method_title(first) in title, f"kNN plot title {title!r} {shot}"

    timed(timings, "upload -> results (warm)", lambda: upload(demo_file(2, PER_CLASS), STEP_MS))

    # The plot toggle: show the baseline's results; only the plots are redrawn.
    def toggle() -> None:
        page.get_by_label(BASELINE_LABEL, exact=True).check()
        page.wait_for_function(
            "title => document.querySelector('#knn-plot .gtitle')?.textContent.includes(title)",
            arg=BASELINE_TITLE, polling=50)

    timed(timings, "plot toggle", toggle)

    # An example of the first class (the last upload was of the third): its thumbnail becomes
    # the query image and the results change.
    before = {elem_id: signature(page, elem_id) for elem_id in galleries}
    query_before = page.locator("#query-image img").get_attribute("src")
    timed(timings, "example -> results", lambda: (
        thumbnails(page, "examples").first.click(),
        wait_for_results(page, galleries, before, DEFAULT_TOP_N, STEP_MS)))
    query_after = page.locator("#query-image img").get_attribute("src")
    assert query_after and query_after != query_before, (
        f"the query image stayed {query_before!r} after clicking an example {shot}")
    top = thumbnails(page, galleries[0]).first.inner_text()
    assert CLASSES[0] in top, f"top baseline result {top!r} for a {CLASSES[0]} example {shot}"

    # A re-ranked result's evidence: clicking it opens the sentence below the strips.
    sentence = page.locator(f"#evidence-sentence-{first}")
    timed(timings, "result -> evidence", lambda: (
        thumbnails(page, galleries[1]).nth(2).click(),
        sentence.get_by_text(EVIDENCE_SENTENCE).wait_for()))

    # The rankings download: the example's rankings of every method (a gallery pick: the
    # uploads before it have no file), with their run card.
    def picked(text: str) -> bool:
        return read_csv_export(text)[0].extra["query"]["file"] is not None

    card, headers, rows = read_csv_export(download(page, "download-rankings-csv", timings,
                                                   picked))
    assert card.kind == "query rankings" and headers[:3] == ["method", "rank", "file"], shot
    assert {row[0] for row in rows} == {BASELINE, *methods}, f"rankings download {shot}"
    assert {row[3] for row in rows if row[1] == "1"} <= set(CLASSES.values()), shot
    data = json.loads(download(page, "download-rankings-json", timings))
    assert data["run_card"]["kind"] == "query rankings", f"rankings JSON {shot}"
    assert set(data["methods"]) == {BASELINE, *methods}, f"rankings JSON {shot}"

    # Compare: one row per method and the baseline (a virtual table: rows are [role=row]).
    rows = page.locator("#compare-table [role=row]")
    timed(timings, "tab switch (Compare)", lambda: (
        page.get_by_role("tab", name="Compare").click(),
        rows.nth(1).wait_for(state="visible")))
    cells = [rows.nth(i).locator("[role=gridcell], td, th").first.inner_text().strip()
             for i in range(rows.count())]
    expected = ["method", BASELINE_TITLE, *(method_title(name) for name in methods)]
    assert cells == expected, f"Compare table rows {cells} {shot}"

    # The table downloads: CSV, JSON and Markdown of the rows shown, each with its run card.
    card, headers, rows = read_csv_export(download(page, "download-table-csv", timings))
    assert card.kind == "compare table" and [row[0] for row in rows] == expected[1:], shot
    data = json.loads(download(page, "download-table-json", timings))
    assert data["headers"] == headers and len(data["rows"]) == len(rows), shot
    markdown = download(page, "download-table-md", timings).splitlines()
    assert "| " + " | ".join(headers) + " |" in markdown, f"Markdown download {shot}"
    assert len([line for line in markdown if line.startswith("| ")]) == len(rows) + 1, shot

    # Where it hurts: the first method's queries by AP change, one point each in the per-query
    # plot; clicking a point makes its image the query.
    summary = page.locator("#failures-summary")
    timed(timings, "failure browser", lambda: (
        page.get_by_role("tab", name="Where it hurts").click(),
        page.locator("#failures-show").click(),
        summary.get_by_text(re.compile(r"[\d,]+ queries; ")).wait_for()))
    queries = int(re.search(r"([\d,]+) queries; ", summary.inner_text()).group(1)
                  .replace(",", ""))
    points = page.locator("#query-ap-plot .scatterlayer .point")
    assert points.count() == queries, f"the per-query plot draws {points.count()} {shot}"
    query_before = page.locator("#query-image img").get_attribute("src")
    box = points.nth(queries // 2).bounding_box()
    timed(timings, "per-query point -> query", lambda: (
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2),
        page.wait_for_function(
            "before => document.querySelector('#query-image img')?.src !== before",
            arg=query_before, polling=100, timeout=STEP_MS)))


def download(page: Any, elem_id: str, timings: dict[str, float],
             accept: Callable[[str], bool] = lambda text: True) -> str:
    """Click a download button and return the text of the file the browser saved. Its file is
    written when the query or table changes, a moment after they are shown: until then a click
    downloads nothing (or the previous file), so the click is repeated until `accept` takes
    the text (for up to STEP_MS)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = time.perf_counter()
    while True:
        try:
            with page.expect_download(timeout=3000) as info:
                page.locator(f"#{elem_id}").click()
            text = Path(info.value.path()).read_text(encoding="utf-8")
            if accept(text):
                break
        except PlaywrightTimeout:
            pass
        if time.perf_counter() - started > STEP_MS / 1000:
            raise AssertionError(f"#{elem_id} downloaded no accepted file in {STEP_MS} ms")
        time.sleep(0.5)
    timings[f"download {elem_id}"] = time.perf_counter() - started
    return text
