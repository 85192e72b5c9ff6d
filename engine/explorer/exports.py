"""Exports of what the page shows, each with its run card (`engine.evaluation.runcard`).

- The current query's rankings for every method (`rankings_table`): one row per method and
  place (the first `EXPORT_DEPTH` places, or the shown top N when larger), with the gallery
  file, its class, the method's own distance, the cosine similarity of the query to the item
  (one scale for every method), hit / miss / junk when the query's relevant items are known,
  and the method's AP and P@N for the query. As CSV and JSON.
- The Compare table (`export_table`), whatever columns it has: headers and rows. As CSV, JSON
  and a Markdown table.

Where the card goes: JSON under a "run_card" key; CSV in leading comment lines starting with
"# " (the card as one line of JSON after "# run_card: "; `read_csv_export` reads it back, and
`csv` readers skip nothing else); Markdown in a `<details>` block below the table. Files are
written atomically under `exports_folder(cache_root)`, named with the gallery, the query (for
rankings), a UTC timestamp and a random token.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.storage import atomic_write_bytes
from engine.errors import InvalidInputError
from engine.evaluation.runcard import (
    RunCard,
    figures_of,
    gallery_entry,
    json_value,
    method_entries,
    run_card,
)
from engine.evaluation.scores import SCORE_SAMPLE
from engine.explorer.results import BASELINE, QueryResult, distance_note, query_similarities
from engine.explorer.session import GallerySession, ParamsOrSetting
from engine.rerank.setting import MethodSetting

EXPORTS_FOLDER = "exports"
EXPORT_DEPTH = 100
"""Places of each method's ranking a rankings export holds (the shown top N when larger)."""
CARD_PREFIX = "# run_card: "
RANKINGS_FORMATS = ("csv", "json")
TABLE_FORMATS = ("csv", "json", "md")
HIT, MISS, JUNK = "hit", "miss", "junk"


def exports_folder(cache_root: str | Path) -> Path:
    """Where the page's exports are written: the explorer's cache root's `exports/`."""
    return Path(cache_root) / EXPORTS_FOLDER


# -- the rankings ---------------------------------------------------------------------------------
def rankings_headers(top_n: int) -> list[str]:
    return ["method", "rank", "file", "class", "distance", "cosine similarity", "outcome",
            "AP", f"P@{top_n}"]


def rankings_table(result: QueryResult, session: GallerySession, depth: int = EXPORT_DEPTH
                   ) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of a query's rankings: per method (the baseline first) its first
    max(depth, top N) places. The distance is the method's own (see `distance_note`); the
    cosine similarity is the query's to the item, on one scale for every method; the outcome
    is "hit", "miss" or "junk" (ignored by the query's revisited ground truth), blank when
    the query's relevant items are unknown; AP and P@N are the method's for this query."""
    gallery = session.gallery
    rows: list[list[Any]] = []
    for name, ranking in result.rankings.items():
        shown = min(len(ranking.indices), max(depth, result.top_n))
        indices = np.asarray(ranking.indices[:shown], np.int64)
        similarities = query_similarities(result.feature, gallery.features, indices)
        for place, row in enumerate(indices.tolist()):
            outcome = ""
            if ranking.junk is not None and place < len(ranking.junk) and ranking.junk[place]:
                outcome = JUNK
            elif ranking.relevant is not None and place < len(ranking.relevant):
                outcome = HIT if ranking.relevant[place] else MISS
            rows.append([name, place + 1, gallery.files[row], gallery.class_of(row),
                         round(float(ranking.distances[place]), 6),
                         round(float(similarities[place]), 6), outcome,
                         json_value(ranking.ap), json_value(ranking.precision)])
    return rankings_headers(result.top_n), rows


def query_protocol(result: QueryResult) -> str:
    """What the rankings are: which query, ranked how."""
    hows = sorted({ranking.how for ranking in result.rankings.values()})
    if result.query_set_name is not None:
        what = f"query {result.query_set_name!r} of the gallery's query set"
    elif result.source_file is not None:
        left = "left out of its own ranking" if result.leave_out else "kept in its ranking"
        what = f"gallery item {result.source_file!r} as the query, {left}"
    else:
        what = "an uploaded query image"
    return f"one query: {what}; ranked {' and '.join(hows)}"


def query_name(result: QueryResult) -> str:
    return result.query_set_name or result.source_file or "upload"


def rankings_card(session: GallerySession, result: QueryResult) -> RunCard:
    """The run card of a query's rankings: each method's parameters as the ranking records
    them, the figures the rankings' per-method AP and P@N."""
    settings = [MethodSetting(name, dict(ranking.params), ranking.params_source)
                for name, ranking in result.rankings.items()]
    headers = ["method", "AP", f"P@{result.top_n}", "ms", "how"]
    rows = [[name, ranking.ap, ranking.precision, round(ranking.seconds * 1000, 3),
             ranking.how] for name, ranking in result.rankings.items()]
    return session_card(session, "query rankings", query_protocol(result), settings,
                        figures_of(headers, rows), extra={
                            "query": {"file": result.source_file, "class": result.query_class,
                                      "query_set_name": result.query_set_name,
                                      "leave_out": result.leave_out, "top_n": result.top_n,
                                      "embedded_by": result.embedded_by},
                            "not_ready": dict(result.not_ready)})


def rankings_json(result: QueryResult, session: GallerySession, card: RunCard,
                  depth: int = EXPORT_DEPTH) -> dict[str, Any]:
    """The rankings as a JSON object: the run card, the query, and per method its title,
    parameters, AP, P@N and results (rank, file, class, distance, similarity, outcome)."""
    headers, rows = rankings_table(result, session, depth)
    methods: dict[str, Any] = {}
    for name, ranking in result.rankings.items():
        methods[name] = {
            "title": ranking.title, "params": json_value(dict(ranking.params)),
            "params_source": ranking.params_source, "how": ranking.how,
            "ms": round(ranking.seconds * 1000, 3), "distance_note": distance_note(name),
            "ap": json_value(ranking.ap), f"p@{result.top_n}": json_value(ranking.precision),
            "results": [dict(zip(headers[1:7], row[1:7], strict=True))
                        for row in rows if row[0] == name]}
    return {"run_card": card.to_dict(),
            "query": {"file": result.source_file, "class": result.query_class,
                      "query_set_name": result.query_set_name, "leave_out": result.leave_out},
            "methods": methods}


def export_rankings(session: GallerySession, result: QueryResult, folder: str | Path,
                    formats: Sequence[str] = RANKINGS_FORMATS, depth: int = EXPORT_DEPTH
                    ) -> dict[str, Path]:
    """Write a query's rankings (CSV and/or JSON, each with its run card) under `folder`;
    return the paths by format."""
    _check_formats(formats, RANKINGS_FORMATS)
    card = rankings_card(session, result)
    stem = export_stem(session, "rankings", query_name(result))
    written = {}
    for kind in formats:
        if kind == "csv":
            headers, rows = rankings_table(result, session, depth)
            text = to_csv(headers, rows, card)
        else:
            text = json.dumps(rankings_json(result, session, card, depth), indent=2,
                              allow_nan=False)
        written[kind] = _write(Path(folder) / f"{stem}.{kind}", text)
    return written


# -- the Compare table ----------------------------------------------------------------------------
def table_protocol(session: GallerySession) -> str:
    """What the Compare table's scores are over."""
    if session.revisited_ready:
        queries = session.query_set
        assert queries is not None
        return (f"revisited Oxford/Paris (Easy, Medium, Hard; junk removed per setting): "
                f"{len(queries.names)} queries of {queries.source} against the whole gallery "
                f"(batch), ground truth {queries.ground_truth}")
    if session.full_rankings:
        return ("leave-one-out: every labelled gallery item a query against the others "
                "(batch)")
    return (f"leave-one-out over a fixed random sample of {SCORE_SAMPLE} of the "
            f"{session.gallery.size} gallery items, each ranked online against the rest")


def table_card(session: GallerySession, headers: Sequence[str], rows: Sequence[Sequence[Any]],
               params: Mapping[str, ParamsOrSetting] | None = None) -> RunCard:
    """The run card of a Compare table: its figures as they are, each method's setting
    (`params` per method, default the gallery's)."""
    settings = [session.setting(method, None if params is None else params.get(method))
                for method, _ in session.methods()]
    return session_card(session, "compare table", table_protocol(session), settings,
                        figures_of(headers, rows))


def export_table(session: GallerySession, headers: Sequence[str],
                 rows: Sequence[Sequence[Any]], folder: str | Path,
                 params: Mapping[str, ParamsOrSetting] | None = None,
                 formats: Sequence[str] = TABLE_FORMATS) -> dict[str, Path]:
    """Write a Compare table (any headers and rows: the engine's or the page's, with whatever
    columns it has) as CSV, JSON and/or Markdown, each with its run card; return the paths by
    format. A table without rows raises InvalidInputError."""
    _check_formats(formats, TABLE_FORMATS)
    if not rows:
        raise InvalidInputError("the Compare table has no rows yet: compute it first")
    headers = [str(header) for header in headers]
    rows = [list(row) for row in rows]
    card = table_card(session, headers, rows, params)
    stem = export_stem(session, "compare")
    written = {}
    for kind in formats:
        if kind == "csv":
            text = to_csv(headers, rows, card)
        elif kind == "json":
            text = json.dumps(table_json(headers, rows, card), indent=2, allow_nan=False)
        else:
            text = to_markdown(headers, rows, card, f"Compare: {session.title}")
        written[kind] = _write(Path(folder) / f"{stem}.{kind}", text)
    return written


def table_json(headers: Sequence[str], rows: Sequence[Sequence[Any]], card: RunCard
               ) -> dict[str, Any]:
    """A table as JSON: its run card, headers, rows, and the rows as {header: value}."""
    figures = figures_of(headers, rows)
    return {"run_card": card.to_dict(), **figures,
            "records": [dict(zip(figures["headers"], row, strict=True))
                        for row in figures["rows"]]}


# -- formats --------------------------------------------------------------------------------------
def to_csv(headers: Sequence[str], rows: Sequence[Sequence[Any]], card: RunCard) -> str:
    """CSV with the run card in leading comment lines: "# Retrieval Explorer <kind>" and
    `CARD_PREFIX` + the card as one line of JSON; then the header row and the rows (NaN and
    None as empty cells)."""
    buffer = io.StringIO()
    buffer.write(f"# Retrieval Explorer export: {card.kind}\n")
    buffer.write(CARD_PREFIX + card.to_json(indent=None) + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if value is None else value for value in
                         (json_value(cell) for cell in row)])
    return buffer.getvalue()


def read_csv_export(text: str) -> tuple[RunCard, list[str], list[list[str]]]:
    """The run card, headers and rows (as strings) of a `to_csv` export."""
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("# ")]
    cards = [line[len(CARD_PREFIX):] for line in comments if line.startswith(CARD_PREFIX)]
    if not cards:
        raise InvalidInputError("this CSV has no run card line (# run_card: ...)")
    table = list(csv.reader(line for line in lines if not line.startswith("# ")))
    if not table:
        raise InvalidInputError("this CSV has no header row")
    return RunCard.from_json(cards[0]), table[0], table[1:]


def markdown_cell(value: Any) -> str:
    value = json_value(value)
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], card: RunCard,
                title: str) -> str:
    """A titled Markdown table (one line per row), then the run card in a `<details>` block
    (JSON)."""
    lines = [f"### {title}", "", "| " + " | ".join(markdown_cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    lines += ["", "<details><summary>Run card</summary>", "", "```json", card.to_json(),
              "```", "", "</details>", ""]
    return "\n".join(lines)


# -- shared ---------------------------------------------------------------------------------------
def session_card(session: GallerySession, kind: str, protocol: str,
                 settings: Sequence[MethodSetting], figures: dict[str, Any],
                 extra: Mapping[str, Any] | None = None) -> RunCard:
    """A run card of figures computed on a session's gallery."""
    gallery = session.gallery
    from engine.core.device import resolve_device

    settings = [setting if setting.method != BASELINE else MethodSetting(BASELINE)
                for setting in settings]
    return run_card(kind=kind, gallery=gallery_entry(gallery, session.title),
                    protocol=protocol, methods=method_entries(settings), figures=figures,
                    device=resolve_device(session.device), backbone=gallery.meta.backbone,
                    weights=gallery.meta.weights,
                    extra={"query_model": session.query_model, **(extra or {})})


def export_stem(session: GallerySession, what: str, query: str | None = None) -> str:
    """A file name stem: gallery, what, query (its file stem), a UTC timestamp with
    milliseconds and a random token (the page serves the exports folder: a name must not be
    guessable), with every character outside [A-Za-z0-9._-] replaced."""
    gallery = session.name or session.gallery.root.name
    parts = [gallery, what]
    if query:
        parts.append(Path(query).stem)
    parts.append(datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3] + "Z")
    parts.append(secrets.token_hex(4))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))[:180]


def _check_formats(formats: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [kind for kind in formats if kind not in allowed]
    if unknown or not formats:
        raise InvalidInputError(f"export formats are {', '.join(allowed)}; got "
                                f"{', '.join(formats) or 'none'}")


def _write(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
