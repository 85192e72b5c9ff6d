"""Retrieval metrics as pure numpy functions: AP and mAP, precision/recall@k, CMC (the revisited
Oxford/Paris protocol is in `revisited.py`, on the same relevance matrices).

Conventions:
- A ranking `indices` is an (n_queries, k) integer array of gallery indices, best first, unique
  per row (the engine's result convention).
- Relevance comes either from labels (gallery j is relevant to query i iff their labels are equal,
  `relevance_from_labels`) or from per-query lists of positive and junk gallery indices
  (`relevance_from_lists`). Both give a boolean (n_queries, k) matrix `relevant` that every metric
  reads, so labels and explicit ground truth are scored by the same code.
- `n_positives` is the total number of relevant gallery items of each query, not only those in the
  ranking: positives missing from a truncated ranking count as misses.
- A query without positives has no defined AP or recall: it gets NaN and is excluded from every
  mean, and the number excluded is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from engine.errors import InvalidInputError

__all__ = [
    "ApMode",
    "MeanAveragePrecision",
    "RetrievalScores",
    "average_precision",
    "cmc",
    "evaluate",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "relevance_from_labels",
    "relevance_from_lists",
]

ApMode = Literal["step", "trapezoid"]
AP_MODES: tuple[str, ...] = ("step", "trapezoid")



# -- result types ------------------------------------------------------------------------------
def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class MeanAveragePrecision:
    """mAP over the queries that have positives.

    value: mean AP in [0, 1] (NaN when no query has positives).
    n_excluded: number of queries without positives (their AP is NaN).
    per_query: (n_queries,) float64 AP of every query, NaN where excluded.
    """

    value: float
    n_excluded: int
    per_query: np.ndarray


@dataclass(frozen=True)
class RetrievalScores:
    """Scores of a ranking against labels; fractions in [0, 1], means over non-excluded queries.

    map: mean average precision.
    precision_at: k -> mean precision@k.
    recall_at: k -> mean recall@k (fraction of a query's positives found in its top k; the
        metric-learning "Recall@K", a hit in the top K, is `cmc[K - 1]`).
    cmc: (k,) float64, cmc[r - 1] = fraction of queries whose first positive is at rank <= r.
    n_queries: number of queries scored, excluded ones included.
    n_excluded: queries without positives, left out of every mean.
    per_query_ap: (n_queries,) float64, NaN for excluded queries.
    """

    map: float
    precision_at: Mapping[int, float]
    recall_at: Mapping[int, float]
    cmc: np.ndarray
    n_queries: int
    n_excluded: int
    per_query_ap: np.ndarray


# -- input checks ------------------------------------------------------------------------------
def _check_indices(indices: Any, n_gallery: int | None = None) -> np.ndarray:
    """Validate a ranking: (Q, k) integer, non-negative, < n_gallery, unique per row -> int64."""
    array = np.asarray(indices)
    if array.ndim != 2:
        raise InvalidInputError(
            f"indices must be a 2-D (n_queries, k) array, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"indices must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise InvalidInputError(
                f"indices contain {low}: a ranking must hold valid gallery indices only "
                "(search with k <= the gallery size instead of padding with -1)")
        if n_gallery is not None and high >= n_gallery:
            raise InvalidInputError(
                f"indices contain {high} but the gallery has only {n_gallery} items")
        ordered = np.sort(array, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if repeated.any():
            rows = np.flatnonzero(repeated)
            raise InvalidInputError(
                f"indices repeat a gallery item within rows {rows[:10].tolist()}"
                f"{' ...' if rows.size > 10 else ''}; each item may appear once per ranking")
    return array


def _check_relevant(relevant: Any) -> np.ndarray:
    """Validate a (Q, k) relevance matrix -> bool."""
    array = np.asarray(relevant)
    if array.ndim != 2:
        raise InvalidInputError(
            f"relevant must be a 2-D (n_queries, k) array, got shape {array.shape}")
    if array.dtype != np.bool_:
        numeric = np.issubdtype(array.dtype, np.number)
        if array.size and not (numeric and np.isin(array, (0, 1)).all()):
            raise InvalidInputError("relevant must be boolean (or 0/1), one column per rank")
        array = array.astype(bool)
    return array


def _check_mode(mode: Any) -> None:
    if mode not in AP_MODES:
        raise InvalidInputError(f"mode must be one of {AP_MODES}, got {mode!r}")


def _check_k(k: Any, length: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {k!r}")
    if k < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {k}")
    if k > length:
        raise InvalidInputError(
            f"{name}={k} exceeds the ranking length {length}; retrieve at least {k} results")
    return int(k)


def _check_n_positives(n_positives: Any, relevant: np.ndarray) -> np.ndarray:
    """Validate per-query positive counts against a (Q, k) relevance matrix -> (Q,) int64."""
    n_queries = relevant.shape[0]
    array = np.asarray(n_positives)
    if array.ndim == 0:
        array = np.full(n_queries, array)
    if array.shape != (n_queries,):
        raise InvalidInputError(
            f"n_positives must have one value per query ({n_queries}), got shape {array.shape}")
    if array.size:
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
            raise InvalidInputError(f"n_positives must be integers, got dtype {array.dtype}")
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise InvalidInputError("n_positives must hold whole numbers")
        if array.min() < 0:
            raise InvalidInputError(f"n_positives must be >= 0, got {array.min()}")
    array = array.astype(np.int64)
    found = relevant.sum(axis=1)
    short = np.flatnonzero(array < found)
    if short.size:
        i = int(short[0])
        raise InvalidInputError(
            f"n_positives[{i}]={array[i]} is smaller than the {found[i]} relevant items already "
            f"in query {i}'s ranking; it must count every relevant gallery item")
    return array


def _check_labels(query_labels: Any, gallery_labels: Any,
                  n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    queries, gallery = np.asarray(query_labels), np.asarray(gallery_labels)
    for name, array in (("query_labels", queries), ("gallery_labels", gallery)):
        if array.ndim != 1:
            raise InvalidInputError(f"{name} must be 1-D, got shape {array.shape}")
    if queries.shape[0] != n_queries:
        raise InvalidInputError(
            f"query_labels has {queries.shape[0]} entries but indices has {n_queries} rows")
    kinds = {_label_kind(queries, "query_labels"), _label_kind(gallery, "gallery_labels")}
    if len(kinds) > 1 and queries.size and gallery.size:
        raise InvalidInputError(
            f"query_labels ({queries.dtype}) and gallery_labels ({gallery.dtype}) are of "
            "different kinds; use integers for both or strings for both")
    return queries, gallery


def _label_kind(labels: np.ndarray, name: str) -> str:
    if labels.dtype.kind in "biuf":
        return "number"
    if labels.dtype.kind in "US":
        return "string"
    raise InvalidInputError(
        f"{name} must hold integers or strings, got dtype {labels.dtype}")


# -- relevance ---------------------------------------------------------------------------------
def relevance_from_labels(indices: Any, query_labels: Any, gallery_labels: Any) -> np.ndarray:
    """Which ranked items share the query's label.

    Args:
        indices: (Q, k) int gallery indices, best first.
        query_labels: (Q,) int or str labels of the queries.
        gallery_labels: (G,) labels of the gallery, same kind as `query_labels`.

    Returns:
        (Q, k) bool, True where the ranked item's label equals the query's.
    """
    gallery = np.asarray(gallery_labels)
    array = _check_indices(indices, gallery.shape[0] if gallery.ndim == 1 else None)
    queries, gallery = _check_labels(query_labels, gallery, array.shape[0])
    return gallery[array] == queries[:, None]


def _count_positives(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q,) int64 number of gallery items carrying each query's label."""
    if gallery_labels.size == 0 or query_labels.size == 0:
        return np.zeros(query_labels.shape[0], dtype=np.int64)
    values, counts = np.unique(gallery_labels, return_counts=True)
    slots = np.clip(np.searchsorted(values, query_labels), 0, values.size - 1)
    return np.where(values[slots] == query_labels, counts[slots], 0).astype(np.int64)


def _index_lists(lists: Sequence[Iterable[int]] | None, n_queries: int,
                 name: str) -> list[np.ndarray]:
    if lists is None:
        return [np.empty(0, dtype=np.int64)] * n_queries
    if isinstance(lists, (str, bytes)) or len(lists) != n_queries:
        raise InvalidInputError(f"{name} must hold one list of gallery indices per query "
                                f"({n_queries})")
    arrays = []
    for i, items in enumerate(lists):
        if not isinstance(items, (Iterable, np.ndarray)) or isinstance(items, (str, bytes)):
            raise InvalidInputError(f"{name}[{i}] must be a list of gallery indices, got "
                                    f"{type(items).__name__}")
        array = np.asarray(items if isinstance(items, np.ndarray) else list(items))
        if array.size == 0:
            arrays.append(np.empty(0, dtype=np.int64))
            continue
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
            raise InvalidInputError(
                f"{name}[{i}] must be a flat list of non-negative integer gallery indices")
        arrays.append(array.astype(np.int64))
    return arrays


def _membership(indices: np.ndarray, arrays: list[np.ndarray], span: int) -> np.ndarray:
    """(Q, k) bool: indices[i, r] is in arrays[i]. Vectorised by encoding (row, item) pairs."""
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), [a.size for a in arrays])
    items = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    ranked = np.arange(indices.shape[0], dtype=np.int64)[:, None] * span + indices
    return np.isin(ranked, rows * span + items)


def relevance_from_lists(indices: Any, positives: Sequence[Iterable[int]],
                         junk: Sequence[Iterable[int]] | None = None) -> np.ndarray:
    """Relevance from explicit per-query ground truth, with junk items removed from the ranking.

    Junk items (e.g. the query itself, or images too ambiguous to score) are dropped and the items
    after them move up, as in the Oxford/Paris protocols; each row is padded at its end with
    False for the removed places, so the matrix keeps its (Q, k) shape.

    Args:
        indices: (Q, k) int gallery indices, best first.
        positives: Q sequences of relevant gallery indices.
        junk: None, or Q sequences of gallery indices to ignore; disjoint from `positives`.

    Returns:
        (Q, k) bool, True where the item at that place (after junk removal) is a positive.
    """
    array = _check_indices(indices)
    n_queries = array.shape[0]
    positive_lists = _index_lists(positives, n_queries, "positives")
    junk_lists = _index_lists(junk, n_queries, "junk")
    span = 1 + max([int(array.max(initial=-1))]
                   + [int(a.max()) for a in positive_lists + junk_lists if a.size])
    overlap = [i for i, (p, j) in enumerate(zip(positive_lists, junk_lists, strict=True))
               if j.size and np.isin(p, j).any()]
    if overlap:
        raise InvalidInputError(
            f"queries {overlap[:10]} list the same gallery item as positive and as junk")
    relevant = _membership(array, positive_lists, span)
    if junk is None:
        return relevant
    is_junk = _membership(array, junk_lists, span)
    order = np.argsort(is_junk, axis=1, kind="stable")  # kept items first, in ranking order
    return np.take_along_axis(relevant & ~is_junk, order, axis=1)


# -- per-query metrics -------------------------------------------------------------------------
def average_precision(ranked_relevant: Any, n_positives: Any,
                      mode: ApMode = "step") -> float | np.ndarray:
    """Average precision of one ranking (k,) or of each row of (Q, k).

    "step": the standard AP, sum over relevant positions of precision@position, divided by
    `n_positives`. "trapezoid": the Oxford/Paris form (cirtorch/revisitop `compute_ap`), which
    averages, at each relevant position r (0-based, j positives before it), precision_0 = 1 if
    r == 0 else j / r and precision_1 = (j + 1) / (r + 1), each step weighing 1 / n_positives.

    Args:
        ranked_relevant: (k,) or (Q, k) bool, True at ranking positions holding a positive.
        n_positives: int or (Q,) ints, total positives per query (>= those in the ranking), so a
            positive missing from a truncated ranking counts as zero precision.
        mode: "step" or "trapezoid".

    Returns:
        float for a (k,) input, (Q,) float64 otherwise; NaN where n_positives == 0.
    """
    _check_mode(mode)
    array = np.asarray(ranked_relevant)
    single = array.ndim == 1
    relevant = _check_relevant(array[None, :] if single else array)
    counts = _check_n_positives(
        np.reshape(n_positives, (1,)) if single and np.ndim(n_positives) == 0 else n_positives,
        relevant)
    scores = _average_precision(relevant, counts, mode)
    return float(scores[0]) if single else scores


def _average_precision(relevant: np.ndarray, n_positives: np.ndarray, mode: str) -> np.ndarray:
    hit = relevant.astype(np.float64)
    found = np.cumsum(hit, axis=1)  # positives up to and including each position
    ranks = np.arange(relevant.shape[1], dtype=np.float64)  # 0-based positions
    precision = found / (ranks + 1)
    if mode == "step":
        gain = hit * precision
    else:
        before = np.broadcast_to(found - hit, hit.shape)
        precision_0 = np.divide(before, ranks, out=np.ones_like(hit),
                                where=np.broadcast_to(ranks > 0, hit.shape))
        gain = hit * (precision_0 + precision) / 2
    total = gain.sum(axis=1)
    scores = np.full(relevant.shape[0], np.nan)
    has = n_positives > 0
    scores[has] = total[has] / n_positives[has]
    return scores


def precision_at_k(relevant: Any, k: int) -> np.ndarray:
    """Fraction of the top k that is relevant.

    Args:
        relevant: (Q, K) bool relevance of each ranking position; k <= K.
        k: cut-off.

    Returns:
        (Q,) float64 in [0, 1].
    """
    array = _check_relevant(relevant)
    k = _check_k(k, array.shape[1])
    return array[:, :k].sum(axis=1) / k


def recall_at_k(relevant: Any, k: int, n_positives: Any) -> np.ndarray:
    """Fraction of each query's positives found in its top k.

    Args:
        relevant: (Q, K) bool relevance of each ranking position; k <= K.
        k: cut-off.
        n_positives: (Q,) ints, total positives per query.

    Returns:
        (Q,) float64 in [0, 1]; NaN for queries without positives.
    """
    array = _check_relevant(relevant)
    k = _check_k(k, array.shape[1])
    counts = _check_n_positives(n_positives, array)
    found = array[:, :k].sum(axis=1).astype(np.float64)
    return np.divide(found, counts, out=np.full(found.shape, np.nan), where=counts > 0)


def cmc(relevant: Any, k: int | None = None, n_positives: Any = None) -> np.ndarray:
    """Cumulative match characteristic: share of queries whose first positive is at rank <= r.

    Args:
        relevant: (Q, K) bool relevance of each ranking position.
        k: length of the curve (default K).
        n_positives: optional (Q,) ints; queries with 0 positives are left out of the curve.

    Returns:
        (k,) float64 non-decreasing, entry r - 1 for rank r; all NaN when no query is counted.
    """
    array = _check_relevant(relevant)
    k = array.shape[1] if k is None else _check_k(k, array.shape[1])
    if n_positives is not None:
        array = array[_check_n_positives(n_positives, array) > 0]
    if array.shape[0] == 0:
        return np.full(k, np.nan)
    matched = np.logical_or.accumulate(array[:, :k], axis=1)
    return matched.mean(axis=0)


# -- label-based evaluation --------------------------------------------------------------------
def _mean_kept(values: np.ndarray, keep: np.ndarray) -> float:
    return float(values[keep].mean()) if keep.any() else float("nan")


def _labels_relevance(indices: Any, query_labels: Any, gallery_labels: Any,
                      n_positives: Any) -> tuple[np.ndarray, np.ndarray]:
    relevant = relevance_from_labels(indices, query_labels, gallery_labels)
    if n_positives is None:
        n_positives = _count_positives(np.asarray(query_labels), np.asarray(gallery_labels))
    return relevant, _check_n_positives(n_positives, relevant)


def mean_average_precision(indices: Any, query_labels: Any, gallery_labels: Any, *,
                           n_positives: Any = None,
                           mode: ApMode = "step") -> MeanAveragePrecision:
    """mAP of rankings against labels, leaving out (and counting) queries without positives.

    Args:
        indices: (Q, k) int gallery indices, best first.
        query_labels: (Q,) labels; gallery_labels: (G,) labels of the same kind.
        n_positives: optional (Q,) ints overriding the count of relevant gallery items per query
            (e.g. 79 for an Oxford-17 image scored leave-one-out in its class of 80). Default: the
            number of gallery items with the query's label.
        mode: "step" (standard AP) or "trapezoid" (Oxford/Paris form).
    """
    _check_mode(mode)
    relevant, counts = _labels_relevance(indices, query_labels, gallery_labels, n_positives)
    per_query = _average_precision(relevant, counts, mode)
    keep = counts > 0
    return MeanAveragePrecision(value=_mean_kept(per_query, keep),
                                n_excluded=int((~keep).sum()), per_query=_frozen(per_query))


def evaluate(indices: Any, query_labels: Any, gallery_labels: Any,
             ks: Sequence[int] = (1, 5, 10), n_positives: Any = None, *,
             mode: ApMode = "step") -> RetrievalScores:
    """Score rankings against labels: mAP, precision@k, recall@k and CMC.

    Queries without positives are excluded from every mean and counted in `n_excluded`.

    Args:
        indices: (Q, K) int gallery indices, best first; every k in `ks` must be <= K.
        query_labels: (Q,) labels; gallery_labels: (G,) labels of the same kind.
        ks: cut-offs for precision and recall.
        n_positives: optional (Q,) ints overriding the number of relevant gallery items per
            query (see `mean_average_precision`).
        mode: AP interpolation, "step" or "trapezoid".
    """
    _check_mode(mode)
    relevant, counts = _labels_relevance(indices, query_labels, gallery_labels, n_positives)
    cutoffs = [_check_k(k, relevant.shape[1], "each of ks") for k in ks]
    keep = counts > 0
    per_query = _average_precision(relevant, counts, mode)
    kept = relevant[keep]
    precision = {k: _mean_kept(precision_at_k(relevant, k), keep) for k in cutoffs}
    recall = {k: _mean_kept(recall_at_k(relevant, k, counts), keep) for k in cutoffs}
    return RetrievalScores(
        map=_mean_kept(per_query, keep),
        precision_at=MappingProxyType(precision),
        recall_at=MappingProxyType(recall),
        cmc=_frozen(cmc(kept)),
        n_queries=int(relevant.shape[0]),
        n_excluded=int((~keep).sum()),
        per_query_ap=_frozen(per_query),
    )


