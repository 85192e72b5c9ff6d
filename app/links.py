"""The page's event functions for links: the view (gallery, query, tab, changed parameters)
written into the address bar, and a link's view reopened when the page loads.

`LinkEvents` is part of `app.handlers.PageHandlers` (which it is mixed into): it uses the
page's components (`ui`), the explorer and the query events (`pick`, `search`, ...) defined
there. The query string itself is `app.share`'s (pure functions).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.render import QueryView
from app.share import QueryUploads, SharedView, changed_params, decode, encode
from app.text import ALL_CLASSES, NO_CLASS
from app.thumbnails import ThumbnailCache
from engine import Explorer, GallerySession, method_title
from engine.errors import EngineError

if TYPE_CHECKING:
    from app.layout import PageComponents


class LinkEvents:
    """The view as a link, and a link reopened (mixed into PageHandlers)."""

    explorer: Explorer
    thumbnails: ThumbnailCache
    query_uploads: QueryUploads | None
    method_names: list[str]
    ui: PageComponents
    tab_ids: list[str]
    session: Callable[[str | None], GallerySession]
    all_params: Callable[..., dict[str, dict[str, Any]]]
    gallery_choices: Callable[..., list[tuple[str, str]]]
    browse: Callable[..., dict[Any, Any]]
    pick: Callable[..., dict[Any, Any]]
    pick_query: Callable[..., dict[Any, Any]]
    show_upload: Callable[..., dict[Any, Any]]
    flat_controls: Callable[[dict[str, dict[str, Any]]], list[Any]]
    _switched: Callable[..., dict[Any, Any]]

    # -- the view as a link ----------------------------------------------------------------------
    def select_tab(self, event: gr.SelectData) -> str:
        """The id of the tab the user selected (its position among `tab_ids`)."""
        ids = self.tab_ids
        return ids[event.index] if 0 <= event.index < len(ids) else ids[0]

    def share_link(self, key: str, view: QueryView | None, uploaded: str | None,
                   tab: str, *control_values: Any) -> str:
        """The view as a URL query string: the gallery, the query (a pick, a query of the
        gallery's query features by name, or an upload this page kept), its class when given
        for an upload, the tab and the parameters that differ from the gallery's setting."""
        try:
            session = self.explorer.session(key)
        except EngineError:
            return ""
        params = {}
        for method, values in self.all_params(control_values).items():
            changed = changed_params(values, session.params_for(method)[0])
            if changed:
                params[method] = changed
        file = name = upload = query_class = None
        if view is not None and view.result.gallery_key == session.key:
            file = view.result.source_file
            name = view.result.query_set_name
            if file is None and name is None and uploaded and self.query_uploads is not None:
                upload = Path(uploaded).stem
                query_class = view.result.query_class
        return encode(SharedView(gallery=session.key, file=file, query=name, upload=upload,
                                 query_class=query_class, tab=tab, params=params))

    def restore(self, request: gr.Request | None, *defaults: Any) -> dict[Any, Any]:
        """On load: reopen the view the page's URL names (see `app.share`); a part that no
        longer exists is skipped with a message. `defaults`: the page's plot choices and
        leave-out and top-N values (plot method, space, leave_out, top_n)."""
        ui = self.ui
        plot_method, space, leave_out, top_n = defaults
        query = dict(request.query_params) if request is not None else {}
        shared = decode(query, self.method_names)
        updates: dict[Any, Any] = {}
        notes = []
        key = None
        if shared.gallery:
            # a public page's visitor may open only the galleries offered to them
            offered = {choice for _, choice in self.gallery_choices(request)}
            if shared.gallery in offered:
                key = shared.gallery
            else:
                notes.append("the link's gallery is not open on this server")
        session = self.session(key)
        if key is not None and key != self.explorer.default_key:
            updates.update(self._switched(session, request))
        updates.update(self.browse(session.key, ALL_CLASSES, 1))
        params: dict[str, dict[str, Any]] = {}
        for method, values in shared.params.items():
            tab = ui.tabs[method]
            try:
                resolved, _ = session.resolve(method, {**session.params_for(method)[0],
                                                       **_numbers(values)})
            except EngineError as error:
                notes.append(f"{method_title(method)}'s parameters in the link: {error}")
                continue
            params[method] = resolved
            for control, name in zip(tab.controls, tab.param_names, strict=True):
                updates[control] = resolved[name]
        if shared.tab in self.tab_ids:
            updates[ui.method_tabs] = gr.Tabs(selected=shared.tab)
            updates[ui.current_tab] = shared.tab
        chosen = {method: params.get(method, session.params_for(method)[0])
                  for method in self.method_names}
        try:
            if shared.file:
                updates.update(self.pick(session.key, shared.file, leave_out, top_n,
                                         plot_method, space, *self.flat_controls(chosen)))
            elif shared.query:
                updates.update(self.pick_query(session.key, shared.query, top_n, plot_method,
                                               space, *self.flat_controls(chosen)))
            elif shared.upload and self.query_uploads is not None:
                kept = self.query_uploads.find(shared.upload)
                if kept is None:
                    notes.append("the link's uploaded query is no longer kept here")
                else:
                    updates.update(self.show_upload(
                        session.key, str(kept), shared.query_class or NO_CLASS, leave_out,
                        top_n, plot_method, space, *self.flat_controls(chosen)))
        except gr.Error as error:
            notes.append(f"the link's query: {error.message}")
        if notes:
            updates[ui.message] = "⚠️ Reopening the link: " + "; ".join(notes) + "."
        return updates


def _numbers(values: dict[str, str]) -> dict[str, Any]:
    """A link's parameter values as numbers where they are numbers ("true"/"false" as
    booleans); the engine validates them."""
    parsed: dict[str, Any] = {}
    for name, text in values.items():
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            parsed[name] = lowered == "true"
            continue
        try:
            number = float(text)
        except ValueError:
            parsed[name] = text
            continue
        parsed[name] = int(number) if number.is_integer() else number
    return parsed
