"""The page's event functions, bound to one explorer.

They are plain methods that return {component: value} dicts keyed by the page's components
(`app.layout.PageComponents`), so tests call them directly; they refuse with `gr.Error`, which
the wiring shows in the page's one message area (`app.feedback.shown_in`). Per-user state (the
last query, the pick or upload) lives in `gr.State`s; everything heavy (backbone, galleries,
fitted methods, maps) is shared through the `Explorer`. Slow work runs in the engine: a sweep
in its own thread, a build the user asks for (another query model, a gallery) in the
explorer's request queue, which the handlers only follow and cancel.

`PageHandlers` holds the query, browsing, Compare and tuning events; the events of long work
(`app.builds.BuildEvents`), of links (`app.links.LinkEvents`), of a result's evidence
(`app.evidence.EvidenceEvents`) and of the failure browser (`app.failures.FailureEvents`) are
mixed into it from their own modules.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app import plots
from app.builds import BuildEvents
from app.evidence import EvidenceEvents
from app.exports import ExportEvents
from app.failures import FailureEvents
from app.feedback import engine_errors_as_gradio, gradio_progress
from app.links import LinkEvents
from app.plot_events import clicked_file, selected_files
from app.public import PublicUploads
from app.render import (
    QueryView,
    compare_updates,
    examples_for,
    map_figure,
    method_updates,
    plot_updates,
    query_note,
    query_set_note,
    query_view,
)
from app.share import QueryUploads
from app.text import (
    ALL_CLASSES,
    NO_CLASS,
    NO_PARAMETER,
    background_text,
    default_grid,
    header_text,
    parse_values,
    source_text,
    timings_table,
    tune_text,
)
from app.thumbnails import PREVIEW_SIDE, ThumbnailCache
from engine import (
    BASELINE,
    DEFAULT_TOP_N,
    Explorer,
    GallerySession,
    QueryResult,
    SweepRun,
    Trial,
    best_trial,
    get_reranker_class,
    list_rerankers,
    load_image,
    method_title,
    scores_table,
)

if TYPE_CHECKING:
    from app.layout import PageComponents

BROWSE_PAGE = 48
"""Gallery images per page of the browser."""
TUNE_PROTOCOL = "oxford17-split"
"""How a sweep splits the labelled images into queries and gallery (`app.text` says it)."""
SELECTION_SHOWN = 60
"""Thumbnails shown of a map selection (the file list holds all of it)."""
QUERY_SET_PICK = "query-set:"
"""How the `picked` state names a query of the session's query features (its name follows),
apart from a gallery item of the same name."""


class PageHandlers(ExportEvents, BuildEvents, LinkEvents, EvidenceEvents, FailureEvents):
    """The page's event functions, bound to one explorer (plain methods, testable without a UI).

    `build_app` sets `ui` (the page's components); handlers return dicts keyed by them.
    `public`: a public page's uploads (None on a private page); a public page opens no server
    folder, keeps each upload to its session and keeps no uploaded query for links.
    """

    def __init__(self, explorer: Explorer, public: PublicUploads | None = None) -> None:
        self.explorer = explorer
        self.public = public
        self.method_names = list_rerankers()
        self.thumbnails = ThumbnailCache(explorer.thumbnail_root)
        self.query_uploads = (None if public is not None
                              else QueryUploads(explorer.cache_root / "query-uploads"))
        self._ui: PageComponents | None = None

    @property
    def ui(self) -> PageComponents:
        """The components of the page built for these handlers (by `build_app`)."""
        if self._ui is None:
            raise RuntimeError("no page built for these handlers yet: call build_app")
        return self._ui

    @ui.setter
    def ui(self, components: PageComponents) -> None:
        self._ui = components

    @property
    def tab_ids(self) -> list[str]:
        """The ids of the page's tabs, in order (the methods, then Compare)."""
        return [*self.method_names, "compare"]

    # -- helpers ---------------------------------------------------------------------------------
    def session(self, key: str | None) -> GallerySession:
        with engine_errors_as_gradio():
            return self.explorer.session(key)

    def params_from(self, method: str, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.ui.tabs[method].param_names, values, strict=True))

    def all_params(self, values: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Split the flat list of every tab's control values into per-method parameters."""
        params, at = {}, 0
        for method in self.method_names:
            count = len(self.ui.tabs[method].param_names)
            params[method] = self.params_from(method, values[at:at + count])
            at += count
        return params

    def flat_controls(self, params: dict[str, dict[str, Any]]) -> list[Any]:
        """Per-method parameters as the flat list of every tab's control values (the inverse
        of `all_params`)."""
        return [params[method][name] for method in self.method_names
                for name in self.ui.tabs[method].param_names]

    def default_controls(self, session: GallerySession) -> list[Any]:
        """Every tab's control values at the gallery's setting (preset or authors' defaults)."""
        return self.flat_controls({method: session.params_for(method)[0]
                                   for method in self.method_names})

    # -- API -------------------------------------------------------------------------------------
    def api_query(self, image: str | None, gallery_file: str | None, leave_out: bool = True,
                  gallery: str | None = None, top_n: float = DEFAULT_TOP_N,
                  query_class: str | None = None) -> dict[str, Any]:
        """Rank a gallery for an uploaded image or one of its images; the `query` endpoint.

        Returns per method the top-N file names, classes, distances and cosine similarities,
        timings and, when the query's class is known, its AP and P@N (JSON of
        `QueryResult.as_dict`).
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
    def search(self, key: str, uploaded: str | None, picked: str | None, query_class: str,
               leave_out: bool, top_n: float, plot_method: str, space: str,
               *control_values: Any) -> dict[Any, Any]:
        """Run the current query (a pick if there is one, else the upload) with every method."""
        if not uploaded and not picked:
            return {}
        if picked and picked.startswith(QUERY_SET_PICK):
            return self._query_from_set(key, picked.removeprefix(QUERY_SET_PICK), top_n,
                                        plot_method, space, control_values)
        result = self._run_query(key, None if picked else uploaded, picked, query_class,
                                 leave_out, top_n, self.all_params(control_values))
        return self.render_query(result, plot_method, space)

    def _query_from_set(self, key: str, name: str, top_n: float, plot_method: str, space: str,
                        control_values: Sequence[Any]) -> dict[Any, Any]:
        """Rank for one query of the session's query features (every method) and show it,
        with its AP by the revisited ground truth (Medium) or its class."""
        with engine_errors_as_gradio():
            result = self.explorer.query_from_set(key, name,
                                                  params=self.all_params(control_values),
                                                  top_n=int(top_n))
        queries = self.session(result.gallery_key).query_set
        updates = self.render_query(result, plot_method, space)
        if queries is not None:
            updates[self.ui.query_note] = query_set_note(result, name, queries.source,
                                                         queries.ground_truth)
        return updates

    def pick_query(self, key: str, name: str, top_n: float, plot_method: str, space: str,
                   *control_values: Any) -> dict[Any, Any]:
        """A query of the session's query features was chosen (the examples list shows them):
        show it as the query (its image when the gallery has an image folder holding it,
        else a tile with its name) and rank with every method."""
        session = self.session(key)
        updates = self._query_from_set(key, name, top_n, plot_method, space, control_values)
        return {**updates, self.ui.picked: f"{QUERY_SET_PICK}{name}", self.ui.uploaded: None,
                self.ui.query_image: str(self.thumbnails.get(session.gallery.root / name,
                                                             side=PREVIEW_SIDE)),
                self.ui.query_class: gr.update(value=NO_CLASS)}

    def upload(self, key: str, file: str | None, query_class: str, leave_out: bool,
               top_n: float, plot_method: str, space: str, *control_values: Any
               ) -> dict[Any, Any]:
        """A file was uploaded as the query: the engine decodes it (a file it cannot read is
        refused by name); on success it becomes the query, shown as its thumbnail, and any
        gallery pick is forgotten. A private page keeps the file (by hash) for links."""
        if not file:
            return {}
        updates = self.search(key, file, None, query_class, leave_out, top_n, plot_method,
                              space, *control_values)
        kept = file
        if self.query_uploads is not None:
            kept = str(self.query_uploads.keep(file))
        return {**updates, self.ui.picked: None, self.ui.uploaded: kept,
                self.ui.upload: None,
                self.ui.query_image: str(self.thumbnails.get(Path(kept), side=PREVIEW_SIDE))}

    def pick(self, key: str, file: str, leave_out: bool, top_n: float, plot_method: str,
             space: str, *control_values: Any) -> dict[Any, Any]:
        """A gallery image was chosen (browser, example, random, a result, a plot point):
        show it as the query, rank. A `QUERY_SET_PICK` name is a query of the session's query
        features (`pick_query`)."""
        if file.startswith(QUERY_SET_PICK):
            return self.pick_query(key, file.removeprefix(QUERY_SET_PICK), top_n, plot_method,
                                   space, *control_values)
        session = self.session(key)
        with engine_errors_as_gradio():
            path = session.gallery.path_of(session.position_of(file))
        updates = self.search(key, None, file, NO_CLASS, leave_out, top_n, plot_method, space,
                              *control_values)
        return {**updates, self.ui.picked: file,
                self.ui.query_image: str(self.thumbnails.get(path, side=PREVIEW_SIDE)),
                self.ui.query_class: gr.update(value=NO_CLASS)}

    def show_upload(self, key: str, kept: str, query_class: str, leave_out: bool,
                    top_n: float, plot_method: str, space: str, *control_values: Any
                    ) -> dict[Any, Any]:
        """An upload already kept (a link's, or the current one under another query model)
        shown as the query again and ranked."""
        updates = self.search(key, kept, None, query_class, leave_out, top_n, plot_method,
                              space, *control_values)
        return {**updates, self.ui.picked: None, self.ui.uploaded: kept,
                self.ui.query_class: gr.update(value=query_class),
                self.ui.query_image: str(self.thumbnails.get(Path(kept), side=PREVIEW_SIDE))}

    def pick_browsed(self, event: gr.SelectData, key: str, class_filter: str, page: float,
                     leave_out: bool, top_n: float, plot_method: str, space: str,
                     *control_values: Any) -> dict[Any, Any]:
        rows = self.browse_rows(key, class_filter, page)
        return self.pick(key, self.session(key).gallery.files[rows[event.index]], leave_out,
                         top_n, plot_method, space, *control_values)

    def pick_example(self, event: gr.SelectData, key: str, leave_out: bool, top_n: float,
                     plot_method: str, space: str, *control_values: Any) -> dict[Any, Any]:
        session = self.session(key)
        if session.query_set is not None:  # the examples list shows the query features
            names = session.query_set.names
            if not 0 <= event.index < len(names):
                return {}
            return self.pick_query(key, names[event.index], top_n, plot_method, space,
                                   *control_values)
        files = session.example_files()
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

    def pick_result(self, method: str, event: gr.SelectData, view: QueryView | None,
                    leave_out: bool, top_n: float, plot_method: str, space: str,
                    *control_values: Any) -> dict[Any, Any]:
        """A result of `method`'s ranking was clicked ("query with this result")."""
        if view is None:
            return {}
        result = view.result
        if method not in result.rankings:
            raise gr.Error(f"{method_title(method)} has no results to pick from yet.",
                           print_exception=False)
        rows = result.top(method)[1]
        if not 0 <= event.index < len(rows):
            return {}
        gallery = self.session(result.gallery_key).gallery
        return self.pick(result.gallery_key, gallery.files[int(rows[event.index])], leave_out,
                         top_n, plot_method, space, *control_values)

    def pick_plotted(self, clicked: str, key: str, leave_out: bool, top_n: float,
                     plot_method: str, space: str, *control_values: Any) -> dict[Any, Any]:
        """A point of the map or a node of the kNN graph was clicked ("file|nonce")."""
        file = clicked_file(clicked)
        if not file:
            return {}
        return self.pick(key, file, leave_out, top_n, plot_method, space, *control_values)

    def select_on_map(self, selected: str, key: str) -> dict[Any, Any]:
        """Points were box- or lasso-selected on the map (a JSON list of files): show them as
        a strip and offer their list as a file."""
        ui = self.ui
        files = selected_files(selected)
        if not files:
            return {ui.selection: gr.Gallery(value=[], visible=False),
                    ui.selection_file: gr.File(value=None, visible=False)}
        session = self.session(key)
        rows = []
        with engine_errors_as_gradio():
            rows = [session.position_of(name) for name in files]
        gallery = session.gallery
        items = [(str(self.thumbnails.get(gallery.path_of(row))),
                  gallery.class_of(row) or Path(gallery.files[row]).stem)
                 for row in rows[:SELECTION_SHOWN]]
        listing = Path(tempfile.mkdtemp(prefix="selection-")) / "selected-images.txt"
        listing.write_text("".join(f"{gallery.files[row]}\t{gallery.class_of(row) or ''}\n"
                                   for row in rows), encoding="utf-8")
        shown = f" (the first {SELECTION_SHOWN})" if len(rows) > SELECTION_SHOWN else ""
        return {ui.selection: gr.Gallery(value=items, visible=True,
                                         label=f"{len(rows)} images selected on the map{shown}"),
                ui.selection_file: gr.File(value=str(listing), visible=True)}

    def rerank_method(self, method: str, key: str, view: QueryView | None, plot_method: str,
                      space: str, *values: Any) -> dict[Any, Any]:
        """A parameter of one method changed: re-rank the current query with that method only.
        The controls get the values used (a typed value outside its range was clamped)."""
        tab = self.ui.tabs[method]
        params = self.params_from(method, values)
        shown = dict(zip(tab.controls, values, strict=True))
        if view is None:
            with engine_errors_as_gradio():
                params, source = self.session(key).resolve(method, params)
            return {**shown, tab.source: source_text(method, params, source)}
        with engine_errors_as_gradio():
            result = self.explorer.rerank(view.result, method, params)
        session = self.session(result.gallery_key)
        new_view = query_view(session, result, view)
        updates = method_updates(tab, self.thumbnails, session, result)
        updates.update(compare_updates(self.ui.compare_rows, self.thumbnails, session, result))
        updates.update(plot_updates(self.ui, session, new_view, plot_method, space,
                                    self.thumbnails))
        updates[self.ui.state] = new_view
        updates[self.ui.timings] = timings_table(result)
        updates[self.ui.json] = result.as_dict(session.gallery)
        updates.update(self.hide_evidence([tab]))
        return {**shown, **updates}

    def replot(self, view: QueryView | None, key: str, plot_method: str, space: str
               ) -> dict[Any, Any]:
        """The plot toggles changed: redraw both plots from the stored query (no re-ranking)."""
        session = self.session(key if view is None else view.result.gallery_key)
        if view is None:
            return {self.ui.map_plot: map_figure(session, None, plot_method, space,
                                                 self.thumbnails)}
        return plot_updates(self.ui, session, view, plot_method, space, self.thumbnails)

    def render_query(self, result: QueryResult, plot_method: str, space: str
                     ) -> dict[Any, Any]:
        """Every component that shows a query: the rankings, scores, timings and plots."""
        session = self.session(result.gallery_key)
        view = query_view(session, result, None)
        updates: dict[Any, Any] = {
            self.ui.state: view,
            self.ui.query_note: query_note(result),
            self.ui.timings: timings_table(result),
            self.ui.json: result.as_dict(session.gallery),
        }
        for method in self.method_names:
            updates.update(method_updates(self.ui.tabs[method], self.thumbnails, session,
                                          result))
        updates.update(compare_updates(self.ui.compare_rows, self.thumbnails, session, result))
        updates.update(plot_updates(self.ui, session, view, plot_method, space,
                                    self.thumbnails))
        updates.update(self.hide_evidence())
        return updates

    # -- gallery browsing ------------------------------------------------------------------------
    def browse_rows(self, key: str, class_filter: str | None, page: float) -> list[int]:
        session = self.session(key)
        with engine_errors_as_gradio():
            rows = session.rows_of_class(None if class_filter in (None, ALL_CLASSES)
                                         else class_filter)
        start = max(0, int(page or 1) - 1) * BROWSE_PAGE
        return rows[start:start + BROWSE_PAGE].tolist()

    def browse(self, key: str, class_filter: str | None, page: float) -> dict[Any, Any]:
        """One page of the gallery browser; a page past the last shows the last."""
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
        return {self.ui.browser: gr.Gallery(value=items,
                                            label=f"Gallery: {total} images · click to query"),
                self.ui.page: gr.Number(value=page, maximum=pages, label=f"Page (of {pages})")}

    def switch_gallery(self, key: str) -> dict[Any, Any]:
        """Another gallery was chosen: reset the query and show that gallery's settings."""
        ui = self.ui
        session = self.session(key)
        gallery = session.gallery
        classes = gallery.class_names
        updates: dict[Any, Any] = {
            ui.header: header_text(session),
            ui.state: None, ui.picked: None, ui.uploaded: None, ui.query_image: None,
            ui.query_class: gr.Dropdown(choices=[NO_CLASS, *classes], value=NO_CLASS,
                                        interactive=bool(classes)),
            ui.class_filter: gr.Dropdown(choices=[ALL_CLASSES, *classes], value=ALL_CLASSES),
            ui.examples: examples_for(self.thumbnails, session),
            ui.compare_table: self.compare_rows(session),
            ui.knn_plot: None, ui.json: None, ui.timings: "", ui.query_note: "",
            ui.map_plot: map_figure(session, None, BASELINE, "backbone", self.thumbnails),
            ui.space: gr.Radio(choices=[(t, n) for n, t in session.map_spaces()],
                               value="backbone"),
            # A gallery of another model's features takes no image query and no other
            # query model: the page offers neither there.
            ui.query_model: gr.update(value=session.query_model,
                                      interactive=gallery.source is None),
            ui.upload: gr.update(interactive=gallery.source is None),
            ui.selection: gr.Gallery(value=[], visible=False),
            ui.selection_file: gr.File(value=None, visible=False),
        }
        updates.update(self.browse(key, ALL_CLASSES, 1))
        for method in self.method_names:
            tab = ui.tabs[method]
            params, source = session.params_for(method)
            updates[tab.source] = source_text(method, params, source)
            for control, name in zip(tab.controls, tab.param_names, strict=True):
                updates[control] = gr.update(value=params[name])
            updates[tab.baseline] = gr.Gallery(value=[])
            updates[tab.reranked] = gr.Gallery(value=[])
            updates[tab.metrics] = ""
            updates[tab.state] = session.state_text(method)
            updates[tab.train] = self.train_button(session, method)
        updates[ui.background] = background_text(session)
        for gallery_widget in ui.compare_rows.values():
            updates[gallery_widget] = gr.Gallery(value=[])
        updates.update(self.hide_evidence())
        if ui.failures is not None:
            updates.update(self.failure_reset(session))
        return updates

    # -- compare ---------------------------------------------------------------------------------
    def compare_rows(self, session: GallerySession, params: dict[str, dict] | None = None,
                     compute: bool = False, progress: Any = None
                     ) -> list[list[Any]] | dict[str, Any]:
        """Whole-gallery scores per method (leave-one-out): cached ones, or all when computing.
        A gallery with query features and revisited ground truth gets the revisited table
        instead (Easy/Medium/Hard mAP and mP@1/5/10), as {"headers": ..., "data": ...}, so that
        its own headers come with it."""
        if session.revisited_ready:
            with engine_errors_as_gradio():
                headers, data = session.revisited_rows(params, compute=compute,
                                                       progress=progress)
            return {"headers": headers, "data": data}
        rows = session.scores_rows(params, compute=compute, progress=progress)
        return scores_table(rows, dict(session.methods()))

    def compute_compare(self, progress: gr.Progress = gr.Progress(), *inputs: Any
                        ) -> list[list[Any]] | dict[str, Any]:
        """Score every method at the tabs' current parameters (inputs: gallery key, then every
        tab's control values)."""
        key, *control_values = inputs
        session = self.session(key)
        if session.gallery.labels is None and not session.revisited_ready:
            raise gr.Error("The Compare table needs a labelled gallery (labels.csv or "
                           "sub-folders), or query features with revisited ground truth.",
                           print_exception=False)
        with engine_errors_as_gradio():
            return self.compare_rows(session, self.all_params(control_values), compute=True,
                                     progress=gradio_progress(progress))

    # -- parameters and tuning -------------------------------------------------------------------
    def reset_params(self, method: str, key: str) -> list[Any]:
        params, _ = self.session(key).params_for(method)
        return [params[name] for name in self.ui.tabs[method].param_names]

    def tune(self, method: str, progress: gr.Progress = gr.Progress(), *inputs: Any
             ) -> Iterator[tuple[Any, str, Any]]:
        """Sweep one or two parameters on the gallery's fixed split; yields the growing plot.

        inputs: gallery key, first parameter and its values, second parameter (or none) and its
        values, then the tab's control values (the parameters held fixed). The sweep runs in
        the engine's thread (`SweepRun`); cancelling the event closes this generator, which
        cancels the run: it stops after the current setting.
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
        run = SweepRun(method, grid, gallery.features[labelled], gallery.labels[labelled],
                       TUNE_PROTOCOL, base, device=session.device)
        trials: list[Trial] = []
        swept = list(grid)
        progress((0, run.total), desc="sweeping", unit="settings")
        try:
            with engine_errors_as_gradio():
                for event in run:
                    if not isinstance(event, Trial):
                        progress((event.done, event.total), desc="sweeping", unit="settings")
                        continue
                    trials.append(event)
                    yield (plots.sweep_figure(trials, swept), tune_text(trials, run.total),
                           best_trial(trials).params)
        finally:
            run.cancel()
        if not trials:
            yield plots.sweep_figure([], swept), "No setting finished.", None

    def grid_for(self, method: str, name: str) -> str:
        """Suggested sweep values for one of a method's parameters."""
        specs = {spec["name"]: spec for spec in get_reranker_class(method).Params.describe()}
        return default_grid(specs[name]) if name in specs else ""

    def use_best(self, method: str, best: dict[str, Any] | None) -> list[Any]:
        if not best:
            raise gr.Error("Run a sweep first.", print_exception=False)
        return [best[name] for name in self.ui.tabs[method].param_names]

    def save_best(self, method: str, key: str, best: dict[str, Any] | None
                  ) -> dict[Any, Any]:
        """Save the sweep's best setting as the gallery's preset and put it in the controls
        (the wiring then re-ranks with it): label, controls and results agree."""
        if not best:
            raise gr.Error("Run a sweep first.", print_exception=False)
        session = self.session(key)
        with engine_errors_as_gradio():
            stored = session.save_preset(method, best, note=f"sweep on {TUNE_PROTOCOL}")
        tab = self.ui.tabs[method]
        return {tab.source: source_text(method, stored, "preset"),
                **{control: stored[name]
                   for control, name in zip(tab.controls, tab.param_names, strict=True)}}
