"""The page's event handlers on the tiny gallery, called directly, and the served `query` API."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

import app.handlers
from app.handlers import TUNE_PROTOCOL, PageHandlers
from app.page import launch_options
from app.render import QueryView
from app.text import ALL_CLASSES, BASELINE_LABEL, NO_CLASS, NO_PARAMETER, rank_change
from app.thumbnails import FRAME_COLOURS
from engine import SCORES_TABLE_COLUMNS
from engine.errors import InvalidInputError
from engine.evaluation import tuning
from engine.evaluation.tuning import PRESETS_FILE, best_trial, sweep
from engine.explorer import BASELINE, CUSTOM, Explorer, GallerySession, method_title
from engine.rerank import list_rerankers
from tests.galleries import CLASSES, PER_CLASS, demo_file, make_gallery

REPO = Path(__file__).resolve().parents[2]
METHODS = [BASELINE, *list_rerankers()]
UPLOAD = demo_file(1, PER_CLASS)  # a snowdrop that is not in the tiny gallery
TOP = 10
CAPTION = re.compile(r"(?P<head>#\d+ · [^·]+) · cos (?P<cos>-?\d\.\d{3}) · (?P<tail>d .*)")
RANK_CHANGE = re.compile(r" · (▲\d+|▼\d+|=|new( \(was #\d+\))?)( [✓✗])?$")

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


@pytest.fixture(scope="module")
def picked(handlers: PageHandlers, session: GallerySession) -> dict[Any, Any]:
    """The updates of picking a daffodil (leave-one-out, plots of k-reciprocal); its top
    TOP holds misses, as the daffodil has only PER_CLASS - 1 positives."""
    return handlers.pick(session.key, session.gallery.files[3], True, TOP, "k_reciprocal",
                         "backbone", *controls(handlers, session))


def controls(handlers: PageHandlers, session: GallerySession,
             **changed: dict[str, Any]) -> list[Any]:
    """Every tab's control values, in page order: the gallery's defaults, with changes."""
    values = []
    for method in handlers.method_names:
        params = {**session.params_for(method)[0], **changed.get(method, {})}
        values += [params[name] for name in handlers.ui.tabs[method].param_names]
    return values


def tab_values(handlers: PageHandlers, session: GallerySession, method: str,
               **changed: Any) -> list[Any]:
    params = {**session.params_for(method)[0], **changed}
    return [params[name] for name in handlers.ui.tabs[method].param_names]


class Progress:
    """Stands in for gr.Progress: records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, value: Any, **kwargs: Any) -> None:
        self.calls.append((value, kwargs))


def link(query: str) -> Any:
    """Stands in for the gr.Request of a page opened at `?query`."""
    return SimpleNamespace(query_params=dict(parse_qsl(query)))


def run_to_end(steps: Any) -> dict[Any, Any]:
    """Every update a generator handler (a build the user follows) yields, merged in order."""
    merged: dict[Any, Any] = {}
    for updates in steps:
        merged.update(updates)
    return merged


def captions(update: gr.Gallery) -> list[str]:
    return [item["caption"] for item in update.value]


def thumbnail_of(explorer: Explorer, item: dict[str, Any]) -> Path:
    """The cached thumbnail a gallery item was made from (gradio serves a copy of it)."""
    found = list(explorer.thumbnail_root.rglob(item["image"]["orig_name"]))
    assert len(found) == 1, item
    return found[0]


# -- a gallery pick ----------------------------------------------------------------------------
def test_pick_shows_every_method_side_by_side(handlers: PageHandlers, session: GallerySession,
                                              picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    view = picked[ui.state]
    assert isinstance(view, QueryView)
    result = view.result
    assert result.source_file == session.gallery.files[3] and result.top_n == TOP
    assert picked[ui.picked] == session.gallery.files[3]
    assert picked[ui.query_class]["value"] == NO_CLASS
    assert "Backbone's ImageNet guess" in picked[ui.query_note]
    assert all(label in picked[ui.query_note] for label, _ in result.imagenet)
    assert "embed" in picked[ui.timings]
    assert picked[ui.json]["query"]["class"] == "daffodil"
    baseline = result.rankings[BASELINE]
    baseline_rank = {row: rank for rank, row in enumerate(baseline.indices.tolist(), start=1)}
    for method in list_rerankers():
        tab = handlers.ui.tabs[method]
        ranking = result.rankings[method]
        left, right = captions(picked[tab.baseline]), captions(picked[tab.reranked])
        assert len(left) == len(right) == TOP
        assert left[0].startswith("#1 · ") and right[0].startswith("#1 · ")
        features = session.gallery.features
        for rank, (caption, row, distance, hit) in enumerate(zip(
                right, ranking.indices[:TOP].tolist(), ranking.distances[:TOP].tolist(),
                ranking.relevant[:TOP].tolist(), strict=True), start=1):
            change = rank_change(rank, baseline_rank.get(row), TOP)
            cosine = float(features[row] @ result.feature) / float(
                np.linalg.norm(result.feature))
            shown = CAPTION.fullmatch(caption)
            assert shown, caption
            assert shown["head"] == f"#{rank} · {session.gallery.class_of(row)}"
            # three decimals of a float32 product: compare the value, not its last digit
            assert abs(float(shown["cos"]) - cosine) <= 5e-4 + 1e-6, (caption, cosine)
            assert shown["tail"] == f"d {distance:.3g} · {change} {'✓' if hit else '✗'}"
            assert RANK_CHANGE.search(caption)
        for caption, hit in zip(left, baseline.relevant[:TOP].tolist(), strict=True):
            assert caption.endswith(" ✓" if hit else " ✗")
            assert not RANK_CHANGE.search(caption.removesuffix(" ✓").removesuffix(" ✗"))
        metrics = picked[tab.metrics]
        assert f"**AP** {baseline.ap:.3f} → **{ranking.ap:.3f}**" in metrics
        assert f"**P@{TOP}** {baseline.precision:.2f} → **{ranking.precision:.2f}**" in metrics
        assert "leave-one-out" in metrics
        assert ("preset" if method == "ssr" else "authors' defaults") in picked[tab.source]
    assert "Learned from labels" not in picked[handlers.ui.tabs["gnn"].metrics]
    assert "Learned from the gallery without labels" in picked[handlers.ui.tabs["ssr"].metrics]
    assert isinstance(picked[ui.knn_plot], go.Figure)
    assert isinstance(picked[ui.map_plot], go.Figure)
    for method, row_gallery in ui.compare_rows.items():
        assert f"AP {result.rankings[method].ap:.3f}" in picked[row_gallery].label
        assert len(picked[row_gallery].value) == TOP


def test_thumbnails_come_from_the_cache_with_a_coloured_frame(
        handlers: PageHandlers, explorer: Explorer, session: GallerySession,
        picked: dict[Any, Any]) -> None:
    query_image = Path(picked[handlers.ui.query_image])
    assert query_image.is_relative_to(explorer.thumbnail_root)
    seen = set()
    for method in list_rerankers():
        tab = handlers.ui.tabs[method]
        for update in (picked[tab.baseline], picked[tab.reranked]):
            for item in update.value:
                assert not Path(item["image"]["path"]).is_relative_to(session.gallery.root)
                thumbnail = thumbnail_of(explorer, item)
                assert thumbnail.is_relative_to(explorer.thumbnail_root)
                mark = "hit" if item["caption"].endswith("✓") else "miss"
                assert thumbnail.name.endswith(f"-{mark}.jpg")
                with Image.open(thumbnail) as image:
                    corner = np.asarray(image.convert("RGB"))[1, 1].astype(int)
                assert np.abs(corner - FRAME_COLOURS[mark]).max() < 40, (mark, corner)
                seen.add(mark)
    assert seen == {"hit", "miss"}  # both frames were checked


def test_replot_keeps_the_knn_node_positions(handlers: PageHandlers, session: GallerySession,
                                             picked: dict[Any, Any]) -> None:
    view = picked[handlers.ui.state]

    def nodes(figure: go.Figure) -> dict[str, tuple[float, float]]:
        found = {}
        for trace in figure.data:
            if trace.mode == "markers+text" and trace.name != "query":
                for x, y, text in zip(trace.x, trace.y, trace.hovertext, strict=True):
                    found[re.search(r"</b> (\S+)<br>", text).group(1)] = (x, y)
        return found

    plots = {method: handlers.replot(view, session.key, method, "backbone")
             for method in (BASELINE, "k_reciprocal")}
    figures = {method: updates[handlers.ui.knn_plot] for method, updates in plots.items()}
    baseline, reranked = nodes(figures[BASELINE]), nodes(figures["k_reciprocal"])
    expected = {session.gallery.files[row] for row in view.result.top(BASELINE)[1]}
    assert set(baseline) == expected
    common = set(baseline) & set(reranked)
    assert common
    for file in common:
        assert baseline[file] == reranked[file]
    assert figures[BASELINE].layout.xaxis.range == figures["k_reciprocal"].layout.xaxis.range
    for updates in plots.values():
        assert isinstance(updates[handlers.ui.map_plot], go.Figure)


def test_rerank_method_changes_that_method_only(handlers: PageHandlers,
                                                session: GallerySession,
                                                picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    view = picked[ui.state]
    updates = handlers.rerank_method("k_reciprocal", session.key, view, BASELINE, "backbone",
                                     *tab_values(handlers, session, "k_reciprocal", k1=4, k2=2))
    tab = handlers.ui.tabs["k_reciprocal"]
    result = updates[ui.state].result
    assert result.rankings["k_reciprocal"].params["k1"] == 4
    assert result.rankings["k_reciprocal"].params_source == CUSTOM
    assert "**custom**" in updates[tab.source] and "k1=4" in updates[tab.source]
    assert len(updates[tab.reranked].value) == TOP
    for method in METHODS:
        if method != "k_reciprocal":
            assert result.rankings[method] is view.result.rankings[method]
    for other in list_rerankers():
        if other != "k_reciprocal":
            other_tab = handlers.ui.tabs[other]
            assert not {other_tab.baseline, other_tab.reranked, other_tab.metrics,
                        other_tab.source} & set(updates)
    assert updates[ui.json]["methods"]["k_reciprocal"]["params"]["k1"] == 4
    # Without a query the handler only reports the setting's source.
    alone = handlers.rerank_method("k_reciprocal", session.key, None, BASELINE, "backbone",
                                   *tab_values(handlers, session, "k_reciprocal", k1=4))
    assert set(alone) == {tab.source, *tab.controls} and "**custom**" in alone[tab.source]
    # the controls get the values used (what a clamped typed value shows)
    assert [alone[control] for control in tab.controls] == tab_values(
        handlers, session, "k_reciprocal", k1=4)
    with pytest.raises(gr.Error):
        handlers.rerank_method("k_reciprocal", session.key, view, BASELINE, "backbone",
                               *tab_values(handlers, session, "k_reciprocal", k1=0))


def test_reset_params_returns_the_gallery_setting(handlers: PageHandlers,
                                                  session: GallerySession) -> None:
    for method in list_rerankers():
        params, _ = session.params_for(method)
        assert handlers.reset_params(method, session.key) == [
            params[name] for name in handlers.ui.tabs[method].param_names]


# -- uploads and the JSON API ------------------------------------------------------------------
def test_upload_forgets_the_pick_and_scores_with_a_class(handlers: PageHandlers,
                                                         session: GallerySession) -> None:
    updates = handlers.upload(session.key, str(UPLOAD), "snowdrop", True, 4, BASELINE,
                              "backbone", *controls(handlers, session))
    assert updates[handlers.ui.picked] is None
    result = updates[handlers.ui.state].result
    assert result.source_row is None and result.query_class == "snowdrop"
    assert all(r.how == "online" and r.ap is not None for r in result.rankings.values())
    tab = handlers.ui.tabs["k_reciprocal"]
    assert "online against the fitted gallery" in updates[tab.metrics]
    unscored = handlers.upload(session.key, str(UPLOAD), NO_CLASS, True, 4, BASELINE,
                               "backbone", *controls(handlers, session))
    assert "Pick the query's class" in unscored[tab.metrics]
    assert not any(caption.endswith(("✓", "✗")) for caption in captions(unscored[tab.reranked]))
    assert handlers.upload(session.key, None, NO_CLASS, True, 4, BASELINE, "backbone",
                           *controls(handlers, session)) == {}


def test_api_query_returns_json_per_method(handlers: PageHandlers,
                                           session: GallerySession) -> None:
    file = session.gallery.files[PER_CLASS]
    summary = handlers.api_query(None, file, True)
    json.dumps(summary)  # JSON-ready
    assert summary["query"]["file"] == file and summary["query"]["class"] == "snowdrop"
    assert list(summary["methods"]) == METHODS
    for method in summary["methods"].values():
        assert len(method["files"]) == len(method["distances"]) == 10
        assert method["distances"] == sorted(method["distances"])
        assert file not in method["files"]
        assert all((session.gallery.root / name).is_file() for name in method["files"])
        assert 0 <= method["ap"] <= 1 and method["how"] == "leave-one-out"
    uploaded = handlers.api_query(str(UPLOAD), None, True, session.key, 5, "snowdrop")
    assert uploaded["query"]["file"] is None and uploaded["query"]["class"] == "snowdrop"
    for method in uploaded["methods"].values():
        assert len(method["files"]) == 5 and method["how"] == "online"
        assert 0 <= method["ap"] <= 1 and 0 <= method["p@5"] <= 1


def test_query_without_an_image_or_pick_is_refused(handlers: PageHandlers) -> None:
    with pytest.raises(gr.Error, match="Upload an image"):
        handlers.api_query(None, None, True)


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\ntruncated"])
def test_a_non_image_upload_is_refused_by_name(handlers: PageHandlers, tmp_path: Path,
                                               content: bytes) -> None:
    upload = tmp_path / "upload.png"
    upload.write_bytes(content)
    with pytest.raises(gr.Error, match=r"upload\.png") as raised:
        handlers.api_query(str(upload), None, True)
    assert str(tmp_path) not in raised.value.message  # no server path in the message


def test_an_unknown_gallery_file_is_refused(handlers: PageHandlers,
                                            session: GallerySession) -> None:
    with pytest.raises(gr.Error, match="not an image of the gallery"):
        handlers.api_query(None, "../../etc/passwd", True)
    with pytest.raises(gr.Error, match="not an image of the gallery"):
        handlers.pick(session.key, "missing.jpg", True, 5, BASELINE, "backbone",
                      *controls(handlers, session))
    with pytest.raises(gr.Error, match="no open gallery"):
        handlers.api_query(None, session.gallery.files[0], True, "no-such-gallery")


# -- browsing ----------------------------------------------------------------------------------
def test_browse_filters_by_class(handlers: PageHandlers, session: GallerySession) -> None:
    ui = handlers.ui
    updates = handlers.browse(session.key, "snowdrop", 1)
    assert captions(updates[ui.browser]) == ["snowdrop"] * PER_CLASS
    assert (updates[ui.page].value, updates[ui.page].maximum) == (1, 1)
    rows = handlers.browse_rows(session.key, "snowdrop", 1)
    assert [session.gallery.class_of(row) for row in rows] == ["snowdrop"] * PER_CLASS
    everything = handlers.browse(session.key, ALL_CLASSES, 1)
    assert len(everything[ui.browser].value) == session.gallery.size
    with pytest.raises(gr.Error, match="not a class"):
        handlers.browse(session.key, "tulip", 1)


def test_browse_pages(handlers: PageHandlers, session: GallerySession,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.handlers, "BROWSE_PAGE", 10)
    ui = handlers.ui
    last = handlers.browse(session.key, ALL_CLASSES, 3)
    assert len(last[ui.browser].value) == session.gallery.size - 20
    assert (last[ui.page].value, last[ui.page].maximum) == (3, 3)
    assert handlers.browse_rows(session.key, ALL_CLASSES, 2) == list(range(10, 20))
    clamped = handlers.browse(session.key, ALL_CLASSES, 9)
    assert clamped[ui.page].value == 3
    assert captions(clamped[ui.browser]) == captions(last[ui.browser])


@pytest.mark.parametrize("class_name", ["lily_valley", "daffodil"])
def test_pick_random_draws_from_the_filtered_class(handlers: PageHandlers,
                                                   session: GallerySession,
                                                   class_name: str) -> None:
    updates = handlers.pick_random(session.key, class_name, True, 3, BASELINE, "backbone",
                                   *controls(handlers, session))
    file = updates[handlers.ui.picked]
    assert session.gallery.class_of(session.position_of(file)) == class_name
    assert updates[handlers.ui.state].result.source_file == file


# -- galleries ---------------------------------------------------------------------------------
def test_switch_gallery_resets_the_controls(handlers: PageHandlers, explorer: Explorer,
                                            app_root: Path) -> None:
    second = explorer.open_folder(make_gallery(app_root / "second", per_class=4))
    ui = handlers.ui
    updates = handlers.switch_gallery(second.key)
    for component in (ui.state, ui.picked, ui.query_image, ui.knn_plot, ui.json):
        assert updates[component] is None
    assert updates[ui.query_class].value == NO_CLASS
    assert updates[ui.class_filter].value == ALL_CLASSES
    assert second.title in updates[ui.header]
    assert len(updates[ui.browser].value) == second.gallery.size
    for method in list_rerankers():
        tab = handlers.ui.tabs[method]
        params, source = second.params_for(method)
        assert [updates[control]["value"] for control in tab.controls] == [
            params[name] for name in tab.param_names]
        assert updates[tab.baseline].value == [] and updates[tab.reranked].value == []
        # the second gallery has no presets (SSR's episodes are scaled to its size)
        assert source.startswith("authors' defaults")
        assert "**authors' defaults**" in updates[tab.source]
    for row_gallery in ui.compare_rows.values():
        assert updates[row_gallery].value == []


def test_query_model_radio_switches_to_the_lite2_index(handlers: PageHandlers,
                                                     explorer: Explorer,
                                                     app_root: Path) -> None:
    """Choosing lite2 opens the lite2 index of the same folder and says so on the page; an
    unknown model is a clear error; choosing lite0 again returns the gallery as opened."""
    base = explorer.open_folder(make_gallery(app_root / "query_models", per_class=3))
    ui = handlers.ui
    updates = run_to_end(handlers.switch_query_model(None, base.key, "lite2", None, None,
                                                     NO_CLASS, True, TOP, BASELINE, "backbone",
                                                     *controls(handlers, base)))
    variant = updates[ui.gallery].value
    assert variant != base.key and variant in {key for _, key in updates[ui.gallery].choices}
    session = explorer.session(variant)
    assert session.gallery.meta.backbone == "tf_efficientnet_lite2"
    assert updates[ui.query_model]["value"] == "lite2"
    assert ("query: tf_efficientnet_lite2 · gallery: tf_efficientnet_lite2"
            in updates[ui.header])
    assert f"search: {session.gallery.index.backend} ·" in updates[ui.header]
    with pytest.raises(gr.Error, match="query model"):
        run_to_end(handlers.switch_query_model(None, base.key, "lite7", None, None, NO_CLASS,
                                               True, TOP, BASELINE, "backbone",
                                               *controls(handlers, base)))
    back = run_to_end(handlers.switch_query_model(None, variant, "lite0", None, None, NO_CLASS,
                                                  True, TOP, BASELINE, "backbone",
                                                  *controls(handlers, base)))
    assert back[ui.gallery].value == base.key
    assert "query: tf_efficientnet_lite0" in back[ui.header]


def test_open_folder_refuses_folders_outside_the_allowed_roots(handlers: PageHandlers,
                                                               tmp_path: Path) -> None:
    for folder in ("/", str(tmp_path)):
        with pytest.raises(gr.Error, match="outside the allowed folders"):
            run_to_end(handlers.open_folder(folder))
    with pytest.raises(gr.Error, match="Type the path"):
        run_to_end(handlers.open_folder("  "))
    with pytest.raises(gr.Error, match=r"Choose a \.zip"):
        run_to_end(handlers.open_zip(None, None))


def test_compare_rows_have_one_row_per_method(handlers: PageHandlers,
                                              session: GallerySession) -> None:
    rows = handlers.compare_rows(session)
    assert [row[0] for row in rows] == [title for _, title in session.methods()]
    column = {name: index for index, name in enumerate(SCORES_TABLE_COLUMNS)}
    for row, (method, _) in zip(rows, session.methods(), strict=True):
        assert 0 <= row[1] <= 1 and 0 <= row[column["P@1"]] <= 1 and 0 <= row[column["P@5"]] <= 1
        scores = session.scores(method)
        assert row[1] == round(scores.map, 4)
        assert row[2] == f"{scores.map_low:.4f} to {scores.map_high:.4f}"
        assert scores.map_low <= scores.map <= scores.map_high
        assert row[3] == f"all {session.gallery.size}"
        difference = row[column["mAP - baseline"]]
        if method == BASELINE:
            assert difference is None and row[column["p (Holm)"]] is None
        else:
            baseline = session.scores(BASELINE)
            assert difference == pytest.approx(scores.map - baseline.map, abs=1e-4)
            assert 0 < row[column["p (Holm)"]] <= 1


# -- tuning ------------------------------------------------------------------------------------
def test_tune_sweeps_and_reports_the_best_setting(handlers: PageHandlers,
                                                  session: GallerySession) -> None:
    progress = Progress()
    base = tab_values(handlers, session, "k_reciprocal")
    steps = list(handlers.tune("k_reciprocal", progress, session.key, "k1", "3, 6, 12",
                               NO_PARAMETER, "", *base))
    assert len(steps) == 3
    for done, (figure, summary, _) in enumerate(steps, start=1):
        assert isinstance(figure, go.Figure)
        assert summary.startswith(f"{done}/3 settings")
    gallery = session.gallery
    defaults = session.params_for("k_reciprocal")[0]
    expected = best_trial(sweep("k_reciprocal", {"k1": [3.0, 6.0, 12.0]}, gallery.features,
                                gallery.labels, TUNE_PROTOCOL,
                                {k: v for k, v in defaults.items() if k != "k1"}))
    assert steps[-1][2] == expected.params
    assert f"best mAP **{expected.map:.4f}**" in steps[-1][1]
    assert progress.calls[0][0] == (0, 3) and progress.calls[-1][0] == (3, 3)


def test_tune_refuses_bad_values(handlers: PageHandlers, session: GallerySession) -> None:
    base = tab_values(handlers, session, "k_reciprocal")
    with pytest.raises(gr.Error, match="not a number"):
        next(handlers.tune("k_reciprocal", Progress(), session.key, "k1", "3, many",
                           NO_PARAMETER, "", *base))
    with pytest.raises(gr.Error, match="minimum"):
        list(handlers.tune("k_reciprocal", Progress(), session.key, "k1", "0",
                           NO_PARAMETER, "", *base))


def test_cancelling_a_sweep_stops_its_thread(handlers: PageHandlers, session: GallerySession,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    trials: list[Any] = []
    resume = threading.Event()

    def gated_sweep(*args: Any, on_trial: Any, **kwargs: Any) -> Any:
        def record(trial: Any) -> None:
            trials.append(trial)
            on_trial(trial)
            assert resume.wait(10)  # hold the sweep until the test has cancelled

        return sweep(*args, on_trial=record, **kwargs)

    monkeypatch.setattr(tuning, "sweep", gated_sweep)
    steps = handlers.tune("k_reciprocal", Progress(), session.key, "k1", "3, 4, 5, 6, 7, 8",
                          NO_PARAMETER, "", *tab_values(handlers, session, "k_reciprocal"))
    _, summary, _ = next(steps)
    assert summary.startswith("1/6 settings")
    worker = next(thread for thread in threading.enumerate()
                  if thread.name == "sweep-k_reciprocal")
    steps.close()  # what Gradio does when the event is cancelled
    resume.set()
    worker.join(10)
    assert not worker.is_alive()
    assert len(trials) == 1


def test_save_best_writes_the_gallery_preset(handlers: PageHandlers, explorer: Explorer,
                                             app_root: Path) -> None:
    target = explorer.open_folder(make_gallery(app_root / "page_presets", per_class=3))
    tab = handlers.ui.tabs["k_reciprocal"]
    updates = handlers.save_best("k_reciprocal", target.key, {"k1": 9, "k2": 4,
                                                              "lambda_value": 0.2})
    assert "**preset**" in updates[tab.source] and "k1=9" in updates[tab.source]
    # the label, the controls (and so the re-ranking the wiring runs next) agree
    assert [updates[control] for control in tab.controls] == [9, 4, 0.2]
    stored = json.loads((target.gallery.state_dir / PRESETS_FILE).read_text())
    assert stored["k_reciprocal"]["params"] == {"k1": 9, "k2": 4, "lambda_value": 0.2}
    assert target.params_for("k_reciprocal") == (stored["k_reciprocal"]["params"], "preset")
    assert handlers.reset_params("k_reciprocal", target.key)[:2] == [9, 4]
    with pytest.raises(gr.Error, match="Run a sweep first"):
        handlers.save_best("k_reciprocal", target.key, None)
    with pytest.raises(gr.Error, match="minimum"):
        handlers.save_best("k_reciprocal", target.key, {"k1": 0})


# -- the served page ---------------------------------------------------------------------------
def test_launch_options_serve_only_the_thumbnails(explorer: Explorer,
                                                  session: GallerySession) -> None:
    """The thumbnails and the downloads (`app.exports`), nothing else."""
    options = launch_options(explorer)
    assert options["allowed_paths"] == [str(explorer.thumbnail_root),
                                        str(explorer.cache_root / "exports")]
    assert str(session.gallery.root) not in options["allowed_paths"]


def test_the_served_api_answers_a_query(server: str, session: GallerySession) -> None:
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    summary = client.predict(None, session.gallery.files[0], True, api_name="/query")
    assert summary["query"]["class"] == "daffodil"
    assert list(summary["methods"]) == METHODS
    assert len(summary["methods"][BASELINE]["files"]) == 10
    assert session.gallery.files[0] not in summary["methods"][BASELINE]["files"]
    uploaded = client.predict(handle_file(str(UPLOAD)), None, True, api_name="/query")
    assert uploaded["query"]["file"] is None
    nearest = uploaded["methods"][BASELINE]["classes"][0]
    assert nearest == CLASSES[1]


def test_query_is_the_only_public_endpoint(server: str) -> None:
    from gradio_client import Client

    info = Client(server, verbose=False).view_api(print_info=False, return_format="dict")
    assert list(info["named_endpoints"]) == ["/query"]
    assert not info["unnamed_endpoints"]
    parameters = [p["parameter_name"] for p in info["named_endpoints"]["/query"]["parameters"]]
    assert parameters[:3] == ["image", "gallery_file", "leave_out"]


def test_method_titles_label_the_compare_rows(handlers: PageHandlers) -> None:
    assert list(handlers.ui.compare_rows) == METHODS
    assert list(handlers.ui.tabs) == list_rerankers()
    labels = [component.label for component in handlers.ui.compare_rows.values()]
    assert labels == [BASELINE_LABEL] + [method_title(method) for method in list_rerankers()]


def test_engine_does_not_import_gradio() -> None:
    # every module but `python -m` entry points (engine.bench.__main__ runs the benchmark)
    code = ("import importlib, pkgutil, sys, engine; "
            "[importlib.import_module(m.name) "
            " for m in pkgutil.walk_packages(engine.__path__, 'engine.') "
            " if not m.name.endswith('.__main__')]; "
            "engine.rerank.list_rerankers(); "
            "loaded = [name for name in ('gradio', 'umap') if name in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- clicks that make a query, the map's selection, the link -----------------------------------
def test_a_clicked_result_becomes_the_query(handlers: PageHandlers, session: GallerySession,
                                            picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    view = picked[ui.state]
    rows = view.result.top("k_reciprocal")[1]
    event = gr.SelectData(None, {"index": 2, "value": None})
    updates = handlers.pick_result("k_reciprocal", event, view, True, TOP, BASELINE,
                                   "backbone", *controls(handlers, session))
    chosen = session.gallery.files[int(rows[2])]
    assert updates[ui.picked] == chosen
    assert updates[ui.state].result.source_file == chosen
    assert handlers.pick_result("k_reciprocal", event, None, True, TOP, BASELINE,
                                "backbone") == {}


def test_a_clicked_plot_point_becomes_the_query(handlers: PageHandlers,
                                                session: GallerySession) -> None:
    ui = handlers.ui
    file = session.gallery.files[5]
    updates = handlers.pick_plotted(f"{file}|1733512345678", session.key, True, TOP,
                                    BASELINE, "backbone", *controls(handlers, session))
    assert updates[ui.picked] == file and updates[ui.state].result.source_file == file
    assert handlers.pick_plotted("", session.key, True, TOP, BASELINE, "backbone") == {}
    with pytest.raises(gr.Error, match="not an image of the gallery"):
        handlers.pick_plotted("../../etc/passwd|1", session.key, True, TOP, BASELINE,
                              "backbone", *controls(handlers, session))


def test_a_map_selection_is_shown_and_listed(handlers: PageHandlers,
                                             session: GallerySession) -> None:
    ui = handlers.ui
    files = session.gallery.files[:4]
    updates = handlers.select_on_map(json.dumps(files), session.key)
    assert updates[ui.selection].visible and len(updates[ui.selection].value) == 4
    listing = Path(updates[ui.selection_file].value["path"])
    lines = listing.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert lines[0].split("\t")[1] == session.gallery.class_of(0)
    cleared = handlers.select_on_map("[]", session.key)
    assert cleared[ui.selection].visible is False
    assert handlers.select_on_map("not json", session.key)[ui.selection].visible is False


def test_a_bad_upload_shows_only_the_engines_message(handlers: PageHandlers,
                                                     session: GallerySession,
                                                     tmp_path: Path) -> None:
    """Through the wiring's wrapper: one message, no other output touched."""
    from app.feedback import shown_in

    ui = handlers.ui
    for content in (b"", b"this is a text file"):
        upload = tmp_path / "holiday.jpg"
        upload.write_bytes(content)
        wrapped = shown_in(ui.message, handlers.upload, [ui.state])
        updates = wrapped(session.key, str(upload), NO_CLASS, True, TOP, BASELINE, "backbone",
                          *controls(handlers, session))
        assert list(updates) == [ui.message]
        assert "holiday.jpg" in updates[ui.message]
        assert str(tmp_path) not in updates[ui.message]


def test_the_link_names_the_view_and_reopens_it(handlers: PageHandlers,
                                                session: GallerySession,
                                                picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    view = picked[ui.state]
    changed = controls(handlers, session, k_reciprocal={"k1": 7})
    query = handlers.share_link(session.key, view, None, "k_reciprocal", *changed)
    assert f"file={session.gallery.files[3]}" in query.replace("%2F", "/")
    assert "tab=k_reciprocal" in query and "k_reciprocal.k1=7" in query
    assert "gnn." not in query  # unchanged parameters stay out of the link

    updates = handlers.restore(link(query), BASELINE, "backbone", True, TOP)
    result = updates[ui.state].result
    assert result.source_file == session.gallery.files[3]
    assert result.rankings["k_reciprocal"].params["k1"] == 7
    tab = ui.tabs["k_reciprocal"]
    assert updates[tab.controls[tab.param_names.index("k1")]] == 7
    assert updates[ui.current_tab] == "k_reciprocal"
    assert ui.message not in updates

    updates = handlers.restore(link("gallery=gone&file=missing.jpg&tab=gnn"), BASELINE,
                               "backbone", True, TOP)
    assert "gallery is not open" in updates[ui.message]
    assert "not an image of the gallery" in updates[ui.message]
    assert updates[ui.current_tab] == "gnn"


def test_an_uploaded_query_is_named_by_its_hash(handlers: PageHandlers,
                                                session: GallerySession) -> None:
    ui = handlers.ui
    updates = handlers.upload(session.key, str(UPLOAD), "snowdrop", True, TOP, BASELINE,
                              "backbone", *controls(handlers, session))
    kept = Path(updates[ui.uploaded])
    assert kept.read_bytes() == UPLOAD.read_bytes()
    query = handlers.share_link(session.key, updates[ui.state], str(kept), "gnn",
                                *controls(handlers, session))
    assert f"upload={kept.stem}" in query and "class=snowdrop" in query

    reopened = handlers.restore(link(query), BASELINE, "backbone", True, TOP)
    assert reopened[ui.state].result.query_class == "snowdrop"
    assert reopened[ui.uploaded] == str(kept)


def test_cancel_says_so_and_puts_the_query_model_back(handlers: PageHandlers,
                                                      session: GallerySession) -> None:
    """The Cancel of a build's line: its event is cancelled with it and says nothing more, so
    the cancel handler itself hides the line, says so and puts the radio back."""
    ui = handlers.ui
    updates = handlers.cancel_request(["query model", session.key, "lite2"], session.key)
    assert updates[ui.job_row].visible is False and updates[ui.job] is None
    assert updates[ui.message].startswith("Cancelled")
    assert updates[ui.query_model]["value"] == session.query_model
    assert ui.message not in handlers.cancel_request(None, session.key)


def test_a_features_file_opens_from_the_folder_box(handlers: PageHandlers, explorer: Explorer,
                                                   app_root: Path) -> None:
    """A features file typed into the folder box opens as a gallery of its items; its items
    query it, an uploaded image is refused with the engine's reason."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    features = np.repeat(centres, 5, axis=0) + 0.05 * rng.normal(size=(15, 16))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    path = app_root / "own_features" / "clusters.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=features.astype(np.float32), labels=np.repeat(np.arange(3), 5),
             names=np.array([f"item{i:02d}" for i in range(15)]),
             class_names=np.array(["a", "b", "c"]))
    ui = handlers.ui
    updates = run_to_end(handlers.open_folder(str(path)))
    key = updates[ui.gallery].value
    session = explorer.session(key)
    assert session.gallery.size == 15 and "clusters.npz" in updates[ui.header]
    # no image upload and no other query model on a gallery of another model's features
    assert updates[ui.upload]["interactive"] is False
    assert updates[ui.query_model]["interactive"] is False
    back = handlers.switch_gallery(explorer.default_key)
    assert back[ui.upload]["interactive"] is True
    picked = handlers.pick(key, "item00", True, 4, BASELINE, "backbone",
                           *controls(handlers, session))
    result = picked[ui.state].result
    assert all(session.gallery.class_of(int(row)) == "a" for row in result.top(BASELINE)[1])
    with pytest.raises(gr.Error, match="features of another model"):
        handlers.search(key, str(UPLOAD), None, NO_CLASS, True, 4, BASELINE, "backbone",
                        *controls(handlers, session))


def test_query_features_are_refused_for_a_gallery_of_images(handlers: PageHandlers,
                                                             session: GallerySession,
                                                             tmp_path: Path) -> None:
    """The "Attach queries" box takes query features for a features gallery only: an image
    gallery's queries are its images."""
    queries = tmp_path / "queries.npz"
    np.savez(queries, features=np.eye(2, 8, dtype=np.float32))
    with pytest.raises(gr.Error, match=rf"{re.escape(session.title)} was opened from images"):
        handlers.attach_queries(session.key, str(queries), None)
    assert session.query_set is None


def test_an_uploaded_features_file_opens_from_a_kept_copy(handlers: PageHandlers,
                                                          explorer: Explorer,
                                                          tmp_path: Path) -> None:
    """A features file uploaded through the zip box (outside the allowed folders, as Gradio's
    temporary files are) opens from a copy under the cache's uploads, which outlives the
    temporary file; the same bytes uploaded again reuse that copy."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(12, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    upload = tmp_path / "gradio-temp" / "mine.npz"
    upload.parent.mkdir()
    np.savez(upload, features=features, labels=np.repeat(np.arange(3), 4))
    updates = run_to_end(handlers.open_zip(None, str(upload)))
    session = explorer.session(updates[handlers.ui.gallery].value)
    assert session.gallery.size == 12 and "mine.npz" in updates[handlers.ui.header]
    kept = explorer.keep_features_upload(upload)
    assert kept.parent.parent == explorer.upload_root / "features" and kept.name == "mine.npz"
    assert kept.read_bytes() == upload.read_bytes()
    upload.unlink()  # Gradio cleans its temporary files; the gallery's source is the copy
    assert session.gallery.size == 12 and kept.is_file()
    notes = tmp_path / "gradio-temp" / "notes.txt"
    notes.write_text("not features")
    with pytest.raises(InvalidInputError, match="must be one of"):
        explorer.keep_features_upload(notes)


def test_the_header_states_an_approximate_search_and_graph_with_their_recall(
        session: GallerySession) -> None:
    """Exact search and graph say nothing more; approximate ones state their measured recall."""
    from app.text import search_quality

    gallery = session.gallery
    assert search_quality(gallery) == ""
    approximate = dataclasses.replace(gallery.knn, canonical=False, recall=0.912)

    index = types.SimpleNamespace(
        exact=False, recall={"recall@10": 0.995, "recall@100": 0.33, "queries": 200})
    text = search_quality(types.SimpleNamespace(index=index, knn=approximate))
    assert "recall@10 0.995, recall@100 0.330 on 200 rows" in text
    assert f"kNN graph approximate (recall 0.912 of its {gallery.knn.depth} neighbours)" in text
