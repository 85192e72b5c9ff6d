"""Downloads: the current query's rankings for every method (CSV, JSON) and the Compare table
(CSV, JSON, Markdown), each file carrying its run card (`engine.export_rankings`,
`engine.export_table`).

The files are written when what they hold changes (a query's state, the Compare table), into
the explorer's cache (`engine.exports_folder`), and set as the download buttons' values, so
that a click downloads at once (a `gr.DownloadButton` downloads its current value when
clicked). A click with nothing to download yet says why in the page's message area.

`ExportEvents` is mixed into `app.handlers.PageHandlers`; `rankings_buttons` and
`table_buttons` create the buttons inside the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.render import QueryView
from engine import (
    BASELINE,
    EngineError,
    Explorer,
    GallerySession,
    export_rankings,
    export_table,
    exports_folder,
)

if TYPE_CHECKING:
    from app.layout import PageComponents

logger = logging.getLogger(__name__)

NO_QUERY = ("No query yet: pick a gallery image or upload one, then download its rankings.")
NO_TABLE = ("The Compare table has no rows yet: press \"Compute for the current parameters\" "
            "first, then download it.")
KEEP_EXPORTS = 200
"""Export files kept in the exports folder (the oldest beyond are removed as new ones come)."""


@dataclass
class ExportButtons:
    """The download buttons: the query's rankings and the Compare table."""

    rankings_csv: gr.DownloadButton
    rankings_json: gr.DownloadButton
    table_csv: gr.DownloadButton
    table_json: gr.DownloadButton
    table_md: gr.DownloadButton

    @property
    def rankings(self) -> list[gr.DownloadButton]:
        return [self.rankings_csv, self.rankings_json]

    @property
    def table(self) -> list[gr.DownloadButton]:
        return [self.table_csv, self.table_json, self.table_md]


def _button(label: str, elem_id: str) -> gr.DownloadButton:
    return gr.DownloadButton(label, value=None, size="sm", variant="secondary",
                             elem_id=elem_id, min_width=80)


def rankings_buttons() -> tuple[gr.DownloadButton, gr.DownloadButton]:
    """'Download rankings' CSV and JSON (created where the layout calls this)."""
    with gr.Row(elem_id="download-rankings"):
        return (_button("Download rankings (CSV)", "download-rankings-csv"),
                _button("Download rankings (JSON)", "download-rankings-json"))


def table_buttons() -> tuple[gr.DownloadButton, gr.DownloadButton, gr.DownloadButton]:
    """'Download table' CSV, JSON and Markdown (created where the layout calls this)."""
    with gr.Row(elem_id="download-table"):
        return (_button("Download table (CSV)", "download-table-csv"),
                _button("Download table (JSON)", "download-table-json"),
                _button("Download table (Markdown)", "download-table-md"))


def table_values(table: Any) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the Compare table's value as the page holds it: a pandas frame
    (a Dataframe input), {"headers", "data"} or a list of rows (a handler's output)."""
    if table is None:
        return [], []
    if hasattr(table, "columns") and hasattr(table, "values"):
        return [str(column) for column in table.columns], table.values.tolist()
    if isinstance(table, dict):
        return list(table.get("headers") or []), [list(row) for row in table.get("data") or []]
    return [], [list(row) for row in table]


def _has_rows(rows: Sequence[Sequence[Any]]) -> bool:
    """Whether a table has a row with content (an empty Dataframe holds one blank row)."""
    return any(any(cell not in (None, "") for cell in row) for row in rows)


class ExportEvents:
    """The download buttons' files and refusals (mixed into PageHandlers)."""

    explorer: Explorer
    ui: PageComponents
    method_names: list[str]
    session: Callable[[str | None], GallerySession]
    all_params: Callable[[Sequence[Any]], dict[str, dict[str, Any]]]

    @property
    def exports_dir(self) -> Path:
        return exports_folder(self.explorer.cache_root)

    def rankings_files(self, view: QueryView | None) -> dict[Any, Any]:
        """The query changed: write its rankings (CSV, JSON) and make them the buttons'
        downloads; no query (or a failed export, logged) leaves the buttons without one."""
        buttons = self.ui.exports.rankings if self.ui.exports else []
        empty = {button: None for button in buttons}
        if view is None or not buttons:
            return empty
        try:
            session = self.explorer.session(view.result.gallery_key)
            paths = export_rankings(session, view.result, self.exports_dir)
        except EngineError as error:
            logger.warning("could not export the query's rankings: %s", error)
            return empty
        self._prune()
        return {buttons[0]: str(paths["csv"]), buttons[1]: str(paths["json"])}

    def table_files(self, key: str, table: Any, *control_values: Any) -> dict[Any, Any]:
        """The Compare table changed: write it (CSV, JSON, Markdown) as it is shown, with a
        run card naming each method's setting: the tabs' parameters where the table's
        parameters column shows them, else the gallery's default."""
        buttons = self.ui.exports.table if self.ui.exports else []
        empty = {button: None for button in buttons}
        headers, rows = table_values(table)
        if not buttons or not headers or not _has_rows(rows):
            return empty
        try:
            session = self.explorer.session(key)
            params = self._shown_params(session, headers, rows, control_values)
            paths = export_table(session, headers, rows, self.exports_dir, params)
        except EngineError as error:
            logger.warning("could not export the Compare table: %s", error)
            return empty
        self._prune()
        return dict(zip(buttons, (str(paths[kind]) for kind in ("csv", "json", "md")),
                        strict=True))

    def _shown_params(self, session: GallerySession, headers: Sequence[str],
                      rows: Sequence[Sequence[Any]], control_values: Sequence[Any]
                      ) -> dict[str, dict[str, Any] | None]:
        """Per method, the tabs' parameters when the table's row shows them, else None (the
        gallery's default)."""
        if "parameters" not in headers or not control_values:
            return {}
        column = list(headers).index("parameters")
        shown = {str(row[0]): str(row[column]) for row in rows if len(row) > column}
        titles = dict(session.methods())
        chosen: dict[str, dict[str, Any] | None] = {}
        for method, values in self.all_params(control_values).items():
            if method == BASELINE or method not in titles:
                continue
            setting = session.setting(method, values)
            text = ", ".join(f"{name}={value}" for name, value in setting.params.items())
            chosen[method] = values if shown.get(titles[method]) == text else None
        return chosen

    def check_rankings_download(self, view: QueryView | None) -> dict[Any, Any]:
        """A click on a rankings download: nothing to download before a query."""
        if view is None:
            raise gr.Error(NO_QUERY, print_exception=False)
        return {}

    def check_table_download(self, table: Any) -> dict[Any, Any]:
        """A click on a table download: nothing to download while the table is empty."""
        if not _has_rows(table_values(table)[1]):
            raise gr.Error(NO_TABLE, print_exception=False)
        return {}

    def _prune(self) -> None:
        """Keep the newest `KEEP_EXPORTS` export files."""
        try:
            files = sorted((path for path in self.exports_dir.iterdir() if path.is_file()),
                           key=lambda path: path.stat().st_mtime, reverse=True)
            for stale in files[KEEP_EXPORTS:]:
                stale.unlink(missing_ok=True)
        except OSError as error:
            logger.debug("could not prune the exports folder: %s", error)
