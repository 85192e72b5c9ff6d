"""The explorer's first page: one query image, the baseline and every re-ranker side by side.

The page has one API endpoint, `query`, that returns JSON (per method the ranked files, classes
and distances, plus the query's ImageNet top-3 and timings). Every way of asking a query (the
Search button, an upload, a gallery pick, an example) writes that JSON, and the displays are
drawn from it by one `render` function, so the page shows exactly what the API returns.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr

from app.session import DEFAULT_K, ExplorerSession
from engine.errors import EngineError
from engine.images import MAX_FILE_BYTES, load_image

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 2
"""Queries run at once; the backbone serialises its forward pass, the rest is light."""

CSS = """
.ranking .caption-label { font-size: 0.8rem; }
.ranking { min-width: 220px; }
"""


def launch_options(session: ExplorerSession) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` (Gradio 6 takes theme and css there).

    The gallery folder is allowed so that its images can be served to the browser. show_error:
    an upload that is not an image at all fails in Gradio's own decoding, before the engine sees
    it; this lets its message reach the user instead of a bare "Error".
    """
    return {"theme": gr.themes.Soft(), "css": CSS,
            "allowed_paths": [str(session.gallery.root)],
            "max_file_size": MAX_FILE_BYTES, "show_error": True}


@contextmanager
def engine_errors_as_gradio() -> Iterator[None]:
    """Turn the engine's typed errors into messages shown to the user (logged, no traceback)."""
    try:
        yield
    except EngineError as error:
        logger.info("query refused: %s", error)
        raise gr.Error(str(error), print_exception=False) from error


class PageHandlers:
    """The page's event functions, bound to one session (plain methods, testable without a UI)."""

    def __init__(self, session: ExplorerSession) -> None:
        self.session = session
        self.methods = session.methods()
        self.examples = session.example_files()

    # -- API ---------------------------------------------------------------------------------------
    def query(self, image: str | None, gallery_file: str | None, leave_out: bool = True
              ) -> dict[str, Any]:
        """Rank the gallery for an uploaded image or a gallery image; the `query` API endpoint.

        Args:
            image: path of the uploaded image, or None.
            gallery_file: a gallery file name (as listed in the dropdown); when given it is the
                query (the image is ignored) and results are marked by its class.
            leave_out: drop a gallery query's own image from the results.
        Returns:
            The JSON summary of `QueryResult.as_dict`.
        """
        with engine_errors_as_gradio():
            if gallery_file:
                result = self.session.query(source_file=gallery_file,
                                            leave_out_source=bool(leave_out))
            elif image:
                # Uploads live in temporary folders; messages name only the file.
                picture = load_image(image, name=Path(image).name)
                result = self.session.query(picture, leave_out_source=bool(leave_out))
            else:
                raise gr.Error("Upload an image or pick one of the gallery first.",
                               print_exception=False)
            return result.as_dict(self.session.gallery)

    # -- UI events -----------------------------------------------------------------------------
    def pick(self, gallery_file: str | None, leave_out: bool) -> tuple[Any, Any]:
        """A gallery image was chosen: show it as the query and rank."""
        if not gallery_file:
            return gr.skip(), gr.skip()
        with engine_errors_as_gradio():
            path = self.session.gallery.path_of(self.session.position_of(gallery_file))
        return str(path), self.query(None, gallery_file, leave_out)

    def upload(self, image: str | None, leave_out: bool) -> tuple[Any, Any]:
        """An image was uploaded: forget any gallery pick and rank."""
        if not image:
            return gr.skip(), gr.skip()
        return None, self.query(image, None, leave_out)

    def refresh(self, image: str | None, gallery_file: str | None, leave_out: bool) -> Any:
        """Re-run the current query (after an option changed); nothing when there is none."""
        if not image and not gallery_file:
            return gr.skip()
        return self.query(image, gallery_file, leave_out)

    def example(self, event: gr.SelectData) -> str:
        """An example thumbnail was clicked: pick that gallery file."""
        return self.examples[event.index]

    def render(self, summary: dict[str, Any] | None) -> list[Any]:
        """The displays for a query summary: ImageNet top-3, one gallery per method, timings."""
        if not summary:
            return [gr.skip()] * (len(self.methods) + 2)
        query = summary["query"]
        imagenet = {row["label"]: row["probability"] for row in query["imagenet_top3"]}
        galleries = []
        for name, title in self.methods:
            ranking = summary["methods"].get(name)
            if ranking is None:
                galleries.append(gr.Gallery(value=[], label=f"{title}: no result"))
                continue
            items, hits = self._items(ranking, query["class"])
            label = f"{title} · {ranking['ms']:.0f} ms"
            if hits is not None:
                label += f" · {hits}/{len(items)} same class"
            galleries.append(gr.Gallery(value=items, label=label))
        return [imagenet, *galleries, self._timings_table(summary)]

    # -- helpers -----------------------------------------------------------------------------------
    def _items(self, ranking: dict[str, Any], query_class: str | None
               ) -> tuple[list[tuple[str, str]], int | None]:
        """(image path, "rank · class · distance [✓/✗]") per result, and the same-class count."""
        items, hits = [], 0
        rows = zip(ranking["files"], ranking["classes"], ranking["distances"], strict=True)
        for rank, (file, label, distance) in enumerate(rows, start=1):
            path = self.session.gallery.path_of(self.session.position_of(file))
            caption = f"{rank} · {label or Path(file).stem} · {distance:.3f}"
            if query_class is not None and label is not None:
                same = label == query_class
                hits += same
                caption += " ✓" if same else " ✗"
            items.append((str(path), caption))
        return items, (hits if query_class is not None else None)

    def _timings_table(self, summary: dict[str, Any]) -> str:
        titles = dict(self.methods)
        rows = ["| stage | ms |", "| --- | ---: |"]
        for stage, ms in summary["timings_ms"].items():
            name = "embed + classify (backbone)" if stage == "embed" else titles.get(stage, stage)
            rows.append(f"| {name} | {ms:.1f} |")
        return "\n".join(rows)


def _header(session: ExplorerSession) -> str:
    gallery = session.gallery
    classes = f", {len(gallery.class_names)} classes" if gallery.labels is not None else ""
    skipped = f" ({len(gallery.skipped)} unreadable files skipped)" if gallery.skipped else ""
    return (f"# Retrieval Explorer\n"
            f"Gallery **{gallery.root.name}**: {gallery.size} images{classes}{skipped} · "
            f"backbone `{gallery.meta.backbone}` · pick or upload a query to compare the "
            f"baseline ranking with every re-ranking method (top {DEFAULT_K}).")


def build_app(session: ExplorerSession, concurrency_limit: int = DEFAULT_CONCURRENCY
              ) -> gr.Blocks:
    """The page for a loaded session; launch it with `launch(**launch_options(session))`."""
    handlers = PageHandlers(session)
    gallery = session.gallery
    with gr.Blocks(title="Retrieval Explorer") as demo:
        gr.Markdown(_header(session))
        if session.unavailable:
            gr.Markdown("\n".join(f"**{name} is unavailable:** {message}"
                                  for name, message in session.unavailable.items()))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                query_image = gr.Image(type="filepath", image_mode=None, label="Query image",
                                       sources=["upload", "clipboard"], height=280)
                gallery_file = gr.Dropdown(choices=gallery.files, value=None, filterable=True,
                                           label="…or a gallery image")
                leave_out = gr.Checkbox(value=True,
                                        label="Leave a gallery query out of its own results")
                search = gr.Button("Search", variant="primary")
            with gr.Column(scale=1, min_width=300):
                examples = gr.Gallery(
                    value=[(str(gallery.path_of(session.position_of(name))),
                            gallery.class_of(session.position_of(name)) or Path(name).stem)
                           for name in handlers.examples],
                    label="Examples: click one to query it", columns=4, height="auto",
                    allow_preview=False, object_fit="cover", interactive=False)
                imagenet = gr.Label(num_top_classes=3, label="Backbone's ImageNet top-3")
                timings = gr.Markdown()
        with gr.Row(equal_height=False):
            rankings = [gr.Gallery(label=title, columns=2, height="auto", object_fit="cover",
                                   interactive=False, elem_classes=["ranking"],
                                   elem_id=f"ranking-{name}")
                        for name, title in handlers.methods]
        with gr.Accordion("Results as JSON (the `query` API)", open=False):
            summary = gr.JSON(label="query result")

        search.click(handlers.query, [query_image, gallery_file, leave_out], summary,
                     api_name="query")
        summary.change(handlers.render, summary, [imagenet, *rankings, timings],
                       api_visibility="private")
        gallery_file.change(handlers.pick, [gallery_file, leave_out], [query_image, summary],
                            api_visibility="private")
        query_image.upload(handlers.upload, [query_image, leave_out], [gallery_file, summary],
                           api_visibility="private")
        query_image.clear(lambda: None, None, gallery_file, api_visibility="private")
        leave_out.input(handlers.refresh, [query_image, gallery_file, leave_out], summary,
                        api_visibility="private")
        examples.select(handlers.example, None, gallery_file, api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64)
    return demo
