"""The explorer page: a query, then the baseline and every re-ranker side by side, with plots.

Layout: the gallery chooser; the query (upload, gallery browser, examples) with the backbone's
ImageNet guess and stage timings; one tab per registered re-ranker (built from the registry and
each method's parameter metadata, so a new method file adds a tab), a Compare tab and a
Galleries tab; the kNN-graph and embedding-map plots under the tabs.

Event functions live in `PageHandlers` and return {component: value} dicts, so they are plain
methods that tests call directly. Per-user state (the last query) is a `gr.State`; everything
heavy (backbone, galleries, fitted methods, maps) is shared through the `Explorer`.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from app import plots
from app.public import PublicUploads, UploadLimits, refuse_folder
from app.thumbnails import PREVIEW_SIDE, ThumbnailCache
from engine.errors import EngineError, InvalidInputError
from engine.evaluation.scores import scores_table
from engine.evaluation.tuning import Trial, best_trial, sweep
from engine.explorer.session import (
    BASELINE,
    CUSTOM,
    DEFAULT_TOP_N,
    QUERY_MODELS,
    Explorer,
    GallerySession,
    QueryResult,
    Ranking,
    method_title,
)
from engine.features.images import MAX_FILE_BYTES, load_image
from engine.rerank import get_reranker_class, list_rerankers
from engine.views.neighbourhood import NeighbourhoodGraph, neighbourhood_graph

logger = logging.getLogger(__name__)

PUBLIC_CACHE_SECONDS = 3 * 3600
"""A public page deletes Gradio's temporary files (uploaded files, served copies of
thumbnails) older than this, checking every hour; anyone can upload files, so they must not
pile up."""
DEFAULT_CONCURRENCY = 2
"""Model work run at once. Every event that embeds a query or re-ranks (upload, pick, search,
parameter changes and the `query` API) is in the concurrency group "query" with this limit: they
share one backbone and one GPU, whose forward pass the backbone serialises, so a second slot
only overlaps one query's re-ranking with the next one's embedding. Jobs that build or train
(open a gallery, switch the query model, Compare, Tune) are in the group "index" with limit 1:
one at a time, beside the queries rather than in their slots, so a long build cannot starve
them."""
QUEUE_SIZE = 64
"""Events waiting at most (all groups); one more is refused at once ("queue full") rather than
left waiting: 64 queries of about 1 s, 2 at a time, is already a half-minute wait. It also
bounds the server's memory, as a waiting event holds only its inputs."""
JOB_REFRESH_SECONDS = 2.0
"""How often the page redraws the background jobs' states (only what changed is sent)."""
BROWSE_PAGE = 48
MAX_SLIDER_STEPS = 5000
EDGE_K = 10
BASELINE_LABEL = "Baseline (faiss)"
NO_CLASS = "(unknown)"
ALL_CLASSES = "All classes"
NO_PARAMETER = "(none)"
TUNE_PROTOCOL = "oxford17-split"
TUNE_PROTOCOL_TEXT = ("fixed split of the labelled images: every 10th image is a query, the "
                      "others the gallery (batch mode, as the methods' authors evaluate)")

CSS = """
.ranking .caption-label { white-space: normal !important; max-width: 97% !important;
  font-size: 0.68rem !important; line-height: 1.15; left: 2px; }
#timings table { font-size: 0.85rem; }
.method-source { font-size: 0.9rem; }
"""


def launch_options(explorer: Explorer, public: bool = False,
                   upload_limits: UploadLimits | None = None) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` (Gradio 6 takes theme and css there).

    Only the thumbnail cache is served: the page never hands the browser a path inside a
    gallery folder. On a private page show_error lets Gradio's own messages (an upload it
    cannot decode) reach the user. A public page keeps it off: a gr.Error (our typed messages)
    is shown either way, any other exception only as "Error", never its text; and no uploaded
    file may be larger than the largest zip it accepts (`upload_limits`).
    """
    explorer.thumbnail_root.mkdir(parents=True, exist_ok=True)
    options = {"theme": gr.themes.Soft(), "css": CSS,
               "allowed_paths": [str(explorer.thumbnail_root)]}
    if public:
        limits = upload_limits or UploadLimits()
        return {**options, "max_file_size": limits.archive_bytes, "show_error": False}
    return {**options, "max_file_size": MAX_FILE_BYTES * 20, "show_error": True}


@contextmanager
def engine_errors_as_gradio() -> Iterator[None]:
    """Turn the engine's typed errors into messages shown to the user (logged, no traceback)."""
    try:
        yield
    except EngineError as error:
        logger.info("request refused: %s", error)
        raise gr.Error(str(error), print_exception=False) from error


@dataclass
class QueryView:
    """One user's last query: the result, its kNN-graph layout and map positions."""

    result: QueryResult
    graph: NeighbourhoodGraph
    map_positions: dict[str, np.ndarray | None] = field(default_factory=dict)


@dataclass
class MethodWidgets:
    """The components of one method's tab."""

    name: str
    controls: list[gr.components.Component]
    param_names: list[str]
    source: gr.Markdown
    state: gr.Markdown
    baseline: gr.Gallery
    reranked: gr.Gallery
    metrics: gr.Markdown
    reset: gr.Button
    tune_first: gr.Dropdown
    tune_first_values: gr.Textbox
    tune_second: gr.Dropdown
    tune_second_values: gr.Textbox
    tune_run: gr.Button
    tune_cancel: gr.Button
    tune_plot: gr.Plot
    tune_summary: gr.Markdown
    tune_best: gr.State
    use_best: gr.Button
    save_best: gr.Button


def parse_values(text: str, name: str) -> list[float]:
    """'10, 20, 30' -> [10.0, 20.0, 30.0]; a clear error for anything else."""
    values = []
    for item in str(text or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise InvalidInputError(f"values of {name} must be numbers separated by commas; "
                                    f"{item.strip()!r} is not a number") from None
    if not values:
        raise InvalidInputError(f"give at least one value for {name}")
    return values


def default_grid(spec: dict[str, Any]) -> str:
    """Suggested sweep values around a parameter's default, inside its declared range."""
    default, low, high = spec["default"], spec.get("min"), spec.get("max")
    if spec["type"] == "int":
        candidates = {max(1, round(default * factor)) for factor in (0.5, 0.75, 1, 1.5, 2)}
    else:
        span = (high - low) if low is not None and high is not None else abs(default) or 1.0
        candidates = {round(default + span * step, 4) for step in (-0.3, -0.15, 0, 0.15, 0.3)}
    kept = sorted(v for v in candidates
                  if (low is None or v >= low) and (high is None or v <= high))
    return ", ".join(str(v) for v in kept)


class PageHandlers:
    """The page's event functions, bound to one explorer (plain methods, testable without a UI).

    `build_app` fills `w` (the shared components by role) and `tabs` (each method's components);
    handlers return dicts keyed by those components. `public`: a public page's uploads (None on
    a private page); a public page opens no server folder and keeps each upload to its session.
    """

    def __init__(self, explorer: Explorer, public: PublicUploads | None = None) -> None:
        self.explorer = explorer
        self.public = public
        self.method_names = list_rerankers()
        self.thumbnails = ThumbnailCache(explorer.thumbnail_root)
        self.w: dict[str, Any] = {}
        self.tabs: dict[str, MethodWidgets] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def session(self, key: str | None) -> GallerySession:
        with engine_errors_as_gradio():
            return self.explorer.session(key)

    def params_from(self, method: str, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.tabs[method].param_names, values, strict=True))

    def all_params(self, values: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Split the flat list of every tab's control values into per-method parameters."""
        params, at = {}, 0
        for method in self.method_names:
            count = len(self.tabs[method].param_names)
            params[method] = self.params_from(method, values[at:at + count])
            at += count
        return params

    def all_controls(self) -> list[gr.components.Component]:
        return [control for method in self.method_names for control in self.tabs[method].controls]

    # -- API -------------------------------------------------------------------------------------
    def api_query(self, image: str | None, gallery_file: str | None, leave_out: bool = True,
                  gallery: str | None = None, top_n: float = DEFAULT_TOP_N,
                  query_class: str | None = None) -> dict[str, Any]:
        """Rank a gallery for an uploaded image or one of its images; the `query` endpoint.

        Returns per method the top-N file names, classes and distances, timings and, when the
        query's class is known, its AP and P@N (JSON of `QueryResult.as_dict`).
        """
        result = self._run_query(gallery, image, gallery_file, query_class, leave_out, top_n,
                                 None)
        return result.as_dict(self.explorer.session(result.gallery_key).gallery)

    def _run_query(self, key: str | None, image: str | None, gallery_file: str | None,
                   query_class: str | None, leave_out: bool, top_n: float,
                   params: dict[str, dict[str, Any]] | None) -> QueryResult:
        with engine_errors_as_gradio():
            if gallery_file:
                return self.explorer.query(key, source_file=gallery_file, params=params,
                                           top_n=int(top_n), leave_out=bool(leave_out))
            if image:
                # Uploads live in temporary folders; messages name only the file.
                picture = load_image(image, name=Path(image).name)
                return self.explorer.query(
                    key, picture, query_class=None if query_class in (None, "", NO_CLASS)
                    else query_class, params=params, top_n=int(top_n))
            raise gr.Error("Upload an image or pick one of the gallery first.",
                           print_exception=False)

    # -- query events ----------------------------------------------------------------------------
    def search(self, key: str, image: str | None, picked: str | None, query_class: str,
               leave_out: bool, top_n: float, plot_method: str, space: str,
               *control_values: Any) -> dict[Any, Any]:
        """Run the current query (a pick if there is one, else the upload) with every method."""
        if not image and not picked:
            return {}
        result = self._run_query(key, None if picked else image, picked, query_class,
                                 leave_out, top_n, self.all_params(control_values))
        return self.render_query(result, plot_method, space)

    def upload(self, key: str, image: str | None, query_class: str, leave_out: bool,
               top_n: float, plot_method: str, space: str, *control_values: Any
               ) -> dict[Any, Any]:
        """An image was uploaded: forget any gallery pick and rank."""
        if not image:
            return {}
        updates = self.search(key, image, None, query_class, leave_out, top_n, plot_method,
                              space, *control_values)
        return {**updates, self.w["picked"]: None}

    def pick(self, key: str, file: str, leave_out: bool, top_n: float, plot_method: str,
             space: str, *control_values: Any) -> dict[Any, Any]:
        """A gallery image was chosen (browser, example, random): show it as the query, rank."""
        session = self.session(key)
        with engine_errors_as_gradio():
            path = session.gallery.path_of(session.position_of(file))
        updates = self.search(key, None, file, NO_CLASS, leave_out, top_n, plot_method, space,
                              *control_values)
        return {**updates, self.w["picked"]: file,
                self.w["query_image"]: str(self.thumbnails.get(path, side=PREVIEW_SIDE)),
                self.w["query_class"]: gr.update(value=NO_CLASS)}

    def pick_browsed(self, event: gr.SelectData, key: str, class_filter: str, page: float,
                     leave_out: bool, top_n: float, plot_method: str, space: str,
                     *control_values: Any) -> dict[Any, Any]:
        rows = self.browse_rows(key, class_filter, page)
        return self.pick(key, self.session(key).gallery.files[rows[event.index]], leave_out,
                         top_n, plot_method, space, *control_values)

    def pick_example(self, event: gr.SelectData, key: str, leave_out: bool, top_n: float,
                     plot_method: str, space: str, *control_values: Any) -> dict[Any, Any]:
        files = self.session(key).example_files()
        return self.pick(key, files[event.index], leave_out, top_n, plot_method, space,
                         *control_values)

    def pick_random(self, key: str, class_filter: str, leave_out: bool, top_n: float,
                    plot_method: str, space: str, *control_values: Any) -> dict[Any, Any]:
        session = self.session(key)
        with engine_errors_as_gradio():
            rows = session.rows_of_class(None if class_filter == ALL_CLASSES else class_filter)
        row = int(random.choice(rows.tolist()))
        return self.pick(key, session.gallery.files[row], leave_out, top_n, plot_method, space,
                         *control_values)

    def rerank_method(self, method: str, key: str, view: QueryView | None, plot_method: str,
                      space: str, *values: Any) -> dict[Any, Any]:
        """A parameter of one method changed: re-rank the current query with that method only."""
        tab = self.tabs[method]
        params = self.params_from(method, values)
        if view is None:
            with engine_errors_as_gradio():
                params, source = self.session(key).resolve(method, params)
            return {tab.source: self.source_text(method, params, source)}
        with engine_errors_as_gradio():
            result = self.explorer.rerank(view.result, method, params)
        session = self.session(result.gallery_key)
        new_view = self._view(session, result, view)
        updates = self._method_updates(session, result, method)
        updates.update(self._compare_galleries(session, result))
        updates.update(self._plots(session, new_view, plot_method, space))
        updates[self.w["state"]] = new_view
        updates[self.w["timings"]] = self.timings_table(result)
        updates[self.w["json"]] = result.as_dict(session.gallery)
        return updates

    def replot(self, view: QueryView | None, key: str, plot_method: str, space: str
               ) -> dict[Any, Any]:
        """The plot toggles changed: redraw both plots from the stored query (no re-ranking)."""
        session = self.session(key if view is None else view.result.gallery_key)
        if view is None:
            return {self.w["map_plot"]: self.map_figure(session, None, plot_method, space)}
        return self._plots(session, view, plot_method, space)

    # -- rendering -------------------------------------------------------------------------------
    def render_query(self, result: QueryResult, plot_method: str, space: str
                     ) -> dict[Any, Any]:
        session = self.session(result.gallery_key)
        view = self._view(session, result, None)
        updates: dict[Any, Any] = {
            self.w["state"]: view,
            self.w["imagenet"]: {label: p for label, p in result.imagenet},
            self.w["timings"]: self.timings_table(result),
            self.w["json"]: result.as_dict(session.gallery),
        }
        for method in self.method_names:
            updates.update(self._method_updates(session, result, method))
        updates.update(self._compare_galleries(session, result))
        updates.update(self._plots(session, view, plot_method, space))
        return updates

    def _view(self, session: GallerySession, result: QueryResult, previous: QueryView | None
              ) -> QueryView:
        """The view of a result; the graph layout is kept when the drawn rows did not change,
        so node positions stay put."""
        rows = self._drawn_rows(result)
        if previous is not None and set(rows) <= set(previous.graph.rows.tolist()):
            return QueryView(result, previous.graph, previous.map_positions)
        with engine_errors_as_gradio():
            graph = neighbourhood_graph(
                result.feature, session.gallery.features, rows, session.gallery.knn,
                edge_k=EDGE_K, query_row=result.source_row if result.leave_out else None)
        return QueryView(result, graph)

    @staticmethod
    def _drawn_rows(result: QueryResult) -> list[int]:
        rows: list[int] = []
        for method in result.rankings:
            rows.extend(result.top(method)[0].tolist())
        return list(dict.fromkeys(rows))

    def _items(self, session: GallerySession, result: QueryResult, method: str,
               compare_to_baseline: bool) -> list[tuple[str, str]]:
        """(thumbnail, caption) per top-N result: rank, class, distance, rank change, hit mark."""
        ranking = result.rankings[method]
        indices, distances = result.top(method)
        baseline_rank = {}
        if compare_to_baseline:
            baseline_rank = {row: rank for rank, row in
                             enumerate(result.rankings[BASELINE].indices.tolist(), start=1)}
        items = []
        for rank, (row, distance) in enumerate(zip(indices.tolist(), distances.tolist(),
                                                   strict=True), start=1):
            label = session.gallery.class_of(row) or Path(session.gallery.files[row]).stem
            caption = f"#{rank} · {label} · {distance:.3f}"
            if compare_to_baseline:
                caption += " · " + rank_change(rank, baseline_rank.get(row), result.top_n)
            mark = None
            if ranking.relevant is not None:
                hit = bool(ranking.relevant[rank - 1])
                mark = "hit" if hit else "miss"
                caption += " ✓" if hit else " ✗"
            items.append((str(self.thumbnails.get(session.gallery.path_of(row), mark)),
                          caption))
        return items

    def _method_updates(self, session: GallerySession, result: QueryResult, method: str
                        ) -> dict[Any, Any]:
        tab = self.tabs[method]
        baseline_items = gr.Gallery(value=self._items(session, result, BASELINE, False),
                                    label=f"{BASELINE_LABEL} · top {result.top_n}")
        if method in result.not_ready:
            return {tab.baseline: baseline_items,
                    tab.reranked: gr.Gallery(value=[], label=f"{method_title(method)}: "
                                             "not ready yet"),
                    tab.metrics: f"**Not ready yet:** {result.not_ready[method]}. The "
                                 "baseline is shown; search again when it is ready."}
        if method not in result.rankings:
            message = session.unavailable.get(method, "not run")
            return {tab.metrics: f"**Unavailable on this gallery:** {message}"}
        ranking = result.rankings[method]
        baseline = result.rankings[BASELINE]
        return {
            tab.baseline: baseline_items,
            tab.reranked: gr.Gallery(value=self._items(session, result, method, True),
                                     label=f"{ranking.title} · top {result.top_n}"),
            tab.metrics: self.metrics_text(result, baseline, ranking)
            + self.history_text(session, result, ranking),
            tab.source: self.source_text(method, ranking.params, ranking.params_source),
        }

    def _compare_galleries(self, session: GallerySession, result: QueryResult
                           ) -> dict[Any, Any]:
        updates = {}
        for method, gallery in self.w["compare_rows"].items():
            if method not in result.rankings:
                why = "not ready yet" if method in result.not_ready else "unavailable"
                updates[gallery] = gr.Gallery(value=[], label=f"{method_title(method)}: {why}")
                continue
            ranking = result.rankings[method]
            label = f"{ranking.title}"
            if ranking.ap is not None:
                label += f" · AP {ranking.ap:.3f} · P@{result.top_n} {ranking.precision:.2f}"
            updates[gallery] = gr.Gallery(
                value=self._items(session, result, method, method != BASELINE), label=label)
        return updates

    def _plots(self, session: GallerySession, view: QueryView, plot_method: str, space: str
               ) -> dict[Any, Any]:
        result = view.result
        method = plot_method if plot_method in result.rankings else BASELINE
        indices, distances = result.top(method)
        gallery = session.gallery
        knn = plots.knn_figure(
            view.graph, indices.tolist(), distances.tolist(), files=gallery.files,
            labels=gallery.labels, class_names=gallery.class_names,
            query_label=result.query_label,
            title=f"kNN graph: query and {method_title(method)} top {result.top_n}")
        return {self.w["knn_plot"]: knn,
                self.w["map_plot"]: self.map_figure(session, view, method, space)}

    def map_figure(self, session: GallerySession, view: QueryView | None, method: str,
                   space: str) -> Any:
        spaces = dict(session.map_spaces())
        space = space if space in spaces else "backbone"
        with engine_errors_as_gradio():
            layout = session.embedding_map(space, fit=False)
        if layout is None:
            return plots.embedding_figure(np.zeros((0, 2)), files=[], labels=None,
                                          class_names=[], title="Embedding map not computed")
        gallery = session.gallery
        kwargs: dict[str, Any] = {}
        if view is not None:
            result = view.result
            if space not in view.map_positions:
                with engine_errors_as_gradio():
                    view.map_positions[space] = session.query_map_position(result, space)
            indices, distances = result.top(method if method in result.rankings else BASELINE)
            kwargs = {"query_xy": view.map_positions[space], "result_rows": indices.tolist(),
                      "result_distances": distances.tolist()}
        return plots.embedding_figure(
            layout.coordinates, files=gallery.files, labels=gallery.labels,
            class_names=gallery.class_names,
            title=f"UMAP of {spaces[space]}", **kwargs)

    @staticmethod
    def metrics_text(result: QueryResult, baseline: Ranking, ranking: Ranking) -> str:
        how = ("its row of the leave-one-out run over the whole gallery (as in Compare)"
               if ranking.how == "leave-one-out" else
               f"online against the fitted gallery in {ranking.seconds * 1000:.1f} ms")
        learned = ranking.details.get("trained_on")
        learned = f" Learned from {learned}." if learned else ""
        if ranking.ap is None or baseline.ap is None:
            note = ("Pick the query's class (under the query) to score an upload."
                    if result.source_row is None else "This gallery has no labels to score.")
            return f"Ranked {how}. {note}{learned}"
        n = result.top_n
        return (f"**AP** {baseline.ap:.3f} → **{ranking.ap:.3f}** ({ranking.ap - baseline.ap:+.3f})"
                f" · **P@{n}** {baseline.precision:.2f} → **{ranking.precision:.2f}** · "
                f"{result.n_positives} relevant images · ranked {how}.{learned}")

    @staticmethod
    def history_text(session: GallerySession, result: QueryResult, ranking: Ranking) -> str:
        """For iterative methods (details["history"]: (iterations + 1, h) ids), how the top of
        the ranking moved per iteration: ✓/✗ per position when the query has a class, else the
        classes or file names."""
        history = ranking.details.get("history")
        if not isinstance(history, np.ndarray) or history.ndim != 2:
            return ""
        width = min(history.shape[1], result.top_n, 10)
        gallery = session.gallery
        lines = ["", "", "**Top results per iteration** (iteration 0 = the original ranking)",
                 "", "| iteration | " + " | ".join(str(p) for p in range(1, width + 1))
                 + (" | hits |" if result.query_label is not None else " |"),
                 "|---" * (width + 1 + (result.query_label is not None)) + "|"]
        for iteration, rows in enumerate(history[:, :width].tolist()):
            if result.query_label is not None and gallery.labels is not None:
                hits = [int(gallery.labels[row]) == result.query_label for row in rows]
                cells = ["✓" if hit else "✗" for hit in hits] + [str(sum(hits))]
            else:
                cells = [gallery.class_of(row) or Path(gallery.files[row]).stem for row in rows]
            lines.append(f"| {iteration} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    @staticmethod
    def source_text(method: str, params: dict[str, Any], source: str | None) -> str:
        setting = ", ".join(f"{name}={value}" for name, value in params.items())
        origin = {"preset": "this gallery's **preset**",
                  "authors' defaults": "the **authors' defaults**",
                  CUSTOM: "**custom** parameters"}.get(source or "", "the parameters below")
        return f"Runs with {origin}: `{setting}`"

    def timings_table(self, result: QueryResult) -> str:
        rows = ["| stage | ms |", "| --- | ---: |"]
        for stage, seconds in result.timings.items():
            if stage == "embed":
                name = f"embed ({result.embedded_by})" if result.embedded_by else "embed"
            else:
                ranking = result.rankings[stage]
                name = method_title(stage) + (" (leave-one-out share)"
                                              if ranking.how == "leave-one-out" else "")
            rows.append(f"| {name} | {seconds * 1000:.1f} |")
        return "\n".join(rows)

    # -- gallery browsing ------------------------------------------------------------------------
    def browse_rows(self, key: str, class_filter: str | None, page: float) -> list[int]:
        session = self.session(key)
        with engine_errors_as_gradio():
            rows = session.rows_of_class(None if class_filter in (None, ALL_CLASSES)
                                         else class_filter)
        start = max(0, int(page or 1) - 1) * BROWSE_PAGE
        return rows[start:start + BROWSE_PAGE].tolist()

    def browse(self, key: str, class_filter: str | None, page: float) -> dict[Any, Any]:
        session = self.session(key)
        with engine_errors_as_gradio():
            total = len(session.rows_of_class(None if class_filter in (None, ALL_CLASSES)
                                              else class_filter))
        pages = max(1, -(-total // BROWSE_PAGE))
        page = min(max(1, int(page or 1)), pages)
        rows = self.browse_rows(key, class_filter, page)
        items = [(str(self.thumbnails.get(session.gallery.path_of(row))),
                  session.gallery.class_of(row) or Path(session.gallery.files[row]).stem)
                 for row in rows]
        return {self.w["browser"]: gr.Gallery(value=items,
                                              label=f"Gallery: {total} images · click to query"),
                self.w["page"]: gr.Number(value=page, maximum=pages, label=f"Page (of {pages})")}

    def switch_gallery(self, key: str) -> dict[Any, Any]:
        """Another gallery was chosen: reset the query and show that gallery's settings."""
        session = self.session(key)
        gallery = session.gallery
        classes = gallery.class_names
        updates: dict[Any, Any] = {
            self.w["header"]: header_text(self.explorer, session),
            self.w["state"]: None, self.w["picked"]: None, self.w["query_image"]: None,
            self.w["query_class"]: gr.Dropdown(choices=[NO_CLASS, *classes], value=NO_CLASS,
                                               interactive=bool(classes)),
            self.w["class_filter"]: gr.Dropdown(choices=[ALL_CLASSES, *classes],
                                                value=ALL_CLASSES),
            self.w["examples"]: self.example_items(session),
            self.w["compare_table"]: self.compare_rows(session),
            self.w["knn_plot"]: None, self.w["json"]: None, self.w["timings"]: "",
            self.w["imagenet"]: None,
            self.w["map_plot"]: self.map_figure(session, None, BASELINE, "backbone"),
            self.w["space"]: gr.Radio(choices=[(t, n) for n, t in session.map_spaces()],
                                      value="backbone"),
            self.w["query_model"]: gr.update(value=session.query_model),
        }
        updates.update(self.browse(key, ALL_CLASSES, 1))
        for method in self.method_names:
            tab = self.tabs[method]
            params, source = session.params_for(method)
            updates[tab.source] = self.source_text(method, params, source)
            for control, name in zip(tab.controls, tab.param_names, strict=True):
                updates[control] = gr.update(value=params[name])
            updates[tab.baseline] = gr.Gallery(value=[])
            updates[tab.reranked] = gr.Gallery(value=[])
            updates[tab.metrics] = ""
            updates[tab.state] = session.state_text(method)
        updates[self.w["background"]] = background_text(session)
        for gallery_widget in self.w["compare_rows"].values():
            updates[gallery_widget] = gr.Gallery(value=[])
        return updates

    def example_items(self, session: GallerySession) -> list[tuple[str, str]]:
        return [(str(self.thumbnails.get(session.gallery.path_of(session.position_of(name)))),
                 session.gallery.class_of(session.position_of(name)) or Path(name).stem)
                for name in session.example_files()]

    # -- galleries -------------------------------------------------------------------------------
    def switch_query_model(self, key: str, query_model: str,
                           progress: gr.Progress = gr.Progress(),
                           request: gr.Request | None = None) -> dict[Any, Any]:
        """Another query model was chosen: open the gallery as that model sees it (indexing
        with the gallery model and training the query model on first use, with a progress
        bar) and switch to it."""
        with engine_errors_as_gradio():
            session = self.explorer.with_query_model(key, query_model,
                                                     progress=_gradio_progress(progress))
        updates = self.switch_gallery(session.key)
        updates[self.w["gallery"]] = gr.Dropdown(choices=self.gallery_choices(request),
                                                 value=session.key)
        return updates

    def open_folder(self, folder: str, progress: gr.Progress = gr.Progress()) -> dict[Any, Any]:
        """Open a gallery folder on the server (inside the allowed folders; never on a public
        page, which does not even wire this handler)."""
        with engine_errors_as_gradio():
            if self.public is not None:
                refuse_folder()
        if not folder or not folder.strip():
            raise gr.Error("Type the path of a folder of images on the server.",
                           print_exception=False)
        with engine_errors_as_gradio():
            session = self.explorer.open_folder(folder.strip(),
                                                progress=_gradio_progress(progress))
        return self._opened(session, progress)

    def open_zip(self, archive: str | None, progress: gr.Progress = gr.Progress(),
                 request: gr.Request | None = None) -> dict[Any, Any]:
        """Extract an uploaded zip (safely) and open it as a gallery; on a public page into the
        session's own temporary folder, under the public limits."""
        if not archive:
            raise gr.Error("Choose a .zip of images first.", print_exception=False)
        with engine_errors_as_gradio():
            if self.public is not None:
                session = self.public.open_zip(archive, _owner(request),
                                               progress=_gradio_progress(progress))
            else:
                session = self.explorer.open_zip(archive, progress=_gradio_progress(progress))
        return self._opened(session, progress, request)

    def end_session(self, request: gr.Request) -> None:
        """A browser session ended (its tab closed): a public page deletes its uploads."""
        if self.public is not None:
            self.public.release(_owner(request))

    def gallery_choices(self, request: gr.Request | None = None) -> list[tuple[str, str]]:
        """The galleries a session may choose (on a public page, not others' uploads)."""
        if self.public is None:
            return self.explorer.choices()
        return self.public.choices(_owner(request))

    def _opened(self, session: GallerySession, progress: gr.Progress,
                request: gr.Request | None = None) -> dict[Any, Any]:
        report = _gradio_progress(progress)
        with engine_errors_as_gradio():
            # with a job queue, the map and scores are queued there when the gallery opens
            for space, _ in session.map_spaces() if session.jobs is None else []:
                session.embedding_map(space, progress=report)
            if session.gallery.labels is not None and session.jobs is None:
                for index, (method, _) in enumerate(session.methods()):
                    report(index / len(session.methods()), f"scoring {method_title(method)}")
                    session.scores(method)
        updates = self.switch_gallery(session.key)
        updates[self.w["gallery"]] = gr.Dropdown(choices=self.gallery_choices(request),
                                                 value=session.key)
        updates[self.w["gallery_status"]] = opened_text(session, show_root=self.public is None)
        return updates

    # -- background work -------------------------------------------------------------------------
    def refresh_states(self, key: str, seen: tuple | None, view: QueryView | None,
                       plot_method: str, space: str) -> dict[Any, Any]:
        """The timer's tick: while background jobs change, redraw each tab's state, the
        background line and the Compare table; when a map becomes ready, the map and its
        choices. Nothing is sent when nothing changed."""
        jobs = self.explorer.jobs
        try:
            session = self.explorer.session(key)
        except EngineError:
            return {}
        if jobs is None:
            return {}
        spaces = tuple(name for name, _ in session.map_spaces()
                       if session.embedding_map(name, fit=False) is not None)
        now = (session.key, jobs.version, spaces)
        if seen == now:
            return {}
        updates: dict[Any, Any] = {self.w["jobs_seen"]: now,
                                   self.w["background"]: background_text(session)}
        for method in self.method_names:
            updates[self.tabs[method].state] = session.state_text(method)
        updates[self.w["compare_table"]] = self.compare_rows(session)
        if seen is None or seen[0] != session.key or seen[2] != spaces:
            choices = [(title, name) for name, title in session.map_spaces()]
            shown = space if space in dict(choices) else "backbone"
            updates[self.w["space"]] = gr.Radio(choices=choices, value=shown)
            if view is None or view.result.gallery_key != session.key:
                updates[self.w["map_plot"]] = self.map_figure(session, None, BASELINE, shown)
            else:
                updates[self.w["map_plot"]] = self.map_figure(session, view, plot_method, shown)
        return updates

    # -- compare ---------------------------------------------------------------------------------
    def compare_rows(self, session: GallerySession, params: dict[str, dict] | None = None,
                     compute: bool = False, progress: Any = None) -> list[list[Any]]:
        """Whole-gallery scores per method (leave-one-out): cached ones, or all when computing."""
        rows = []
        methods = session.methods()
        for index, (method, _) in enumerate(methods):
            if progress is not None:
                progress(index / len(methods), f"scoring {method_title(method)}")
            chosen = None if params is None or method == BASELINE else params.get(method)
            scores = session.scores(method, chosen, cached_only=not compute)
            if scores is not None:
                rows.append(scores)
        return scores_table(rows, dict(methods))

    def compute_compare(self, progress: gr.Progress = gr.Progress(), *inputs: Any
                        ) -> list[list[Any]]:
        """Score every method at the tabs' current parameters (inputs: gallery key, then every
        tab's control values)."""
        key, *control_values = inputs
        session = self.session(key)
        if session.gallery.labels is None:
            raise gr.Error("The Compare table needs a labelled gallery (labels.csv or "
                           "sub-folders).", print_exception=False)
        with engine_errors_as_gradio():
            return self.compare_rows(session, self.all_params(control_values), compute=True,
                                     progress=_gradio_progress(progress))

    # -- parameters and tuning -------------------------------------------------------------------
    def reset_params(self, method: str, key: str) -> list[Any]:
        params, _ = self.session(key).params_for(method)
        return [params[name] for name in self.tabs[method].param_names]

    def tune(self, method: str, progress: gr.Progress = gr.Progress(), *inputs: Any
             ) -> Iterator[tuple[Any, str, Any]]:
        """Sweep one or two parameters on the gallery's fixed split; yields the growing plot.

        inputs: gallery key, first parameter and its values, second parameter (or none) and its
        values, then the tab's control values (the parameters held fixed). The sweep runs in a
        thread; cancelling the event closes this generator, which tells the sweep to stop after
        the current setting.
        """
        key, first, first_values, second, second_values, *control_values = inputs
        session = self.session(key)
        gallery = session.gallery
        if gallery.labels is None or (gallery.labels < 0).all():
            raise gr.Error("Tuning needs a labelled gallery (labels.csv or sub-folders).",
                           print_exception=False)
        with engine_errors_as_gradio():
            grid = {first: parse_values(first_values, first)}
            if second and second != NO_PARAMETER and second != first:
                grid[second] = parse_values(second_values, second)
            base = self.params_from(method, control_values)
            base = {name: value for name, value in base.items() if name not in grid}
        labelled = gallery.labels >= 0
        features, labels = gallery.features[labelled], gallery.labels[labelled]
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                sweep(method, grid, features, labels, TUNE_PROTOCOL, base,
                      progress=lambda done, total: events.put(("progress", (done, total))),
                      should_stop=stop.is_set,
                      on_trial=lambda trial: events.put(("trial", trial)),
                      device=session.device)
            except EngineError as error:
                events.put(("error", error))
            finally:
                events.put(("done", None))

        worker = threading.Thread(target=run, name=f"sweep-{method}", daemon=True)
        trials: list[Trial] = []
        swept = list(grid)
        total = int(np.prod([len(values) for values in grid.values()]))
        progress((0, total), desc="sweeping", unit="settings")
        worker.start()
        try:
            while True:
                kind, payload = events.get()
                if kind == "error":
                    raise gr.Error(str(payload), print_exception=False)
                if kind == "done":
                    break
                if kind == "progress":
                    progress(payload, desc="sweeping", unit="settings")
                    continue
                trials.append(payload)
                yield (plots.sweep_figure(trials, swept), tune_text(trials, total),
                       best_trial(trials).params)
        finally:
            stop.set()
        if not trials:
            yield plots.sweep_figure([], swept), "No setting finished.", None

    def grid_for(self, method: str, name: str) -> str:
        """Suggested sweep values for one of a method's parameters."""
        specs = {spec["name"]: spec for spec in get_reranker_class(method).Params.describe()}
        return default_grid(specs[name]) if name in specs else ""

    def use_best(self, method: str, best: dict[str, Any] | None) -> list[Any]:
        if not best:
            raise gr.Error("Run a sweep first.", print_exception=False)
        return [best[name] for name in self.tabs[method].param_names]

    def save_best(self, method: str, key: str, best: dict[str, Any] | None) -> str:
        if not best:
            raise gr.Error("Run a sweep first.", print_exception=False)
        session = self.session(key)
        with engine_errors_as_gradio():
            stored = session.save_preset(method, best, note=f"sweep on {TUNE_PROTOCOL}")
        return self.source_text(method, stored, "preset")



def rank_change(rank: int, old_rank: int | None, top_n: int) -> str:
    """'▲3' (moved up 3), '▼2', '=' or 'new' (was outside the baseline's top N)."""
    if old_rank is None:
        return "new"
    if old_rank > top_n:
        return f"new (was #{old_rank})"
    if old_rank == rank:
        return "="
    return f"▲{old_rank - rank}" if old_rank > rank else f"▼{rank - old_rank}"


def tune_text(trials: Sequence[Trial], total: int) -> str:
    best = best_trial(trials)
    setting = ", ".join(f"{name}={value}" for name, value in best.params.items())
    return (f"{len(trials)}/{total} settings · best mAP **{best.map:.4f}** (P@1 {best.p1:.3f}) "
            f"at `{setting}` · on the {TUNE_PROTOCOL_TEXT}")


def background_text(session: GallerySession) -> str:
    """One line on the background work of a gallery: what runs now and how much waits."""
    jobs = session.jobs
    if jobs is None:
        return ""
    mine = [job for job in jobs.jobs() if job.key[0] == session.key]
    running = [job for job in mine if job.state == "running"]
    waiting = [job for job in mine if job.state == "waiting"]
    failed = [job for job in mine if job.state == "failed"]
    if not running and not waiting:
        done = f"Background preparation done ({len(mine) - len(failed)} jobs"
        return done + (f", {len(failed)} failed)." if failed else ").") if mine else ""
    parts = [f"**Preparing in the background** ({len(mine) - len(running) - len(waiting)} of "
             f"{len(mine)} done)"]
    parts += [f"now: {job.describe()}" for job in running]
    if waiting:
        parts.append(f"then {len(waiting)} more: " + ", ".join(job.title for job in waiting[:4])
                     + (", ..." if len(waiting) > 4 else ""))
    return " · ".join(parts)


def header_text(explorer: Explorer, session: GallerySession) -> str:
    gallery = session.gallery
    classes = f", {len(gallery.class_names)} classes" if gallery.labels is not None else ""
    skipped = f" ({len(gallery.skipped)} unreadable files skipped)" if gallery.skipped else ""
    return (f"**{session.title}**{classes}{skipped} · embedded by {session.embedded_by} · "
            f"search: {gallery.index.backend} · pick, click or upload a query "
            "to compare the baseline ranking with every re-ranking method.")


def galleries_text(public: PublicUploads | None) -> str:
    """The Galleries tab's explanation: what may be opened, and on a public page the limits."""
    if public is None:
        return ("Open another gallery: a folder on the server (labels from `labels.csv` or "
                "sub-folders) or an uploaded .zip of images. Indexing is cached: reopening is "
                "instant.")
    limits = public.limits
    return (f"Open another gallery: upload a .zip of images (labels from `labels.csv` or "
            f"sub-folders; at most {limits.archive_bytes >> 20} MiB, "
            f"{limits.extracted_bytes >> 20} MiB extracted and {limits.entries:,} files). "
            f"Your uploads are visible to you only, at most {limits.per_session} at a time, "
            "and are deleted when you close this page.")


def opened_text(session: GallerySession, show_root: bool = True) -> str:
    """What opening a gallery found; `show_root`: name the server folder (not on a public
    page, whose visitors only know the zip they uploaded)."""
    gallery = session.gallery
    lines = [f"Opened **{session.title}**" + (f" from `{gallery.root}`." if show_root else ".")]
    if gallery.skipped:
        lines.append(f"{len(gallery.skipped)} files were skipped:")
        lines += [f"- `{name}`: {reason}" for name, reason in list(gallery.skipped.items())[:50]]
    return "\n".join(lines)


def _owner(request: gr.Request | None) -> str | None:
    """The browser session a request comes from (None without one)."""
    return None if request is None else request.session_hash


def _gradio_progress(progress: gr.Progress) -> Any:
    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)
    return report


def _control(spec: dict[str, Any], value: Any) -> gr.components.Component:
    """A slider when the parameter has a range of at most MAX_SLIDER_STEPS steps, a checkbox
    for a switch, else a number box; help text as info."""
    if spec["type"] == "bool":
        return gr.Checkbox(value=bool(value), label=spec["name"], info=spec.get("help") or None)
    integral = spec["type"] == "int"
    low, high = spec.get("min"), spec.get("max")
    step = spec.get("step") or (1 if integral else 0.01)
    if low is not None and high is not None and (high - low) / step <= MAX_SLIDER_STEPS:
        return gr.Slider(minimum=low, maximum=high, step=step, value=value, label=spec["name"],
                         info=spec.get("help") or None)
    return gr.Number(value=value, label=spec["name"], info=spec.get("help") or None,
                     precision=0 if integral else None, minimum=low, maximum=high)


def build_app(explorer: Explorer, concurrency_limit: int = DEFAULT_CONCURRENCY,
              handlers: PageHandlers | None = None, public: bool = False) -> gr.Blocks:
    """The page for an explorer; launch it with `launch(**launch_options(explorer, public))`.

    handlers: the event functions to wire (default: new ones); `build_app` fills their
    components, so a caller (a test) can keep them and call the handlers directly.
    public: a page open to anyone (hosted): no folder on the server can be opened (the control
    is not even wired), uploads stay with the browser session that made them and are deleted
    when it ends, and Gradio's own temporary files are deleted after PUBLIC_CACHE_SECONDS.
    With `handlers`, their `public` decides.
    """
    handlers = handlers or PageHandlers(explorer,
                                        PublicUploads(explorer) if public else None)
    public = handlers.public is not None
    w = handlers.w
    session = explorer.session(None)
    gallery = session.gallery
    method_choices = [(BASELINE_LABEL, BASELINE)] + [
        (method_title(name), name) for name in handlers.method_names]

    with gr.Blocks(title="Retrieval Explorer",
                   delete_cache=(3600, PUBLIC_CACHE_SECONDS) if public else None) as demo:
        gr.Markdown("# Retrieval Explorer")
        with gr.Row():
            w["gallery"] = gr.Dropdown(choices=explorer.choices(), value=session.key,
                                       label="Gallery", scale=1, elem_id="gallery-choice")
            w["header"] = gr.Markdown(header_text(explorer, session))
        w["query_model"] = gr.Radio(
            choices=[(spec.title, name) for name, spec in QUERY_MODELS.items()],
            value=session.query_model, label="Query model (which network embeds the query and "
            "which the gallery; lite2 and SSP build their index and model on first use)",
            elem_id="query-model")
        w["background"] = gr.Markdown(background_text(session), elem_id="background")
        w["state"] = gr.State(None)
        w["jobs_seen"] = gr.State(None)
        w["timer"] = gr.Timer(JOB_REFRESH_SECONDS, active=explorer.jobs is not None)
        w["picked"] = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                # image_mode=None: the engine gets the uploaded file as it is (gradio's RGB
                # conversion would drop 16-bit depth and composite alpha on black).
                w["query_image"] = gr.Image(type="filepath", label="Query image (upload)",
                                            sources=["upload", "clipboard"], height=300,
                                            image_mode=None, elem_id="query-image")
                w["query_class"] = gr.Dropdown(
                    choices=[NO_CLASS, *gallery.class_names], value=NO_CLASS,
                    label="Class of an uploaded query (to score it)",
                    interactive=bool(gallery.class_names))
                with gr.Row():
                    w["leave_out"] = gr.Checkbox(value=True, label="Leave a gallery query out "
                                                 "of its own results")
                    w["top_n"] = gr.Slider(3, 30, value=DEFAULT_TOP_N, step=1,
                                           label="Results per method")
                w["search"] = gr.Button("Search again", variant="primary")
                w["imagenet"] = gr.Label(num_top_classes=3, label="Backbone's ImageNet top-3")
                w["timings"] = gr.Markdown(elem_id="timings")
            with gr.Column(scale=3, min_width=360):
                w["examples"] = gr.Gallery(
                    value=handlers.example_items(session), label="Examples: click to query",
                    columns=8, height=110, allow_preview=False, object_fit="cover",
                    interactive=False, elem_id="examples")
                with gr.Row():
                    w["class_filter"] = gr.Dropdown(choices=[ALL_CLASSES, *gallery.class_names],
                                                    value=ALL_CLASSES, label="Browse a class",
                                                    scale=3)
                    w["random"] = gr.Button("Random image", scale=1)
                w["browser"] = gr.Gallery(columns=6, height=360, allow_preview=False,
                                          object_fit="cover", interactive=False,
                                          elem_id="browser")
                w["page"] = gr.Number(value=1, minimum=1, precision=0, label="Page",
                                      elem_id="browse-page")
        with gr.Tabs():
            for name in handlers.method_names:
                cls = get_reranker_class(name)
                params, source = session.params_for(name)
                specs = cls.Params.describe()
                with gr.Tab(method_title(name), id=name, elem_id=f"tab-{name}"):
                    source_md = gr.Markdown(handlers.source_text(name, params, source),
                                            elem_classes=["method-source"])
                    state_md = gr.Markdown(session.state_text(name), elem_id=f"state-{name}")
                    with gr.Row():
                        controls = [_control(spec, params[spec["name"]]) for spec in specs]
                        reset = gr.Button("Reset to preset / defaults", scale=0)
                    metrics = gr.Markdown("", elem_id=f"metrics-{name}")
                    with gr.Row(equal_height=False):
                        baseline = gr.Gallery(label=BASELINE_LABEL, columns=5, height=300,
                                              object_fit="cover", interactive=False,
                                              elem_classes=["ranking"],
                                              elem_id=f"baseline-{name}")
                        reranked = gr.Gallery(label=method_title(name), columns=5,
                                              height=300, object_fit="cover",
                                              interactive=False, elem_classes=["ranking"],
                                              elem_id=f"reranked-{name}")
                    with gr.Accordion("Tune on this gallery", open=False):
                        gr.Markdown(f"Sweeps run on the {TUNE_PROTOCOL_TEXT}.")
                        names = [spec["name"] for spec in specs if spec["type"] != "bool"]
                        with gr.Row():
                            first = gr.Dropdown(choices=names, value=names[0], label="Parameter")
                            first_values = gr.Textbox(
                                default_grid(next(spec for spec in specs
                                                  if spec["name"] == names[0])),
                                label="Values")
                            second = gr.Dropdown(choices=[NO_PARAMETER, *names],
                                                 value=NO_PARAMETER,
                                                 label="Second parameter (optional)")
                            second_values = gr.Textbox("", label="Values")
                        with gr.Row():
                            run = gr.Button("Run sweep", variant="primary")
                            cancel = gr.Button("Cancel")
                            use_best = gr.Button("Use best")
                            save_best = gr.Button("Save best as this gallery's preset")
                        tune_summary = gr.Markdown()
                        tune_plot = gr.Plot(label="mAP and P@1 per setting")
                        tune_best = gr.State(None)
                handlers.tabs[name] = MethodWidgets(
                    name, controls, [spec["name"] for spec in specs], source_md, state_md,
                    baseline,
                    reranked, metrics, reset, first, first_values, second, second_values, run,
                    cancel, tune_plot, tune_summary, tune_best, use_best, save_best)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                w["compare_rows"] = {}
                for title, method in method_choices:
                    w["compare_rows"][method] = gr.Gallery(
                        label=title, columns=DEFAULT_TOP_N, rows=1, height=150,
                        object_fit="cover", interactive=False, allow_preview=False,
                        elem_id=f"compare-{method}")
                gr.Markdown("Whole-gallery scores: every labelled image a query against the "
                            "others (leave-one-out, batch); online ms is the median of single "
                            "queries against the fitted gallery.")
                w["compare_table"] = gr.Dataframe(
                    value=handlers.compare_rows(session),
                    headers=["method", "mAP", "P@1", "P@5", "online ms/query", "batch s",
                             "parameters"], interactive=False, elem_id="compare-table")
                w["compare_button"] = gr.Button("Compute for the current parameters")
            with gr.Tab("Galleries", id="galleries", elem_id="tab-galleries"):
                gr.Markdown(galleries_text(handlers.public))
                with gr.Row(visible=not public):
                    w["folder"] = gr.Textbox(label="Folder on the server", scale=3,
                                             visible=not public)
                    w["open_folder"] = gr.Button("Open folder", scale=1, visible=not public)
                with gr.Row():
                    w["zip"] = gr.File(label="Zip of images", file_types=[".zip"],
                                       type="filepath", scale=3)
                    w["open_zip"] = gr.Button("Open zip", scale=1)
                w["gallery_status"] = gr.Markdown()
        with gr.Row():
            w["plot_method"] = gr.Radio(choices=method_choices, value=handlers.method_names[0]
                                        if handlers.method_names else BASELINE,
                                        label="Plots show the top results of")
            w["space"] = gr.Radio(choices=[(t, n) for n, t in session.map_spaces()],
                                  value="backbone", label="Embedding map of")
        with gr.Row(equal_height=False):
            w["knn_plot"] = gr.Plot(label="kNN graph", elem_id="knn-plot")
            w["map_plot"] = gr.Plot(value=handlers.map_figure(session, None, BASELINE,
                                                              "backbone"),
                                    label="Embedding map", elem_id="embedding-map")
        with gr.Accordion("Results as JSON (the `query` API)", open=False):
            w["json"] = gr.JSON(label="query result")
        # The API endpoint: its own hidden inputs, so that it takes plain values.
        with gr.Row(visible=False):
            api_image = gr.Image(type="filepath", image_mode=None, label="image")
            api_file = gr.Textbox(label="gallery_file")
            api_leave = gr.Checkbox(value=True, label="leave_out")
            api_gallery = gr.Textbox(label="gallery")
            api_top = gr.Number(value=DEFAULT_TOP_N, precision=0, label="top_n")
            api_class = gr.Textbox(label="query_class")
            api_button = gr.Button()
        api_button.click(handlers.api_query, [api_image, api_file, api_leave, api_gallery,
                                              api_top, api_class], w["json"], api_name="query",
                         concurrency_id="query")

        _wire(handlers, demo)
        demo.load(handlers.browse, [w["gallery"], w["class_filter"], w["page"]],
                  [w["browser"], w["page"]], api_visibility="private")
        if public:
            demo.unload(handlers.end_session)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_SIZE)
    return demo


def _wire(handlers: PageHandlers, demo: gr.Blocks) -> None:
    """Connect the events (all private: the API is the `query` endpoint alone)."""
    w = handlers.w
    controls = handlers.all_controls()
    plot_inputs = [w["plot_method"], w["space"]]
    result_outputs = [w["state"], w["imagenet"], w["timings"], w["json"], w["knn_plot"],
                      w["map_plot"], *w["compare_rows"].values()]
    for tab in handlers.tabs.values():
        result_outputs += [tab.baseline, tab.reranked, tab.metrics, tab.source]
    pick_outputs = [*result_outputs, w["picked"], w["query_image"], w["query_class"]]
    private = {"api_visibility": "private", "concurrency_id": "query"}

    w["query_image"].upload(
        handlers.upload, [w["gallery"], w["query_image"], w["query_class"], w["leave_out"],
                          w["top_n"], *plot_inputs, *controls], [*result_outputs, w["picked"]],
        **private)
    gr.on([w["search"].click, w["leave_out"].input, w["top_n"].release, w["query_class"].input],
          handlers.search,
          [w["gallery"], w["query_image"], w["picked"], w["query_class"], w["leave_out"],
           w["top_n"], *plot_inputs, *controls], result_outputs, **private)
    w["browser"].select(handlers.pick_browsed,
                        [w["gallery"], w["class_filter"], w["page"], w["leave_out"], w["top_n"],
                         *plot_inputs, *controls], pick_outputs, **private)
    w["examples"].select(handlers.pick_example,
                         [w["gallery"], w["leave_out"], w["top_n"], *plot_inputs, *controls],
                         pick_outputs, **private)
    w["random"].click(handlers.pick_random,
                      [w["gallery"], w["class_filter"], w["leave_out"], w["top_n"],
                       *plot_inputs, *controls], pick_outputs, **private)
    gr.on([w["class_filter"].input, w["page"].submit, w["page"].input], handlers.browse,
          [w["gallery"], w["class_filter"], w["page"]], [w["browser"], w["page"]],
          api_visibility="private")
    gr.on([w["plot_method"].input, w["space"].input], handlers.replot,
          [w["state"], w["gallery"], *plot_inputs], [w["knn_plot"], w["map_plot"]],
          api_visibility="private")

    gallery_outputs = [w["header"], w["state"], w["picked"], w["query_image"], w["query_class"],
                       w["class_filter"], w["examples"], w["compare_table"], w["knn_plot"],
                       w["json"], w["timings"], w["imagenet"], w["map_plot"], w["space"],
                       w["browser"], w["page"], w["query_model"],
                       *w["compare_rows"].values()]
    gallery_outputs.append(w["background"])
    for tab in handlers.tabs.values():
        gallery_outputs += [tab.source, tab.state, *tab.controls, tab.baseline, tab.reranked,
                            tab.metrics]
    w["gallery"].input(handlers.switch_gallery, w["gallery"], gallery_outputs,
                       api_visibility="private")
    w["timer"].tick(handlers.refresh_states,
                    [w["gallery"], w["jobs_seen"], w["state"], *plot_inputs],
                    [w["jobs_seen"], w["background"], w["compare_table"], w["space"],
                     w["map_plot"], *[tab.state for tab in handlers.tabs.values()]],
                    api_visibility="private", concurrency_id="refresh", concurrency_limit=4,
                    show_progress="hidden")
    w["query_model"].input(handlers.switch_query_model, [w["gallery"], w["query_model"]],
                           [*gallery_outputs, w["gallery"]], api_visibility="private",
                           concurrency_id="index", concurrency_limit=1)
    opened_outputs = [*gallery_outputs, w["gallery"], w["gallery_status"]]
    if handlers.public is None:  # a public page has no event that takes a server path
        w["open_folder"].click(handlers.open_folder, w["folder"], opened_outputs,
                               api_visibility="private", concurrency_id="index",
                               concurrency_limit=1)
    w["open_zip"].click(handlers.open_zip, w["zip"], opened_outputs, api_visibility="private",
                        concurrency_id="index", concurrency_limit=1)
    w["compare_button"].click(handlers.compute_compare, [w["gallery"], *controls],
                              w["compare_table"], api_visibility="private",
                              concurrency_id="index", concurrency_limit=1)

    for name, tab in handlers.tabs.items():
        method_outputs = [w["state"], w["timings"], w["json"], w["knn_plot"], w["map_plot"],
                          *w["compare_rows"].values(), tab.baseline, tab.reranked, tab.metrics,
                          tab.source]
        triggers = [control.release if isinstance(control, gr.Slider)
                    else control.input if isinstance(control, gr.Checkbox) else control.submit
                    for control in tab.controls]
        rerank_inputs = [w["gallery"], w["state"], *plot_inputs, *tab.controls]
        gr.on(triggers, _bind(handlers.rerank_method, name), rerank_inputs, method_outputs,
              trigger_mode="always_last", **private)
        tab.reset.click(_bind(handlers.reset_params, name), w["gallery"], tab.controls,
                        api_visibility="private").then(
            _bind(handlers.rerank_method, name), rerank_inputs, method_outputs, **private)
        sweep_event = tab.tune_run.click(
            _bind(handlers.tune, name),
            [w["gallery"], tab.tune_first, tab.tune_first_values, tab.tune_second,
             tab.tune_second_values, *tab.controls],
            [tab.tune_plot, tab.tune_summary, tab.tune_best], api_visibility="private",
            concurrency_id="index", concurrency_limit=1)
        tab.tune_first.input(_bind(handlers.grid_for, name), tab.tune_first,
                             tab.tune_first_values, api_visibility="private")
        tab.tune_second.input(_bind(handlers.grid_for, name), tab.tune_second,
                              tab.tune_second_values, api_visibility="private")
        tab.tune_cancel.click(None, None, None, cancels=[sweep_event],
                              api_visibility="private")
        tab.use_best.click(_bind(handlers.use_best, name), tab.tune_best, tab.controls,
                           api_visibility="private").then(
            _bind(handlers.rerank_method, name), rerank_inputs, method_outputs, **private)
        tab.save_best.click(_bind(handlers.save_best, name), [w["gallery"], tab.tune_best],
                            tab.source, api_visibility="private")


def _bind(function: Any, method: str) -> Any:
    """`function` with its first argument (the method name) fixed; a partial keeps the rest of
    the signature, which Gradio inspects for a gr.Progress parameter."""
    bound = functools.partial(function, method)
    bound.__name__ = f"{function.__name__}_{method}"  # type: ignore[attr-defined]
    return bound
