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

from engine.core.storage import atomic_write_json, fingerprint, load_json
from engine.errors import CacheError, InvalidInputError
from engine.evaluation.metrics import (
    _average_precision,
    _check_indices,
    _check_n_positives,
    _frozen,
    _mean_kept,
    relevance_from_lists,
)
from engine.evaluation.paired import holm_adjusted_by_key, paired_comparison

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


GROUND_TRUTH_FORMATS = frozenset({".pkl"})
"""The suffix of a revisited Oxford/Paris ground-truth file (gnd_roxford5k.pkl style), which
`load_revisitop_gnd` reads."""
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
        possessive = "'" if what.endswith("s") else "'s"
        raise InvalidInputError(
            f"the {what}{possessive} names do not match the ground truth's {key!r} "
            f"({len(expected)} names, "
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


def ground_truth_for(data: Mapping[str, Any], gallery_names: Sequence[str],
                     query_names: Sequence[str], source: str = "the ground truth"
                     ) -> list[dict[str, list[int]]]:
    """`align_revisitop_gnd` after checking the counts first, so that a ground truth made for
    another gallery or query set says so plainly (with both numbers) before naming items.

    Args:
        data: `load_revisitop_gnd(path)`. source: what the messages call it (its file name).
        gallery_names, query_names: the gallery's and the queries' item names.

    Raises:
        InvalidInputError: a count or a name that does not match.
    """
    for key, names, what in (("qimlist", query_names, "queries"),
                             ("imlist", gallery_names, "gallery items")):
        if len(data[key]) != len(names):
            raise InvalidInputError(
                f"{source} has {len(data[key])} {what} ({key!r}) but {len(names)} were given: "
                f"it belongs to another {'query set' if key == 'qimlist' else 'gallery'}")
    return align_revisitop_gnd(data, gallery_names, query_names)


@dataclass(frozen=True)
class QueryGroundTruthScore:
    """One query's ranking scored by its revisited ground truth in one protocol.

    ap: AP in [0, 1] (trapezoid, junk removed: its term in `revisited_map`'s mAP), NaN when
        the protocol gives the query no positives. precision: the fraction of positives among
        the first `top_n` places once junk is removed. n_positives: the protocol's positives.
    hits: (k,) bool in the ranking's own order (junk included), True at a positive; junk: the
        same for junk items (neither hit nor miss), for the page's marks.
    """

    ap: float
    precision: float
    n_positives: int
    hits: np.ndarray
    junk: np.ndarray


def score_query(indices: Any, entry: Mapping[str, Any], protocol: str = "medium",
                top_n: int = 10) -> QueryGroundTruthScore:
    """Score one query's ranking (k,) of gallery rows by its ground-truth `entry` ('easy',
    'hard', 'junk' lists of gallery rows) under `protocol`, with the code `revisited_map` uses,
    so that the AP is this query's term in the table's mAP (for the same ranking depth)."""
    if protocol not in REVISITED_PROTOCOLS:
        raise InvalidInputError(f"protocol must be one of {', '.join(REVISITED_PROTOCOLS)}, "
                                f"got {protocol!r}")
    row = _check_indices(np.asarray(indices).reshape(1, -1))
    _check_gnd([entry], 1)
    positives, junk = _protocol_lists([entry], protocol)
    relevant = relevance_from_lists(row, positives, junk)
    count = np.array([len(positives[0])], dtype=np.int64)
    ap = float(_average_precision(relevant, _check_n_positives(count, relevant),
                                  "trapezoid")[0])
    shown = relevant[0, :max(1, min(int(top_n), relevant.shape[1]))]
    return QueryGroundTruthScore(
        ap=ap, precision=float(shown.mean()), n_positives=int(count[0]),
        hits=np.isin(row[0], np.asarray(positives[0], np.int64)),
        junk=np.isin(row[0], np.asarray(junk[0], np.int64)))


@dataclass(frozen=True)
class RevisitedRun:
    """One method's revisited scores on a gallery and query set, as the Compare table shows
    them: the method, its parameters, its `RevisitedScores` (percent) and the seconds its
    batch ranking of the queries took."""

    method: str
    params: dict[str, Any]
    scores: RevisitedScores
    batch_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None, cut-offs as strings)."""
        scores = self.scores

        def number(value: float) -> float | None:
            return None if not np.isfinite(value) else float(value)

        return {"method": self.method, "params": dict(self.params),
                "batch_seconds": float(self.batch_seconds),
                "map": {p: number(v) for p, v in scores.map.items()},
                "mp_at": {p: {str(k): number(v) for k, v in cut.items()}
                          for p, cut in scores.mp_at.items()},
                "n_excluded": dict(scores.n_excluded), "n_queries": scores.n_queries,
                "per_query_ap": {p: [number(v) for v in ap.tolist()]
                                 for p, ap in scores.per_query_ap.items()}}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> RevisitedRun:
        """The run `to_dict` wrote; KeyError, TypeError or ValueError when it is not one."""
        def number(value: Any) -> float:
            return float("nan") if value is None else float(value)

        scores = RevisitedScores(
            map=MappingProxyType({p: number(stored["map"][p]) for p in REVISITED_PROTOCOLS}),
            mp_at=MappingProxyType({p: MappingProxyType(
                {int(k): number(v) for k, v in stored["mp_at"][p].items()})
                for p in REVISITED_PROTOCOLS}),
            n_excluded=MappingProxyType({p: int(stored["n_excluded"][p])
                                         for p in REVISITED_PROTOCOLS}),
            per_query_ap=MappingProxyType({p: _frozen(np.array(
                [number(v) for v in stored["per_query_ap"][p]], np.float64))
                for p in REVISITED_PROTOCOLS}),
            n_queries=int(stored["n_queries"]))
        return cls(str(stored["method"]), dict(stored["params"]), scores,
                   float(stored["batch_seconds"]))


REVISITED_SCORES_FILE = "revisited-scores.json"


class RevisitedCache:
    """Revisited runs by (gallery fingerprint, query set fingerprint, method, parameters) in
    `folder/revisited-scores.json`, beside the gallery's `scores.json` (`ScoreCache`): a
    damaged file reads as empty and is replaced on the next write; writes are atomic."""

    def __init__(self, folder: Path, gallery_fingerprint: str, queries_fingerprint: str
                 ) -> None:
        self.path = Path(folder) / REVISITED_SCORES_FILE
        self.fingerprints = [gallery_fingerprint, queries_fingerprint]

    def key(self, method: str, params: Mapping[str, Any]) -> str:
        return fingerprint([*self.fingerprints, method, dict(params)])

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            stored = load_json(self.path)
        except CacheError:
            return {}
        return stored if isinstance(stored, dict) else {}

    def get(self, method: str, params: Mapping[str, Any]) -> RevisitedRun | None:
        entry = self._read().get(self.key(method, params))
        try:
            return None if entry is None else RevisitedRun.from_dict(entry)
        except (KeyError, TypeError, ValueError, AttributeError):  # another version's entry
            return None

    def put(self, run: RevisitedRun) -> None:
        stored = self._read()
        stored[self.key(run.method, run.params)] = run.to_dict()
        atomic_write_json(self.path, stored)


REVISITED_TABLE_KAPPAS = (1, 5, 10)
REVISITED_PAIRED = ("medium", "hard")
"""The settings whose mAP difference from the baseline the table tests (the revisited papers
report Medium and Hard)."""
REVISITED_TABLE_COLUMNS: tuple[str, ...] = (
    "method",
    *(f"{protocol[0].upper()} {what}" for protocol in REVISITED_PROTOCOLS
      for what in ("mAP", *(f"mP@{kappa}" for kappa in REVISITED_TABLE_KAPPAS))),
    *(f"{protocol[0].upper()} {what}" for protocol in REVISITED_PAIRED
      for what in ("mAP - baseline", "difference 95 % interval", "p (Holm)")),
    "queries", "batch s", "parameters")
"""Headers of `revisited_table`'s columns: per setting (E, M, H) mAP and mP@1/5/10, then per
tested setting (M, H) the paired difference from the baseline."""


def revisited_table(runs: Sequence[RevisitedRun], titles: Mapping[str, str],
                    baseline: str | None = None) -> list[list[Any]]:
    """Rows for a table (`REVISITED_TABLE_COLUMNS`): the method's title, per setting mAP and
    mP@1/5/10 in percent (2 decimals; blank where no query has positives), per tested setting
    the mAP difference from the run named `baseline` on the same queries (percent points),
    its 95 % paired bootstrap interval and randomisation p-value, Holm-adjusted over the
    methods in the table (blank for the baseline, or without one), the queries scored (those
    without positives in a setting named), batch seconds and the parameters."""
    def rounded(value: float | None) -> float | None:
        return None if value is None or not np.isfinite(value) else round(float(value), 2)

    paired = _paired_with(runs, baseline)
    rows = []
    for index, run in enumerate(runs):
        scores = run.scores
        row: list[Any] = [titles.get(run.method, run.method)]
        for protocol in REVISITED_PROTOCOLS:
            row += [rounded(scores.map[protocol]),
                    *(rounded(scores.mp_at[protocol].get(kappa, float("nan")))
                      for kappa in REVISITED_TABLE_KAPPAS)]
        for protocol in REVISITED_PAIRED:
            found = paired[protocol].get(index)
            if found is None:
                row += [None, "-", None]
            else:
                compared, adjusted = found
                row += [rounded(compared.difference),
                        f"{compared.low:+.2f} to {compared.high:+.2f}",
                        round(float(adjusted), 4)]
        left_out = [f"{count} without positives in {protocol}"
                    for protocol, count in scores.n_excluded.items() if count]
        row += [f"{scores.n_queries}" + (f" ({'; '.join(left_out)})" if left_out else ""),
                round(run.batch_seconds, 3),
                ", ".join(f"{name}={value}" for name, value in run.params.items()) or "-"]
        rows.append(row)
    return rows


def _paired_with(runs: Sequence[RevisitedRun], baseline: str | None
                 ) -> dict[str, dict[int, tuple[Any, float]]]:
    """Per tested setting, each non-baseline run's `PairedComparison` against the baseline run
    (its per-query APs, percent) with its Holm-adjusted p-value, by run index."""
    found: dict[str, dict[int, tuple[Any, float]]] = {protocol: {} for protocol in
                                                      REVISITED_PAIRED}
    reference = next((run for run in runs if run.method == baseline), None)
    if reference is None:
        return found
    for protocol in REVISITED_PAIRED:
        compared = {}
        for index, run in enumerate(runs):
            if run is reference:
                continue
            ap, base = run.scores.per_query_ap[protocol], reference.scores.per_query_ap[protocol]
            if ap.shape == base.shape and (np.isfinite(ap) & np.isfinite(base)).any():
                compared[index] = paired_comparison(ap, base)
        adjusted = holm_adjusted_by_key({index: result.p_value
                                         for index, result in compared.items()})
        found[protocol] = {index: (result, adjusted[index])
                           for index, result in compared.items()}
    return found

