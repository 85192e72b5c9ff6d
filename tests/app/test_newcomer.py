"""The explorer page as a newcomer meets it, in a real browser (headless chromium, Playwright).

Five flows on one page served over its own explorer, with a background job queue and a request
queue as `launch.py` runs it (the shared `explorer` fixture has neither):

1. the first use of the lite2 query model: one progress line with its plan and a Cancel that
   works, the page usable meanwhile; then the build run to its end, the query re-run there;
2. a bad upload (an empty file, a text file named holiday.jpg): the engine's message naming
   the file, nothing else;
3. a click on a result and on a map point makes it the query;
4. the page's URL reopens the view (query, tab, a parameter typed and applied with Enter);
5. the embedding map's gallery points fill its initial view.

They run in the order 5, 2, 3, 4, 1, once the background queue has prepared everything (so
that results are deterministic): the lite2 flow last, as it opens the lite2 gallery, whose
preparation then keeps the background queue busy.

Each flow saves a full-page screenshot (into $RETRIEVAL_EXPLORER_SCREENSHOTS when set, else the
test's tmp_path) and prints its path; assertion messages name it. Skips where
chromium or Playwright is missing (`tests.app.browser`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.page import build_app, launch_options
from engine.core.jobs import JobQueue
from engine.explorer import DEFAULT_TOP_N, Explorer
from engine.features.backbone import get_extractor
from engine.rerank import list_rerankers
from tests.app.browser import Browser, needs_browser, open_browser, signature, thumbnails
from tests.app.conftest import free_port
from tests.galleries import PER_CLASS

pytestmark = [
    needs_browser,
    # gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning"),
]

VIEWPORT = {"width": 1600, "height": 1000}
STEP_MS = 60_000
"""The longest wait for one step of a flow (the first query loads the backbone)."""
IDLE_S = 240.0
"""The longest wait for the background queue to prepare every method and map."""
LITE2 = "lite2"
LITE2_BACKBONE = "tf_efficientnet_lite2"
SLOW_BATCH = 4
"""Images per lite2 batch while the build is slowed down (24 images: 6 batches)."""
SLOW_BATCH_S = 2.5
"""Seconds each slowed lite2 batch sleeps: the build then takes about 15 s, long enough to look
at its progress line, query meanwhile and cancel it mid-way."""
PROGRESS = """() => [...document.querySelectorAll(
        '[data-testid="status-tracker"]:not(.hide), .progress-text, .eta-bar, .progress-bar,'
        + ' .progress-level, .loading')]
    .filter(e => !e.closest('[data-testid="status-tracker"].hide')
                 && e.checkVisibility({opacityProperty: true, visibilityProperty: true}))
    .map(e => `#${e.closest('[id]')?.id ?? '?'} ${e.className}: ${e.innerText.trim()}`
              .slice(0, 160))"""
"""Gradio 6's progress displays shown now, each as "#<nearest id> <classes>: <text>". Its
status tracker (a `div.wrap`, data-testid="status-tracker") shows a `.meta-text` timer, an
`.eta-bar`, a `.progress-level`/`.progress-bar` and a `.loading` text while an event runs; the
class `hide` hides it, leaving its texts in the layout at opacity 0 (a timer's tick with
show_progress="hidden" fills them unseen), hence the visibility check. A build's own progress,
#job-row's line, is none of these."""
ERRORS = """() => [...document.querySelectorAll(
        '[data-testid="status-tracker"] .error, .validation-error, .toast-body, .toast-item,'
        + ' .toast-wrap .toast-text')]
    .filter(e => e.checkVisibility({opacityProperty: true, visibilityProperty: true}))
    .map(e => `#${e.closest('[id]')?.id ?? '?'} ${e.className}: ${e.innerText.trim()}`
              .slice(0, 240))"""
"""Gradio's own error displays shown now: an "Error" badge on a component (status tracker's
`.error`), a validation error, an error toast."""


@dataclass
class Served:
    url: str
    explorer: Explorer
    jobs: JobQueue


@pytest.fixture(scope="module")
def served(tiny_gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The page over its own explorer of the tiny gallery, with a fresh cache (the lite2 build
    has not run), its background and request queues started as `launch.py` starts them."""
    jobs = JobQueue()
    explorer = Explorer.load(tiny_gallery, device="cpu",
                             cache_root=tmp_path_factory.mktemp("newcomer-cache"),
                             allowed_roots=[tiny_gallery.parent], jobs=jobs)
    assert explorer.requests is not None
    demo = build_app(explorer)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, **launch_options(explorer))
    jobs.start()
    explorer.requests.start()
    try:
        yield Served(f"http://127.0.0.1:{port}/", explorer, jobs)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def ready(served: Served) -> Served:
    """The page once the background queue has prepared every method and map (deterministic
    results)."""
    assert served.jobs.wait_idle(IDLE_S), (
        f"background jobs still busy after {IDLE_S:.0f} s: "
        f"{[job.describe() for job in served.jobs.jobs() if job.state != 'done']}")
    return served


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """A chromium page (1600 x 1000) on a fresh profile, shared by the flows."""
    with open_browser(tmp_path_factory.mktemp("chromium-profile"), VIEWPORT["width"],
                      VIEWPORT["height"], STEP_MS) as found:
        yield found


@dataclass
class Shot:
    """Where a flow's screenshot goes; formats as " (screenshot: <path>)" for messages."""

    path: Path

    def __str__(self) -> str:
        return f" (screenshot: {self.path})"

    def beside(self, name: str) -> Path:
        """Another screenshot of the flow (a second page)."""
        return self.path.with_name(f"{self.path.stem}-{name}.png")


@pytest.fixture
def shot(request: pytest.FixtureRequest, tmp_path: Path, browser: Browser) -> Iterator[Shot]:
    """Where this flow's screenshot goes; the page is saved there after the flow, pass or
    fail, and the path printed. Uncaught page errors fail the flow."""
    folder = Path(os.environ.get("RETRIEVAL_EXPLORER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"newcomer-{request.node.name.removeprefix('test_')}.png"
    browser.errors.clear()
    browser.console.clear()
    started = time.perf_counter()
    try:
        yield Shot(path)
    finally:
        try:
            browser.page.screenshot(path=str(path), full_page=True)
            print(f"\nscreenshot: {path}")
        except Exception as error:  # a failed screenshot must not hide the flow's failure
            print(f"\nno screenshot ({error})")
        print(f"{request.node.name}: {time.perf_counter() - started:.1f} s")
        for line in browser.console:
            print(f"browser console {line}")
    assert not browser.errors, f"uncaught page errors {browser.errors} (screenshot: {path})"


# -- the page's parts ------------------------------------------------------------------------------
FIRST = list_rerankers()[0]
RESULTS = [f"baseline-{FIRST}", f"reranked-{FIRST}"]


def open_page(page: Any, url: str) -> None:
    page.goto(url, wait_until="load")
    thumbnails(page, "examples").first.wait_for()


def results_of(page: Any, elem_ids: list[str]) -> dict[str, str]:
    return {elem_id: signature(page, elem_id) for elem_id in elem_ids}


def wait_for_new_results(page: Any, before: dict[str, str], what: str, shot: Shot,
                         timeout: float = STEP_MS) -> None:
    """Wait until each gallery of `before` shows DEFAULT_TOP_N results other than before."""
    try:
        page.wait_for_function(
            """([before, count]) => Object.entries(before).every(([id, old]) => {
                   const items = [...document.querySelectorAll(`#${id} .thumbnail-item`)];
                   const now = items.map(i => (i.querySelector('img')?.src ?? '') + '|'
                                              + i.innerText).join('\\n');
                   return items.length === count && now !== old;
               })""", arg=[before, DEFAULT_TOP_N], timeout=timeout, polling=100)
    except Exception as error:
        counts = {elem_id: thumbnails(page, elem_id).count() for elem_id in before}
        raise AssertionError(f"{what}: the results {counts} did not change to "
                             f"{DEFAULT_TOP_N} new ones{shot}") from error


def query_note(page: Any) -> str:
    return page.locator("#query-note").inner_text()


def wait_for_query(page: Any, file: str, what: str, shot: Shot) -> None:
    """Wait until #query-note names gallery file `file` as the query."""
    try:
        page.wait_for_function(
            "file => document.querySelector('#query-note')?.innerText"
            ".includes(`gallery image ${file}`)", arg=file, timeout=STEP_MS, polling=100)
    except Exception as error:
        raise AssertionError(f"{what}: #query-note says {query_note(page)!r}, not the query "
                             f"{file}{shot}") from error


def pick_example(page: Any, index: int, shot: Shot) -> str:
    """Click the index-th example; returns the gallery file it queries (read from the note)."""
    before = results_of(page, RESULTS)
    thumbnails(page, "examples").nth(index).click()
    wait_for_new_results(page, before, f"example {index}", shot)
    return query_file(page, shot)


def query_file(page: Any, shot: Shot) -> str:
    """The gallery file #query-note names as the query."""
    note = query_note(page)
    assert "gallery image " in note, f"#query-note {note!r} after an example{shot}"
    return note.split("gallery image ", 1)[1].split()[0].strip("`")


def distances(page: Any, elem_id: str) -> list[str]:
    """The distances a result gallery's captions show ("#1 · class · cos 0.54 · d 0.404 ...")."""
    captions = page.eval_on_selector_all(f"#{elem_id} .thumbnail-item",
                                         "items => items.map(i => i.innerText)")
    return [match.group(1) if (match := re.search(r"\bd ([0-9.]+)", caption)) else caption
            for caption in captions]


def query_model(page: Any) -> list[str]:
    """The values of the query model radio's selected options (Gradio 6 gives each option its
    own input name, so `:checked` alone could match several)."""
    return page.eval_on_selector_all("#query-model input[aria-checked=true]",
                                     "inputs => inputs.map(i => i.value)")


def message(page: Any) -> str:
    return page.locator("#message").inner_text().strip()


def watch_progress(page: Any, seconds: float) -> list[str]:
    """Gradio's progress displays (see PROGRESS) seen during `seconds`, sampled every 100 ms."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen += [shown for shown in page.evaluate(PROGRESS) if shown not in seen]
        page.wait_for_timeout(100)
    return seen


def progress_until_results(page: Any, action: Callable[[], Any]) -> list[str]:
    """Gradio's progress displays seen (sampled every 50 ms) from just before `action` (which
    waits in the page) until it returns."""
    page.evaluate(f"""() => {{
        window.__progressSeen = new Set();
        window.__progressWatch = setInterval(
            () => ({PROGRESS})().forEach(shown => window.__progressSeen.add(shown)), 50);
    }}""")
    try:
        action()
    finally:
        seen = page.evaluate("""() => { clearInterval(window.__progressWatch);
                                        return [...window.__progressSeen]; }""")
    return seen


def settled_progress(page: Any, seconds: float = 3.0) -> list[str]:
    """The progress displays still shown after waiting up to `seconds` for none."""
    try:
        page.wait_for_function(f"() => ({PROGRESS})().length === 0",
                               timeout=seconds * 1000, polling=100)
    except Exception:
        return page.evaluate(PROGRESS)
    return []


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# -- 5. the map's points fill the plot -------------------------------------------------------------
def test_the_map_points_fill_the_plot(ready: Served, browser: Browser, shot: Shot) -> None:
    page = browser.page
    open_page(page, ready.url)
    page.locator("#embedding-map").scroll_into_view_if_needed()
    try:
        page.wait_for_function(
            """() => (document.querySelector('#embedding-map .js-plotly-plot')?._fullData ?? [])
                   .some(t => t.type === 'scattergl' && t.x.length)""",
            timeout=STEP_MS, polling=200)
    except Exception as error:
        raise AssertionError(f"the map shows no gallery points{shot}") from error
    figure = page.evaluate("""() => {
        const plot = document.querySelector('#embedding-map .js-plotly-plot');
        const points = plot._fullData.filter(t => t.type === 'scattergl');
        return {x: points.flatMap(t => Array.from(t.x)), y: points.flatMap(t => Array.from(t.y)),
                xrange: plot._fullLayout.xaxis.range, yrange: plot._fullLayout.yaxis.range};
    }""")
    size = len(figure["x"])
    assert size == 3 * PER_CLASS, f"the map draws {size} gallery points{shot}"
    (x_low, x_high), (y_low, y_high) = figure["xrange"], figure["yrange"]
    inside = sum(x_low <= x <= x_high and y_low <= y <= y_high
                 for x, y in zip(figure["x"], figure["y"], strict=True))
    assert inside >= 0.9 * size, (
        f"only {inside} of {size} gallery points lie inside the map's initial view "
        f"x {figure['xrange']}, y {figure['yrange']}{shot}")
    for axis, low, high in (("x", x_low, x_high), ("y", y_low, y_high)):
        five, ninety_five = np.percentile(figure[axis], [5, 95])
        central = ninety_five - five
        assert central >= (high - low) / 3, (
            f"the central 90 % of the points span {central:.3g} of the {axis} axis's "
            f"{high - low:.3g}: squeezed into the middle of the map{shot}")


# -- 2. a bad upload -------------------------------------------------------------------------------
def test_a_bad_upload_shows_only_the_engines_message(
        ready: Served, browser: Browser, shot: Shot, tmp_path: Path) -> None:
    page = browser.page
    open_page(page, ready.url)
    pick_example(page, 0, shot)
    before = results_of(page, RESULTS)
    note = query_note(page)
    image = page.locator("#query-image img").get_attribute("src")
    files = tmp_path / "uploads"
    files.mkdir()
    empty = files / "blank.jpg"
    empty.write_bytes(b"")
    text = files / "holiday.jpg"
    text.write_text("Dear all, the photos of our holiday follow.\n")
    for bad in (empty, text):
        page.locator("#query-upload input[type=file]").set_input_files(str(bad))
        try:
            page.wait_for_function(
                "name => document.querySelector('#message')?.innerText.includes(name)",
                arg=bad.name, timeout=STEP_MS, polling=100)
        except Exception as error:
            raise AssertionError(f"#message says {message(page)!r} after uploading {bad.name}"
                                 f", not naming it{shot}") from error
        shown = message(page)
        print(f"{bad.name} ({bad.stat().st_size} bytes): {shown}")
        assert "/tmp" not in shown and "gradio" not in shown.lower() and str(
            bad.parent) not in shown, f"#message shows a server path: {shown!r}{shot}"
        page.wait_for_timeout(500)  # a late error badge or toast would show by now
        errors = page.evaluate(ERRORS)
        assert not errors, f"Gradio's own error displays after {bad.name}: {errors}{shot}"
        left = settled_progress(page)
        assert not left, f"a progress display stays after {bad.name}: {left}{shot}"
        assert results_of(page, RESULTS) == before, (
            f"the results changed after the refused upload {bad.name}{shot}")
        assert query_note(page) == note, (
            f"#query-note changed to {query_note(page)!r} after {bad.name}{shot}")
        now = page.locator("#query-image img").get_attribute("src")
        assert now == image, f"the query image changed to {now!r} after {bad.name}{shot}"


# -- 3. a click on a result and on a map point -----------------------------------------------------
MAP_POINTS = """() => {
    const plot = document.querySelector('#embedding-map .js-plotly-plot');
    const area = plot.querySelector('.nsewdrag').getBoundingClientRect();
    const layout = plot._fullLayout;
    const points = [];
    plot._fullData.forEach((trace, t) => Array.from(trace.x ?? [], (x, i) => points.push({
        trace: t, gallery: trace.type === 'scattergl',
        file: Array.isArray(trace.customdata?.[i]) ? trace.customdata[i][0] : null,
        x: area.left + layout.xaxis.d2p(x), y: area.top + layout.yaxis.d2p(trace.y[i]),
        inside: layout.xaxis.d2p(x) >= 0 && layout.xaxis.d2p(x) <= area.width
                && layout.yaxis.d2p(trace.y[i]) >= 0
                && layout.yaxis.d2p(trace.y[i]) <= area.height})));
    return points;
}"""
"""Every point of the map with its pixel position on the page (the gallery points are WebGL,
not DOM elements: plotly's axes map their data to pixels, as in tests/app/test_plot_events.py).
Read from `_fullData`: `data` keeps the figure's arrays as Python's plotly sent them (base64
typed-array specs)."""


def test_a_click_on_a_result_and_on_a_map_point_makes_it_the_query(
        ready: Served, browser: Browser, shot: Shot) -> None:
    page, explorer = browser.page, ready.explorer
    open_page(page, ready.url)
    query = pick_example(page, 0, shot)
    expected = explorer.query(None, source_file=query, top_n=DEFAULT_TOP_N, leave_out=True)
    rows = expected.top(FIRST)[1]
    third = explorer.session(None).gallery.files[int(rows[2])]

    # (a) the 3rd result of the first method's ranking: a click opens its evidence, whose
    # "Query with this image" makes it the query
    before = results_of(page, RESULTS)
    thumbnails(page, RESULTS[1]).nth(2).click()
    page.locator(f"#evidence-query-{FIRST}").click()
    wait_for_query(page, third, f"a click on the 3rd result of {FIRST}", shot)
    wait_for_new_results(page, before, f"a click on the 3rd result of {FIRST}", shot)
    page.wait_for_function("file => location.search.includes(`file=${file}`)", arg=third,
                           timeout=10_000, polling=100)

    # (b) a gallery point of the map, once the map shows the new query's results: the one
    # farthest (in pixels) from every other point, so that plotly's hover picks it and not a
    # result's marker drawn over it
    shown = [explorer.session(None).gallery.files[int(row)] for row in explorer.query(
        None, source_file=third, top_n=DEFAULT_TOP_N, leave_out=True).top(FIRST)[1]]
    page.locator("#embedding-map").scroll_into_view_if_needed()
    try:
        page.wait_for_function(
            """files => (document.querySelector('#embedding-map .js-plotly-plot')?._fullData ?? [])
                   .some(t => t.name === 'results' && JSON.stringify(
                       (t.customdata ?? []).map(d => d[0])) === JSON.stringify(files))""",
            arg=shown, timeout=STEP_MS, polling=100)
    except Exception as error:
        raise AssertionError(f"the map does not show the results {shown} of the query "
                             f"{third}{shot}") from error
    points = page.evaluate(MAP_POINTS)
    gallery = [p for p in points if p["gallery"] and p["file"] and p["inside"]
               and p["file"] != third]
    assert gallery, f"no gallery point inside the map's view{shot}"

    def clearance(point: dict[str, Any]) -> float:
        return min(((point["x"] - other["x"]) ** 2 + (point["y"] - other["y"]) ** 2) ** 0.5
                   for other in points if other is not point)

    target = max(gallery, key=clearance)
    before = results_of(page, RESULTS)
    page.mouse.move(target["x"], target["y"], steps=3)
    page.wait_for_timeout(150)
    page.mouse.click(target["x"], target["y"])
    wait_for_query(page, target["file"], f"a click on the map point of {target['file']} "
                   f"at ({target['x']:.0f}, {target['y']:.0f})", shot)
    wait_for_new_results(page, before, "a click on a map point", shot)


# -- 4. the URL reopens the view -------------------------------------------------------------------
def test_the_url_reopens_the_view(ready: Served, browser: Browser, shot: Shot) -> None:
    page, explorer = browser.page, ready.explorer
    method = "k_reciprocal" if "k_reciprocal" in list_rerankers() else list_rerankers()[-1]
    param = "k1" if method == "k_reciprocal" else None
    session = explorer.session(None)
    params, _ = session.params_for(method)
    if param is None:  # another registry: its first integer parameter
        param = next(name for name, value in params.items() if isinstance(value, int)
                     and not isinstance(value, bool))
    value = 10 if params[param] != 10 else 12
    galleries = [f"baseline-{method}", f"reranked-{method}"]

    open_page(page, ready.url)
    query = pick_example(page, 2, shot)
    page.locator(f"#tab-{method}-button").click()
    thumbnails(page, galleries[1]).first.wait_for()
    before = results_of(page, galleries[1:])
    box = page.locator(f"#tab-{method} input[aria-label='number input for {param}']")
    box.fill(str(value))
    box.press("Enter")
    wanted = [f"tab={method}", f"{method}.{param}={value}", f"file={query}"]
    try:
        page.wait_for_function("wanted => wanted.every(part => location.search.includes(part))",
                               arg=wanted, timeout=STEP_MS, polling=100)
    except Exception as error:
        raise AssertionError(f"the URL {page.url} lacks one of {wanted} after typing {param}="
                             f"{value} and Enter{shot}") from error
    url = page.url
    wait_for_new_results(page, before, f"{param}={value} typed and Enter", shot)
    shown = distances(page, galleries[1])
    # The link is opened once the background queue is idle: a pick's ranking at a new setting
    # is first ranked online and, once the setting's leave-one-out run (queued by that first
    # ranking) is done, read from that run; both must show what the engine answers now.
    assert ready.jobs.wait_idle(IDLE_S), f"background jobs still busy{shot}"
    answer = explorer.query(None, source_file=query, top_n=DEFAULT_TOP_N,
                            params={method: {param: value}}).top(method)[0]
    expected = [f"{distance:.3f}" for distance in answer]

    reopened = page.context.new_page()
    try:
        open_page(reopened, url)
        wait_for_query(reopened, query, f"the reopened link {url}", shot)
        selected = reopened.locator("#method-tabs [role=tab][aria-selected=true]"
                                    ).get_attribute("data-tab-id")
        assert selected == method, (
            f"the reopened link {url} selects the tab {selected!r}{shot}")
        box = reopened.locator(f"#tab-{method} input[aria-label='number input for {param}']")
        assert box.input_value() == str(value), (
            f"the reopened link shows {param}={box.input_value()!r}, not {value}{shot}")
        for elem_id in galleries:
            thumbnails(reopened, elem_id).nth(DEFAULT_TOP_N - 1).wait_for()
            count = thumbnails(reopened, elem_id).count()
            assert count == DEFAULT_TOP_N, f"#{elem_id} shows {count} results reopened{shot}"
        again = distances(reopened, galleries[1])
        assert again == expected, (
            f"the reopened link ranks {method} at distances {again}, the engine at {expected} "
            f"for {param}={value}{shot}")
        if shown != expected:
            print(f"note: the page ranked {method} at {param}={value} online (distances "
                  f"{shown}); the link, after its leave-one-out run, at {expected}")
    finally:
        reopened.screenshot(path=str(shot.beside("reopened")), full_page=True)
        print(f"screenshot: {shot.beside('reopened')}")
        reopened.close()


# -- 1. the first use of lite2 ---------------------------------------------------------------------
def test_first_lite2_build_shows_one_progress_line_and_cancels(
        ready: Served, browser: Browser, shot: Shot, monkeypatch: pytest.MonkeyPatch) -> None:
    page, explorer = browser.page, ready.explorer
    base = explorer.session(None)
    job_key = ("query model", base.key, LITE2)
    assert f"{base.key}@{LITE2}" not in explorer.galleries, "lite2 was built before the flow"
    open_page(page, ready.url)
    gallery_title = page.locator("#gallery-choice input").input_value()
    assert gallery_title == base.title, f"the gallery dropdown shows {gallery_title!r}{shot}"
    first_query = pick_example(page, 0, shot)

    # The lite2 build of 24 images takes a few seconds on the CPU: too quick to watch its
    # progress line and to cancel it mid-way. Slow it down in the server (this process): small
    # batches, each sleeping before the model runs, so the build reports its progress (where
    # a cancel takes effect) every SLOW_BATCH_S. Its plan's estimate is measured first, at the
    # model's real speed.
    lite2 = get_extractor(LITE2_BACKBONE, device="cpu")
    lite2.seconds_per_image(explorer.cache_root)
    forward = lite2._forward

    def slow_forward(batch: Any) -> Any:
        time.sleep(SLOW_BATCH_S)
        return forward(batch)

    monkeypatch.setattr(lite2, "_forward", slow_forward)
    monkeypatch.setattr(lite2, "batch_size", SLOW_BATCH)

    page.locator(f"#query-model input[value={LITE2}]").click()
    job_row = page.locator("#job-row")
    job_row.wait_for(state="visible", timeout=STEP_MS)
    status = page.locator("#job-status").inner_text()
    assert "lite2" in status and "index" in status and "about" in status, (
        f"#job-status {status!r} does not say what the build does and about how long{shot}")
    try:  # the line follows the build's progress
        page.wait_for_function(
            "() => document.querySelector('#job-status')?.innerText.includes('embedding images')",
            timeout=STEP_MS, polling=100)
    except Exception as error:
        raise AssertionError(f"#job-status stays {status!r}{shot}") from error
    status = page.locator("#job-status").inner_text()
    # one progress display: no Gradio progress on any component while the build runs
    seen = watch_progress(page, 1.5)
    assert not seen, f"progress shown besides #job-row's line while the build runs: {seen}{shot}"

    page.screenshot(path=str(shot.beside("building")), full_page=True)
    print(f"screenshot: {shot.beside('building')}\njob line: {status!r}")

    # the page stays usable: another example's results come while the build runs, the query's
    # progress shown on the query image alone
    during = progress_until_results(page, lambda: pick_example(page, 1, shot))
    print("progress shown while the query ran: "
          + ", ".join(sorted({shown.split()[0] for shown in during})))
    assert all(shown.startswith("#query-image ") for shown in during), (
        f"the query during the build showed progress beyond #query-image: {during}{shot}")
    second_query = query_file(page, shot)
    assert second_query != first_query, f"examples 0 and 1 both query {first_query}{shot}"
    assert job_row.is_visible(), (
        f"the build ended before the query's results came (slow it down more){shot}")
    job = explorer.requests.get(job_key)
    assert job is not None and job.state == "running", f"the build's job: {job}{shot}"
    left = settled_progress(page)
    assert not left, f"progress left after the query, while the build runs: {left}{shot}"

    page.locator("#job-cancel").click()
    job_row.wait_for(state="hidden", timeout=STEP_MS)
    assert wait_until(lambda: explorer.requests.get(job_key).state == "cancelled", 30), (
        f"the engine's job is {explorer.requests.get(job_key).state!r}, not cancelled{shot}")
    try:
        page.wait_for_function(
            "() => document.querySelector('#message')?.innerText.includes('Cancelled')",
            timeout=10_000, polling=100)
    except Exception as error:
        raise AssertionError(f"#message says {message(page)!r} after Cancel, not "
                             f"'Cancelled'{shot}") from error
    checked = query_model(page)
    assert checked == ["lite0"], f"the query model radio is on {checked} after Cancel{shot}"
    now = page.locator("#gallery-choice input").input_value()
    assert now == gallery_title, f"the gallery dropdown changed to {now!r} on Cancel{shot}"
    assert f"{base.key}@{LITE2}" not in explorer.galleries, f"a cancelled build opened{shot}"

    # Again, at the model's real speed: it finishes, the page moves to the lite2 gallery and
    # runs the current query there.
    monkeypatch.undo()
    before = results_of(page, RESULTS)
    page.locator(f"#query-model input[value={LITE2}]").click()
    assert wait_until(lambda: f"{base.key}@{LITE2}" in explorer.galleries, 120), (
        f"the lite2 build did not finish: {explorer.requests.describe(job_key)}{shot}")
    variant = explorer.session(f"{base.key}@{LITE2}")
    try:
        page.wait_for_function(
            "title => document.querySelector('#gallery-choice input')?.value === title",
            arg=variant.title, timeout=STEP_MS, polling=100)
    except Exception as error:
        raise AssertionError(
            f"the gallery dropdown shows {page.locator('#gallery-choice input').input_value()!r}"
            f", not the lite2 gallery {variant.title!r}{shot}") from error
    wait_for_new_results(page, {RESULTS[0]: before[RESULTS[0]]}, "the query re-run on lite2",
                         shot)
    assert f"gallery image {second_query}" in query_note(page), (
        f"#query-note {query_note(page)!r} on lite2, not the query {second_query}{shot}")
    header = page.locator("#header").inner_text()
    assert LITE2_BACKBONE in header, f"the header {header!r} on lite2{shot}"
    checked = query_model(page)
    assert checked == [LITE2], f"the query model radio is on {checked} on lite2{shot}"
    assert job_row.is_hidden(), f"the job line stays after the build finished{shot}"
    # The re-rankers of the new gallery are fitted by its background jobs, which start as it
    # opens: the first method's ranking is there unless its fit was not done at the re-run.
    reranked = thumbnails(page, RESULTS[1]).count()
    print(f"lite2 gallery: #{RESULTS[1]} shows {reranked} results "
          f"({variant.state_text(FIRST)})")
