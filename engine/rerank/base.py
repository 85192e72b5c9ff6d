"""The re-ranker contract: parameters, the result type and the base class every method extends.

Conventions (one for the whole project):
- Features are float32, L2-normalised rows; similarity is the inner product.
- A ranking is `RerankResult(indices, distances)` (named fields) of shape (n_queries, k), best
  first, and a smaller distance is closer. Per-method extras for the UI ride in
  `RerankResult.details`. Where a pair is returned, it is in faiss's (distances, indices) order.
- Indices refer to gallery rows.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from engine.core.threads import query_threads
from engine.core.types import (
    Evidence,
    EvidenceGroup,
    GalleryContext,
    RerankResult,
    check_features,
)
from engine.errors import InvalidInputError, NotFittedError, TooLargeError

logger = logging.getLogger(__name__)

Mode = Literal["batch", "online"]

COMMON_DETAILS: Mapping[str, str] = {
    "per_query": "online mode with several queries: each query's details, in query order",
}
"""Detail keys `Reranker.rerank` adds for every method (see `Reranker.details_schema`)."""


def param(default: Any, *, minimum: float | None = None, maximum: float | None = None,
          step: float | None = None, help: str = "") -> Any:
    """A parameter field with the metadata the UI turns into a control and `validate` checks."""
    return field(default=default, metadata={"min": minimum, "max": maximum, "step": step,
                                            "help": help})


@dataclass(frozen=True)
class RerankParams:
    """Base of every method's frozen parameter dataclass; fields are declared with `param`."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            low, high = spec.metadata.get("min"), spec.metadata.get("max")
            if spec.type in ("bool", bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise InvalidInputError(f"{type(self).__name__}.{spec.name} must be true or "
                                            f"false, got {value!r}")
                object.__setattr__(self, spec.name, bool(value))
                continue
            numeric = spec.type in ("int", int, "float", float)
            if not numeric:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InvalidInputError(f"{type(self).__name__}.{spec.name} must be a number, "
                                        f"got {value!r}")
            if spec.type in ("int", int):
                if not float(value).is_integer():
                    raise InvalidInputError(f"{type(self).__name__}.{spec.name} must be an "
                                            f"integer, got {value!r}")
                value = int(value)  # UI sliders send floats such as 20.0
            else:
                value = float(value)
            object.__setattr__(self, spec.name, value)
            if not np.isfinite(value):
                raise InvalidInputError(f"{type(self).__name__}.{spec.name} must be finite")
            if low is not None and value < low:
                raise InvalidInputError(
                    f"{type(self).__name__}.{spec.name}={value} is below its minimum {low}")
            if high is not None and value > high:
                raise InvalidInputError(
                    f"{type(self).__name__}.{spec.name}={value} is above its maximum {high}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def check_names(cls, method: str, names: Any) -> None:
        """The one unknown-parameter check: every name in `names` must be a field."""
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = set(names) - known
        if unknown:
            raise InvalidInputError(
                f"{method} has no parameter(s) {sorted(unknown)}; it takes {sorted(known)}")

    @classmethod
    def from_mapping(cls, method: str, params: Any) -> RerankParams:
        """Validated parameters from a name -> value mapping (missing names take their
        defaults); anything else, unknown names and out-of-range values raise
        InvalidInputError."""
        if not isinstance(params, Mapping):
            raise InvalidInputError(f"the parameters of {method} must be a mapping of name to "
                                    f"value, got {type(params).__name__}")
        cls.check_names(method, params)
        return cls(**dict(params))

    @classmethod
    def for_gallery(cls, size: int) -> dict[str, Any]:
        """Overrides of the authors' defaults for a gallery of `size` items (default: none).

        For a default sized for the authors' data that is absurd on a small gallery (SSR's
        training episodes); applied only when the default setting is resolved for a gallery
        (`engine.rerank.setting.default_setting`), never to a user's value or a preset.
        """
        return {}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One dict per field: name, type, default, min, max, step, help (for building controls)."""
        return [{"name": spec.name, "type": spec.type if isinstance(spec.type, str)
                 else spec.type.__name__, "default": spec.default, **spec.metadata}
                for spec in dataclasses.fields(cls)]


class Reranker(ABC):
    """Base class of every re-ranking method.

    A subclass sets `name`, `Params` (a frozen `RerankParams` dataclass with the paper's defaults)
    and writes only the math, in three hooks (every method takes `device`; `self.device` is
    where it computes, the CPU for methods with `runs_on_gpu = False`):

    - `_fit(context)`: precompute gallery-side structures (and train, for methods that learn).
    - `_rerank_batch(query_features, k)`: the method's transductive algorithm as its authors define
      it, queries (Q, d) against the gallery, or, when `query_features` is None, every gallery item
      as a query against the rest (leave-one-out; the item itself must not be returned).
    - `_rerank_online(query_feature, k)`: one new query (d,) against the fitted gallery, using only
      precomputed gallery structures and the query's own neighbours; `rerank` runs it on one
      thread (`engine.core.threads.query_threads`).

    Each hook returns `(distances, indices, details)`, faiss's order: distances (n, k) float
    ascending (smaller is closer), indices (n, k) int, details a dict. The public `rerank`
    validates the input, calls the hook and validates the output, so every method honours the
    same contract and returns one `RerankResult`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    distance_note: ClassVar[str] = ""
    """One line for the page: what this method's distances are (each method's are its own, on
    its own scale; the explorer compares methods by cosine similarity instead)."""
    Params: ClassVar[type[RerankParams]] = RerankParams
    learns: ClassVar[bool] = False
    baseline: ClassVar[bool] = False
    """A practitioners' baseline the re-rankers are compared with (query expansion,
    augmentation, diffusion), listed after the re-rankers (`list_rerankers`)."""
    runs_on_gpu: ClassVar[bool] = False
    """The method computes on a CUDA device when one is asked for (`device="cuda"` or "auto");
    False keeps it on the CPU whatever is asked. The GPU tests run every method that sets it."""
    quick_params: ClassVar[dict[str, Any]] = {}
    """Small parameters for fast tests and smoke runs (keyword overrides of `Params`): a run
    that checks shapes and behaviour, not what the method's defaults achieve."""
    details_schema: ClassVar[Mapping[str, str]] = {}
    """The keys this method's `RerankResult.details` may hold, each with what it means: the
    documented schema the page reads details through. `COMMON_DETAILS` are added by `rerank`
    for every method; a contract test checks that no other key appears."""
    min_gallery: ClassVar[int] = 2
    """Fewest gallery items the method can work with (fit refuses fewer, with a clear error)."""
    online_is_batch: ClassVar[bool] = True
    """Online mode gives exactly the batch result with that single query. False for a method
    whose batch mode learns on the queries too (SGRR): its online mode embeds one query against
    the fitted gallery instead."""
    exact_neighbours: ClassVar[bool] = True
    """A near-duplicate of a gallery item is ranked that item first. False for a method that
    may rank another item before it: one ranking in a learned low-dimensional space, where a
    whole class collapses to nearly one point (SGRR), or one that moves the query towards its
    neighbours (query expansion) or spreads its score along the graph (diffusion), where a
    better-connected neighbour can overtake the duplicate."""

    def __init__(self, params: RerankParams | None = None, *, device: str = "auto",
                 **overrides: Any) -> None:
        if params is not None and overrides:
            raise InvalidInputError("pass either a Params object or keyword overrides, not both")
        if params is None:
            params = self.Params.from_mapping(self.name, overrides)
        elif not isinstance(params, self.Params):
            raise InvalidInputError(f"{self.name} expects {self.Params.__name__}, "
                                    f"got {type(params).__name__}")
        self.params = params
        self.device = self._resolve_device(device)
        self._context: GalleryContext | None = None
        self._progress: Callable[[float, str], None] | None = None

    @classmethod
    def _resolve_device(cls, device: str) -> Any:
        """The torch device this method computes on; methods that run only on the CPU
        (`runs_on_gpu = False`) keep the CPU whatever is asked."""
        from engine.core.device import resolve_device

        resolved = resolve_device(device)
        return resolved if cls.runs_on_gpu else resolve_device("cpu")

    # -- public API -----------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._context is not None

    @property
    def gallery(self) -> GalleryContext:
        if self._context is None:
            raise NotFittedError(f"{self.name} is not fitted: call fit(gallery) first")
        return self._context

    def fit(self, gallery: GalleryContext | np.ndarray,
            progress: Callable[[float, str], None] | None = None) -> Reranker:
        """Give the method its gallery (features or a full context) and precompute what it needs.

        `progress` is an optional (fraction, message) callback that a method that learns reports
        its training to (`_report`), for this fit only. The caller's context and arrays are not
        modified: the method keeps its own context, with checked float32 features.
        """
        context = gallery if isinstance(gallery, GalleryContext) else GalleryContext(gallery)
        context = dataclasses.replace(
            context, features=check_features(context.features, "gallery features"))
        if context.size < max(2, self.min_gallery):
            raise InvalidInputError(
                f"{self.name} needs a gallery of at least {max(2, self.min_gallery)} items, "
                f"got {context.size}")
        self._progress = progress
        try:
            self._fit(context)
        finally:
            self._progress = None
        self._context = context
        return self

    def _report(self, fraction: float, message: str) -> None:
        """Report training progress to the callback given to the running `fit`, if any."""
        if self._progress is not None:
            self._progress(fraction, message)

    def rerank(self, query_features: np.ndarray | None, k: int | None = None, *,
               mode: Mode = "batch") -> RerankResult:
        """Re-rank the gallery for each query.

        Args:
            query_features: (Q, d) float L2-normalised queries, or None for every gallery item as
                a query against the rest (batch mode only).
            k: length of each returned ranking; None means the whole gallery (G, or G - 1 for
                leave-one-out).
            mode: "batch" (transductive, all queries at once) or "online" (one query at a time
                against the fixed gallery).
        Returns:
            RerankResult with (Q, k) indices and ascending distances.
        """
        context = self.gallery
        leave_one_out = query_features is None
        available = context.size - 1 if leave_one_out else context.size
        if k is None:
            k = available
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        if k > available:
            raise InvalidInputError(
                f"k={k} is larger than the {available} gallery items that can be returned; "
                f"use k <= {available}")
        if mode not in ("batch", "online"):
            raise InvalidInputError(f"mode must be 'batch' or 'online', got {mode!r}")
        if mode == "batch":
            n_queries = (context.size if leave_one_out
                         else np.atleast_2d(query_features).shape[0])
            refusal = self.batch_refusal(context.size, n_queries)
            if refusal is not None:
                raise TooLargeError(f"{self.title or self.name} batch mode: {refusal}")
        if leave_one_out:
            if mode != "batch":
                raise InvalidInputError("leave-one-out (query_features=None) is a batch mode")
            distances, indices, details = self._rerank_batch(None, int(k))
            n_queries = context.size
        else:
            queries = check_features(query_features, "query features", context.features.shape[1])
            n_queries = queries.shape[0]
            if mode == "batch":
                distances, indices, details = self._rerank_batch(queries, int(k))
            else:
                # one query's steps are small: threads would wait on each other (and on the
                # other work of a shared machine) more than they help
                with query_threads():
                    rows = [self._rerank_online(query, int(k)) for query in queries]
                distances = np.stack([row[0] for row in rows])
                indices = np.stack([row[1] for row in rows])
                details = rows[0][2] if n_queries == 1 else {"per_query": [r[2] for r in rows]}
        result = RerankResult(np.asarray(indices, dtype=np.int64),
                              np.asarray(distances, dtype=np.float32), dict(details))
        self._check_result(result, n_queries, int(k), leave_one_out)
        return result

    def rerank_online(self, query_feature: np.ndarray, k: int | None = None) -> RerankResult:
        """Shorthand for `rerank(query_feature, k, mode="online")`."""
        return self.rerank(query_feature, k, mode="online")

    def explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """Why `item` (a gallery row) sits where it does in this method's online ranking of
        `query_feature` ((d,) or (1, d), unit norm): the evidence the method used, in the one
        schema the page renders (`engine.core.types.Evidence`).

        Every method explains its online computation (`_explain`); a gallery pick shown from
        the leave-one-out run is explained by the online ranking of its feature. The default
        (`_explain` not overridden) gives the item's cosine similarity to the query only.
        """
        context = self.gallery
        query = check_features(query_feature, "query feature", context.features.shape[1])
        if query.shape[0] != 1:
            raise InvalidInputError(f"explain takes one query, got {query.shape[0]}")
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not (
                0 <= item < context.size):
            raise InvalidInputError(f"item must be a gallery row in [0, {context.size}), "
                                    f"got {item!r}")
        with query_threads():
            evidence = self._explain(query[0], int(item))
        self._check_evidence(evidence, int(item))
        return evidence

    def graph_depth(self) -> int:
        """Neighbours per gallery item (itself included) that `fit` reads from the gallery's
        shared kNN graph at these parameters. A gallery builds its graph at least as deep as
        its methods' defaults need (`shared_graph_depth`), so that no method searches the
        whole gallery itself; 0 (the default): the method reads no graph."""
        return 0

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """Why batch mode cannot run for `n_queries` queries against a gallery of
        `gallery_size` on this machine (say, the memory it would need, with the number), or
        None when it can (the default). `rerank` raises `TooLargeError` with it instead of
        trying; the page and the benchmark show it instead of a result."""
        return None

    def estimate_fit_seconds(self, context: GalleryContext) -> float | None:
        """Seconds `fit(context)` would take here with these parameters, measured briefly (a
        few real training steps on `context`) for methods whose fit is long; None when
        unknown (the default). Saved state that `fit` would load counts as about 0."""
        return None

    # -- learned embedding spaces ---------------------------------------------------------------
    def gallery_embeddings(self) -> np.ndarray | None:
        """The gallery in the method's own embedding space, for methods that learn one (the
        explorer can draw its map); None for methods that only re-order."""
        return None

    def query_embeddings(self, query_features: np.ndarray) -> np.ndarray:
        """Queries (Q, d) mapped into the method's embedding space (see `gallery_embeddings`)."""
        raise InvalidInputError(f"{self.name} has no embedding space of its own")

    # -- hooks ----------------------------------------------------------------------------------
    def _fit(self, context: GalleryContext) -> None:  # noqa: B027 - optional hook
        """Precompute gallery-side structures; the default needs none."""

    @abstractmethod
    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Transductive re-ranking; see the class docstring."""

    @abstractmethod
    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One query (d,) against the fitted gallery; returns (k,) distances and indices."""

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The evidence behind `item`'s place in the online ranking of one query (d,); the
        default states the cosine similarity, which every method starts from."""
        similarity = float(np.dot(query_feature.astype(np.float64),
                                  self.gallery.features[item].astype(np.float64)))
        return Evidence(self.name, item,
                        f"{self.title or self.name} gives no evidence of its own; its cosine "
                        f"similarity to the query is {similarity:.3f}",
                        {"cosine similarity": similarity})

    def _check_evidence(self, evidence: Evidence, item: int) -> None:
        problem = None
        if not isinstance(evidence, Evidence):
            problem = f"explain returned {type(evidence).__name__}, not Evidence"
        elif evidence.method != self.name or evidence.item != item:
            problem = (f"evidence is for {evidence.method!r} item {evidence.item}, asked "
                       f"{self.name!r} item {item}")
        elif not all(np.isfinite(float(value)) for value in evidence.numbers.values()):
            problem = "non-finite evidence numbers"
        elif any(not isinstance(group, EvidenceGroup) or (group.rows.size and (
                group.rows.min() < 0 or group.rows.max() >= self.gallery.size))
                 for group in evidence.groups):
            problem = "evidence rows outside the gallery"
        if problem:
            raise RuntimeError(f"re-ranker {self.name!r} broke the evidence contract: {problem}")

    # -- output check ---------------------------------------------------------------------------
    def _check_result(self, result: RerankResult, n_queries: int, k: int,
                      leave_one_out: bool) -> None:
        expected = (n_queries, k)
        problem = None
        if result.indices.shape != expected or result.distances.shape != expected:
            problem = (f"shapes {result.indices.shape}/{result.distances.shape}, "
                       f"expected {expected}")
        elif result.indices.size and (result.indices.min() < 0
                                      or result.indices.max() >= self.gallery.size):
            problem = "indices outside the gallery"
        elif not np.isfinite(result.distances).all():
            problem = "non-finite distances"
        elif k > 1 and (np.diff(result.distances, axis=1) < -1e-6).any():
            problem = "distances not ascending"
        elif k > 1 and (np.diff(np.sort(result.indices, axis=1), axis=1) == 0).any():
            problem = "repeated indices in a ranking"
        elif leave_one_out and (result.indices == np.arange(n_queries)[:, None]).any():
            problem = "a leave-one-out ranking returned the query itself"
        if problem:
            raise RuntimeError(f"re-ranker {self.name!r} broke the result contract: {problem}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
