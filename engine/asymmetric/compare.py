"""A query model's search scored on a gallery, for the Compare table of an asymmetric query
model: each gallery item, embedded by the query model, is a query against the other items
(the gallery model's features), as the leave-one-out scores of the symmetric rows are.

So SSP, its closed-form baselines (Procrustes, ridge) and the symmetric lite0 and lite2 rows
stand side by side on the user's own gallery. The query models learnt from the gallery's
images (labels unused), so these are in-sample numbers; the asymmetric benchmark
(`engine.bench.asymmetric`, oxford17-heldout) scores images of classes they never saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.types import check_features
from engine.errors import InvalidInputError
from engine.evaluation.scores import (
    LeaveOneOutRankings,
    MethodScores,
    ScoreCache,
    score_rankings,
    time_online,
    timing_queries,
)

if TYPE_CHECKING:
    from engine.search.gallery import Gallery


def query_model_scores(gallery: Gallery, label: str, params: Mapping[str, Any],
                       queries: Callable[[np.ndarray], np.ndarray], *, depth: int,
                       rows: np.ndarray | None = None, timing_depth: int = 10,
                       cached_only: bool = False) -> MethodScores | None:
    """Leave-one-out scores of the gallery's search (the baseline) with another query model's
    queries, cached beside the gallery's other scores under `label` and `params`.

    Args:
        gallery: a labelled gallery (None is returned without labels).
        label: the row's name (the Compare table shows it as the method).
        params: what identifies the query model (its state's fingerprint, its settings).
        queries: (len(rows),) gallery rows -> their (n, d) query features in the gallery's
            space, embedded by the query model.
        depth: how many results each ranking keeps (the gallery size - 1 for full rankings).
        rows: the gallery rows that are queries (None: every item; else a fixed sample, as the
            symmetric rows of a large gallery).
        timing_depth: results of the timed online searches.
        cached_only: return None instead of computing missing scores.
    """
    cache = ScoreCache(gallery.cache_dir, gallery.fingerprint)
    stored = cache.get(label, params)
    if stored is not None or cached_only or gallery.labels is None:
        return stored
    query_rows = (np.arange(gallery.size, dtype=np.int64) if rows is None
                  else np.asarray(rows, np.int64))
    features = check_features(queries(query_rows), f"{label}: query features",
                              int(gallery.meta.dim), unit_norm=False)
    if len(features) != len(query_rows):
        raise InvalidInputError(f"{len(query_rows)} query rows but {len(features)} query features")
    started = time.perf_counter()
    result = gallery.search(features, min(depth + 1, gallery.size))
    seconds = time.perf_counter() - started
    indices, distances = _without_own_rows(result.indices, result.distances, query_rows, depth)
    online = time_online(lambda query: gallery.search(query, min(timing_depth, gallery.size)),
                         timing_queries(features))
    scores = score_rankings(label, params, LeaveOneOutRankings(indices, distances, seconds),
                            gallery.labels, online, query_rows=rows,
                            gallery_size=None if rows is None else gallery.size)
    cache.put(scores)
    return scores


def _without_own_rows(indices: np.ndarray, distances: np.ndarray, own: np.ndarray, depth: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own gallery row wherever it landed (another model's feature of the
    same image is not the gallery's row, so it need not come first); keep `depth` columns."""
    keep = indices != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]
    return (np.take_along_axis(indices, order, axis=1).astype(np.int64),
            np.take_along_axis(distances, order, axis=1).astype(np.float32))
