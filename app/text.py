"""What the page says: labels, Markdown builders for results, states and galleries, and the
parsing of the values a user types (no components, no events)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.public import PublicUploads
from engine import (
    CUSTOM,
    FAILED,
    RUNNING,
    WAITING,
    Gallery,
    GallerySession,
    QueryResult,
    Ranking,
    Trial,
    best_trial,
    duration_text,
    method_title,
)
from engine.errors import InvalidInputError

BASELINE_LABEL = "Baseline (faiss)"
NO_CLASS = "(unknown)"
ALL_CLASSES = "All classes"
NO_PARAMETER = "(none)"
TUNE_PROTOCOL_TEXT = ("fixed split of the labelled images: every 10th image is a query, the "
                      "others the gallery (batch mode, as the methods' authors evaluate)")


# -- query results -----------------------------------------------------------------------------
def rank_change(rank: int, old_rank: int | None, top_n: int) -> str:
    """'▲3' (moved up 3), '▼2', '=' or 'new' (was outside the baseline's top N)."""
    if old_rank is None:
        return "new"
    if old_rank > top_n:
        return f"new (was #{old_rank})"
    if old_rank == rank:
        return "="
    return f"▲{old_rank - rank}" if old_rank > rank else f"▼{rank - old_rank}"


def distance_text(distance: float) -> str:
    """A method's distance with 3 significant digits: SGRR's distances within a class are
    around 1e-5, which three decimals would all show as 0.000."""
    return f"{distance:.3g}"


def familiarity_text(result: QueryResult) -> str:
    """How close the query is to the gallery, against the gallery's own nearest neighbours; a
    warning when it is unusually far (an astronaut against flowers)."""
    familiarity = result.familiarity
    if familiarity is None:
        return ""
    line = (f"nearest gallery image at cosine {familiarity.nearest:.3f}; gallery images' "
            f"nearest neighbours: median {familiarity.typical:.3f} (this query is at their "
            f"{familiarity.percentile:.0f}th percentile)")
    if familiarity.unusual:
        return (f"**⚠️ Far from this gallery:** {line}. Its results are the least far "
                "images, not matches.")
    return line[0].upper() + line[1:] + "."


def imagenet_text(result: QueryResult) -> str:
    """The backbone's ImageNet top-3, small and labelled as the backbone's guess."""
    if not result.imagenet:
        return ""
    guesses = ", ".join(f"{label} {probability:.0%}" for label, probability in result.imagenet)
    return f"<small>Backbone's ImageNet guess (not the gallery's classes): {guesses}</small>"


def train_label(seconds: float | None) -> str:
    """The label of a learned method's "train now" button, with its expected time."""
    if seconds is None:
        return "Train now"
    return f"Train now (about {duration_text(seconds)})"


def metrics_text(result: QueryResult, baseline: Ranking, ranking: Ranking) -> str:
    how = ("its row of the leave-one-out run over the whole gallery (as in Compare)"
           if ranking.how == "leave-one-out" else
           f"online against the fitted gallery in {ranking.seconds * 1000:.1f} ms")
    learned = ranking.detail("trained_on")
    learned = f" Learned from {learned}." if learned else ""
    if ranking.ap is None or baseline.ap is None:
        note = ("Pick the query's class (under the query) to score an upload."
                if result.source_row is None else "This gallery has no labels to score.")
        return f"Ranked {how}. {note}{learned}"
    n = result.top_n
    return (f"**AP** {baseline.ap:.3f} → **{ranking.ap:.3f}** ({ranking.ap - baseline.ap:+.3f})"
            f" · **P@{n}** {baseline.precision:.2f} → **{ranking.precision:.2f}** · "
            f"{result.n_positives} relevant images · ranked {how}.{learned}")


def history_text(session: GallerySession, result: QueryResult, ranking: Ranking) -> str:
    """For iterative methods (details["history"]: (iterations + 1, h) ids), how the top of
    the ranking moved per iteration: ✓/✗ per position when the query has a class, else the
    classes or file names."""
    history = ranking.detail("history")
    if not isinstance(history, np.ndarray) or history.ndim != 2:
        return ""
    width = min(history.shape[1], result.top_n, 10)
    gallery = session.gallery
    lines = ["", "", "**Top results per iteration** (iteration 0 = the original ranking)",
             "", "| iteration | " + " | ".join(str(p) for p in range(1, width + 1))
             + (" | hits |" if result.query_label is not None else " |"),
             "|---" * (width + 1 + (result.query_label is not None)) + "|"]
    for iteration, rows in enumerate(history[:, :width].tolist()):
        if result.query_label is not None and gallery.labels is not None:
            hits = [int(gallery.labels[row]) == result.query_label for row in rows]
            cells = ["✓" if hit else "✗" for hit in hits] + [str(sum(hits))]
        else:
            cells = [gallery.class_of(row) or Path(gallery.files[row]).stem for row in rows]
        lines.append(f"| {iteration} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_text(method: str, params: dict[str, Any], source: str | None) -> str:
    setting = ", ".join(f"{name}={value}" for name, value in params.items())
    origin = {"preset": "this gallery's **preset**",
              "authors' defaults": "the **authors' defaults**",
              CUSTOM: "**custom** parameters"}.get(source or "", "the parameters below")
    if (source or "").startswith("authors' defaults ("):  # e.g. episodes scaled to the gallery
        origin = "the **authors' defaults** " + source.removeprefix("authors' defaults ")
    return f"Runs with {origin}: `{setting}`"


def timings_table(result: QueryResult) -> str:
    rows = ["| stage | ms |", "| --- | ---: |"]
    for stage, seconds in result.timings.items():
        if stage == "embed":
            name = f"embed ({result.embedded_by})" if result.embedded_by else "embed"
        else:
            ranking = result.rankings[stage]
            name = method_title(stage) + (" (leave-one-out share)"
                                          if ranking.how == "leave-one-out" else "")
        rows.append(f"| {name} | {seconds * 1000:.1f} |")
    return "\n".join(rows)


# -- tuning ------------------------------------------------------------------------------------
def parse_values(text: str, name: str) -> list[float]:
    """'10, 20, 30' -> [10.0, 20.0, 30.0]; a clear error for anything else."""
    values = []
    for item in str(text or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise InvalidInputError(f"values of {name} must be numbers separated by commas; "
                                    f"{item.strip()!r} is not a number") from None
    if not values:
        raise InvalidInputError(f"give at least one value for {name}")
    return values


def default_grid(spec: dict[str, Any]) -> str:
    """Suggested sweep values around a parameter's default, inside its declared range."""
    default, low, high = spec["default"], spec.get("min"), spec.get("max")
    if spec["type"] == "int":
        candidates = {max(1, round(default * factor)) for factor in (0.5, 0.75, 1, 1.5, 2)}
    else:
        span = (high - low) if low is not None and high is not None else abs(default) or 1.0
        candidates = {round(default + span * step, 4) for step in (-0.3, -0.15, 0, 0.15, 0.3)}
    kept = sorted(v for v in candidates
                  if (low is None or v >= low) and (high is None or v <= high))
    return ", ".join(str(v) for v in kept)


def tune_text(trials: Sequence[Trial], total: int) -> str:
    best = best_trial(trials)
    setting = ", ".join(f"{name}={value}" for name, value in best.params.items())
    return (f"{len(trials)}/{total} settings · best mAP **{best.map:.4f}** (P@1 {best.p1:.3f}) "
            f"at `{setting}` · on the {TUNE_PROTOCOL_TEXT}")


# -- galleries ---------------------------------------------------------------------------------
def background_text(session: GallerySession) -> str:
    """One line on the background work of a gallery: what runs now and how much waits."""
    jobs = session.jobs
    if jobs is None:
        return ""
    mine = [job for job in jobs.jobs() if job.key[0] == session.key]
    running = [job for job in mine if job.state == RUNNING]
    waiting = [job for job in mine if job.state == WAITING]
    failed = [job for job in mine if job.state == FAILED]
    if not running and not waiting:
        done = f"Background preparation done ({len(mine) - len(failed)} jobs"
        return done + (f", {len(failed)} failed)." if failed else ").") if mine else ""
    parts = [f"**Preparing in the background** ({len(mine) - len(running) - len(waiting)} of "
             f"{len(mine)} done)"]
    parts += [f"now: {job.describe()}" for job in running]
    if waiting:
        parts.append(f"then {len(waiting)} more: " + ", ".join(job.title for job in waiting[:4])
                     + (", ..." if len(waiting) > 4 else ""))
    return " · ".join(parts)


def header_text(session: GallerySession) -> str:
    gallery = session.gallery
    classes = f", {len(gallery.class_names)} classes" if gallery.labels is not None else ""
    skipped = f" ({len(gallery.skipped)} unreadable files skipped)" if gallery.skipped else ""
    return (f"**{session.title}**{classes}{skipped} · embedded by {session.embedded_by} · "
            f"search: {gallery.index.backend}{search_quality(gallery)} · pick, click or upload "
            "a query to compare the baseline ranking with every re-ranking method.")


def search_quality(gallery: Gallery) -> str:
    """How exact search and the shared kNN graph are: nothing for exact ones, else their
    recall against exact search measured when they were built (a sample of gallery rows)."""
    parts = []
    index = gallery.index
    if not index.exact and index.recall:
        recalls = ", ".join(f"{name} {value:.3f}" for name, value in index.recall.items()
                            if name.startswith("recall@"))
        parts.append(f" (approximate: {recalls} on {index.recall.get('queries', '?')} rows)")
    if gallery.knn is not None and not gallery.knn.canonical:
        recall = ("unmeasured" if gallery.knn.recall is None
                  else f"recall {gallery.knn.recall:.3f} of its {gallery.knn.depth} neighbours")
        parts.append(f" · kNN graph approximate ({recall})")
    return "".join(parts)


def galleries_text(public: PublicUploads | None) -> str:
    """What "open another gallery" explains: what may be opened, and on a public page the
    limits."""
    if public is None:
        return ("Open another gallery: a folder on the server (labels from `labels.csv` or "
                "sub-folders) or an uploaded .zip of images. Indexing is cached: reopening is "
                "instant. A gallery opened from a features file takes query features (a "
                "query/gallery split) below, optionally with revisited Oxford/Paris ground "
                "truth (gnd_*.pkl): its queries then fill the examples and the Compare table "
                "scores them.")
    limits = public.limits
    return (f"Open another gallery: upload a .zip of images (labels from `labels.csv` or "
            f"sub-folders; at most {limits.archive_bytes >> 20} MiB, "
            f"{limits.extracted_bytes >> 20} MiB extracted and {limits.entries:,} files). "
            f"Your uploads are visible to you only, at most {limits.per_session} at a time, "
            "and are deleted when you close this page.")


def attached_text(session: GallerySession) -> str:
    """What attaching query features to a features gallery gave: how many queries, from which
    file, and what scores them."""
    queries = session.query_set
    if queries is None:
        return ""
    count = len(queries.names)
    scored = (f", scored by **{queries.ground_truth}** (the Compare table is the revisited "
              "protocol's, computed in the background or with its button)"
              if queries.ground_truth else
              ", scored by their labels" if queries.labels is not None else
              " (no labels or ground truth: ranked, not scored)")
    return (f"Attached **{count} quer{'y' if count == 1 else 'ies'}** from `{queries.source}` "
            f"to **{session.title}**{scored}. Pick one in the examples list.")


def opened_text(session: GallerySession, show_root: bool = True) -> str:
    """What opening a gallery found; `show_root`: name the server folder (not on a public
    page, whose visitors only know the zip they uploaded)."""
    gallery = session.gallery
    lines = [f"Opened **{session.title}**" + (f" from `{gallery.root}`." if show_root else ".")]
    if gallery.skipped:
        lines.append(f"{len(gallery.skipped)} files were skipped:")
        lines += [f"- `{name}`: {reason}" for name, reason in list(gallery.skipped.items())[:50]]
    return "\n".join(lines)
