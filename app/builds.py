"""The page's event functions for long work: builds the user asks for (another query model,
another gallery), followed in one progress line with a Cancel, and the background work's
states (the timer's redraw, "train now").

`BuildEvents` is part of `app.handlers.PageHandlers` (which it is mixed into): it uses the
page's components (`ui`), the explorer, the thumbnails and the query events (`search`,
`render_query`, `switch_gallery`, ...) defined there. The builds run in the engine's request
queue; these functions only start, follow and cancel them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.feedback import engine_errors_as_gradio, owner
from app.public import PublicUploads, refuse_folder
from app.render import QueryView, examples_for, map_figure
from app.text import attached_text, background_text, opened_text, train_label
from app.thumbnails import ThumbnailCache
from engine import (
    BASELINE,
    DONE,
    FAILED,
    FEATURE_FILE_FORMATS,
    RUNNING,
    WAITING,
    Explorer,
    GallerySession,
    Job,
    Plan,
    PlanStep,
    get_reranker_class,
)
from engine.errors import EngineError, InvalidInputError

if TYPE_CHECKING:
    from app.layout import PageComponents

JOB_POLL_SECONDS = 0.5
"""How often a followed build's progress line is redrawn (only when it changed)."""


class BuildEvents:
    """Builds the user asks for and the background work's states (mixed into PageHandlers)."""

    explorer: Explorer
    public: PublicUploads | None
    thumbnails: ThumbnailCache
    method_names: list[str]
    ui: PageComponents
    session: Callable[[str | None], GallerySession]
    switch_gallery: Callable[[str], dict[Any, Any]]
    compare_rows: Callable[..., list[list[Any]]]
    default_controls: Callable[[GallerySession], list[Any]]
    pick: Callable[..., dict[Any, Any]]
    show_upload: Callable[..., dict[Any, Any]]

    # -- long work the user asks for: another query model, another gallery -----------------------
    def switch_query_model(self, request: gr.Request | None, key: str, query_model: str,
                           uploaded: str | None, picked: str | None, query_class: str,
                           leave_out: bool, top_n: float, plot_method: str, space: str,
                           *control_values: Any) -> Iterator[dict[Any, Any]]:
        """Another query model was chosen: open the gallery as that model sees it and switch
        to it, then run the current query again there.

        A model already built switches at once. Otherwise the build (indexing with the gallery
        model, training SSP) runs in the explorer's request queue: the page says what it will
        do and about how long, shows its progress in one line with a Cancel, and stays usable
        meanwhile; cancelling leaves the page on the gallery it was on.
        """
        with engine_errors_as_gradio():
            base = self.explorer.session(key)
            if self.explorer.requests is None:
                session = self.explorer.with_query_model(base.key, query_model)
            else:
                job = self.explorer.request_query_model(base.key, query_model)
                session = yield from self._follow(job, f"{job.title} for {base.title}",
                                                  {self.ui.query_model: base.query_model})
        if session is None:
            return
        updates = self._switched(session, request)
        updates.update(self._rerun(session, uploaded, picked, query_class, leave_out, top_n,
                                   plot_method, space))
        yield {**updates, **self._job_hidden()}

    def open_folder(self, folder: str) -> Iterator[dict[Any, Any]]:
        """Open a gallery folder, or a features file (.npy, .npz, .safetensors), on the server
        (inside the allowed folders; never on a public page, which does not even wire this
        handler), in the request queue as above."""
        with engine_errors_as_gradio():
            if self.public is not None:
                refuse_folder()
        if not folder or not folder.strip():
            raise gr.Error("Type the path of a folder of images on the server.",
                           print_exception=False)
        path = folder.strip()
        with engine_errors_as_gradio():
            if Path(path).suffix.lower() in FEATURE_FILE_FORMATS:
                session = yield from self._open_features(path)
            elif self.explorer.requests is None:
                session = self.explorer.open_folder(path)
            else:
                job = self.explorer.request_gallery(path)
                session = yield from self._follow(job, "Opening a folder", {})
        if session is not None:
            yield {**self._opened(session, None), **self._job_hidden()}

    def _open_features(self, path: str, check_allowed: bool = True
                       ) -> Iterator[dict[Any, Any]]:
        """Open a features file (a gallery of another model's features: its items are its
        queries) as a request; returns its session, None when cancelled. A file typed in must
        lie in the allowed folders; an upload's kept copy need not (`check_allowed`)."""
        def work(progress: Callable[[float, str], None]) -> GallerySession:
            return self.explorer.open_features(path, progress=progress,
                                               check_allowed=check_allowed)

        if self.explorer.requests is None:
            return work(lambda fraction, message: None)
        name = Path(path).name
        plan = Plan.of(PlanStep(f"reads {name} and builds its index and kNN graph", None))
        job = self.explorer.request(("features", path), f"Opening {name}", plan, work)
        return (yield from self._follow(job, f"Opening {name}", {}))

    def open_zip(self, request: gr.Request | None, archive: str | None
                 ) -> Iterator[dict[Any, Any]]:
        """Extract an uploaded zip (safely) and open it as a gallery, listed by its file name;
        on a public page into the session's own temporary folder, under the public limits. An
        uploaded features file (.npy, .npz, .safetensors) opens as a features gallery instead
        (not on a public page)."""
        if not archive:
            raise gr.Error("Choose a .zip of images or a features file first.",
                           print_exception=False)
        name = Path(archive).name
        visitor = owner(request)
        with engine_errors_as_gradio():
            if Path(name).suffix.lower() in FEATURE_FILE_FORMATS:
                if self.public is not None:
                    raise InvalidInputError("this public page opens zips of images only")
                kept = self.explorer.keep_features_upload(archive)
                session = yield from self._open_features(str(kept), check_allowed=False)
            elif self.public is not None:
                def work(progress: Callable[[float, str], None]) -> GallerySession:
                    return self.public.open_zip(archive, visitor, progress=progress)

                if self.explorer.requests is None:
                    session = work(lambda fraction, message: None)
                else:
                    plan = Plan.of(PlanStep(f"extracts and indexes {name}", None))
                    job = self.explorer.request(("public zip", visitor, archive),
                                                f"Opening {name}", plan, work)
                    session = yield from self._follow(job, f"Opening {name}", {})
            elif self.explorer.requests is None:
                session = self.explorer.open_zip(archive)
            else:
                root = self.explorer.extract_upload(archive)
                job = self.explorer.request_gallery(root, check_allowed=False)
                session = yield from self._follow(job, f"Opening {name}", {})
        if session is not None:
            yield {**self._opened(session, request), **self._job_hidden()}

    def attach_queries(self, key: str, queries: str | None, ground_truth: str | None
                       ) -> dict[Any, Any]:
        """The "Attach queries" button: give the features gallery shown query features (and,
        optionally, their revisited ground truth), both uploads kept by the engine; the
        examples list then offers the queries and the Compare table is theirs. Refused on a
        public page and for a gallery opened from images; a bad file leaves the gallery's
        queries as they were."""
        with engine_errors_as_gradio():
            if self.public is not None:
                raise InvalidInputError("this public page attaches no query features")
        if not queries:
            raise gr.Error("Choose a query features file (.npz, .npy, .safetensors) first.",
                           print_exception=False)
        ui = self.ui
        with engine_errors_as_gradio():
            kept, truth = self.explorer.keep_queries_upload(queries, ground_truth or None)
            session = self.explorer.attach_queries(key, kept, truth, check_allowed=False)
        return {ui.examples: examples_for(self.thumbnails, session),
                ui.compare_table: self.compare_rows(session),
                ui.gallery_status: attached_text(session),
                ui.queries_file: None, ui.truth_file: None}

    def _follow(self, job: Job, title: str, on_cancel: dict[Any, Any]
                ) -> Iterator[dict[Any, Any]]:
        """Follow a build the user asked for (a job of the explorer's request queue),
        yielding its one progress line with its plan; returns its result (a session), or None
        when it was cancelled (then `on_cancel` is shown with a message). A job with nothing
        long to do (an empty plan) is waited for without a line.

        Closing this generator (the page's Cancel cancels the event) cancels the job: the
        engine stops it at its next progress report and keeps nothing half-built.
        """
        ui = self.ui
        plan = job.plan or Plan()
        shown = None
        try:
            while job.state in (WAITING, RUNNING):
                if plan.steps:
                    line = f"**{title}**: {plan.text()}.  \nNow: {job.describe()}"
                    if line != shown:
                        yield {ui.job_row: gr.Row(visible=True), ui.job_status: line,
                               ui.job: list(job.key)}
                        shown = line
                time.sleep(JOB_POLL_SECONDS)
        finally:
            if job.state in (WAITING, RUNNING):
                self._cancel(job.key)
        hidden = {ui.job_row: gr.Row(visible=False), ui.job_status: "", ui.job: None}
        if job.state == FAILED:
            yield hidden
            raise gr.Error(job.error, print_exception=False)
        if job.state != DONE:
            yield {**hidden, **on_cancel,
                   ui.message: f"Cancelled: {title}. Nothing was changed; choose it again to "
                               "start over."}
            return None
        if shown is not None:  # the line stays until the caller's last update hides it
            yield {ui.job_status: f"**{title}**: done; opening it..."}
        return job.result

    def _job_hidden(self) -> dict[Any, Any]:
        """The updates that hide the job line (part of a build's last update)."""
        return {self.ui.job_row: gr.Row(visible=False), self.ui.job_status: "",
                self.ui.job: None}

    def _cancel(self, job_key: Any) -> None:
        requests = self.explorer.requests
        if job_key is not None and requests is not None:
            requests.cancel(tuple(job_key))

    def cancel_request(self, job_key: Any, key: str) -> dict[Any, Any]:
        """The job line's Cancel: stop the user's build. Its event is cancelled with it (so
        that event says nothing more): the line hides and the page says so here, with the
        query model back on the gallery's own."""
        self._cancel(job_key)
        updates: dict[Any, Any] = {self.ui.job_row: gr.Row(visible=False),
                                   self.ui.job_status: "", self.ui.job: None}
        if job_key is not None:
            updates[self.ui.message] = ("Cancelled. Nothing was changed; choose it again to "
                                        "start over.")
        with contextlib.suppress(EngineError):
            updates[self.ui.query_model] = gr.update(
                value=self.explorer.session(key).query_model)
        return updates

    def _switched(self, session: GallerySession, request: gr.Request | None
                  ) -> dict[Any, Any]:
        updates = self.switch_gallery(session.key)
        updates[self.ui.gallery] = gr.Dropdown(choices=self.gallery_choices(request),
                                               value=session.key)
        return updates

    def _rerun(self, session: GallerySession, uploaded: str | None, picked: str | None,
               query_class: str, leave_out: bool, top_n: float, plot_method: str, space: str
               ) -> dict[Any, Any]:
        """The current query (a pick or an upload) run again on `session` with its default
        settings (the controls show them after a switch); nothing when there is none."""
        controls = self.default_controls(session)
        if picked:
            return self.pick(session.key, picked, leave_out, top_n, plot_method, space,
                             *controls)
        if uploaded:
            return self.show_upload(session.key, uploaded, query_class, leave_out, top_n,
                                    plot_method, space, *controls)
        return {}

    def end_session(self, request: gr.Request) -> None:
        """A browser session ended (its tab closed): a public page deletes its uploads."""
        if self.public is not None:
            self.public.release(owner(request))

    def gallery_choices(self, request: gr.Request | None = None) -> list[tuple[str, str]]:
        """The galleries a session may choose (on a public page, not others' uploads)."""
        if self.public is None:
            return self.explorer.choices()
        return self.public.choices(owner(request))

    def _opened(self, session: GallerySession, request: gr.Request | None) -> dict[Any, Any]:
        with engine_errors_as_gradio():
            session.prepare_views()
        updates = self._switched(session, request)
        updates[self.ui.gallery_status] = opened_text(session, show_root=self.public is None)
        updates[self.ui.open_panel] = gr.Accordion(open=False)
        return updates

    # -- background work -------------------------------------------------------------------------
    def train_button(self, session: GallerySession, method: str) -> Any:
        """The tab's "Train now (about 40 s)": shown while a learned method waits in the
        background queue for its training here."""
        hidden = gr.Button(visible=False)
        if (session.jobs is None or not get_reranker_class(method).learns
                or method in session.unavailable or session.fitted(method) is not None):
            return hidden
        job = session.fit_job(method)
        if job is not None and job.state != WAITING:
            return hidden
        with engine_errors_as_gradio():  # measured once, then remembered by the session
            seconds = session.fit_estimate(method)
        return gr.Button(value=train_label(seconds), visible=True)

    def train_now(self, method: str, key: str) -> dict[Any, Any]:
        """Train a learned method next (ahead of the other background work)."""
        session = self.session(key)
        with engine_errors_as_gradio():
            session.train_now(method)
        tab = self.ui.tabs[method]
        return {tab.state: session.state_text(method), tab.train: gr.Button(visible=False)}

    def refresh_states(self, key: str, seen: tuple | None, view: QueryView | None,
                       plot_method: str, space: str) -> dict[Any, Any]:
        """The timer's tick: while background jobs change, redraw each tab's state and train
        button, the background line and the Compare table; when a map becomes ready, the map
        and its choices. Nothing is sent when nothing changed."""
        ui = self.ui
        jobs = self.explorer.jobs
        unchanged = {ui.jobs_seen: seen}  # Gradio takes an empty dict for one missing value
        try:
            session = self.explorer.session(key)
        except EngineError:
            return unchanged
        if jobs is None:
            return unchanged
        spaces = tuple(name for name, _ in session.map_spaces()
                       if session.embedding_map(name, fit=False) is not None)
        now = (session.key, jobs.version, spaces)
        if seen == now:
            return unchanged
        updates: dict[Any, Any] = {ui.jobs_seen: now, ui.background: background_text(session)}
        for method in self.method_names:
            updates[ui.tabs[method].state] = session.state_text(method)
            updates[ui.tabs[method].train] = self.train_button(session, method)
        updates[ui.compare_table] = self.compare_rows(session)
        if seen is None or seen[0] != session.key or seen[2] != spaces:
            choices = [(title, name) for name, title in session.map_spaces()]
            shown = space if space in dict(choices) else "backbone"
            updates[ui.space] = gr.Radio(choices=choices, value=shown)
            if view is None or view.result.gallery_key != session.key:
                updates[ui.map_plot] = map_figure(session, None, BASELINE, shown,
                                                  self.thumbnails)
            else:
                updates[ui.map_plot] = map_figure(session, view, plot_method, shown,
                                                  self.thumbnails)
        return updates
