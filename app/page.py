"""The explorer page: a query, then the baseline and every re-ranker side by side, with plots.

`build_app` puts the page together from its parts: `app.layout` builds the components,
`app.handlers` holds the event functions (keyed by those components), `app.wiring` connects
them, `app.text` says what the page says and `app.render` turns a query result into updates.
`launch_options` are the matching arguments of `Blocks.launch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.handlers import PageHandlers
from app.layout import build_layout
from app.plot_events import plot_events_js
from app.public import PublicUploads, UploadLimits
from app.wiring import wire
from engine import MAX_FILE_BYTES, Explorer, exports_folder

__all__ = ["DEFAULT_CONCURRENCY", "PUBLIC_CACHE_SECONDS", "QUEUE_SIZE", "PageHandlers",
           "build_app", "launch_options"]

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

CSS = """
.ranking .caption-label { white-space: normal !important; max-width: 97% !important;
  overflow: visible !important; text-overflow: clip !important;
  font-size: 0.68rem !important; line-height: 1.15; left: 2px; }
#timings table { font-size: 0.85rem; }
.method-source { font-size: 0.9rem; }
#message:not(:empty) { position: sticky; top: 0; z-index: 50; }
#message p { background: #fff4e5; border: 1px solid #f0b45a; border-radius: 6px;
  padding: 6px 10px; margin: 0; }
#job-row { background: #eef4ff; border-radius: 6px; padding: 2px 8px; }
#query-note { font-size: 0.85rem; }
#top-bar { align-items: center; }
"""
ENTER_APPLIES_SCRIPT = """<script>
// Enter in a slider's number box applies the value: Gradio applies it when the box loses
// focus (its "release"), so Enter takes the focus away.
document.addEventListener("keydown", (event) => {
  const box = event.target;
  if (event.key !== "Enter" || !(box instanceof HTMLInputElement) || box.type !== "number") {
    return;
  }
  const block = box.closest(".block");
  if (block && block.querySelector("input[type=range]")) { box.blur(); }
});
</script>"""


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
    options = {"theme": gr.themes.Soft(), "css": CSS, "head": ENTER_APPLIES_SCRIPT,
               "js": plot_events_js(),
               "allowed_paths": [str(explorer.thumbnail_root),
                                 str(exports_folder(explorer.cache_root))]}
    if public:
        limits = upload_limits or UploadLimits()
        return {**options, "max_file_size": limits.archive_bytes, "show_error": False}
    return {**options, "max_file_size": MAX_FILE_BYTES * 20, "show_error": True}


def serve_thumbnails_in_place(root: Path) -> None:
    """Let Gradio serve the thumbnail cache's files from where they are (a static path), as
    `launch_options` already allows, instead of copying each shown thumbnail into its own
    cache on every update: a pick shows some 160 of them (16 result strips), and the copies
    and their checks took about 0.1 s of it. Thumbnails never change once written (their
    names are their content's keys). Gradio's static paths are global to the process: a root
    is added once."""
    root = root.resolve()
    if root not in _static_roots:
        gr.set_static_paths([root])
        _static_roots.add(root)


_static_roots: set[Path] = set()


def build_app(explorer: Explorer, concurrency_limit: int = DEFAULT_CONCURRENCY,
              handlers: PageHandlers | None = None, public: bool = False) -> gr.Blocks:
    """The page for an explorer; launch it with `launch(**launch_options(explorer, public))`.

    handlers: the event functions to wire (default: new ones); `build_app` sets their `ui`
    (the page's components), so a caller (a test) can keep them and call the handlers directly.
    public: a page open to anyone (hosted): no folder on the server can be opened (the control
    is not even wired), uploads stay with the browser session that made them and are deleted
    when it ends, and Gradio's own temporary files are deleted after PUBLIC_CACHE_SECONDS.
    With `handlers`, their `public` decides.
    """
    handlers = handlers or PageHandlers(explorer,
                                        PublicUploads(explorer) if public else None)
    public = handlers.public is not None
    serve_thumbnails_in_place(explorer.thumbnail_root)
    with gr.Blocks(title="Retrieval Explorer",
                   delete_cache=(3600, PUBLIC_CACHE_SECONDS) if public else None) as demo:
        handlers.ui = build_layout(explorer, handlers)
        wire(handlers, demo)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_SIZE)
    return demo
