"""Which event runs which handler, with which inputs and outputs, in which concurrency group.

Every event is private except the `query` API. A user's event shows a refusal in the page's one
message area and nowhere else (`app.feedback.shown_in`), and its progress on one component, not
over every output. Events that embed a query or re-rank share the group "query"; Compare and
Tune share "index" with limit 1 (see `app.page.DEFAULT_CONCURRENCY`); following a build the
user asked for (another query model or gallery: the work runs in the engine's request queue,
the event only polls it) is in "requests".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from app.feedback import shown_in
from app.handlers import PageHandlers
from app.layout import PageComponents
from engine import BASELINE

SHARE_SCRIPT = """(query) => {
    const url = new URL(window.location.href);
    url.search = query ? "?" + query : "";
    window.history.replaceState(null, "", url.toString());
}"""
"""Puts the view's query string (the hidden share textbox) in the address bar."""
REQUESTS_CONCURRENCY = 8
"""Users following their builds at once (each event mostly sleeps: the engine's request queue
runs the builds one at a time)."""


def wire(handlers: PageHandlers, demo: gr.Blocks) -> None:
    """Connect the events of the page built for `handlers` (inside `demo`'s context)."""
    ui = handlers.ui
    api = ui.api
    api.button.click(handlers.api_query, [api.image, api.gallery_file, api.leave_out,
                                          api.gallery, api.top_n, api.query_class], ui.json,
                     api_name="query", concurrency_id="query")
    _wire_query(handlers, ui)
    _wire_galleries(handlers, ui)
    for name in handlers.method_names:
        _wire_method(handlers, ui, name)
        _wire_evidence(handlers, ui, name)
    _wire_share(handlers, ui, demo)
    _wire_exports(handlers, ui, demo)
    _wire_failures(handlers, ui)
    if handlers.public is not None:
        demo.unload(handlers.end_session)


_PRIVATE_QUERY = {"api_visibility": "private", "concurrency_id": "query"}
_PRIVATE_INDEX = {"api_visibility": "private", "concurrency_id": "index",
                  "concurrency_limit": 1}
_PRIVATE_REQUESTS = {"api_visibility": "private", "concurrency_id": "requests",
                     "concurrency_limit": REQUESTS_CONCURRENCY, "show_progress": "hidden"}


def on(ui: PageComponents, triggers: Any, function: Callable[..., Any], inputs: Any,
       outputs: Sequence[Any], **options: Any) -> Any:
    """`gr.on` for a user's event: refusals go to the message area (added to the outputs);
    its progress shows on `show_progress_on` (default: the message area)."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    options.setdefault("show_progress_on", ui.message)
    return gr.on(triggers, shown_in(ui.message, function, outputs), inputs,
                 [*outputs, ui.message], **options)


def _result_outputs(ui: PageComponents) -> list[Any]:
    """Every component a query's result updates."""
    outputs = [ui.state, ui.query_note, ui.timings, ui.json, ui.knn_plot, ui.map_plot,
               *ui.compare_rows.values()]
    for tab in ui.tabs.values():
        outputs += [tab.baseline, tab.reranked, tab.metrics, tab.source]
    return outputs + _evidence_hidden(ui)


def _evidence_hidden(ui: PageComponents) -> list[Any]:
    """What closing every tab's evidence panel updates (a new query or gallery does)."""
    return [component for tab in ui.tabs.values() if tab.evidence is not None
            for component in (tab.evidence.panel, tab.evidence.item)]


def _pick_outputs(ui: PageComponents) -> list[Any]:
    """A query's outputs, and the query panel's state (a pick or an upload)."""
    return [*_result_outputs(ui), ui.picked, ui.uploaded, ui.query_image, ui.query_class]


def _gallery_outputs(ui: PageComponents) -> list[Any]:
    """Every component switching the gallery updates."""
    outputs = [ui.header, ui.state, ui.picked, ui.uploaded, ui.query_image, ui.upload,
               ui.query_class,
               ui.class_filter, ui.examples, ui.compare_table, ui.knn_plot, ui.json,
               ui.timings, ui.query_note, ui.map_plot, ui.space, ui.browser, ui.page,
               ui.query_model, ui.selection, ui.selection_file, *ui.compare_rows.values(),
               ui.background, ui.gallery]
    for tab in ui.tabs.values():
        outputs += [tab.source, tab.state, tab.train, *tab.controls, tab.baseline,
                    tab.reranked, tab.metrics]
    return outputs + _evidence_hidden(ui) + _failures_reset(ui)


def _failures_reset(ui: PageComponents) -> list[Any]:
    """What switching the gallery resets in the failure browser."""
    if ui.failures is None:
        return []
    return [*ui.failures.outputs(), ui.failures.class_filter]


def _unique(components: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(components))


def _query_inputs(ui: PageComponents) -> list[Any]:
    """What running the current query again needs (`PageHandlers.search`'s arguments)."""
    return [ui.uploaded, ui.picked, ui.query_class, ui.leave_out, ui.top_n, ui.plot_method,
            ui.space, *ui.all_controls()]


def _wire_query(handlers: PageHandlers, ui: PageComponents) -> None:
    """The query: upload, search again, picks (browser, examples, random, results, plot
    points), browsing, the plots and the map's selection."""
    controls = ui.all_controls()
    plot_inputs = [ui.plot_method, ui.space]
    after_pick = [ui.leave_out, ui.top_n, *plot_inputs, *controls]
    pick_outputs = _pick_outputs(ui)
    query = {**_PRIVATE_QUERY, "show_progress_on": ui.query_image}
    # The upload box is emptied after every upload, taken or refused, ready for the next one.
    on(ui, ui.upload.upload, handlers.upload,
       [ui.gallery, ui.upload, ui.query_class, ui.leave_out, ui.top_n, *plot_inputs,
        *controls], [*pick_outputs, ui.upload], **query).then(
        lambda: None, None, ui.upload, api_visibility="private", show_progress="hidden")
    on(ui, [ui.search.click, ui.leave_out.input, ui.top_n.release, ui.query_class.input],
       handlers.search, [ui.gallery, *_query_inputs(ui)], _result_outputs(ui), **query)
    on(ui, ui.browser.select, handlers.pick_browsed,
       [ui.gallery, ui.class_filter, ui.page, *after_pick], pick_outputs, **query)
    on(ui, ui.examples.select, handlers.pick_example, [ui.gallery, *after_pick],
       pick_outputs, **query)
    on(ui, ui.random.click, handlers.pick_random, [ui.gallery, ui.class_filter, *after_pick],
       pick_outputs, **query)
    on(ui, ui.plot_click.input, handlers.pick_plotted, [ui.plot_click, ui.gallery,
                                                        *after_pick], pick_outputs, **query)
    result_galleries = [(BASELINE, tab.baseline) for tab in ui.tabs.values()]
    # a method's own strip opens the result's evidence instead (`_wire_evidence`)
    result_galleries += [(tab.name, tab.reranked) for tab in ui.tabs.values()
                         if tab.evidence is None]
    result_galleries += list(ui.compare_rows.items())
    for method, gallery in result_galleries:
        on(ui, gallery.select, _picker(handlers, method), [ui.state, *after_pick],
           pick_outputs, **query)
    on(ui, [ui.class_filter.input, ui.page.submit], handlers.browse,
       [ui.gallery, ui.class_filter, ui.page], [ui.browser, ui.page],
       api_visibility="private")
    on(ui, [ui.plot_method.input, ui.space.input], handlers.replot,
       [ui.state, ui.gallery, *plot_inputs], [ui.knn_plot, ui.map_plot],
       api_visibility="private", show_progress_on=[ui.knn_plot, ui.map_plot])
    on(ui, ui.plot_selection.input, handlers.select_on_map, [ui.plot_selection, ui.gallery],
       [ui.selection, ui.selection_file], api_visibility="private",
       show_progress_on=ui.selection)


def _wire_galleries(handlers: PageHandlers, ui: PageComponents) -> None:
    """Switching and opening galleries, the query model, the job line, the timer, Compare."""
    plot_inputs = [ui.plot_method, ui.space]
    gallery_outputs = _gallery_outputs(ui)
    job_outputs = [ui.job_row, ui.job_status, ui.job]
    on(ui, ui.gallery.input, handlers.switch_gallery, ui.gallery, gallery_outputs,
       api_visibility="private", show_progress="hidden")
    ui.timer.tick(handlers.refresh_states,
                  [ui.gallery, ui.jobs_seen, ui.state, *plot_inputs],
                  [ui.jobs_seen, ui.background, ui.compare_table, ui.space, ui.map_plot,
                   *[tab.state for tab in ui.tabs.values()],
                   *[tab.train for tab in ui.tabs.values()]],
                  api_visibility="private", concurrency_id="refresh", concurrency_limit=4,
                  show_progress="hidden")
    switch_outputs = _unique([*gallery_outputs, *_pick_outputs(ui), *job_outputs])
    builds = [on(ui, ui.query_model.input, handlers.switch_query_model,
                 [ui.gallery, ui.query_model, *_query_inputs(ui)], switch_outputs,
                 **_PRIVATE_REQUESTS)]
    opened_outputs = _unique([*gallery_outputs, ui.gallery_status, ui.open_panel,
                              *job_outputs])
    if handlers.public is None:  # a public page has no event that takes a server path
        builds.append(on(ui, ui.open_folder.click, handlers.open_folder, ui.folder,
                         opened_outputs, **_PRIVATE_REQUESTS))
    builds.append(on(ui, ui.open_zip.click, handlers.open_zip, ui.zip, opened_outputs,
                     **_PRIVATE_REQUESTS))
    if handlers.public is None:  # query features go with features files, never public
        on(ui, ui.attach_queries.click, handlers.attach_queries,
           [ui.gallery, ui.queries_file, ui.truth_file],
           [ui.examples, ui.compare_table, ui.gallery_status, ui.queries_file, ui.truth_file],
           api_visibility="private", concurrency_id="requests",
           concurrency_limit=REQUESTS_CONCURRENCY)
    ui.job_cancel.click(handlers.cancel_request, [ui.job, ui.gallery],
                        [*job_outputs, ui.message, ui.query_model], cancels=builds,
                        api_visibility="private", show_progress="hidden")
    on(ui, ui.compare_button.click, handlers.compute_compare,
       [ui.gallery, *ui.all_controls()], ui.compare_table, **_PRIVATE_INDEX,
       show_progress_on=ui.compare_table)


def _wire_method(handlers: PageHandlers, ui: PageComponents, name: str) -> None:
    """One method's tab: its parameters re-rank, reset, train now, and the sweep with its
    cancel."""
    tab = ui.tabs[name]
    method_outputs = [ui.state, ui.timings, ui.json, ui.knn_plot, ui.map_plot,
                      *ui.compare_rows.values(), tab.baseline, tab.reranked, tab.metrics,
                      tab.source, *tab.controls]
    if tab.evidence is not None:  # its evidence is stale once the method re-ranks
        method_outputs += [tab.evidence.panel, tab.evidence.item]
    triggers = [control.release if isinstance(control, gr.Slider)
                else control.input if isinstance(control, gr.Checkbox) else control.submit
                for control in tab.controls]
    rerank_inputs = [ui.gallery, ui.state, ui.plot_method, ui.space, *tab.controls]
    rerank = _bind(handlers.rerank_method, name)
    progress = {**_PRIVATE_QUERY, "show_progress_on": tab.reranked}
    on(ui, triggers, rerank, rerank_inputs, method_outputs, trigger_mode="always_last",
       **progress)
    on(ui, tab.reset.click, _bind(handlers.reset_params, name), ui.gallery, tab.controls,
       api_visibility="private").then(
        shown_in(ui.message, rerank, method_outputs), rerank_inputs,
        [*method_outputs, ui.message], **progress)
    on(ui, tab.train.click, _bind(handlers.train_now, name), ui.gallery,
       [tab.state, tab.train], api_visibility="private")
    sweep_event = on(
        ui, tab.tune_run.click, _bind(handlers.tune, name),
        [ui.gallery, tab.tune_first, tab.tune_first_values, tab.tune_second,
         tab.tune_second_values, *tab.controls],
        [tab.tune_plot, tab.tune_summary, tab.tune_best], **_PRIVATE_INDEX,
        show_progress_on=tab.tune_plot)
    on(ui, tab.tune_first.input, _bind(handlers.grid_for, name), tab.tune_first,
       tab.tune_first_values, api_visibility="private")
    on(ui, tab.tune_second.input, _bind(handlers.grid_for, name), tab.tune_second,
       tab.tune_second_values, api_visibility="private")
    tab.tune_cancel.click(None, None, None, cancels=[sweep_event], api_visibility="private")
    on(ui, tab.use_best.click, _bind(handlers.use_best, name), tab.tune_best, tab.controls,
       api_visibility="private").then(
        shown_in(ui.message, rerank, method_outputs), rerank_inputs,
        [*method_outputs, ui.message], **progress)
    on(ui, tab.save_best.click, _bind(handlers.save_best, name), [ui.gallery, tab.tune_best],
       [tab.source, *tab.controls], api_visibility="private").then(
        shown_in(ui.message, rerank, method_outputs), rerank_inputs,
        [*method_outputs, ui.message], **progress)


def _wire_evidence(handlers: PageHandlers, ui: PageComponents, name: str) -> None:
    """One method's tab: clicking a result of its ranking opens the result's evidence (and
    rings it on the kNN graph); "Query with this image" then queries with it."""
    panel = ui.tabs[name].evidence
    if panel is None:
        return
    on(ui, ui.tabs[name].reranked.select, _evidence_opener(handlers, name), ui.state,
       [*panel.outputs(), ui.knn_plot],
       **{**_PRIVATE_QUERY, "show_progress_on": ui.tabs[name].reranked})
    on(ui, panel.requery.click, handlers.query_evidence_item,
       [ui.gallery, panel.item, ui.leave_out, ui.top_n, ui.plot_method, ui.space,
        *ui.all_controls()], _pick_outputs(ui),
       **{**_PRIVATE_QUERY, "show_progress_on": ui.query_image})


def _evidence_opener(handlers: PageHandlers, method: str) -> Callable[..., Any]:
    """`PageHandlers.show_evidence` for one method's results (a closure, as `_picker`)."""
    def show_evidence(event: gr.SelectData, view: Any) -> dict[Any, Any]:
        return handlers.show_evidence(method, event, view)
    show_evidence.__name__ = f"show_evidence_{method}"
    return show_evidence


def _wire_exports(handlers: PageHandlers, ui: PageComponents, demo: gr.Blocks) -> None:
    """The download buttons: their files follow the query and the Compare table (written
    when those change, and the table's when the page loads); a click with nothing to download
    says why."""
    exports = ui.exports
    if exports is None:
        return
    quiet = {"api_visibility": "private", "show_progress": "hidden",
             "trigger_mode": "always_last", "concurrency_id": "exports"}
    gr.on([ui.state.change], handlers.rankings_files, ui.state, exports.rankings, **quiet)
    gr.on([demo.load, ui.compare_table.change], handlers.table_files,
          [ui.gallery, ui.compare_table, *ui.all_controls()], exports.table, **quiet)
    for button in exports.rankings:
        on(ui, button.click, handlers.check_rankings_download, ui.state, [],
           api_visibility="private", show_progress="hidden")
    for button in exports.table:
        on(ui, button.click, handlers.check_table_download, ui.compare_table, [],
           api_visibility="private", show_progress="hidden")


def _wire_failures(handlers: PageHandlers, ui: PageComponents) -> None:
    """The failure browser (its choices list the queries; a slot's button queries with one;
    its plot's points query through the plots' click box) and the Compare tab's pair."""
    failures, pair = ui.failures, ui.pair
    if failures is None or pair is None:
        return
    controls = ui.all_controls()
    on(ui, [failures.show.click, failures.method.input, failures.class_filter.input,
            failures.order.input], handlers.show_failures,
       [ui.gallery, failures.method, failures.class_filter, failures.order, *controls],
       failures.outputs(), **{**_PRIVATE_QUERY, "show_progress_on": failures.summary})
    after_pick = [ui.leave_out, ui.top_n, ui.plot_method, ui.space, *controls]
    for index, slot in enumerate(failures.slots):
        on(ui, slot.query.click, _bind(handlers.query_failure, index),
           [ui.gallery, failures.listed, *after_pick], _pick_outputs(ui),
           **{**_PRIVATE_QUERY, "show_progress_on": ui.query_image})
    on(ui, pair.run.click, handlers.compare_pair,
       [ui.gallery, pair.first, pair.second, *controls], pair.result,
       **{**_PRIVATE_INDEX, "show_progress_on": pair.result})


def _wire_share(handlers: PageHandlers, ui: PageComponents, demo: gr.Blocks) -> None:
    """The view in the address bar, and a link's view reopened on load."""
    ui.method_tabs.select(handlers.select_tab, None, ui.current_tab, api_visibility="private",
                          show_progress="hidden")
    gr.on([ui.state.change, ui.current_tab.change, ui.gallery.change], handlers.share_link,
          [ui.gallery, ui.state, ui.uploaded, ui.current_tab, *ui.all_controls()], ui.share,
          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    ui.share.change(None, ui.share, None, js=SHARE_SCRIPT, api_visibility="private")
    restored = _unique([*_gallery_outputs(ui), *_pick_outputs(ui), ui.method_tabs,
                        ui.current_tab])
    on(ui, demo.load, handlers.restore,
       [ui.plot_method, ui.space, ui.leave_out, ui.top_n], restored,
       api_visibility="private", concurrency_id="query")


def _picker(handlers: PageHandlers, method: str) -> Callable[..., Any]:
    """`PageHandlers.pick_result` for one method's results. A closure, not a partial: Gradio
    finds the gr.SelectData parameter by its annotation, which it cannot read on a partial."""
    def pick_result(event: gr.SelectData, *inputs: Any) -> dict[Any, Any]:
        return handlers.pick_result(method, event, *inputs)
    pick_result.__name__ = f"pick_result_{method}"
    return pick_result


def _bind(function: Any, method: str) -> Any:
    """`function` with its first argument (the method name) fixed; a partial keeps the rest of
    the signature, which Gradio inspects for gr.Progress and gr.SelectData parameters."""
    bound = functools.partial(function, method)
    bound.__name__ = f"{function.__name__}_{method}"  # type: ignore[attr-defined]
    return bound
