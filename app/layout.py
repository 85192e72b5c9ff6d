"""The page's components: built once per page inside its `gr.Blocks`, returned as typed
dataclasses (`PageComponents`, a `MethodWidgets` per re-ranker tab) that the handlers key their
updates by and the wiring connects.

Layout: a top bar (gallery, query model), a collapsed panel to open another gallery, the
message area and the progress line of a job the user started; then, in the first screen, the
query panel (preview, upload, examples, the backbone's guess) beside one tab per registered
re-ranker (built from the registry and each method's parameter metadata, so a new method file
adds a tab) and a Compare tab; below, the collapsible gallery browser, the kNN-graph and
embedding-map plots with the map's selection, the hidden inputs the page's script writes to,
and the `query` API's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.controls import clamped
from app.evidence import EvidencePanel, evidence_panel
from app.exports import ExportButtons, rankings_buttons, table_buttons
from app.failures import FailureWidgets, PairWidgets, build_failures_tab, build_pair
from app.plot_events import CLICK_ELEM_ID, SELECTION_ELEM_ID, event_box
from app.render import examples_shown, map_figure
from app.text import (
    ALL_CLASSES,
    BASELINE_LABEL,
    NO_CLASS,
    NO_PARAMETER,
    TUNE_PROTOCOL_TEXT,
    background_text,
    default_grid,
    galleries_text,
    header_text,
    source_text,
)
from engine import (
    BASELINE,
    DEFAULT_TOP_N,
    FEATURE_FILE_FORMATS,
    FULL_RANKING_LIMIT,
    GROUND_TRUTH_FORMATS,
    QUERY_MODELS,
    SCORES_TABLE_COLUMNS,
    Explorer,
    GallerySession,
    get_reranker_class,
    method_title,
)

if TYPE_CHECKING:
    from app.handlers import PageHandlers

JOB_REFRESH_SECONDS = 2.0
"""How often the page redraws the background jobs' states (only what changed is sent)."""
MAX_SLIDER_STEPS = 5000


@dataclass
class MethodWidgets:
    """The components of one method's tab."""

    name: str
    controls: list[gr.components.Component]
    param_names: list[str]
    source: gr.Markdown
    state: gr.Markdown
    train: gr.Button
    """Offered while the method learns and is not trained here yet: trains it next."""
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
    evidence: EvidencePanel | None = None
    """Opened by clicking a result of the method's ranking (`app.evidence`)."""


@dataclass
class QueryApi:
    """The hidden inputs of the `query` endpoint (plain values, not the page's own inputs)."""

    image: gr.Image
    gallery_file: gr.Textbox
    leave_out: gr.Checkbox
    gallery: gr.Textbox
    top_n: gr.Number
    query_class: gr.Textbox
    button: gr.Button


@dataclass
class PageComponents:
    """Every component the handlers update or the wiring connects, by role."""

    # gallery, messages and work
    gallery: gr.Dropdown
    header: gr.Markdown
    query_model: gr.Radio
    message: gr.Markdown
    """The page's one place for refusals and errors (see `app.feedback.shown_in`)."""
    job_row: gr.Row
    job_status: gr.Markdown
    """The one progress display of a long job the user started (a build), with its plan."""
    job_cancel: gr.Button
    job: gr.State
    """The key of the user's running request (`Explorer.requests`), or None."""
    background: gr.Markdown
    timer: gr.Timer
    jobs_seen: gr.State
    """(gallery key, job queue version, ready map spaces) the page last drew."""
    # the query
    state: gr.State
    """The user's last query (`app.render.QueryView`) or None."""
    picked: gr.State
    """The gallery file picked as the query, or None (an upload)."""
    uploaded: gr.State
    """The file of the last uploaded query (kept while a pick is shown, for the share link and
    for re-running it under another query model), or None."""
    query_image: gr.Image
    """Shows the query (a thumbnail of the pick or the uploaded file); not an input."""
    upload: gr.File
    """Takes the uploaded query file as it is: the engine decodes it (and refuses it by name)."""
    query_class: gr.Dropdown
    leave_out: gr.Checkbox
    top_n: gr.Slider
    search: gr.Button
    query_note: gr.Markdown
    """The backbone's ImageNet guess (small) and how far the query is from the gallery."""
    timings: gr.Markdown
    examples: gr.Gallery
    class_filter: gr.Dropdown
    random: gr.Button
    browser: gr.Gallery
    page: gr.Number
    # the tabs
    method_tabs: gr.Tabs
    current_tab: gr.State
    """The id of the tab the user last selected (a method name or "compare")."""
    tabs: dict[str, MethodWidgets]
    """Each re-ranker's tab, in registry order."""
    compare_rows: dict[str, gr.Gallery]
    """The Compare tab's row per method (the baseline first)."""
    compare_table: gr.Dataframe
    compare_button: gr.Button
    folder: gr.Textbox
    open_folder: gr.Button
    zip: gr.File
    open_zip: gr.Button
    queries_file: gr.File
    """Query features to attach to the features gallery shown (not on a public page)."""
    truth_file: gr.File
    """Their revisited ground truth (optional)."""
    attach_queries: gr.Button
    gallery_status: gr.Markdown
    open_panel: gr.Accordion
    """The collapsed panel that opens another gallery (closed again once one opened)."""
    # the plots, their selections and the API
    plot_method: gr.Radio
    space: gr.Radio
    knn_plot: gr.Plot
    map_plot: gr.Plot
    plot_click: gr.Textbox
    """Written by the plots' script: "file|nonce" of a clicked point (hidden)."""
    plot_selection: gr.Textbox
    """Written by the plots' script: a JSON list of the files selected on the map (hidden)."""
    selection: gr.Gallery
    selection_file: gr.File
    share: gr.Textbox
    """The view as a URL query string (hidden); the page's script puts it in the address bar."""
    json: gr.JSON
    api: QueryApi
    exports: ExportButtons | None = None
    """The download buttons of the query's rankings and of the Compare table (`app.exports`)."""
    pair: PairWidgets | None = None
    """The Compare tab's chosen pair of methods (`app.failures`)."""
    failures: FailureWidgets | None = None
    """The "Where it hurts" tab: the failure browser (`app.failures`)."""

    def all_controls(self) -> list[gr.components.Component]:
        """Every tab's parameter controls, in tab order (how handlers receive their values)."""
        return [control for tab in self.tabs.values() for control in tab.controls]


def build_layout(explorer: Explorer, handlers: PageHandlers) -> PageComponents:
    """Create the page's components (inside the caller's `gr.Blocks`), showing the first
    gallery. `handlers` give the method names, thumbnails, cached scores and whether the page
    is public.

    The first screen holds the query (compact, on the left) and the rankings (the method tabs,
    on the right); the gallery browser and the plots follow below.
    """
    public = handlers.public is not None
    session = explorer.session(None)
    gallery = session.gallery
    method_choices = [(BASELINE_LABEL, BASELINE)] + [
        (method_title(name), name) for name in handlers.method_names]

    with gr.Row(equal_height=True, elem_id="top-bar"):
        gr.Markdown("## Retrieval Explorer", elem_id="app-title")
        gallery_choice = gr.Dropdown(choices=explorer.choices(), value=session.key,
                                     label="Gallery", scale=2, elem_id="gallery-choice")
        query_model = gr.Radio(
            choices=[(spec.title, name) for name, spec in QUERY_MODELS.items()],
            value=session.query_model, label="Query model", scale=3,
            info="which network embeds the query and which the gallery",
            elem_id="query-model")
    header = gr.Markdown(header_text(session), elem_id="header")
    with gr.Accordion("Open another gallery (a zip of images, a features file, or a folder "
                      "on the server)",
                      open=False, elem_id="open-gallery") as open_panel:
        gr.Markdown(galleries_text(handlers.public))
        with gr.Row(visible=not public):
            folder = gr.Textbox(label="Folder on the server, or a features file (.npy, .npz, "
                                ".safetensors)", scale=3, visible=not public)
            open_folder = gr.Button("Open folder", scale=1, visible=not public)
        with gr.Row():
            zip_file = gr.File(
                label="Zip of images" if public else "Zip of images, or a features file "
                "(.npz, .npy, .safetensors)", type="filepath", height=100, scale=3,
                file_types=[".zip"] if public else [".zip", *sorted(FEATURE_FILE_FORMATS)],
                elem_id="zip-upload")
            open_zip = gr.Button("Open upload", scale=1, elem_id="open-zip")
        # query features go with a features gallery; a public page opens none of those
        with gr.Row(visible=not public):
            queries_file = gr.File(
                label="Query features for the features gallery shown (.npz, .npy, "
                ".safetensors)", type="filepath", height=100, scale=2,
                file_types=sorted(FEATURE_FILE_FORMATS), visible=not public,
                elem_id="queries-upload")
            truth_file = gr.File(
                label="Revisited ground truth for them (gnd_*.pkl, optional)",
                type="filepath", height=100, scale=2,
                file_types=sorted(GROUND_TRUTH_FORMATS), visible=not public,
                elem_id="truth-upload")
            attach_queries = gr.Button("Attach queries", scale=1, visible=not public,
                                       elem_id="attach-queries")
        gallery_status = gr.Markdown(elem_id="gallery-status")
    message = gr.Markdown("", elem_id="message")
    with gr.Row(visible=False, elem_id="job-row") as job_row:
        job_status = gr.Markdown("", elem_id="job-status")
        job_cancel = gr.Button("Cancel", variant="stop", scale=0, min_width=100,
                               elem_id="job-cancel")
    job = gr.State(None)
    background = gr.Markdown(background_text(session), elem_id="background")
    state = gr.State(None)
    jobs_seen = gr.State(None)
    timer = gr.Timer(JOB_REFRESH_SECONDS, active=explorer.jobs is not None)
    picked = gr.State(None)
    uploaded = gr.State(None)
    current_tab = gr.State(handlers.method_names[0] if handlers.method_names else "compare")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=280, elem_id="query-panel"):
            query_image = gr.Image(type="filepath", label="Query", interactive=False,
                                   height=190, show_label=True, elem_id="query-image")
            # gr.File, not gr.Image: gradio would decode an image upload itself and show its
            # own error for a file it cannot read; the engine's message names the file.
            upload = gr.File(label="Upload a query image", file_types=["image"],
                             type="filepath", height=100, elem_id="query-upload")
            query_class = gr.Dropdown(
                choices=[NO_CLASS, *gallery.class_names], value=NO_CLASS,
                label="Class of an uploaded query (to score it)",
                interactive=bool(gallery.class_names))
            leave_out = gr.Checkbox(value=True, label="Leave a gallery query out of its "
                                    "own results")
            top_n = clamped(gr.Slider(3, 30, value=DEFAULT_TOP_N, step=1,
                                      label="Results per method"))
            search = gr.Button("Search again", variant="primary", size="sm")
            query_note = gr.Markdown("", elem_id="query-note")
            example_values, example_label = examples_shown(handlers.thumbnails, session)
            examples = gr.Gallery(
                value=example_values,
                label=example_label, columns=4, height=130, allow_preview=False,
                object_fit="cover", interactive=False, elem_id="examples")
            with gr.Accordion("Timings", open=False):
                timings = gr.Markdown(elem_id="timings")
            downloads = rankings_buttons()
        with gr.Column(scale=4, min_width=480), gr.Tabs(
                selected=handlers.method_names[0] if handlers.method_names else "compare",
                elem_id="method-tabs") as method_tabs:
                tabs = {name: _method_tab(name, session) for name in handlers.method_names}
                with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                    compare_rows = {}
                    for title, method in method_choices:
                        compare_rows[method] = gr.Gallery(
                            label=title, columns=DEFAULT_TOP_N, rows=1, height=150,
                            object_fit="cover", interactive=False, allow_preview=False,
                            elem_classes=["ranking"], elem_id=f"compare-{method}")
                    gr.Markdown("Leave-one-out scores: labelled gallery images as queries "
                                "against the others; every image up to "
                                f"{FULL_RANKING_LIMIT:,} images (batch), above a fixed random "
                                "sample ranked online (the queries column says which). The "
                                "interval is a 95 % bootstrap over the queries. Online ms is "
                                "the median of single queries against the fitted gallery, "
                                "measured when the scores were computed (when, and the "
                                "machine's load then, in the measured column). A gallery "
                                "opened with query features and revisited Oxford/Paris "
                                "ground truth shows the revisited protocol instead: its "
                                "queries ranked against the whole gallery (batch), per "
                                "method mAP and mP@1/5/10 in percent in the Easy (E), "
                                "Medium (M) and Hard (H) settings, junk removed per setting. "
                                "**mAP - baseline** is each method's paired difference on the "
                                "same queries, with its 95 % paired bootstrap interval; **p "
                                "(Holm)** is a paired randomisation test (each query's two APs "
                                "swapped at random, seeded) adjusted by Holm's method over "
                                "every method in the table, so that the chance of any false "
                                "claim among them stays at most the level. Below the table: "
                                "any two methods compared the same way (unadjusted); the "
                                "*Where it hurts* tab lists the queries behind a difference.")
                    compare_table = gr.Dataframe(
                        value=handlers.compare_rows(session),
                        headers=list(SCORES_TABLE_COLUMNS), interactive=False, wrap=True,
                        elem_id="compare-table")
                    compare_button = gr.Button("Compute for the current parameters")
                    downloads += table_buttons()
                    pair = build_pair(handlers.method_names)
                with gr.Tab("Where it hurts", id="failures", elem_id="tab-failures"):
                    failures = build_failures_tab(handlers.method_names, session)
    with gr.Accordion("Browse the gallery", open=False, elem_id="browse"):
        with gr.Row():
            class_filter = gr.Dropdown(choices=[ALL_CLASSES, *gallery.class_names],
                                       value=ALL_CLASSES, label="Browse a class", scale=3)
            page = clamped(gr.Number(value=1, minimum=1, precision=0, label="Page",
                                     scale=1, elem_id="browse-page"))
            random = gr.Button("Random image", scale=1)
        browser = gr.Gallery(columns=8, height=300, allow_preview=False, object_fit="cover",
                             interactive=False, elem_id="browser")
    with gr.Row():
        plot_method = gr.Radio(choices=method_choices, value=handlers.method_names[0]
                               if handlers.method_names else BASELINE,
                               label="Plots show the top results of")
        space = gr.Radio(choices=[(t, n) for n, t in session.map_spaces()],
                         value="backbone", label="Embedding map of")
    with gr.Row(equal_height=False):
        knn_plot = gr.Plot(label="kNN graph (click a node to query with it)",
                           elem_id="knn-plot")
        map_plot = gr.Plot(value=map_figure(session, None, BASELINE, "backbone",
                                            handlers.thumbnails),
                           label="Embedding map (click a point to query with it; box or "
                           "lasso select to list images)", elem_id="embedding-map")
    with gr.Row(equal_height=False):
        selection = gr.Gallery(label="Selected on the map", columns=12, height=130,
                               allow_preview=False, object_fit="cover", interactive=False,
                               visible=False, elem_id="selection", scale=4)
        selection_file = gr.File(label="Selected files (list)", visible=False, scale=1,
                                 elem_id="selection-file")
    plot_click = event_box(CLICK_ELEM_ID)
    plot_selection = event_box(SELECTION_ELEM_ID)
    share = event_box("share-state")
    with gr.Accordion("Results as JSON (the `query` API)", open=False):
        result_json = gr.JSON(label="query result")
    # The API endpoint: its own hidden inputs, so that it takes plain values.
    with gr.Row(visible=False):
        api = QueryApi(
            image=gr.Image(type="filepath", image_mode=None, label="image"),
            gallery_file=gr.Textbox(label="gallery_file"),
            leave_out=gr.Checkbox(value=True, label="leave_out"),
            gallery=gr.Textbox(label="gallery"),
            top_n=gr.Number(value=DEFAULT_TOP_N, precision=0, label="top_n"),
            query_class=gr.Textbox(label="query_class"),
            button=gr.Button())
    return PageComponents(
        gallery=gallery_choice, header=header, query_model=query_model, message=message,
        job_row=job_row, job_status=job_status, job_cancel=job_cancel, job=job,
        background=background, timer=timer, jobs_seen=jobs_seen, state=state, picked=picked,
        uploaded=uploaded, query_image=query_image, upload=upload, query_class=query_class,
        leave_out=leave_out, top_n=top_n, search=search, query_note=query_note,
        timings=timings, examples=examples, class_filter=class_filter, random=random,
        browser=browser, page=page, method_tabs=method_tabs, current_tab=current_tab,
        tabs=tabs, compare_rows=compare_rows, compare_table=compare_table,
        compare_button=compare_button, folder=folder, open_folder=open_folder, zip=zip_file,
        open_zip=open_zip, queries_file=queries_file, truth_file=truth_file,
        attach_queries=attach_queries, gallery_status=gallery_status, open_panel=open_panel,
        plot_method=plot_method,
        space=space, knn_plot=knn_plot, map_plot=map_plot, plot_click=plot_click,
        plot_selection=plot_selection, selection=selection, selection_file=selection_file,
        share=share, json=result_json, api=api, exports=ExportButtons(*downloads), pair=pair,
        failures=failures)


def short_title(name: str) -> str:
    """A method's tab label: its title without the authors ("GNN re-ranking"), so that every
    tab fits one row at 1600 px; the tab shows the full title."""
    return method_title(name).split(" (")[0]


def _method_tab(name: str, session: GallerySession) -> MethodWidgets:
    """One re-ranker's tab: the baseline and its ranking side by side (first, so that they
    are in the first screen), then its parameters (as the gallery sets them) and tuning."""
    specs = get_reranker_class(name).Params.describe()
    params, source = session.params_for(name)
    with gr.Tab(short_title(name), id=name, elem_id=f"tab-{name}"):
        gr.Markdown(f"**{method_title(name)}**", elem_classes=["method-title"])
        source_md = gr.Markdown(source_text(name, params, source),
                                elem_classes=["method-source"])
        with gr.Row(equal_height=True):
            state_md = gr.Markdown(session.state_text(name), elem_id=f"state-{name}")
            train = gr.Button("Train now", visible=False, scale=0, min_width=180, size="sm",
                              elem_id=f"train-{name}")
        metrics = gr.Markdown("", elem_id=f"metrics-{name}")
        with gr.Row(equal_height=False):
            baseline = gr.Gallery(label=BASELINE_LABEL, columns=5, height=330,
                                  object_fit="cover", interactive=False, allow_preview=False,
                                  elem_classes=["ranking"], elem_id=f"baseline-{name}")
            reranked = gr.Gallery(label=method_title(name), columns=5, height=330,
                                  object_fit="cover", interactive=False, allow_preview=False,
                                  elem_classes=["ranking"], elem_id=f"reranked-{name}")
        evidence = evidence_panel(name)
        with gr.Accordion("Parameters", open=True), gr.Row():
            controls = [_control(spec, params[spec["name"]]) for spec in specs]
            reset = gr.Button("Reset to preset / defaults", scale=0)
        with gr.Accordion("Tune on this gallery", open=False):
            gr.Markdown(f"Sweeps run on the {TUNE_PROTOCOL_TEXT}.")
            names = [spec["name"] for spec in specs if spec["type"] != "bool"]
            with gr.Row():
                first = gr.Dropdown(choices=names, value=names[0], label="Parameter")
                first_values = gr.Textbox(
                    default_grid(next(spec for spec in specs if spec["name"] == names[0])),
                    label="Values")
                second = gr.Dropdown(choices=[NO_PARAMETER, *names], value=NO_PARAMETER,
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
    return MethodWidgets(
        name=name, controls=controls, param_names=[spec["name"] for spec in specs],
        source=source_md, state=state_md, train=train, baseline=baseline, reranked=reranked,
        metrics=metrics, reset=reset, tune_first=first, tune_first_values=first_values,
        tune_second=second, tune_second_values=second_values, tune_run=run,
        tune_cancel=cancel, tune_plot=tune_plot, tune_summary=tune_summary,
        tune_best=tune_best, use_best=use_best, save_best=save_best, evidence=evidence)


def _control(spec: dict[str, Any], value: Any) -> gr.components.Component:
    """A slider when the parameter has a range of at most MAX_SLIDER_STEPS steps, a checkbox
    for a switch, else a number box; help text as info. A typed value outside the range is
    clamped into it (`app.controls`), never refused with an error."""
    if spec["type"] == "bool":
        return gr.Checkbox(value=bool(value), label=spec["name"], info=spec.get("help") or None)
    integral = spec["type"] == "int"
    low, high = spec.get("min"), spec.get("max")
    step = spec.get("step") or (1 if integral else 0.01)
    if low is not None and high is not None and (high - low) / step <= MAX_SLIDER_STEPS:
        return clamped(gr.Slider(minimum=low, maximum=high, step=step, value=value,
                                 label=spec["name"], info=spec.get("help") or None))
    return clamped(gr.Number(value=value, label=spec["name"], info=spec.get("help") or None,
                             precision=0 if integral else None, minimum=low, maximum=high))
