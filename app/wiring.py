"""Which event runs which handler, with which inputs and outputs, in which concurrency group.

Every event is private except the `query` API. Events that embed a query or re-rank share the
group "query"; those that build or train (open a gallery, switch the query model, Compare,
Tune) share "index" with limit 1 (see `app.page.DEFAULT_CONCURRENCY`).
"""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from app.handlers import PageHandlers
from app.layout import PageComponents


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
    demo.load(handlers.browse, [ui.gallery, ui.class_filter, ui.page], [ui.browser, ui.page],
              api_visibility="private")
    if handlers.public is not None:
        demo.unload(handlers.end_session)


_PRIVATE_QUERY = {"api_visibility": "private", "concurrency_id": "query"}
_PRIVATE_INDEX = {"api_visibility": "private", "concurrency_id": "index",
                  "concurrency_limit": 1}


def _result_outputs(ui: PageComponents) -> list[Any]:
    """Every component a query's result updates."""
    outputs = [ui.state, ui.imagenet, ui.timings, ui.json, ui.knn_plot, ui.map_plot,
               *ui.compare_rows.values()]
    for tab in ui.tabs.values():
        outputs += [tab.baseline, tab.reranked, tab.metrics, tab.source]
    return outputs


def _gallery_outputs(ui: PageComponents) -> list[Any]:
    """Every component switching the gallery updates."""
    outputs = [ui.header, ui.state, ui.picked, ui.query_image, ui.query_class,
               ui.class_filter, ui.examples, ui.compare_table, ui.knn_plot, ui.json,
               ui.timings, ui.imagenet, ui.map_plot, ui.space, ui.browser, ui.page,
               ui.query_model, *ui.compare_rows.values(), ui.background]
    for tab in ui.tabs.values():
        outputs += [tab.source, tab.state, *tab.controls, tab.baseline, tab.reranked,
                    tab.metrics]
    return outputs


def _wire_query(handlers: PageHandlers, ui: PageComponents) -> None:
    """The query: upload, search again, picks (browser, examples, random), browsing, plots."""
    controls = ui.all_controls()
    plot_inputs = [ui.plot_method, ui.space]
    result_outputs = _result_outputs(ui)
    pick_outputs = [*result_outputs, ui.picked, ui.query_image, ui.query_class]
    ui.query_image.upload(
        handlers.upload, [ui.gallery, ui.query_image, ui.query_class, ui.leave_out, ui.top_n,
                          *plot_inputs, *controls], [*result_outputs, ui.picked],
        **_PRIVATE_QUERY)
    gr.on([ui.search.click, ui.leave_out.input, ui.top_n.release, ui.query_class.input],
          handlers.search,
          [ui.gallery, ui.query_image, ui.picked, ui.query_class, ui.leave_out, ui.top_n,
           *plot_inputs, *controls], result_outputs, **_PRIVATE_QUERY)
    ui.browser.select(handlers.pick_browsed,
                      [ui.gallery, ui.class_filter, ui.page, ui.leave_out, ui.top_n,
                       *plot_inputs, *controls], pick_outputs, **_PRIVATE_QUERY)
    ui.examples.select(handlers.pick_example,
                       [ui.gallery, ui.leave_out, ui.top_n, *plot_inputs, *controls],
                       pick_outputs, **_PRIVATE_QUERY)
    ui.random.click(handlers.pick_random,
                    [ui.gallery, ui.class_filter, ui.leave_out, ui.top_n, *plot_inputs,
                     *controls], pick_outputs, **_PRIVATE_QUERY)
    gr.on([ui.class_filter.input, ui.page.submit, ui.page.input], handlers.browse,
          [ui.gallery, ui.class_filter, ui.page], [ui.browser, ui.page],
          api_visibility="private")
    gr.on([ui.plot_method.input, ui.space.input], handlers.replot,
          [ui.state, ui.gallery, *plot_inputs], [ui.knn_plot, ui.map_plot],
          api_visibility="private")


def _wire_galleries(handlers: PageHandlers, ui: PageComponents) -> None:
    """Switching and opening galleries, the query model, the job timer and Compare."""
    plot_inputs = [ui.plot_method, ui.space]
    gallery_outputs = _gallery_outputs(ui)
    ui.gallery.input(handlers.switch_gallery, ui.gallery, gallery_outputs,
                     api_visibility="private")
    ui.timer.tick(handlers.refresh_states,
                  [ui.gallery, ui.jobs_seen, ui.state, *plot_inputs],
                  [ui.jobs_seen, ui.background, ui.compare_table, ui.space, ui.map_plot,
                   *[tab.state for tab in ui.tabs.values()]],
                  api_visibility="private", concurrency_id="refresh", concurrency_limit=4,
                  show_progress="hidden")
    ui.query_model.input(handlers.switch_query_model, [ui.gallery, ui.query_model],
                         [*gallery_outputs, ui.gallery], **_PRIVATE_INDEX)
    opened_outputs = [*gallery_outputs, ui.gallery, ui.gallery_status]
    if handlers.public is None:  # a public page has no event that takes a server path
        ui.open_folder.click(handlers.open_folder, ui.folder, opened_outputs, **_PRIVATE_INDEX)
    ui.open_zip.click(handlers.open_zip, ui.zip, opened_outputs, **_PRIVATE_INDEX)
    ui.compare_button.click(handlers.compute_compare, [ui.gallery, *ui.all_controls()],
                            ui.compare_table, **_PRIVATE_INDEX)


def _wire_method(handlers: PageHandlers, ui: PageComponents, name: str) -> None:
    """One method's tab: its parameters re-rank, reset, and the sweep with its cancel."""
    tab = ui.tabs[name]
    method_outputs = [ui.state, ui.timings, ui.json, ui.knn_plot, ui.map_plot,
                      *ui.compare_rows.values(), tab.baseline, tab.reranked, tab.metrics,
                      tab.source]
    triggers = [control.release if isinstance(control, gr.Slider)
                else control.input if isinstance(control, gr.Checkbox) else control.submit
                for control in tab.controls]
    rerank_inputs = [ui.gallery, ui.state, ui.plot_method, ui.space, *tab.controls]
    rerank = _bind(handlers.rerank_method, name)
    gr.on(triggers, rerank, rerank_inputs, method_outputs, trigger_mode="always_last",
          **_PRIVATE_QUERY)
    tab.reset.click(_bind(handlers.reset_params, name), ui.gallery, tab.controls,
                    api_visibility="private").then(
        rerank, rerank_inputs, method_outputs, **_PRIVATE_QUERY)
    sweep_event = tab.tune_run.click(
        _bind(handlers.tune, name),
        [ui.gallery, tab.tune_first, tab.tune_first_values, tab.tune_second,
         tab.tune_second_values, *tab.controls],
        [tab.tune_plot, tab.tune_summary, tab.tune_best], **_PRIVATE_INDEX)
    tab.tune_first.input(_bind(handlers.grid_for, name), tab.tune_first,
                         tab.tune_first_values, api_visibility="private")
    tab.tune_second.input(_bind(handlers.grid_for, name), tab.tune_second,
                          tab.tune_second_values, api_visibility="private")
    tab.tune_cancel.click(None, None, None, cancels=[sweep_event], api_visibility="private")
    tab.use_best.click(_bind(handlers.use_best, name), tab.tune_best, tab.controls,
                       api_visibility="private").then(
        rerank, rerank_inputs, method_outputs, **_PRIVATE_QUERY)
    tab.save_best.click(_bind(handlers.save_best, name), [ui.gallery, tab.tune_best],
                        tab.source, api_visibility="private")


def _bind(function: Any, method: str) -> Any:
    """`function` with its first argument (the method name) fixed; a partial keeps the rest of
    the signature, which Gradio inspects for a gr.Progress parameter."""
    bound = functools.partial(function, method)
    bound.__name__ = f"{function.__name__}_{method}"  # type: ignore[attr-defined]
    return bound
