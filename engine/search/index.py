"""Nearest-neighbour search over gallery features (inner product = cosine).

One result convention everywhere: `(distances, indices)` of shape (n_queries, k), best first,
with distance = 1 - cosine similarity (smaller is closer).

Three backends behind one `device` argument, chosen once when the index is built or loaded:

- **faiss-gpu**: when faiss reports GPUs and a start-up probe search agrees with the CPU. The
  probe runs first in a child process, because faiss aborts the whole process on a CUDA error
  (a PyPI wheel without kernels for the GPU's architecture, or linked against another CUDA
  major than torch), then in this process.
- **torch exact**: the gallery as one tensor on the torch device, scores by matrix products in
  query chunks x gallery chunks, each chunk's top k merged; `precision` "fp32", "bf16" or
  "fp16" (reduced precision stores the gallery and queries rounded, products in float32).
  Used on CUDA when faiss-gpu is not usable, and for any reduced precision. Exact kind only:
  IVF and HNSW stay faiss.
- **faiss-cpu**: otherwise, and always for `device="cpu"` in fp32.

The chosen backend is logged and readable as `SearchIndex.backend`, with why in
`SearchIndex.backend_reason`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.device import resolve_device
from engine.core.knn import (
    FLOAT32_SLACK,
    GATHER_ELEMENTS,
    exact_candidates,
    float32_scores,
    gathered_similarity,
    merge_top_k,
    top_k_smallest,
    torch_topk_largest,
)
from engine.core.storage import atomic_path
from engine.core.types import check_features
from engine.errors import EmptyGalleryError, InvalidInputError

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
INDEX_CHOICES = ("auto", *INDEX_KINDS)
SEARCH_BACKENDS = ("auto", "faiss", "torch")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

FAISS_GPU_MAX_K = 2048  # faiss GPU indexes select at most this many neighbours per query
QUERY_CHUNK = 1024
GALLERY_CHUNK = 65536  # with QUERY_CHUNK: a 256 MiB float32 score block

PROBE_TIMEOUT_SECONDS = 300  # the child's CUDA start, and PTX compilation where a wheel needs it
PROBE_ITEMS, PROBE_DIM, PROBE_QUERIES, PROBE_K = 2000, 64, 64, 10
PROBE_TOLERANCE = 1e-4


def faiss_module():
    """The faiss module, imported on first use (importing it costs seconds)."""
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for the faiss-cpu build).

    On a GPU build this asks CUDA, and faiss aborts the process if CUDA fails (a driver older
    than its CUDA): `faiss_gpu_probe` calls it only after a child process did so safely.
    """
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _faiss_gpu_build() -> bool:
    """Whether the installed faiss has GPU support (without touching CUDA)."""
    return hasattr(faiss_module(), "StandardGpuResources")


# -- the faiss GPU probe -------------------------------------------------------------------------
@dataclass(frozen=True)
class FaissGpuProbe:
    """Whether faiss can search on the GPU here; `reason` says why (not)."""

    usable: bool
    reason: str


def _faiss_to_gpu(index, gpus: Sequence[int] | None):
    """A copy of the CPU faiss `index` on the GPUs `gpus` (None: every GPU faiss sees)."""
    faiss = faiss_module()
    return faiss.index_cpu_to_gpus_list(index, gpus=None if gpus is None else list(gpus))


def _probe_data() -> tuple[np.ndarray, np.ndarray]:
    """A small gallery of random unit rows and queries near some of them (fixed seed)."""
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((PROBE_ITEMS, PROBE_DIM)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:PROBE_QUERIES] + 0.1 * rng.standard_normal(
        (PROBE_QUERIES, PROBE_DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return gallery, queries


def _probe_search(kind: str, gpus: Sequence[int] | None) -> str | None:
    """Build a tiny CPU index of `kind`, copy it to the GPU, search both, compare.

    IVF probes every cell, so both answers are exact. Returns None when the GPU answer equals
    the CPU one (up to ties within PROBE_TOLERANCE), else why not.
    """
    faiss = faiss_module()
    gallery, queries = _probe_data()
    if kind == "ivf":
        cpu_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(PROBE_DIM), PROBE_DIM, 8,
                                       faiss.METRIC_INNER_PRODUCT)
        cpu_index.train(gallery)
        cpu_index.nprobe = 8
    else:
        cpu_index = faiss.IndexFlatIP(PROBE_DIM)
    cpu_index.add(gallery)
    expected, _ = cpu_index.search(queries, PROBE_K)
    try:
        gpu_index = _faiss_to_gpu(cpu_index, gpus)
        found, found_indices = gpu_index.search(queries, PROBE_K)
    # A native GPU library fails in ways we cannot list (missing kernels, CUDA driver or
    # library mismatch, out of memory): any failure means "not usable", with its message.
    except Exception as error:
        return f"the faiss GPU probe search raised {type(error).__name__}: {error}"
    found_indices = np.asarray(found_indices)
    if found_indices.shape != (PROBE_QUERIES, PROBE_K) or (found_indices < 0).any() or (
            found_indices >= PROBE_ITEMS).any():
        return "the faiss GPU probe search returned missing or invalid neighbours"
    true = queries.astype(np.float64) @ gallery.astype(np.float64).T
    error = max(float(np.abs(np.asarray(found) - expected).max()),
                float(np.abs(np.take_along_axis(true, found_indices, 1) - found).max()))
    if error > PROBE_TOLERANCE:
        return (f"the faiss GPU probe search disagreed with the CPU (similarities off by "
                f"{error:.3g} > {PROBE_TOLERANCE})")
    return None


def _probe_command(kind: str, gpus: Sequence[int] | None) -> list[str]:
    return [sys.executable, "-m", "engine.search.index", "--probe-faiss-gpu", kind,
            *(str(gpu) for gpu in gpus or ())]


def _probe_in_child(kind: str, gpus: Sequence[int] | None) -> str | None:
    """`_probe_search` in a child process (it can abort without taking this one along).

    Returns None when the child's probe passed, else why not (its last stderr line on a crash).
    """
    environment = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [root, environment.get("PYTHONPATH")]))
    try:
        completed = subprocess.run(_probe_command(kind, gpus), capture_output=True, text=True,
                                   timeout=PROBE_TIMEOUT_SECONDS, env=environment, check=False)
    except subprocess.TimeoutExpired:
        return f"the faiss GPU probe process did not finish in {PROBE_TIMEOUT_SECONDS} s"
    except OSError as error:
        return f"the faiss GPU probe process could not start ({error})"
    last_error = next((line for line in reversed(completed.stderr.splitlines()) if line.strip()),
                      "no message")
    if completed.returncode != 0:
        how = (f"crashed (signal {-completed.returncode})" if completed.returncode < 0
               else f"exited with status {completed.returncode}")
        return f"the faiss GPU probe process {how}: {last_error.strip()}"
    try:
        return json.loads(completed.stdout.strip().splitlines()[-1])["reason"]
    except (IndexError, KeyError, TypeError, ValueError):
        return f"the faiss GPU probe process gave no answer: {last_error.strip()}"


@functools.cache
def faiss_gpu_probe(kind: str = "flat", gpus: tuple[int, ...] | None = None) -> FaissGpuProbe:
    """Whether a faiss index of `kind` can search on the GPU here (checked once per process).

    Usable when faiss is a GPU build, reports GPUs and the probe search (`_probe_search`)
    agrees with the CPU, first in a child process, then in this one. A failure is logged with
    its reason.
    """
    if not _faiss_gpu_build():
        return FaissGpuProbe(False, "faiss is the CPU-only build (faiss-cpu)")
    if kind == "hnsw":
        return FaissGpuProbe(False, "faiss has no GPU HNSW index")
    reason = _probe_in_child(kind, gpus)
    count = faiss_gpu_count() if reason is None else 0
    if reason is None and count == 0:
        reason = "faiss reports no GPU"
    reason = reason or _probe_search(kind, gpus)
    if reason is not None:
        logger.warning("faiss GPU search is not usable: %s", reason)
        return FaissGpuProbe(False, reason)
    used = len(gpus) if gpus else count
    return FaissGpuProbe(True, f"the probe search on {used} GPU(s) matched the CPU")


def _probe_main(argv: Sequence[str]) -> int:
    """Child side of `_probe_in_child`: print {"reason": null or why not} as JSON."""
    kind, gpus = argv[0], tuple(int(gpu) for gpu in argv[1:]) or None
    if torch.cuda.is_available():  # the parent has torch's CUDA libraries loaded: so do we
        torch.cuda.init()
    if faiss_gpu_count() == 0:
        reason = "faiss reports no GPU in a fresh process"
    else:
        reason = _probe_search(kind, gpus)
    print(json.dumps({"reason": reason}), flush=True)
    return 0


# -- the torch backend ---------------------------------------------------------------------------
def _check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def _mixed_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm takes `dtype` inputs and writes float32 products on `device`."""
    sample = torch.ones((2, 2), device=device, dtype=dtype)
    try:
        torch.mm(sample, sample, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        logger.warning("torch.mm(out_dtype=float32) is unavailable for %s on %s (%s); products "
                       "upcast each gallery chunk instead", dtype, device, error)
        return False
    return True


class TorchExactSearch:
    """Exact top-k inner products with torch, on any torch device.

    The gallery is one (n, d) tensor on `device`, stored in `precision`. Queries go in chunks
    of `query_chunk` rows; each is scored against gallery chunks of `gallery_chunk` rows (one
    (query_chunk, gallery_chunk) float32 block at a time), each block's top k is kept and
    merged with the best so far. Ties are broken by the smaller gallery index, so the result
    does not depend on the chunk sizes.

    Reduced precision ("bf16", "fp16") rounds gallery and queries to that type and computes the
    products in float32 (cuBLAS with `out_dtype`; on the CPU by upcasting each chunk, the same
    numbers, slowly): half the memory and tensor-core speed, at the cost of similarities off by
    about 1e-4 and the recall that `engine.bench.search` measures.
    """

    def __init__(self, features: np.ndarray, device: str | torch.device = "auto",
                 precision: str = "fp32", query_chunk: int = QUERY_CHUNK,
                 gallery_chunk: int = GALLERY_CHUNK) -> None:
        self.dtype = _check_precision(precision)
        for name, value in (("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        features = check_features(features, "gallery features")
        self.device = resolve_device(device)
        self.precision = precision
        self.query_chunk, self.gallery_chunk = int(query_chunk), int(gallery_chunk)
        self.ntotal, self.d = features.shape
        self.gallery = torch.from_numpy(features).to(self.device, self.dtype)
        self._mixed = (self.dtype != torch.float32 and self.device.type == "cuda"
                       and _mixed_products(self.device, self.dtype))

    @property
    def name(self) -> str:
        return f"torch-{self.device.type} exact ({self.precision})"

    def _products(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(q, g) float32 inner products of the rounded inputs."""
        if self.dtype == torch.float32:
            return queries @ gallery.T
        if self._mixed:
            return torch.mm(queries, gallery.T, out_dtype=torch.float32)
        return queries.float() @ gallery.float().T

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery items of each query, like a faiss index's `search`.

        Args:
            queries: (Q, d) float32.
            k: 1 <= k <= gallery size.
        Returns:
            similarities (Q, k) float32 descending; indices (Q, k) int64.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
                1 <= k <= self.ntotal):
            raise InvalidInputError(f"k must be an integer in [1, {self.ntotal}], got {k!r}")
        k = int(k)
        queries = torch.from_numpy(check_features(queries, "query features", self.d,
                                                  unit_norm=False))
        similarities, indices = [], []
        for start in range(0, queries.shape[0], self.query_chunk):
            block = queries[start:start + self.query_chunk].to(self.device, self.dtype)
            best_values = best_indices = None
            for offset in range(0, self.ntotal, self.gallery_chunk):
                scores = self._products(block, self.gallery[offset:offset + self.gallery_chunk])
                values, order = torch_topk_largest(scores, min(k, scores.shape[1]))
                order = order + offset
                if best_values is not None:
                    # The best so far all precede this chunk and both parts are ordered by
                    # (similarity desc, index asc): among equal similarities, position order is
                    # index order, which is how torch_topk_largest breaks ties.
                    values = torch.cat([best_values, values], dim=1)
                    order = torch.cat([best_indices, order], dim=1)
                    values, position = torch_topk_largest(values, min(k, values.shape[1]))
                    order = order.gather(1, position)
                best_values, best_indices = values, order
            similarities.append(best_values)
            indices.append(best_indices)
        return (torch.cat(similarities).float().cpu().numpy(),
                torch.cat(indices).cpu().numpy().astype(np.int64))


# -- the index -----------------------------------------------------------------------------------
def _check_options(kind: str, precision: str, backend: str) -> None:
    if kind not in INDEX_KINDS:
        raise InvalidInputError(f"index kind must be one of {INDEX_CHOICES}, got {kind!r}")
    if backend not in SEARCH_BACKENDS:
        raise InvalidInputError(f"backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    _check_precision(precision)
    if kind != "flat" and (backend == "torch" or precision != "fp32"):
        raise InvalidInputError(
            f"the torch backend and reduced precision are exact search only: use kind='flat', "
            f"or backend='auto'/'faiss' with precision='fp32' for a {kind} index")
    if backend == "faiss" and precision != "fp32":
        raise InvalidInputError(
            f"faiss indexes here search in fp32; precision={precision!r} needs backend='torch' "
            "or 'auto'")


EXACT_SEARCH_MAX = 200_000
"""`kind="auto"`: exact (flat) search up to this many items. A flat query reads the whole
feature store: about 50 ms at 100k x 1280 float32 on one core, too slow beyond."""
COPY_MEMORY_FRACTION = 0.25
"""`kind="auto"` above `EXACT_SEARCH_MAX`: an IVF index (exact vectors in its lists, a float32
copy of the gallery) while that copy takes at most this fraction of the available memory, else
IVF-PQ (product-quantised codes, d / 8 bytes per item: 96 MB at 1M x 768)."""
DEFAULT_REFINE = 8
"""IVF-PQ: a search for k items takes k * refine candidates from the codes and rescores them
exactly from the gallery's features (when the index has them), since PQ scores are rough
(refine 4 gave recall@10 0.70, 8 gave 0.95 on clustered d = 32 and 64 test galleries)."""
GRAPH_REFINE = 2
"""IVF-PQ: the kNN graph asks for depth * GRAPH_REFINE candidates per row (rescored from the
features): its lists are deep, so the cells probed bound their recall more than the codes,
and every candidate is a gathered feature row (1M x 128 rows of 1.5 KiB at d = 768)."""
RECALL_QUERIES = 200
"""Gallery rows (seeded) on which an approximate index's recall@10 and @100 are measured."""
RECALL_DEPTHS = (10, 100)
TRAIN_MAX = 100_000
"""At most this many (seeded random) rows train an IVF or IVF-PQ index's quantisers."""
CHECK_ROWS = 65536
PQ_POINTS_PER_CENTROID = 39


def choose_index_kind(size: int, dim: int, available: int | None = None,
                      exact_max: int = EXACT_SEARCH_MAX) -> tuple[str, str]:
    """The index kind `kind="auto"` builds for `size` items of `dim` dimensions, and why.

    Flat (exact, served from the gallery's own features) up to `exact_max` items; above,
    IVF while its float32 copy fits `COPY_MEMORY_FRACTION` of the available memory (`available`
    bytes, default: what the system reports), else IVF-PQ. HNSW is never chosen automatically:
    its build is the slowest on a small CPU, and it holds a float32 copy too.
    """
    if size <= exact_max:
        return "flat", f"{size} items <= {exact_max}: exact search"
    if available is None:
        from engine.search.features_file import available_memory

        available = available_memory()
    copy = size * dim * 4
    if available is not None and copy > COPY_MEMORY_FRACTION * available:
        return "ivfpq", (f"{size} items > {exact_max} and a float32 copy "
                         f"({copy / 2**30:.1f} GiB) exceeds {COPY_MEMORY_FRACTION:.0%} of the "
                         f"available {available / 2**30:.1f} GiB: IVF-PQ")
    return "ivf", f"{size} items > {exact_max}: IVF (its float32 copy fits in memory)"


def check_store(features: np.ndarray, what: str = "gallery features") -> np.ndarray:
    """Check (n, d) features as `check_features` does, in row chunks, and return the array
    itself (float16 and memory-mapped stay so: the flat index searches it in place)."""
    array = np.asarray(features) if not isinstance(features, np.ndarray) else features
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        return check_features(array, what)
    for start in range(0, array.shape[0], CHECK_ROWS):
        check_features(array[start:start + CHECK_ROWS], what)
    return array


def _pq_layout(size: int, dim: int) -> tuple[int, int]:
    """(sub-quantisers m, bits per code) of an IVF-PQ index: m the largest divisor of `dim`
    with at least 8 dimensions each (d / 8 bytes per item), 8 bits, fewer for galleries too
    small to train 256 centroids per sub-quantiser (faiss asks `PQ_POINTS_PER_CENTROID` points
    per centroid)."""
    m = max([m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= 8] or [1])
    bits = int(max(1, min(8, np.floor(np.log2(max(2, size // PQ_POINTS_PER_CENTROID))))))
    return m, bits


class StoreSearch:
    """Exact search over the gallery's own feature array (`knn.exact_candidates`): no second
    copy of the features, float16 or memory-mapped ones included."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features
        self.ntotal, self.d = features.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k float32 inner products. One query against float32 features reads the
        product the re-rankers ranking the same query read (`float32_scores`), ties to the
        smaller index; else faiss's brute force in row chunks (`exact_candidates`)."""
        if len(queries) == 1 and self.features.dtype == np.float32:
            negated, indices = top_k_smallest(
                -float32_scores(self.features, np.asarray(queries[0], np.float32))[None, :],
                int(k))
            return -negated, indices
        return exact_candidates(self.features, queries, int(k))


class SearchIndex:
    """An index over L2-normalised gallery features, searched on the best backend available.

    kind: "flat" (exact inner product, the default), "ivf" (IndexIVFFlat, `nlist` cells,
    `nprobe` probed), "hnsw" (IndexHNSWFlat, `hnsw_m` links), "ivfpq" (IndexIVFPQ: d / 8 bytes
    per item, for memory; candidates rescored from the features, `refine`) or "auto"
    (`choose_index_kind`; the choice and why in `kind` and `kind_reason`).
    device: "auto" uses a GPU when there is a usable one (faiss-gpu, else torch exact on CUDA),
    "cpu" the CPU, "cuda[:N]" a GPU (an error without one; faiss-cpu for kinds and builds that
    have no GPU path, with the reason in `backend_reason`).
    precision: "fp32", or "bf16"/"fp16" for the torch backend (exact kind only).
    backend: "auto" (see the module docstring), "faiss" or "torch" to force one.

    The flat kind on the CPU searches `features` in place (`StoreSearch`): the index is no
    second copy of the gallery. Other kinds keep a faiss CPU index, which `save` writes; a flat
    index saves an empty faiss index of its dimension and is loaded with the features.

    recall: {"recall@10", "recall@100", "queries"} measured at build against exact search on
    `RECALL_QUERIES` seeded gallery rows (1.0 for flat, which is exact), tie-aware.
    """

    def __init__(self, features: np.ndarray, kind: str = "flat", device: str = "auto",
                 nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32, *,
                 precision: str = "fp32", backend: str = "auto", refine: int = DEFAULT_REFINE,
                 recall_queries: int = RECALL_QUERIES, seed: int = 0) -> None:
        if features is None or len(features) == 0:
            raise EmptyGalleryError("cannot build an index over an empty gallery: add images")
        features = check_store(features)
        self.size, self.dim = features.shape
        self.kind_reason = f"kind={kind!r}"
        if kind == "auto":
            kind, self.kind_reason = choose_index_kind(self.size, self.dim)
            logger.info("index kind: %s (%s)", kind, self.kind_reason)
        _check_options(kind, precision, backend)
        faiss = faiss_module()
        dim = self.dim
        self.kind, self.refine, self._features = kind, max(1, int(refine)), features
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)  # empty: the features are searched in place
        elif kind in ("ivf", "ivfpq"):
            nlist = nlist or max(1, min(4096, int(4 * np.sqrt(self.size))))
            nlist = min(nlist, self.size)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                           faiss.METRIC_INNER_PRODUCT)
            else:
                m, bits = _pq_layout(self.size, dim)
                index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, bits,
                                         faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = (np.sort(rng.choice(self.size, TRAIN_MAX, replace=False))
                     if self.size > TRAIN_MAX else slice(None))
            index.train(np.ascontiguousarray(features[train], np.float32))
            index.nprobe = min(nprobe, nlist)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(64, 2 * hnsw_m)
        if kind != "flat":
            for start in range(0, self.size, CHECK_ROWS):  # float32 a chunk at a time
                index.add(np.ascontiguousarray(features[start:start + CHECK_ROWS], np.float32))
        self._cpu_index = index
        self._place(device, precision, backend, lambda: check_features(features, "features"))
        self.recall = self.measure_recall(recall_queries, seed)

    @property
    def _cpu_search(self):
        """The CPU searcher: the faiss index, or the in-place search of a flat one."""
        if self.kind == "flat" and self._cpu_index.ntotal == 0:
            return StoreSearch(self._features)
        return self._cpu_index

    def _gpu_source(self):
        """A faiss CPU index holding the vectors, to copy to a GPU (flat: built for the copy)."""
        if self.kind != "flat" or self._cpu_index.ntotal:
            return self._cpu_index
        full = faiss_module().IndexFlatIP(self.dim)
        for start in range(0, self.size, CHECK_ROWS):
            full.add(np.ascontiguousarray(self._features[start:start + CHECK_ROWS], np.float32))
        return full

    def _place(self, device: str | torch.device, precision: str, backend: str,
               gallery: Callable[[], np.ndarray]) -> None:
        """Choose the backend and set `_index` (anything with faiss's `search(x, k)`),
        `backend`, `backend_reason`, `precision` and `on_gpu`; log the choice."""
        torch_device = resolve_device(device)  # "cuda" without CUDA raises here
        wants_gpu = str(device).strip().lower() == "auto" or torch_device.type == "cuda"
        gpus = (torch_device.index,) if torch_device.index is not None else None
        self.precision = precision
        notes: list[str] = []
        probe_kind = "ivf" if self.kind == "ivfpq" else self.kind
        if backend != "torch" and precision == "fp32" and wants_gpu:
            probe = faiss_gpu_probe(probe_kind, gpus)
            if probe.usable:
                try:
                    gpu_index = _faiss_to_gpu(self._gpu_source(), gpus)
                # as in the probe: any failure of the GPU library means "stay off it"
                except Exception as error:
                    notes.append(f"moving the index to the GPU failed "
                                 f"({type(error).__name__}: {error})")
                    logger.warning("faiss GPU index failed: %s", notes[-1])
                else:
                    count = len(gpus) if gpus else faiss_gpu_count()
                    self._use(gpu_index, f"faiss-gpu {self.kind} ({count} GPU"
                              f"{'s' if count != 1 else ''})", probe.reason, on_gpu=True)
                    return
            else:
                notes.append(probe.reason)
        if backend == "torch" or (backend == "auto" and (
                precision != "fp32" or torch_device.type == "cuda")):
            if self.kind == "flat":
                searcher = TorchExactSearch(gallery(), torch_device, precision)
                reason = ("backend='torch'" if backend == "torch"
                          else f"precision={precision!r} needs the torch backend"
                          if precision != "fp32" else "torch sees CUDA")
                self._use(searcher, searcher.name, "; ".join([*notes, reason]),
                          on_gpu=torch_device.type == "cuda")
                return
            notes.append(f"the torch backend is exact only: a {self.kind} index stays faiss")
        self._use(self._cpu_search, f"faiss-cpu {self.kind}",
                  "; ".join(notes) or "device='cpu'", on_gpu=False)

    def _use(self, index, backend: str, reason: str, *, on_gpu: bool) -> None:
        self._index, self.backend, self.backend_reason, self._on_gpu = (
            index, backend, reason, on_gpu)
        logger.info("search backend: %s (%s)", backend, reason)

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    @property
    def exact(self) -> bool:
        """Whether search is exact (the flat kind)."""
        return self.kind == "flat"

    def graph_width(self, depth: int) -> int:
        """Candidates per row the kNN graph asks this index for (`knn.approximate_knn_graph`):
        depth + 8, or depth x GRAPH_REFINE for IVF-PQ, whose code scores are rough."""
        return depth * GRAPH_REFINE if self.kind == "ivfpq" else depth + 8

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k of the index in faiss's order: (similarities (Q, k) float32 descending,
        indices (Q, k) int64), -1 where an approximate index found fewer than k items; IVF-PQ
        similarities are code estimates (no rescoring). For `knn.approximate_knn_graph`."""
        searcher = self._index
        if k > FAISS_GPU_MAX_K and self.backend.startswith("faiss-gpu"):
            searcher = self._cpu_search
        similarities, indices = searcher.search(np.ascontiguousarray(queries, np.float32),
                                                int(min(k, self.size)))
        return similarities, indices.astype(np.int64)

    def _rescored(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ with the features at hand: k * refine code candidates, rescored exactly
        (float32 products of the gallery's own rows), best k. Else the raw search."""
        if self.kind != "ivfpq" or self._features is None:
            return self.neighbours(queries, k)
        width = min(k * self.refine, self.size)
        _, candidates = self.neighbours(queries, width)
        scores = np.empty(candidates.shape, np.float32)
        step = max(1, GATHER_ELEMENTS // (width * self.dim))
        for start in range(0, len(queries), step):
            part = candidates[start:start + step]
            rows = np.asarray(self._features[np.maximum(part, 0)], np.float32)
            scores[start:start + step] = np.matmul(rows, queries[start:start + step, :, None]
                                                   )[:, :, 0]
        return merge_top_k(scores, candidates, k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery items per query.

        Args:
            queries: (Q, d) float32 L2-normalised.
            k: 1 <= k <= gallery size.
        Returns:
            distances (Q, k) float32 = 1 - cosine, ascending; indices (Q, k) int64.

        On faiss-gpu, k > FAISS_GPU_MAX_K searches the CPU copy (faiss GPU selects at most
        that many). IVF-PQ rescores k * refine candidates from the features (`_rescored`).
        """
        queries = check_features(queries, "query features", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise InvalidInputError(
                f"k={k} is larger than the gallery ({self.size} items); use k <= {self.size}")
        similarities, indices = self._rescored(queries, int(k))
        if (indices < 0).any():  # approximate indexes can return fewer than k hits
            raise InvalidInputError(
                f"the {self.kind} index returned fewer than {k} neighbours; raise nprobe/efSearch "
                "or use kind='flat'")
        return (1.0 - similarities).astype(np.float32), indices.astype(np.int64)

    def measure_recall(self, queries: int = RECALL_QUERIES, seed: int = 0
                       ) -> dict[str, float | int]:
        """recall@10 and recall@100 of `search` against exact search, on `queries` seeded
        random gallery rows (as queries), tie-aware: a returned item counts when its similarity
        reaches the exact k-th (less float32 error). Flat is exact: 1.0 without measuring.
        Returns {"recall@10": r, "recall@100": r, "queries": n} (k capped at the size)."""
        if self.exact or self._features is None or queries < 1:
            return {**{f"recall@{k}": 1.0 for k in RECALL_DEPTHS}, "queries": 0} if (
                self.exact) else {}
        rows = np.sort(np.random.default_rng(seed).choice(
            self.size, min(queries, self.size), replace=False))
        sample = np.ascontiguousarray(self._features[rows], np.float32)
        depth = min(max(RECALL_DEPTHS), self.size)
        exact_values, _ = exact_candidates(self._features, sample, depth)
        recall: dict[str, float | int] = {}
        for k in RECALL_DEPTHS:
            k = min(k, self.size)
            _, found = self._rescored(sample, k)  # as `search(sample, k)` answers
            true = gathered_similarity(self._features, rows, found, np.float32)
            true[found < 0] = -np.inf
            bound = exact_values[:, k - 1:k] - FLOAT32_SLACK
            recall[f"recall@{k}"] = float(np.mean((true[:, :k] >= bound).sum(axis=1) / k))
        recall["queries"] = len(rows)
        logger.info("%s index recall on %d gallery rows: %s", self.kind, len(rows), recall)
        return recall

    def save(self, path: str | os.PathLike) -> None:
        """Write the (CPU copy of the) index atomically (flat: an empty index of its
        dimension; the features are the gallery's)."""
        faiss = faiss_module()
        with atomic_path(path) as temporary:
            faiss.write_index(self._cpu_index, str(temporary))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", *, precision: str = "fp32",
             backend: str = "auto", features: np.ndarray | None = None,
             refine: int = DEFAULT_REFINE, recall: dict[str, float | int] | None = None
             ) -> SearchIndex:
        """Read an index written by `save` and place it as the constructor would.

        features: the gallery's (n, d) features. A flat index searches them in place (an index
        file from before that holds vectors drops them); IVF-PQ rescores its candidates with
        them. Without them a flat file must hold its vectors.
        recall: the recall measured at build (kept with the index by its owner, e.g. the
        gallery cache manifest).
        """
        faiss = faiss_module()
        path = Path(path)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            from engine.errors import CacheError

            raise CacheError(f"index file {path} is unreadable ({error})") from error
        self = cls.__new__(cls)
        name = type(index).__name__
        self.kind = ("ivfpq" if "IVFPQ" in name else "ivf" if "IVF" in name
                     else "hnsw" if "HNSW" in name else "flat")
        self.kind_reason = "loaded"
        self.refine, self.recall = max(1, int(refine)), dict(recall or {})
        _check_options(self.kind, precision, backend)
        self.dim = int(index.d)
        self._features = None if features is None else check_store(features)
        if self.kind == "flat" and self._features is not None:
            index.reset()  # searched in place
        if self._features is not None:
            self.size = int(self._features.shape[0])
            if self._features.shape[1] != self.dim or (
                    self.kind != "flat" and index.ntotal != self.size):
                from engine.errors import CacheError

                raise CacheError(f"index file {path} holds {index.ntotal} vectors of "
                                 f"{self.dim} dimensions, not {self._features.shape}")
        elif self.kind == "flat" and index.ntotal == 0:
            raise InvalidInputError(f"the flat index {path} searches the gallery's features in "
                                    "place: load it with features=")
        else:
            self.size = int(index.ntotal)
        self._cpu_index = index
        if self.kind == "flat" and self._features is None:
            self._features = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal),
                                                  np.float32)
            index.reset()
        if self.exact and not self.recall:
            self.recall = {**{f"recall@{k}": 1.0 for k in RECALL_DEPTHS}, "queries": 0}
        store = self._features
        self._place(device, precision, backend,
                    lambda: check_features(store, "features"))
        return self


def exact_knn(features: np.ndarray, k: int, queries: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of `queries` (default: `features` themselves).

    Returns (similarities (n, k) float32 descending, indices (n, k) int64). Uses a faiss flat
    index on the CPU (BLAS, multi-threaded); the torch path of the re-rankers covers CUDA.
    """
    faiss = faiss_module()
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(np.ascontiguousarray(features, dtype=np.float32))
    similarities, indices = index.search(
        np.ascontiguousarray(features if queries is None else queries, dtype=np.float32), int(k))
    return similarities, indices.astype(np.int64)


if __name__ == "__main__" and sys.argv[1:2] == ["--probe-faiss-gpu"]:
    sys.exit(_probe_main(sys.argv[2:]))
