"""The benchmark at scale: index, kNN graph and every re-ranker on clustered synthetic galleries.

    python -m engine.bench.scale --sizes 10000 100000 --dim 768
    python -m engine.bench.scale --sizes 1000000 --dim 768 --store float16 --no-methods
    python -m engine.bench --synthetic 100000 --scale        # the same, for one size

Per size N: N clustered unit features (`engine.bench.measure.synthetic_collection`; above
`CHUNKED_ABOVE` items the same model generated in chunks, so that a million rows do not need
six float64 copies at once), less `--queries` held-out rows (the last ones) that serve as
queries. Then:

- the search index the gallery would build (`--index`, default "auto": `choose_index_kind`):
  its build seconds, recall@10 and recall@100 against exact search on 200 gallery rows, and
  the resident memory it added;
- the gallery kNN graph (`engine.search.gallery.build_knn_graph`: exact up to
  `EXACT_GRAPH_MAX` items, through an approximate index above): seconds, recall of the exact
  lists (all `--depth` entries, and the first 10) on 200 rows, and the mean error of the
  farthest similarity on those rows;
- per registered training-free method (and those that learn with `--learned`): fit seconds on
  `GalleryContext(features, knn=graph)`, online ms/query median and p95 over the held-out
  queries (wall, and CPU of the calling thread), batch seconds of the held-out queries where
  the method runs it (else its `batch_refusal`), and the peak resident growth (MiB) of fit and
  queries (`peak_memory`).

Every timing is printed beside the 1-minute load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.bench.measure import peak_memory, synthetic_collection
from engine.bench.tables import cell, markdown_table
from engine.core.logs import configure_logging
from engine.core.threads import configure_threads

logger = logging.getLogger("engine.bench.scale")

CHUNKED_ABOVE = 200_000
"""Sizes above this are generated in chunks (`synthetic_store`) rather than at once."""
GENERATION_CHUNK = 65536
RECALL_ROWS = 200
DEFAULT_QUERIES = 50
DEFAULT_DEPTH = 64
DEFAULT_BATCH_MAX = 20_000
"""Batch mode is timed up to this gallery size (`--batch-max`); above, a row says it was not."""


def synthetic_store(n: int, dim: int, dtype: str = "float32", folder: Path | None = None,
                    spread: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit features as `synthetic_collection` makes them (n / 20 class centres plus
    `spread` Gaussian noise), generated `GENERATION_CHUNK` rows at a time; with `folder`
    written there as a .npy of `dtype` and returned memory-mapped (as a features file is
    opened), else in memory. Up to `CHUNKED_ABOVE` float32 rows in memory it is exactly
    `synthetic_collection(n, dim, spread=spread, seed=seed)`.

    Returns (features (n, dim) of `dtype`, labels (n,) int64).
    """
    if n <= CHUNKED_ABOVE and folder is None:
        features, labels = synthetic_collection(n, dim, spread=spread, seed=seed)
        return features.astype(dtype, copy=False), labels
    rng = np.random.default_rng(seed)
    n_classes = max(2, n // 20)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    if folder is None:
        features = np.empty((n, dim), dtype)
    else:
        features = np.lib.format.open_memmap(folder / f"synthetic_{n}_{dim}.npy", mode="w+",
                                             dtype=dtype, shape=(n, dim))
    streams = np.random.SeedSequence(seed).spawn((n + GENERATION_CHUNK - 1) // GENERATION_CHUNK)
    for chunk, start in enumerate(range(0, n, GENERATION_CHUNK)):
        stop = min(start + GENERATION_CHUNK, n)
        noise = np.random.default_rng(streams[chunk]).standard_normal(
            (stop - start, dim), dtype=np.float32)
        rows = centres[labels[start:stop]] + spread * noise
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        features[start:stop] = rows
    if folder is not None:
        features.flush()
        del features
        features = np.load(folder / f"synthetic_{n}_{dim}.npy", mmap_mode="r")
    return features, labels


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


@dataclass
class MethodRow:
    method: str
    fit_seconds: float | None = None
    online_ms: float | None = None
    online_p95_ms: float | None = None
    online_cpu_ms: float | None = None
    batch: str = "-"
    peak_mib: float | None = None
    load: str = ""


@dataclass
class SizeResult:
    size: int
    dim: int
    store: str
    index_kind: str = ""
    index_reason: str = ""
    index_seconds: float = 0.0
    index_cpu: float = 0.0
    index_mib: float = 0.0
    recall: dict[str, float | int] = field(default_factory=dict)
    graph: str = ""
    graph_seconds: float = 0.0
    graph_cpu: float = 0.0
    graph_mib: float = 0.0
    graph_recall: float | None = None
    graph_recall_10: float | None = None
    farthest_error: float | None = None
    load: str = ""
    methods: list[MethodRow] = field(default_factory=list)


def farthest_error(features: np.ndarray, farthest: np.ndarray, rows: np.ndarray) -> float:
    """Mean |graph farthest - exact farthest| over `rows` (exact: a negated exact search)."""
    from engine.core.knn import exact_candidates, gathered_similarity

    queries = np.ascontiguousarray(features[rows], np.float32)
    _, opposite = exact_candidates(features, -queries, 1)
    exact = np.minimum(gathered_similarity(features, rows, opposite)[:, 0], 1.0)
    return float(np.mean(np.abs(farthest[rows] - exact)))


def time_online(reranker, queries: np.ndarray, k: int) -> tuple[float, float, float]:
    """Median and p95 wall ms, and median CPU ms of the calling thread, of single online
    queries (after a warm-up with the last one, which is not timed: every timed query is new,
    so none reuses a product kept from an earlier run, `float32_scores`)."""
    reranker.rerank(queries[-1:], k, mode="online")
    wall, cpu = [], []
    for query in queries[:-1] if len(queries) > 1 else queries:
        started, started_cpu = time.perf_counter(), time.thread_time()
        reranker.rerank(query[None, :], k, mode="online")
        wall.append(1000 * (time.perf_counter() - started))
        cpu.append(1000 * (time.thread_time() - started_cpu))
    return (statistics.median(wall), float(np.percentile(wall, 95)), statistics.median(cpu))


def run_methods(gallery: np.ndarray, graph, queries: np.ndarray, methods: Sequence[str],
                k: int, device: str, batch_max: int) -> list[MethodRow]:
    """Fit, online and batch rows of each method on `GalleryContext(gallery, knn=graph)`."""
    from engine.errors import TooLargeError
    from engine.rerank import GalleryContext, create_reranker

    # one float32 copy of a float16 store for every method, as a gallery gives its methods
    # (`Gallery.method_features`)
    context = GalleryContext(np.ascontiguousarray(gallery, np.float32), knn=graph)
    rows = []
    for name in methods:
        row = MethodRow(name, load=load())
        try:
            with peak_memory(device) as peak:
                started = time.perf_counter()
                reranker = create_reranker(name, device=device).fit(context)
                row.fit_seconds = time.perf_counter() - started
                row.online_ms, row.online_p95_ms, row.online_cpu_ms = time_online(
                    reranker, queries, k)
            row.peak_mib = peak["rss"]
            refusal = reranker.batch_refusal(len(gallery), len(queries))
            if refusal is not None:
                row.batch = f"refused: {refusal}"
            elif len(gallery) > batch_max:
                row.batch = f"not timed (gallery > --batch-max {batch_max})"
            else:
                started = time.perf_counter()
                reranker.rerank(queries, k, mode="batch")
                row.batch = f"{time.perf_counter() - started:.2f}"
        except (TooLargeError, MemoryError) as error:
            row.batch = f"failed: {type(error).__name__}: {error}"
        logger.info("%s: %s", name, row)
        rows.append(row)
    return rows


_reported = [-1]


def report_every_tenth(fraction: float, message: str) -> None:
    """Log the graph's progress each time it passes another tenth of the rows."""
    tenth = int(fraction * 10)
    if tenth != _reported[0]:
        _reported[0] = tenth
        logger.info("%s (load %s)", message, load())


def run_size(size: int, dim: int, *, store: str = "float32", index_kind: str = "auto",
             depth: int = DEFAULT_DEPTH, n_queries: int = DEFAULT_QUERIES,
             methods: Sequence[str] = (), k: int = 100, device: str = "cpu",
             batch_max: int = DEFAULT_BATCH_MAX, folder: Path | None = None) -> SizeResult:
    """One size's measurements (see the module docstring)."""
    from engine.core.knn import graph_recall
    from engine.search.gallery import build_knn_graph
    from engine.search.index import SearchIndex

    features, _ = synthetic_store(size, dim, store, folder)
    # The last rows are the held-out queries (labels are drawn at random, so any rows serve):
    # the gallery stays a view of the store, memory-mapped when it is.
    n_queries = max(1, min(n_queries, size - 2))
    gallery = features[:size - n_queries]
    queries = np.ascontiguousarray(features[size - n_queries:], np.float32)
    del features
    result = SizeResult(size, dim, f"{store}{', memory-mapped' if folder else ''}",
                        load=load())
    with peak_memory(device) as peak:
        started, cpu = time.perf_counter(), time.process_time()
        index = SearchIndex(gallery, kind=index_kind, device=device,
                            recall_queries=RECALL_ROWS)
        result.index_seconds = time.perf_counter() - started
        result.index_cpu = time.process_time() - cpu
    result.index_kind, result.index_reason = index.kind, index.kind_reason
    result.index_mib, result.recall = peak["rss"], dict(index.recall)
    with peak_memory(device) as peak:
        started, cpu = time.perf_counter(), time.process_time()
        graph = build_knn_graph(gallery, min(depth, len(gallery)), index, device,
                                progress=report_every_tenth)
        result.graph_seconds = time.perf_counter() - started
        result.graph_cpu = time.process_time() - cpu
    result.graph_mib = peak["rss"]
    result.graph = "exact" if graph.canonical else "approximate"
    result.graph_recall = 1.0 if graph.canonical else graph.recall
    rows = np.sort(np.random.default_rng(1).choice(len(gallery), min(RECALL_ROWS, len(gallery)),
                                                   replace=False))
    result.farthest_error = farthest_error(gallery, graph.farthest, rows)
    result.graph_recall_10 = (1.0 if graph.canonical
                              else graph_recall(gallery, graph.indices[:, :10], rows))
    logger.info("N=%d: %s", size, result)
    if methods:
        result.methods = run_methods(gallery, graph, queries, methods, min(k, len(gallery)),
                                     device, batch_max)
    return result


def format_results(results: Sequence[SizeResult], machine: str) -> str:
    """The index/graph table, then one method table per size."""
    headers = ["N", "d", "store", "index", "build s (CPU s)", "index MiB", "recall@10",
               "recall@100", "kNN graph", "graph s (CPU s)", "graph MiB", "graph recall",
               "graph recall@10", "farthest error", "load"]
    rows = []
    for r in results:
        rows.append([str(r.size), str(r.dim), r.store, r.index_kind,
                     f"{r.index_seconds:.1f} ({r.index_cpu:.1f})", f"{r.index_mib:.0f}",
                     cell(r.recall.get("recall@10"), ".3f"),
                     cell(r.recall.get("recall@100"), ".3f"), r.graph,
                     f"{r.graph_seconds:.1f} ({r.graph_cpu:.1f})", f"{r.graph_mib:.0f}",
                     cell(r.graph_recall, ".3f"), cell(r.graph_recall_10, ".3f"),
                     cell(r.farthest_error, ".2g"), r.load])
    parts = [markdown_table(f"Index and kNN graph ({machine}); recall against exact search on "
                            f"{RECALL_ROWS} gallery rows", headers, rows)]
    for r in results:
        if not r.methods:
            continue
        method_rows = [[m.method, cell(m.fit_seconds, ".1f"), cell(m.online_ms, ".1f"),
                        cell(m.online_p95_ms, ".1f"), cell(m.online_cpu_ms, ".1f"), m.batch,
                        cell(m.peak_mib, ".0f"), m.load] for m in r.methods]
        parts.append(markdown_table(
            f"N={r.size} ({r.index_kind} index, {r.graph} kNN graph), d={r.dim}",
            ["method", "fit s", "online ms median", "online ms p95", "CPU ms median",
             "batch s", "peak MiB", "load"], method_rows))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--synthetic", type=int, metavar="N", default=None,
                        help="one size (as `python -m engine.bench --synthetic N --scale`)")
    parser.add_argument("--scale", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--store", choices=("float32", "float16"), default="float32",
                        help="feature dtype; float16 is written to a temporary .npy and "
                        "memory-mapped, as a features file is opened")
    parser.add_argument("--index", default="auto", help="index kind (default: auto)")
    parser.add_argument("--depth", type=int, default=None,
                        help="kNN graph depth (default: the deepest the methods read, at least "
                             f"{DEFAULT_DEPTH}, as a gallery builds it)")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                        help="held-out queries timed online")
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="re-rankers (default: every training-free one)")
    parser.add_argument("--learned", action="store_true", help="also the methods that learn")
    parser.add_argument("--no-methods", action="store_true", help="index and graph only")
    parser.add_argument("--batch-max", type=int, default=DEFAULT_BATCH_MAX)
    parser.add_argument("--device", default="cpu")
    args, _ = parser.parse_known_args(argv)
    sizes = args.sizes or ([args.synthetic] if args.synthetic else [10_000])
    configure_logging(fmt="%(levelname)s %(name)s: %(message)s")
    budget = configure_threads()
    from engine.rerank import get_reranker_class, list_rerankers, shared_graph_depth

    if args.no_methods:
        methods: list[str] = []
    else:
        methods = args.methods or [name for name in list_rerankers()
                                   if args.learned or not get_reranker_class(name).learns]
    depth = args.depth or max(DEFAULT_DEPTH, shared_graph_depth(methods))
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as temporary:
        for size in sizes:
            folder = Path(temporary) if args.store == "float16" else None
            results.append(run_size(size, args.dim, store=args.store, index_kind=args.index,
                                    depth=depth, n_queries=args.queries, methods=methods,
                                    k=args.top, device=args.device, batch_max=args.batch_max,
                                    folder=folder))
            print(format_results(results[-1:], f"{os.cpu_count()} CPUs"), flush=True)
    machine = (f"{os.cpu_count()} CPUs, threads: {budget.describe()}, load average at each "
               "row's start")
    print("\n" + format_results(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
