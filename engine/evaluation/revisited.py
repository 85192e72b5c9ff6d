"""The revisited Oxford / Paris protocol (Radenović et al. 2018): mAP and mP@k in the easy,
medium and hard settings with junk images removed, and a safe reader of its ground-truth
files. Scored by the same relevance code as every other metric (`metrics.py`)."""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from engine.errors import InvalidInputError
from engine.evaluation.metrics import (
    _average_precision,
    _check_indices,
    _check_n_positives,
    _frozen,
    _mean_kept,
    relevance_from_lists,
)

REVISITED_PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
"""The three settings of the revisited Oxford/Paris protocol, in the order the paper reports
(easy, medium, hard; not the evaluation splits of `protocols.py`)."""


@dataclass(frozen=True)
class RevisitedScores:
    """Revisited Oxford/Paris scores per protocol ("easy", "medium", "hard"), in percent (0-100).

    map: protocol -> mAP (trapezoid AP, junk removed), as revisitop reports it.
    mp_at: protocol -> {kappa: mP@kappa}.
    n_excluded: protocol -> number of queries without positives in that protocol.
    per_query_ap: protocol -> (n_queries,) float64 AP in percent, NaN where excluded.
    n_queries: number of queries.
    """

    map: Mapping[str, float]
    mp_at: Mapping[str, Mapping[int, float]]
    n_excluded: Mapping[str, int]
    per_query_ap: Mapping[str, np.ndarray]
    n_queries: int


def _protocol_lists(gnd: Sequence[Mapping[str, Any]],
                    protocol: str) -> tuple[list[list[int]], list[list[int]]]:
    """Positives and junk of every query under one protocol (Radenovic et al., CVPR 2018)."""
    positives, junk = [], []
    for entry in gnd:
        easy, hard, extra = list(entry["easy"]), list(entry["hard"]), list(entry["junk"])
        if protocol == "easy":
            positives.append(easy)
            junk.append(extra + hard)
        elif protocol == "medium":
            positives.append(easy + hard)
            junk.append(extra)
        else:
            positives.append(hard)
            junk.append(extra + easy)
    return positives, junk


def _check_gnd(gnd: Any, n_queries: int) -> None:
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise InvalidInputError(
            "gnd must be the list of per-query dicts (the 'gnd' entry of the ground-truth file)")
    if len(gnd) != n_queries:
        raise InvalidInputError(
            f"gnd has {len(gnd)} queries but indices has {n_queries} rows")
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or not {"easy", "hard", "junk"} <= set(entry):
            raise InvalidInputError(f"gnd[{i}] must be a dict with keys 'easy', 'hard', 'junk'")


def _revisited_precision(relevant: np.ndarray, kappa: int) -> np.ndarray:
    """mP@kappa as revisitop computes it: kappa is clipped to the position of the last positive.

    For each query, with pos the 1-based positions of its positives after junk removal,
    kq = min(max(pos), kappa) and the score is |pos <= kq| / kq; 0 when no positive was ranked.
    """
    if relevant.shape[1] == 0:
        return np.zeros(relevant.shape[0])
    found = np.cumsum(relevant, axis=1)
    any_found = relevant.any(axis=1)
    last = relevant.shape[1] - np.argmax(relevant[:, ::-1], axis=1)  # 1-based, if any_found
    clipped = np.minimum(last, kappa)
    hits = np.take_along_axis(found, (clipped - 1)[:, None], axis=1)[:, 0]
    return np.where(any_found, hits / clipped, 0.0)


def revisited_map(indices: Any, gnd: Sequence[Mapping[str, Any]],
                  kappas: Sequence[int] = (1, 5, 10)) -> RevisitedScores:
    """The revisited Oxford/Paris evaluation (Radenovic et al., CVPR 2018), as revisitop's
    `compute_map` run for the Easy, Medium and Hard protocols.

    Easy: positives = easy, junk = junk + hard. Medium: positives = easy + hard, junk = junk.
    Hard: positives = hard, junk = junk + easy. Junk is removed from the ranking, AP is the
    trapezoid form over all positives of the query, and mP@kappa clips kappa to the position of
    the last positive (revisitop semantics). A query without positives in a protocol is excluded
    from that protocol's means and counted.

    Args:
        indices: (Q, k) int gallery indices, best first (normally k = the whole database, as in
            revisitop; positives missing from a shorter ranking count as misses).
        gnd: Q dicts with keys 'easy', 'hard', 'junk' (lists of gallery indices), e.g.
            `load_revisitop_gnd(path)["gnd"]`.
        kappas: cut-offs for mP@kappa, each >= 1.

    Returns:
        RevisitedScores with mAP and mP@kappa in percent.
    """
    array = _check_indices(indices)
    _check_gnd(gnd, array.shape[0])
    cutoffs = []
    for kappa in kappas:
        if isinstance(kappa, bool) or not isinstance(kappa, (int, np.integer)) or kappa < 1:
            raise InvalidInputError(f"kappas must be integers >= 1, got {kappa!r}")
        cutoffs.append(int(kappa))
    maps, mp_at, excluded, per_query_ap = {}, {}, {}, {}
    for protocol in REVISITED_PROTOCOLS:
        positives, junk = _protocol_lists(gnd, protocol)
        relevant = relevance_from_lists(array, positives, junk)
        counts = np.array([len(p) for p in positives], dtype=np.int64)
        keep = counts > 0
        ap = _average_precision(relevant, _check_n_positives(counts, relevant), "trapezoid")
        maps[protocol] = 100.0 * _mean_kept(ap, keep)
        mp_at[protocol] = MappingProxyType(
            {kappa: 100.0 * _mean_kept(_revisited_precision(relevant, kappa), keep)
             for kappa in cutoffs})
        excluded[protocol] = int((~keep).sum())
        per_query_ap[protocol] = _frozen(100.0 * ap)
    return RevisitedScores(map=MappingProxyType(maps), mp_at=MappingProxyType(mp_at),
                           n_excluded=MappingProxyType(excluded),
                           per_query_ap=MappingProxyType(per_query_ap),
                           n_queries=int(array.shape[0]))


_SAFE_BUILTINS = frozenset({"dict", "list", "str", "int", "float", "tuple"})


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise InvalidInputError(
            f"refusing to unpickle {module}.{name}: a revisitop ground-truth file holds only "
            "dicts, lists, strings and numbers")


def load_revisitop_gnd(path: str | Path) -> dict[str, Any]:
    """Load a revisitop ground-truth file (gnd_roxford5k.pkl, gnd_rparis6k.pkl) safely.

    The pickle is read with an unpickler that builds only plain containers and numbers, so a
    tampered file cannot run code. The structure is checked.

    Returns:
        {"imlist": list[str] database names, "qimlist": list[str] query names,
         "gnd": list of per-query dicts with "easy", "hard", "junk" (lists of database indices)
         and "bbx" (query box)}.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"ground-truth file {path} does not exist")
    try:
        data = _GroundTruthUnpickler(io.BytesIO(path.read_bytes())).load()
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as error:
        raise InvalidInputError(f"{path} is not a readable ground-truth pickle: {error}") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise InvalidInputError(f"{path} must hold a dict with keys 'imlist', 'qimlist', 'gnd'")
    imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
    if not (isinstance(imlist, list) and isinstance(qimlist, list) and isinstance(gnd, list)):
        raise InvalidInputError(f"{path}: 'imlist', 'qimlist' and 'gnd' must be lists")
    if len(gnd) != len(qimlist):
        raise InvalidInputError(
            f"{path}: {len(gnd)} ground-truth entries for {len(qimlist)} queries")
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{path}: gnd[{i}] is not a dict")
        for key in ("easy", "hard", "junk"):
            items = entry.get(key)
            if not isinstance(items, list) or not all(
                    isinstance(item, int) and 0 <= item < len(imlist) for item in items):
                raise InvalidInputError(
                    f"{path}: gnd[{i}]['{key}'] must be a list of indices into imlist")
    return data


MISSING_SHOWN = 5
"""How many missing names an alignment error lists before it only counts the rest."""


def _positions(expected: Sequence[str], given: Sequence[str], what: str, key: str
               ) -> np.ndarray:
    """For each name of `expected` (the ground truth's `key`), its row among `given` (the
    features file's names), refusing any name that is missing on either side."""
    rows = {name: row for row, name in enumerate(given)}
    missing = [name for name in expected if name not in rows]
    extra = sorted(set(given) - set(expected))
    problems = []
    for names, where in ((missing, f"missing from the {what}"),
                         (extra, f"in the {what} but not in the ground truth's {key!r}")):
        if names:
            shown = ", ".join(repr(name) for name in names[:MISSING_SHOWN])
            more = f" and {len(names) - MISSING_SHOWN} more" if len(names) > MISSING_SHOWN else ""
            problems.append(f"{len(names)} item{'s' if len(names) > 1 else ''} {where}: "
                            f"{shown}{more}")
    if problems:
        raise InvalidInputError(
            f"the {what}'s names do not match the ground truth's {key!r} ({len(expected)} names, "
            f"{len(given)} given): " + "; ".join(problems)
            + " (names must match exactly; their order may differ)")
    return np.array([rows[name] for name in expected], dtype=np.int64)


def align_revisitop_gnd(data: Mapping[str, Any], gallery_names: Sequence[str],
                        query_names: Sequence[str]) -> list[dict[str, list[int]]]:
    """The ground truth's per-query lists for features stored in another order than its own.

    A revisitop file indexes `imlist` and orders its entries as `qimlist`; features files keep
    their own order. Items are matched by name, so that `revisited_map` scores rankings of the
    gallery's rows for the queries' rows.

    Args:
        data: `load_revisitop_gnd(path)`.
        gallery_names: the gallery's item names, the same set as `imlist` in any order.
        query_names: the queries' names, the same set as `qimlist` in any order.

    Returns:
        One dict per query, in `query_names`' order, with 'easy', 'hard', 'junk' as lists of
        gallery rows.

    Raises:
        InvalidInputError: naming the items missing on either side.
    """
    gallery_rows = _positions(data["imlist"], gallery_names, "gallery", "imlist")
    query_rows = _positions(data["qimlist"], query_names, "queries", "qimlist")
    entries: list[dict[str, list[int]]] = [{}] * len(query_rows)
    for entry, row in zip(data["gnd"], query_rows, strict=True):
        entries[int(row)] = {key: gallery_rows[np.asarray(entry[key], dtype=np.int64)].tolist()
                             for key in ("easy", "hard", "junk")}
    return entries
