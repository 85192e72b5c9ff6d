"""Parameter sweeps on a labelled gallery, and per-gallery parameter presets.

A sweep runs one method over a grid of parameter values on a fixed query split of the gallery
(batch mode, as the method's authors evaluate it) and scores each setting; `SweepRun` runs one in
a background thread that a page can read as it goes and cancel. The best setting can
be saved as the gallery's preset: a small JSON next to the gallery cache (`presets.json`), which
overrides a `presets.json` shipped inside the gallery folder. Presets are validated through the
method's parameter dataclass, so a preset outside the declared ranges is refused, not used.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.storage import atomic_write_json, load_json
from engine.errors import CacheError, InvalidInputError
from engine.evaluation.protocols import make_split
from engine.evaluation.scores import run_split, split_context
from engine.rerank import create_reranker, get_reranker_class

logger = logging.getLogger(__name__)

PRESETS_FILE = "presets.json"
KNN_DEPTH = 64
"""Depth of the gallery kNN graph a sweep computes once for all its trials."""
MAX_TRIALS = 400


@dataclass(frozen=True)
class Trial:
    """One setting of a sweep: the full parameters, mAP, P@1 and the batch seconds it took."""

    params: dict[str, Any]
    map: float
    p1: float
    seconds: float


def sweep(name: str, grid: Mapping[str, Sequence[float]], features: np.ndarray,
          labels: np.ndarray, protocol: str = "oxford17-split",
          base: Mapping[str, Any] | None = None,
          progress: Callable[[int, int], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_trial: Callable[[Trial], None] | None = None,
          device: str = "cpu") -> list[Trial]:
    """Score `name` at every combination of `grid` values on a fixed split of the collection.

    Args:
        grid: parameter name -> values (one or two names for the page's plots, any number here).
        features, labels: the labelled collection, rows in file order.
        protocol: how queries and gallery are drawn (`engine.evaluation.protocols`).
        base: parameters held fixed (default: the method's defaults).
        progress: called with (trials done, trials in all) after each trial.
        should_stop: polled between trials; when it returns True the sweep ends early and
            returns the trials done so far (cancel).
        on_trial: called with each finished trial (for live plots).
        device: where each trial's re-ranker runs ("auto", "cpu", "cuda").
    Returns:
        One Trial per setting tried, in grid order.
    """
    cls = get_reranker_class(name)
    cls.Params.check_names(name, set(grid) | set(base or {}))
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise InvalidInputError("a sweep needs at least one value for each swept parameter")
    combinations = list(itertools.product(*grid.values()))
    if len(combinations) > MAX_TRIALS:
        raise InvalidInputError(f"{len(combinations)} settings requested; at most {MAX_TRIALS}")
    split = make_split(protocol, labels)
    context, queries = split_context(features, labels, split, knn_depth=KNN_DEPTH,
                                     offer_training=False)
    trials: list[Trial] = []
    for done, values in enumerate(combinations, start=1):
        if should_stop is not None and should_stop():
            logger.info("sweep of %s stopped after %d of %d settings", name, done - 1,
                        len(combinations))
            break
        params = {**(base or {}), **dict(zip(grid, values, strict=True))}
        reranker = create_reranker(name, device=device, **params).fit(context)
        run = run_split(reranker, split, labels, queries, ks=(1,))
        trials.append(Trial(reranker.params.as_dict(), run.scores.map,
                            run.scores.precision_at[1], run.seconds))
        if on_trial is not None:
            on_trial(trials[-1])
        if progress is not None:
            progress(done, len(combinations))
    return trials


@dataclass(frozen=True)
class SweepProgress:
    """How far a `SweepRun` is: `done` of `total` settings finished."""

    done: int
    total: int


class SweepRun:
    """`sweep` in a background thread (named "sweep-<method>"), read as a stream of events,
    and cancellable.

    Iterating starts the thread and yields, per finished setting, its `Trial` and then a
    `SweepProgress`; it ends when the sweep does. An error the sweep raises (a bad grid, a value
    outside a parameter's range) is raised by the iteration. `cancel()` (from any thread) stops
    the sweep after the setting in progress; leaving the iteration early (break, `close()` of a
    generator reading it, an exception) cancels too, so a page whose event is cancelled stops
    the thread by closing its generator. A run is iterated once.

    Args: as `sweep` (less its callbacks).
    """

    def __init__(self, name: str, grid: Mapping[str, Sequence[float]], features: np.ndarray,
                 labels: np.ndarray, protocol: str = "oxford17-split",
                 base: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        self.name = name
        self.total = math.prod(len(values) for values in grid.values())
        """Settings in the grid (the sweep refuses more than MAX_TRIALS)."""
        self._stop = threading.Event()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(name, grid, features, labels, protocol, base),
            kwargs={"device": device}, name=f"sweep-{name}", daemon=True)

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Stop after the setting in progress (the trials done so far stay reported)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __iter__(self) -> Iterator[Trial | SweepProgress]:
        if self._thread.ident is not None:
            raise RuntimeError("a sweep run is read once; start a new one")
        self._thread.start()
        try:
            while True:
                kind, payload = self._events.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    return
                yield payload
        finally:
            self.cancel()

    def _run(self, *args: Any, device: str) -> None:
        try:
            sweep(*args, device=device, should_stop=self._stop.is_set,
                  on_trial=lambda trial: self._events.put(("event", trial)),
                  progress=lambda done, total: self._events.put(
                      ("event", SweepProgress(done, total))))
        except Exception as error:  # raised again in the reading thread
            self._events.put(("error", error))
        finally:
            self._events.put(("done", None))


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The trial with the highest mAP (ties: higher P@1, then the earlier trial)."""
    if not trials:
        raise InvalidInputError("no trials to choose from")
    return max(trials, key=lambda trial: (trial.map, trial.p1))


def load_presets(*folders: Path | None) -> dict[str, dict[str, Any]]:
    """Presets by method from `presets.json` in each folder; later folders override earlier ones.

    A damaged file is skipped with a warning; an entry naming an unknown method or holding
    parameters its Params class refuses is skipped with a warning too. Parameters an entry
    leaves out (e.g. ones added after it was saved) take the method's defaults.
    """
    presets: dict[str, dict[str, Any]] = {}
    for folder in folders:
        if folder is None or not (Path(folder) / PRESETS_FILE).is_file():
            continue
        try:
            stored = load_json(Path(folder) / PRESETS_FILE)
            if not isinstance(stored, dict):
                raise CacheError("not a JSON object")
        except CacheError as error:
            logger.warning("ignoring %s (%s)", Path(folder) / PRESETS_FILE, error)
            continue
        for method, entry in stored.items():
            try:
                params = get_reranker_class(method).Params(**dict(entry["params"])).as_dict()
            except (KeyError, TypeError, ValueError) as error:  # unknown name, bad params
                logger.warning("ignoring the %s preset in %s (%s)", method, folder, error)
                continue
            presets[method] = params
    return presets


def save_preset(folder: Path, name: str, params: Mapping[str, Any],
                note: str = "") -> dict[str, Any]:
    """Validate `params` for method `name` and store them as its preset in folder/presets.json
    (written atomically; other methods' presets are kept). Returns the stored parameters."""
    validated = get_reranker_class(name).Params(**dict(params)).as_dict()
    path = Path(folder) / PRESETS_FILE
    stored: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = load_json(path)
            stored = loaded if isinstance(loaded, dict) else {}
        except CacheError as error:
            logger.warning("replacing the unreadable %s (%s)", path, error)
    stored[name] = {"params": validated, "note": note}
    atomic_write_json(path, stored)
    return validated
