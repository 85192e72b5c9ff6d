"""The embedding map: a 2-D UMAP layout of one feature space of a gallery, for the explorer's plot.

Cache layout (under `cache_dir/maps/`, one pair of files per feature space `name`):
    {name}.npz       coordinates (G, 2) float32, the key, the fit parameters (JSON) and the rows
                     the model was fitted on
    {name}.umap.pkl  the fitted umap.UMAP, pickled, to project new points with `transform`
    {name}.umap.json its `engine.core.state` manifest: the pickle's size and sha256, checked
                     before it is unpickled, and the key and parameters it was fitted with
Each is written atomically, the model and its manifest first, so a crash never leaves an npz
without its model.
A key or parameter mismatch means refit; a damaged file is logged and refitted, never a crash.

`import umap` costs seconds to tens of seconds (numba), so it happens only inside the functions
that need the model: showing cached coordinates never imports it, and `warm_up` can pay for it
on a background thread. numba/umap can crash when two threads run it at once, so every use of a
model (fit, load, transform) holds one process-wide lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.state import load_state, save_state
from engine.core.storage import atomic_path, atomic_save_npz, fingerprint, load_npz
from engine.core.types import check_features
from engine.errors import CacheError, InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

MAP_VERSION = 2
"""2: the model's sha256 is recorded in a state manifest (maps of 1 are refitted)."""
MODEL_STATE = "embedding-map-model"
"""The kind of state the model's manifest holds."""
MIN_POINTS = 3
TRANSFORM_CHUNK = 4096
SMALL_BATCH = 256  # transforms of at most this many points run numba on one thread
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")

ProgressCallback = Callable[[float, str], None]

# One lock for every umap call of the process: numba's threading layer is not re-entrant.
_UMAP_LOCK = threading.Lock()


def _import_umap() -> Any:
    """The umap module, imported on first use (it compiles numba code: slow).

    numba's default OpenMP/TBB worker threads busy-wait after each parallel region, which made
    the re-rankers (torch, numpy) three to five times slower for a while after every map
    projection on a 2-core machine; the "workqueue" layer's workers sleep instead. It is not
    re-entrant, which `_UMAP_LOCK` already guarantees. A user's own setting wins.
    """
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    try:
        import umap
    except ImportError as error:
        raise MissingDependencyError(
            "the embedding map needs umap-learn: pip install umap-learn") from error
    return umap


@contextlib.contextmanager
def _quiet_umap() -> Iterator[None]:
    """Silence umap's advisory warnings ("n_jobs value 1 overridden ...", "k >= N ...")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(umap|pynndescent|sklearn|numba)(\.|$)")
        warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden")
        yield


@contextlib.contextmanager
def _numba_threads(count: int) -> Iterator[None]:
    """Run numba's parallel loops of the calling thread on at most `count` threads, then restore.

    For a few points the thread pool's start-up dominates: one query point took 2-3 ms on one
    thread against 7-100 ms on two busy cores.
    """
    import numba  # a dependency of umap, already imported by it

    previous = numba.get_num_threads()
    numba.set_num_threads(min(count, previous))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _check_name(name: str) -> str:
    """A feature-space name is used as a file name: letters, digits, '_', '-', '.' only."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise InvalidInputError(
            f"map name {name!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    return name


def _map_paths(cache_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(coordinates .npz, model .umap.pkl) of map `name` under `cache_dir/maps`."""
    folder = Path(cache_dir) / "maps"
    return folder / f"{name}.npz", folder / f"{name}.umap.pkl"


def _model_state(model_path: Path) -> Path:
    """The state stem of the model's manifest: `{name}.umap` (manifest `{name}.umap.json`)."""
    return model_path.with_name(model_path.name.removesuffix(".pkl"))


def _model_fingerprint(key: str, parameters: dict[str, Any]) -> str:
    """What a model file was fitted on: the map's key and fit parameters."""
    return fingerprint({"key": key, "parameters": parameters})


def fit_parameters(n_points: int, dim: int, *, seed: int, n_neighbors: int, min_dist: float,
                   max_points: int) -> dict[str, Any]:
    """Everything a layout depends on besides the key; a cached map with others is refitted.

    n_neighbors is clipped to the fitted points - 1. Spectral initialisation needs a few more
    points than neighbours (its eigen-solver fails on tiny graphs), so tiny galleries start from
    a random layout instead.
    """
    n_fitted = min(n_points, max_points)
    neighbours = min(n_neighbors, n_fitted - 1)
    init = "spectral" if n_fitted >= max(neighbours, 4) + 2 else "random"
    return {"version": MAP_VERSION, "n_points": n_points, "dim": dim, "seed": seed,
            "n_neighbors": neighbours, "min_dist": float(min_dist), "metric": "euclidean",
            "init": init, "max_points": max_points}


def _fit(features: np.ndarray, parameters: dict[str, Any],
         progress: ProgressCallback | None) -> tuple[Any, np.ndarray, np.ndarray]:
    """Fit umap on `features` (or a seeded sample of max_points rows); call with _UMAP_LOCK held.

    Returns the fitted model, (G, 2) float32 coordinates and the sorted rows it was fitted on.
    Rows left out of the sample are projected with the model's transform, in chunks.
    """
    umap = _import_umap()
    n_points = features.shape[0]
    if n_points > parameters["max_points"]:
        generator = np.random.default_rng(parameters["seed"])
        rows = np.sort(generator.choice(n_points, parameters["max_points"], replace=False))
    else:
        rows = np.arange(n_points)
    # The engine's features are L2-normalised rows, for which euclidean distance is monotone in
    # cosine. A fixed random_state makes the layout deterministic (umap then runs one thread).
    model = umap.UMAP(n_components=2, n_neighbors=parameters["n_neighbors"],
                      min_dist=parameters["min_dist"], metric=parameters["metric"],
                      random_state=parameters["seed"], init=parameters["init"])
    with _quiet_umap():
        model.fit(features[rows])
        coordinates = np.empty((n_points, 2), np.float32)
        coordinates[rows] = model.embedding_
        rest = np.setdiff1d(np.arange(n_points), rows)
        for start in range(0, rest.size, TRANSFORM_CHUNK):
            if progress is not None:
                progress(0.5 + 0.5 * start / rest.size,
                         f"placing the other images on the map {start}/{rest.size}")
            chunk = rest[start:start + TRANSFORM_CHUNK]
            coordinates[chunk] = model.transform(features[chunk])
    return model, coordinates, rows.astype(np.int64)


def _save(npz_path: Path, model_path: Path, key: str, parameters: dict[str, Any], model: Any,
          coordinates: np.ndarray, rows: np.ndarray) -> None:
    """Write the model and its manifest (the pickle's sha256), then the coordinates (so an npz
    always has its model beside it)."""
    with atomic_path(model_path) as temporary, open(temporary, "wb") as handle:
        pickle.dump(model, handle, protocol=pickle.HIGHEST_PROTOCOL)
    save_state(_model_state(model_path), kind=MODEL_STATE, version=MAP_VERSION,
               fingerprint=_model_fingerprint(key, parameters), files=[model_path.name])
    atomic_save_npz(npz_path, coordinates=coordinates, key=np.array(key),
                    parameters=np.array(json.dumps(parameters, sort_keys=True)),
                    sample_rows=rows)


class EmbeddingMap:
    """2-D UMAP layout of one feature space of a gallery, fitted once and cached.

    name: the feature space ("backbone"; methods with their own space add theirs, e.g. "sgrr").
    coordinates: (G, 2) float32, row-aligned with the features it was fitted on.
    key: what the layout was fitted on (e.g. the gallery fingerprint); another key means refit.

    Build it with `load_or_fit` (or `load` for cached coordinates only). The umap model behind
    `transform` is loaded lazily, on the first `transform` or `warm_up`.
    """

    def __init__(self, name: str, coordinates: np.ndarray, key: str, *, cache_dir: Path,
                 parameters: dict[str, Any], sample_rows: np.ndarray,
                 features: np.ndarray | None = None, model: Any = None) -> None:
        self.name = name
        self.coordinates = coordinates
        self.key = key
        self.parameters = parameters
        self.sample_rows = sample_rows
        self._cache_dir = cache_dir
        self._features = features  # kept to refit a damaged model file; None after `load`
        self._model = model

    @property
    def dim(self) -> int:
        """Width of the features the map was fitted on."""
        return int(self.parameters["dim"])

    def transform(self, features: Any) -> np.ndarray:
        """Project new points onto the map with umap's transform.

        Args:
            features: (n, d) or a single (d,) vector, d = the fitted width, finite.
        Returns:
            (n, 2) float32 coordinates ((1, 2) for a single vector).

        A damaged or mismatched model file is refitted transparently (same seed: same layout)
        when the map came from `load_or_fit`; a map from `load` has no features to refit with
        and raises CacheError instead.
        """
        points = check_features(features, "features to place on the map", self.dim,
                                unit_norm=False)
        with _UMAP_LOCK:
            model = self._model_locked()
            threads = 1 if points.shape[0] <= SMALL_BATCH else os.cpu_count() or 1
            with _quiet_umap(), _numba_threads(threads):
                projected = model.transform(points)
        return np.asarray(projected, np.float32)

    def warm_up(self) -> None:
        """Load the fitted model (importing umap) and compile umap's transform, so the first
        `transform` is fast. Thread-safe: meant to run on a background thread."""
        probe = np.full((2, self.dim), self.dim ** -0.5, np.float32)
        with _UMAP_LOCK:
            model = self._model_locked()
            with _quiet_umap():  # numba compiles the one-row and many-row paths separately
                model.transform(probe)
                model.transform(probe[:1])

    def _model_locked(self) -> Any:
        """The fitted umap model, unpickled or refitted on first use; call with _UMAP_LOCK held."""
        if self._model is not None:
            return self._model
        npz_path, model_path = _map_paths(self._cache_dir, self.name)
        try:
            self._model = self._read_model(model_path)
        except CacheError as error:
            if self._features is None:
                raise CacheError(
                    f"{error}; rebuild the map with EmbeddingMap.load_or_fit(features, ...)"
                ) from error
            logger.warning("%s; refitting the embedding map %r", error, self.name)
            model, coordinates, rows = _fit(self._features, self.parameters, None)
            _save(npz_path, model_path, self.key, self.parameters, model, coordinates, rows)
            self._model, self.coordinates, self.sample_rows = model, coordinates, rows
        return self._model

    def _read_model(self, model_path: Path) -> Any:
        """Unpickle the model once its manifest vouches for it, and check it is the one that
        made these coordinates."""
        # Pickle, because umap's `transform` needs the whole fitted estimator (its
        # nearest-neighbour search index, the fuzzy graph, the training data), which has no
        # array form to save instead. Unpickling runs code, so the file's sha256, recorded in
        # its manifest when `_save` wrote it, is checked first: only the bytes this module
        # wrote for this key and these parameters are ever unpickled; `load_state` reads the
        # file once, so the bytes unpickled are the bytes checked.
        state = load_state(_model_state(model_path), kind=MODEL_STATE, version=MAP_VERSION,
                           fingerprint=_model_fingerprint(self.key, self.parameters),
                           read=[model_path.name])
        umap = _import_umap()
        try:
            model = pickle.loads(state.contents[model_path.name])
        except (EOFError, pickle.UnpicklingError, AttributeError, ImportError,
                IndexError, KeyError, TypeError, ValueError) as error:
            raise CacheError(f"the embedding map model {model_path} is unreadable ({error})"
                             ) from error
        embedding = getattr(model, "embedding_", None)
        if (not isinstance(model, umap.UMAP) or not isinstance(embedding, np.ndarray)
                or embedding.shape != (self.sample_rows.size, 2)
                or not np.allclose(embedding, self.coordinates[self.sample_rows], atol=1e-5)):
            raise CacheError(f"the embedding map model {model_path} does not match its "
                             "coordinates")
        return model

    @classmethod
    def load(cls, cache_dir: str | os.PathLike, name: str, key: str) -> EmbeddingMap | None:
        """Cached coordinates of map `name` fitted on `key`, without importing umap.

        Returns None when there is no cache, when it was fitted on another key or by another
        version of this module, or when the file is damaged (logged as a warning).
        """
        npz_path, _ = _map_paths(cache_dir, _check_name(name))
        if not npz_path.is_file():
            return None
        try:
            stored = load_npz(npz_path)
            if str(stored["key"]) != key:
                logger.info("the embedding map %s was fitted on another key; refitting",
                            npz_path)
                return None
            parameters = json.loads(str(stored["parameters"]))
            if not isinstance(parameters, dict) or parameters.get("version") != MAP_VERSION:
                logger.info("the embedding map %s has an old format; refitting", npz_path)
                return None
            coordinates = np.asarray(stored["coordinates"], np.float32)
            rows = np.asarray(stored["sample_rows"], np.int64)
            n_points = int(parameters["n_points"])
            if (coordinates.shape != (n_points, 2) or not np.isfinite(coordinates).all()
                    or rows.ndim != 1 or rows.size == 0 or rows.min() < 0
                    or rows.max() >= n_points or int(parameters["dim"]) < 1):
                raise CacheError(f"cache file {npz_path} has inconsistent arrays")
        except (CacheError, KeyError, ValueError, TypeError) as error:  # ValueError: bad JSON
            logger.warning("ignoring the embedding map %s (%s)", npz_path, error)
            return None
        return cls(name, coordinates, key, cache_dir=Path(cache_dir), parameters=parameters,
                   sample_rows=rows)

    @classmethod
    def load_or_fit(cls, features: Any, cache_dir: str | os.PathLike, name: str = "backbone",
                    key: str = "", *, progress: ProgressCallback | None = None, seed: int = 0,
                    n_neighbors: int = 15, min_dist: float = 0.1,
                    max_points: int = 20000) -> EmbeddingMap:
        """The cached map of `features` when key and parameters match, else a fresh UMAP fit.

        Args:
            features: (G, d) gallery features (L2-normalised rows for the engine's spaces),
                G >= 3.
            cache_dir: the gallery's cache folder; files go to `cache_dir/maps/`.
            name: the feature space, also the file name.
            key: what the features are (e.g. the gallery fingerprint); another key refits.
            progress: called with (fraction in [0, 1], message) when fitting.
            seed: UMAP's random_state; a fixed seed gives the same layout every time.
            n_neighbors, min_dist: UMAP's parameters (n_neighbors is clipped to G - 1).
            max_points: above this many rows, UMAP is fitted on a seeded random sample of
                max_points rows and the others are projected with `transform`, in chunks (a
                full fit grows too slow and too large in memory for big galleries).
        Returns:
            the map; its coordinates are (G, 2) float32, row-aligned with `features`.
        """
        name = _check_name(name)
        array = check_features(features, "features of the map", unit_norm=False)
        if array.shape[0] < MIN_POINTS:
            raise InvalidInputError(
                f"need at least {MIN_POINTS} images for a map, got {array.shape[0]}")
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or (
                n_neighbors < 2):
            raise InvalidInputError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
        if (isinstance(min_dist, bool) or not isinstance(min_dist, (int, float, np.number))
                or not np.isfinite(min_dist) or min_dist < 0):
            raise InvalidInputError(f"min_dist must be a finite number >= 0, got {min_dist!r}")
        if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or (
                max_points < MIN_POINTS):
            raise InvalidInputError(
                f"max_points must be an integer >= {MIN_POINTS}, got {max_points!r}")
        parameters = fit_parameters(array.shape[0], array.shape[1], seed=int(seed),
                                    n_neighbors=int(n_neighbors), min_dist=min_dist,
                                    max_points=int(max_points))
        cached = cls.load(cache_dir, name, key)
        if cached is not None and cached.parameters == parameters:
            cached._features = array
            return cached
        if progress is not None:
            progress(0.0, "fitting the embedding map (UMAP) ...")
        logger.info("fitting the embedding map %r of %d points", name, array.shape[0])
        npz_path, model_path = _map_paths(cache_dir, name)
        with _UMAP_LOCK:  # pickling reads the model too
            model, coordinates, rows = _fit(array, parameters, progress)
            _save(npz_path, model_path, key, parameters, model, coordinates, rows)
        if progress is not None:
            progress(1.0, "embedding map ready")
        return cls(name, coordinates, key, cache_dir=Path(cache_dir), parameters=parameters,
                   sample_rows=rows, features=array, model=model)
