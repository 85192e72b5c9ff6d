"""SSP's closed-form baselines as query models: the query backbone's (lite0's) pooled features
mapped into the gallery model's space by the orthogonal Procrustes rotation or the
cross-validated ridge map (`heads`), fitted on the same training images SSP trains on.

Each fits in seconds from features at hand (the training images' query-model and gallery-model
features), so the page can show what SSP's training buys over them on the user's own gallery.
`MappedQueryModel` embeds, maps, saves and loads one; `fit_or_load_map` loads the saved map for
these features or fits and saves one (a damaged or mismatched state is refitted, nothing else in
the state folder is touched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.asymmetric.heads import (
    RIDGE_ALPHAS,
    RIDGE_FOLDS,
    apply_ridge,
    fit_procrustes,
    fit_ridge,
)
from engine.asymmetric.persistence import training_fingerprint
from engine.core.state import MissingStateError, load_state, save_state
from engine.core.storage import fingerprint
from engine.core.types import check_features
from engine.errors import CacheError, InvalidInputError

if TYPE_CHECKING:
    from engine.features.backbone import FeatureExtractor, FeatureMeta

logger = logging.getLogger(__name__)

MAP_KINDS = {"procrustes": "Procrustes", "ridge": "ridge"}
"""The closed-form maps, by name, with the name a message gives them."""
STATE_KIND = "query-map"
STATE_VERSION = 1
STATE_FOLDER = "query-maps"


class MappedQueryModel:
    """A closed-form query model: the query backbone's features times `weights` plus `bias`,
    L2-normalised (`heads.apply_ridge`; the Procrustes map has no bias).

    Attributes:
        kind: "procrustes" (an orthogonal map, no centring nor scaling: the standard orthogonal
            Procrustes solution on unit rows) or "ridge" (least squares with an unpenalised
            intercept, its penalty picked by 5-fold cross-validation on the training pairs).
        weights: (d_in, d_out) float32; bias: (d_out,) float32.
        alpha: the ridge penalty (None for Procrustes).
        query_meta, gallery_meta: how the two sides' features are made.
        training_fingerprint: identifies the training pairs (both sides' features).
        fit_seconds: the fit's wall time (as recorded when the state was made).
        loaded: whether it came from disk.
    """

    def __init__(self, kind: str, weights: np.ndarray, bias: np.ndarray,
                 query_meta: FeatureMeta, gallery_meta: FeatureMeta, training_fingerprint: str,
                 *, alpha: float | None = None, fit_seconds: float | None = None,
                 n_training: int | None = None,
                 extractor: FeatureExtractor | None = None) -> None:
        _check_kind(kind)
        self.kind = kind
        self.weights = np.ascontiguousarray(weights, np.float32)
        self.bias = np.ascontiguousarray(bias, np.float32)
        self.query_meta = query_meta
        self.gallery_meta = gallery_meta
        self.training_fingerprint = training_fingerprint
        self.alpha = alpha
        self.fit_seconds = fit_seconds
        self.n_training = n_training
        self.extractor = extractor
        self.loaded = False

    @property
    def title(self) -> str:
        return MAP_KINDS[self.kind]

    @property
    def dim(self) -> int:
        return int(self.gallery_meta.dim)

    @property
    def fingerprint(self) -> str:
        return map_state_key(self.kind, self.query_meta, self.gallery_meta,
                             self.training_fingerprint)

    @property
    def parameter_count(self) -> int:
        """Parameters of the map (the query backbone's are not counted)."""
        return int(self.weights.size + (self.bias.size if self.kind == "ridge" else 0))

    @property
    def shown_params(self) -> dict[str, Any]:
        """What the Compare table's parameters column shows of it."""
        return {"map": self.kind} | ({} if self.alpha is None else {"alpha": self.alpha})

    # -- inference -------------------------------------------------------------------------------
    def map(self, query_features: np.ndarray) -> np.ndarray:
        """(n, d_in) query-backbone features -> (n, d_out) float32 unit rows in the gallery
        model's space."""
        features = check_features(query_features, "query-model features", self.weights.shape[0],
                                   unit_norm=False)
        return apply_ridge(features, self.weights, self.bias)

    def embed(self, images: Sequence[Any], progress: Callable[[int, int], None] | None = None
              ) -> np.ndarray:
        """Embed images with the query backbone and map them: (n, d_out) float32 unit rows."""
        if self.extractor is None:
            raise InvalidInputError("this query map has no query backbone to embed images "
                                    "with: pass `extractor` (it maps features only)")
        return self.map(self.extractor.embed(images, progress))

    # -- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, kind: str, query_features: np.ndarray, gallery_features: np.ndarray,
            query_meta: FeatureMeta, gallery_meta: FeatureMeta,
            extractor: FeatureExtractor | None = None) -> MappedQueryModel:
        """Fit the map on the training pairs: row i of both arrays is training image i.

        Args:
            query_features: (n, query_meta.dim) the query backbone's features.
            gallery_features: (n, gallery_meta.dim) the gallery model's features.
        """
        _check_kind(kind)
        queries, targets = _check_pairs(query_features, gallery_features, query_meta,
                                        gallery_meta)
        started = time.perf_counter()
        alpha = None
        if kind == "procrustes":
            weights, bias = fit_procrustes(queries, targets), np.zeros(len(targets[0]),
                                                                       np.float32)
        else:
            weights, bias, alpha = fit_ridge(queries, targets)
        seconds = time.perf_counter() - started
        logger.info("fitted the %s query map on %d pairs in %.2f s", MAP_KINDS[kind],
                    len(queries), seconds)
        return cls(kind, weights, bias, query_meta, gallery_meta,
                   pairs_fingerprint(queries, targets), alpha=alpha, fit_seconds=seconds,
                   n_training=len(queries), extractor=extractor)

    # -- state on disk ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `path`.safetensors (the map) and `path`.json (the manifest), atomically."""
        save_state(path, kind=STATE_KIND, version=STATE_VERSION, fingerprint=self.fingerprint,
                   tensors={"weights": self.weights, "bias": self.bias},
                   metadata={"map": self.kind, "alpha": self.alpha,
                             "query_meta": self.query_meta.to_dict(),
                             "query_fingerprint": self.query_meta.fingerprint,
                             "gallery_meta": self.gallery_meta.to_dict(),
                             "gallery_fingerprint": self.gallery_meta.fingerprint,
                             "training_fingerprint": self.training_fingerprint,
                             "n_training": self.n_training, "fit_seconds": self.fit_seconds})

    @classmethod
    def load(cls, path: str | Path, *, kind: str, query_meta: FeatureMeta,
             gallery_meta: FeatureMeta, training_fingerprint: str,
             extractor: FeatureExtractor | None = None) -> MappedQueryModel:
        """Load a saved map; raise CacheError when it is missing, damaged or made from other
        features (another query backbone, gallery model or training set) than the ones given
        (MissingStateError when nothing is saved)."""
        _check_kind(kind)
        expected = map_state_key(kind, query_meta, gallery_meta, training_fingerprint)
        try:
            state = load_state(path, kind=STATE_KIND, version=STATE_VERSION,
                               fingerprint=expected)
            manifest, tensors = state.manifest, state.tensors
            if manifest["map"] != kind:
                raise CacheError(f"it holds a {manifest['map']} map")
            weights = tensors["weights"].numpy()
            bias = tensors["bias"].numpy()
            shape = (int(query_meta.dim), int(gallery_meta.dim))
            if weights.shape != shape or bias.shape != shape[1:]:
                raise CacheError(f"its map has shape {weights.shape} + {bias.shape}, not "
                                 f"{shape}")
            if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
                raise CacheError("its map holds NaN or infinite values")
        except MissingStateError:
            raise
        except (CacheError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise CacheError(f"the saved {MAP_KINDS[kind]} query map {Path(path).name} is "
                             f"unusable ({error})") from error
        model = cls(kind, weights, bias, query_meta, gallery_meta, training_fingerprint,
                    alpha=manifest.get("alpha"), fit_seconds=manifest.get("fit_seconds"),
                    n_training=manifest.get("n_training"), extractor=extractor)
        model.loaded = True
        return model


def pairs_fingerprint(query_features: np.ndarray, gallery_features: np.ndarray) -> str:
    """Identifies a training set of feature pairs (both sides, in order)."""
    return fingerprint([training_fingerprint(query_features),
                        training_fingerprint(gallery_features)])


def map_state_key(kind: str, query_meta: FeatureMeta, gallery_meta: FeatureMeta,
                  training: str) -> str:
    """What a saved map depends on: its kind, both models' features and the training pairs."""
    return fingerprint({"version": STATE_VERSION, "map": kind, "query": query_meta.fingerprint,
                        "gallery": gallery_meta.fingerprint, "training": training})


def saved_map_path(kind: str, query_features: np.ndarray, gallery_features: np.ndarray,
                   state_dir: str | Path, query_meta: FeatureMeta,
                   gallery_meta: FeatureMeta) -> Path:
    """Where `fit_or_load_map` keeps the map fitted on these pairs (a stem: the state is its
    .json and .safetensors), beside SSP's state in the gallery model's state folder."""
    _check_kind(kind)
    queries, targets = _check_pairs(query_features, gallery_features, query_meta, gallery_meta)
    key = map_state_key(kind, query_meta, gallery_meta, pairs_fingerprint(queries, targets))
    return Path(state_dir) / STATE_FOLDER / f"{kind}-{key}"


def fit_or_load_map(kind: str, query_features: np.ndarray, gallery_features: np.ndarray,
                    state_dir: str | Path, *, query_meta: FeatureMeta,
                    gallery_meta: FeatureMeta, extractor: FeatureExtractor | None = None,
                    refit: bool = False,
                    progress: Callable[[float, str], None] | None = None) -> MappedQueryModel:
    """The saved `kind` map for these training pairs, else one fitted now and saved.

    A damaged or mismatched saved map is logged and refitted over; the other states in
    `state_dir` (SSP's, the other map's) are left as they are.

    Args:
        query_features, gallery_features: (n, d) features of the training images by the query
            backbone and by the gallery model, row i the same image.
        state_dir: folder of learned state (the gallery-model gallery's `state_dir`); files go
            to `state_dir/query-maps/<kind>-<key>.{safetensors,json}`.
        extractor: the query backbone (`embed` needs it; mapping features does not).
        refit: ignore a saved state.
    """
    _check_kind(kind)
    queries, targets = _check_pairs(query_features, gallery_features, query_meta, gallery_meta)
    training = pairs_fingerprint(queries, targets)
    path = (Path(state_dir) / STATE_FOLDER
            / f"{kind}-{map_state_key(kind, query_meta, gallery_meta, training)}")
    if not refit:
        try:
            model = MappedQueryModel.load(path, kind=kind, query_meta=query_meta,
                                          gallery_meta=gallery_meta,
                                          training_fingerprint=training, extractor=extractor)
            logger.info("loaded the %s query map %s", MAP_KINDS[kind], path.name)
            return model
        except MissingStateError:
            pass
        except CacheError as error:
            logger.warning("refitting: %s", error)
    if progress is not None:
        progress(0.0, f"fitting the {MAP_KINDS[kind]} query map on {len(queries):,} images")
    model = MappedQueryModel.fit(kind, queries, targets, query_meta, gallery_meta, extractor)
    model.save(path)
    if progress is not None:
        progress(1.0, f"fitted the {MAP_KINDS[kind]} query map in {model.fit_seconds:.1f} s")
    return model


ESTIMATE_SIZE = 384
"""Side of the square products `estimate_fit_seconds` times to measure this machine's rate."""
SVD_COST = 30.0
"""An SVD of a d x d matrix (vectors included) costs about this many d^3 multiply-adds of a
matrix product (measured: about 30 for d = 1280 with OpenBLAS)."""
SOLVE_COST = 2.0
"""A d x d solve costs about this many d^3 multiply-adds of a matrix product."""


def estimate_fit_seconds(kind: str, n_training: int, query_dim: int, gallery_dim: int) -> float:
    """About how long `MappedQueryModel.fit` takes on `n_training` pairs here: its operation
    count (the products, the SVD, the ridge's cross-validation solves, as `heads` runs them)
    at this machine's rate of matrix products, measured now (best of three products of
    `ESTIMATE_SIZE`). A few milliseconds to measure; the count's constants are rough, so the
    estimate is good to a factor of about two."""
    _check_kind(kind)
    n, d_in, d_out = max(1, n_training), query_dim, gallery_dim
    if kind == "procrustes":
        small = min(d_in, d_out)
        work = 2.0 * n * d_in * d_out + SVD_COST * max(d_in, d_out) * small * small
    else:
        folds, alphas = RIDGE_FOLDS, len(RIDGE_ALPHAS)
        size = min(n, d_in)  # the dual form solves n x n systems when n < d_in
        grams = (folds + 1) * 2.0 * n * size * d_in
        solves = (alphas * folds + 1) * SOLVE_COST * size ** 3
        products = (alphas * folds + 1) * 2.0 * n * size * d_out
        work = grams + solves + products
    return work / _product_rate()


def _product_rate() -> float:
    """Multiply-adds a second of a float64 matrix product here now (best of three)."""
    generator = np.random.default_rng(0)
    left = generator.standard_normal((ESTIMATE_SIZE, ESTIMATE_SIZE))
    right = generator.standard_normal((ESTIMATE_SIZE, ESTIMATE_SIZE))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return 2.0 * ESTIMATE_SIZE ** 3 / max(best, 1e-9)


def _check_kind(kind: str) -> None:
    if kind not in MAP_KINDS:
        raise InvalidInputError(f"no closed-form query map {kind!r}; choose one of "
                                f"{', '.join(MAP_KINDS)}")


def _check_pairs(query_features: Any, gallery_features: Any, query_meta: FeatureMeta,
                 gallery_meta: FeatureMeta) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as (n, d) float32 with the same n > 0 and their models' dimensions."""
    queries = check_features(query_features, "query-model features of the training images",
                             query_meta.dim, unit_norm=False)
    targets = check_features(gallery_features, "gallery-model features of the training images",
                             gallery_meta.dim, unit_norm=False)
    if len(queries) != len(targets) or len(queries) == 0:
        raise InvalidInputError(f"a query map needs the same images on both sides: "
                                f"{len(queries)} query-model rows, {len(targets)} gallery-model "
                                f"rows")
    return queries, targets
