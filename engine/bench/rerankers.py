"""Benchmark: accuracy, batch time, online latency and peak memory of every re-ranker.

    python -m engine.bench                                  # demo gallery, leave-one-out
    python -m engine.bench --gallery path/to/oxford17 --protocol oxford17-split
    python -m engine.bench --synthetic 20000 --methods gnn  # scale run on clustered features
    python -m engine.bench --features feats.npz             # a labelled features file
    python -m engine.bench --features db.npz --queries q.npz --gnd gnd_roxford5k.pkl
    python -m engine.bench --gallery path/to/oxford17 --protocol oxford17-heldout \
        --methods k_reciprocal ssr:train_classes=9 ssr:train_classes=9,after_k_reciprocal=true
    python -m engine.bench --gallery path/to/oxford17 --asymmetric   # SSP table
    python -m engine.bench --online --busy                  # online latency, quiet and busy
    python -m engine.bench --online --synthetic 2000 --spread 2.5 --busy
    python -m engine.bench --card ~/.cache/retrieval-explorer/runs/bench-<time>.json

Prints one table. Batch seconds are for all gallery images as queries against the rest
(leave-one-out, transductive); online ms/query is the median over single queries against the
fitted gallery; fit seconds cover precomputation and, for methods that learn, training; peak
memory is the largest resident-set growth (CPU) or CUDA allocation during that method's fit and
batch runs.

With `--queries` and `--gnd` (beside `--features`) the table is the revisited Oxford/Paris one
(Radenovic et al. 2018, `engine.evaluation.revisited`): the queries file's vectors ranked
against the whole gallery (batch mode), per method mAP and mP@1/5/10 in the Easy, Medium and
Hard settings, junk removed per setting; items are matched to the ground truth by name.

Every run writes its run card (`engine.bench.cards`: backbone and weights hash, gallery,
protocol, each method's complete parameters, versions, device, date, figures) to `--card-out`
(default `<cache root>/runs/bench-<UTC time>.json`); `--card run.json` runs what a card
describes again and prints its figures beside the new ones.

`--online` prints the online table instead: each training-free method with its authors'
defaults and with the demo gallery's preset, fitted on the collection less 50 held-out items,
and the median ms of single held-out queries; with `--busy` the same queries again while a
second CPU-bound process (a pure-Python loop, one core) runs. The process runs under
`engine.core.threads.configure_threads()`, as the app does.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.cards import (
    BenchRun,
    bench_card,
    comparison,
    default_card_path,
    replay_argv,
)
from engine.bench.measure import busy_process, peak_memory, synthetic_collection
from engine.bench.tables import cell, markdown_table
from engine.core.logs import configure_logging
from engine.core.threads import configure_threads
from engine.errors import InvalidInputError, TooLargeError
from engine.evaluation.protocols import PROTOCOLS, Split, make_split
from engine.evaluation.revisited import REVISITED_PROTOCOLS, RevisitedScores, revisited_map
from engine.evaluation.runcard import RunCard, gallery_entry
from engine.evaluation.scores import median_ms, run_split, score_split, split_context, without_self
from engine.rerank import (
    GalleryContext,
    create_reranker,
    get_reranker_class,
    list_rerankers,
)

logger = logging.getLogger("engine.bench.rerankers")

ONLINE_QUERIES = 50


@dataclass
class Row:
    method: str
    map: float
    p1: float
    p5: float
    batch_seconds: float | None
    online_ms: float | None
    peak_mib: float | None
    gpu_mib: float | None = None
    fit_seconds: float | None = None


def _baseline(features: np.ndarray, split: Split, k: int) -> np.ndarray:
    from engine.search.index import exact_knn

    gallery = features[split.gallery_rows]
    if split.leave_one_out:
        similarities, indices = exact_knn(gallery, k + 1)
        return without_self(similarities, indices, k)[1]
    _, indices = exact_knn(gallery, k, queries=features[split.query_rows])
    return indices


def run(features: np.ndarray, labels: np.ndarray, protocol: str, methods: Sequence[str],
        top: int | None, device: str, online_queries: int = ONLINE_QUERIES,
        state_dir: Path | None = None) -> list[Row]:
    """Evaluate the baseline and each method on one collection; return the table rows.

    state_dir: where methods that learn keep their trained state (a saved state is loaded; its
    training time, from the manifest, is then what the "fit s" column shows)."""
    split = make_split(protocol, labels)
    gallery = features[split.gallery_rows]
    available = len(gallery) - 1 if split.leave_one_out else len(gallery)
    k = available if top is None else min(top, available)
    baseline = score_split(_baseline(features, split, k), split, labels)
    rows = [Row("baseline (cosine)", baseline.map, baseline.precision_at[1],
                baseline.precision_at[5], None, None, None)]
    # Only SSR with train_classes > 0 reads the labels of a protocol's training items.
    context, queries = split_context(features, labels, split, state_dir=state_dir)
    online_set = (gallery if queries is None else queries)[:online_queries]
    for spec in methods:
        name, params = parse_method(spec)
        with peak_memory(device) as memory:
            started = time.perf_counter()
            reranker = create_reranker(name, device=device, **params).fit(context)
            fit_seconds = time.perf_counter() - started
            try:
                scores = run_split(reranker, split, labels, queries, k).scores
                started = time.perf_counter()
                reranker.rerank(None, min(k, len(gallery) - 1))
                batch_seconds = time.perf_counter() - started
            except TooLargeError as refusal:  # the method says why, with the number
                rows.append(Row(f"{spec}: {refusal}", math.nan, math.nan, math.nan, None,
                                None, None, fit_seconds=fit_seconds))
                continue
        row = Row(spec, scores.map, scores.precision_at[1], scores.precision_at[5],
                  batch_seconds, None, None)
        row.fit_seconds = getattr(reranker, "training_seconds", None) or fit_seconds
        row.peak_mib = memory.get("rss")
        row.gpu_mib = memory.get("gpu")
        row.online_ms = median_ms(functools.partial(reranker.rerank, k=k, mode="online"),
                                  online_set)
        rows.append(row)
    return rows


REVISITED_KAPPAS = (1, 5, 10)


@dataclass
class RevisitedRow:
    """One method's revisited scores (percent) and its fit and batch seconds (None: baseline)."""

    method: str
    scores: RevisitedScores
    fit_seconds: float | None = None
    batch_seconds: float | None = None


def run_revisited(gallery: np.ndarray, queries: np.ndarray, gnd: Sequence[dict[str, list[int]]],
                  methods: Sequence[str], top: int | None, device: str,
                  state_dir: Path | None = None) -> list[RevisitedRow]:
    """Rank the queries against the gallery with the baseline and each method (batch mode) and
    score them by the revisited protocol.

    Args:
        gallery: (G, d) unit rows. queries: (Q, d) unit rows, not part of the gallery.
        gnd: Q dicts of gallery rows, in the queries' order (`align_revisitop_gnd`).
        top: ranking length (default the whole gallery, as revisitop scores).
    """
    from engine.search.index import exact_knn

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = len(gallery) if top is None else min(top, len(gallery))
    rows = [RevisitedRow("baseline (cosine)",
                         revisited_map(exact_knn(gallery, k, queries=queries)[1], gnd,
                                       REVISITED_KAPPAS))]
    context = GalleryContext(gallery, state_dir=state_dir)
    for spec in methods:
        name, params = parse_method(spec)
        started = time.perf_counter()
        reranker = create_reranker(name, device=device, **params).fit(context)
        fit_seconds = getattr(reranker, "training_seconds", None) or (
            time.perf_counter() - started)
        started = time.perf_counter()
        result = reranker.rerank(queries, k)
        rows.append(RevisitedRow(spec, revisited_map(result.indices, gnd, REVISITED_KAPPAS),
                                 fit_seconds, time.perf_counter() - started))
    return rows


def format_revisited_table(rows: Sequence[RevisitedRow], title: str) -> str:
    """The revisited rows as a Markdown table: mAP and mP@1/5/10 per setting (E, M, H), in
    percent, and the excluded queries (without positives in a setting) in the title."""
    headers = ["method"]
    for protocol in REVISITED_PROTOCOLS:
        letter = protocol[0].upper()
        headers += [f"{letter} mAP", *(f"{letter} mP@{kappa}" for kappa in REVISITED_KAPPAS)]
    headers += ["fit s", "batch s"]
    lines = []
    for row in rows:
        line = [row.method]
        for protocol in REVISITED_PROTOCOLS:
            line += [f"{row.scores.map[protocol]:.2f}",
                     *(f"{row.scores.mp_at[protocol][kappa]:.2f}" for kappa in REVISITED_KAPPAS)]
        lines.append([*line, cell(row.fit_seconds, ".2f"), cell(row.batch_seconds, ".3f")])
    if rows:
        excluded = rows[0].scores.n_excluded
        dropped = [f"{count} from {protocol}" for protocol, count in excluded.items() if count]
        if dropped:
            title += f" (queries without positives left out: {', '.join(dropped)})"
    return markdown_table(title, headers, lines)


@dataclass
class OnlineRow:
    method: str
    parameters: str
    fit_seconds: float
    quiet_ms: float
    quiet_cpu_ms: float = 0.0
    busy_ms: float | None = None


def held_out_rows(n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` query rows spread evenly over n items (every class of a sorted collection gets
    some) and the gallery rows left."""
    count = max(1, min(count, n - 2))
    queries = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    return queries, np.setdiff1d(np.arange(n), queries)


def training_free_methods() -> list[str]:
    """Registered methods that do not learn (fit precomputes only)."""
    return [name for name in list_rerankers() if not get_reranker_class(name).learns]


def online_specs(methods: Sequence[str], presets: dict[str, dict[str, object]]
                 ) -> list[tuple[str, str]]:
    """(spec, label) per method: its authors' defaults, then its preset when there is one."""
    specs = []
    for method in methods:
        name, _ = parse_method(method)
        specs.append((method, "authors' defaults" if method == name else "given"))
        if method == name and name in presets:
            values = ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                              for key, value in presets[name].items())
            specs.append((f"{name}:{values}", "demo preset"))
    return specs


def median_online_ms(reranker, queries: np.ndarray, k: int) -> tuple[float, float]:
    """Median wall ms and median CPU ms of the calling thread (`time.thread_time`) of
    `rerank(query, k, mode="online")` over the queries, after a warm-up.

    An online query runs on its calling thread only (`engine.core.threads.query_threads`), so its
    CPU time is about what it takes on an idle core, whatever else the machine runs.
    """
    reranker.rerank(queries[:1], k, mode="online")
    wall, cpu = [], []
    for query in queries:
        started, started_cpu = time.perf_counter(), time.thread_time()
        reranker.rerank(query[None, :], k, mode="online")
        wall.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def run_online(features: np.ndarray, specs: Sequence[tuple[str, str]], top: int | None,
               device: str, online_queries: int = ONLINE_QUERIES, busy: bool = False
               ) -> tuple[list[OnlineRow], str]:
    """The online table's rows: every spec fitted on the collection less `online_queries`
    held-out items, then timed on those (quiet, and with `busy_process` when `busy`).

    Returns the rows and a note of the load: the 1-minute load average before each pass and
    what the busy pass ran beside.
    """
    query_rows, gallery_rows = held_out_rows(len(features), online_queries)
    queries = features[query_rows]
    context = GalleryContext(features[gallery_rows])
    k = len(gallery_rows) if top is None else min(top, len(gallery_rows))
    fitted, rows = [], []
    for spec, label in specs:
        name, params = parse_method(spec)
        started = time.perf_counter()
        reranker = create_reranker(name, device=device, **params).fit(context)
        fitted.append(reranker)
        values = spec.partition(":")[2]
        shown = {"authors' defaults": label, "given": values}.get(label, f"{label}: {values}")
        rows.append(OnlineRow(name, shown, time.perf_counter() - started, 0.0))
    note = f"load average {os.getloadavg()[0]:.2f} before the quiet pass"
    for row, reranker in zip(rows, fitted, strict=True):
        row.quiet_ms, row.quiet_cpu_ms = median_online_ms(reranker, queries, k)
    if busy:
        with busy_process() as description:
            note += f"; busy pass beside {description} (load {os.getloadavg()[0]:.2f})"
            for row, reranker in zip(rows, fitted, strict=True):
                row.busy_ms = median_online_ms(reranker, queries, k)[0]
    note += f"; {len(gallery_rows)} gallery items, {len(queries)} held-out queries, top {k}"
    return rows, note


def format_online_table(rows: Sequence[OnlineRow], title: str) -> str:
    """The online rows as a Markdown table (a busy column only when it was measured)."""
    busy = any(row.busy_ms is not None for row in rows)
    headers = ["method", "parameters", "fit s", "online ms/query (quiet)",
               "CPU ms/query (quiet)"]
    if busy:
        headers += ["online ms/query (busy)", "busy / quiet"]
    lines = []
    for row in rows:
        line = [row.method, row.parameters, f"{row.fit_seconds:.2f}", f"{row.quiet_ms:.2f}",
                f"{row.quiet_cpu_ms:.2f}"]
        if busy:
            ratio = None if row.busy_ms is None else row.busy_ms / row.quiet_ms
            line += [cell(row.busy_ms, ".2f"), cell(ratio, ".2f")]
        lines.append(line)
    return markdown_table(title, headers, lines)


def parse_method(spec: str) -> tuple[str, dict[str, float | bool]]:
    """'gnn' or 'gnn:lambda_value=0,k1=20' or 'ssr:after_k_reciprocal=true' -> (name,
    parameter overrides)."""
    name, _, overrides = spec.partition(":")
    params: dict[str, float | bool] = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if value.strip().lower() in ("true", "false"):
            params[key.strip()] = value.strip().lower() == "true"
            continue
        number = float(value)
        params[key.strip()] = int(number) if number.is_integer() and "." not in value else number
    return name, params


TABLE_HEADERS = ("method", "mAP", "P@1", "P@5", "fit s", "batch s", "online ms/query",
                 "peak MiB (RSS)", "peak MiB (GPU)")


def table_figures(rows: Sequence[Row]) -> list[list[Any]]:
    """The rows' numbers in `TABLE_HEADERS` order (for the run card)."""
    return [[row.method, row.map, row.p1, row.p5, row.fit_seconds, row.batch_seconds,
             row.online_ms, row.peak_mib, row.gpu_mib] for row in rows]


def format_table(rows: Sequence[Row], title: str) -> str:
    """The benchmark's rows as a Markdown table."""
    headers = TABLE_HEADERS
    return markdown_table(title, headers, [
        (row.method, f"{row.map:.4f}", f"{row.p1:.4f}", f"{row.p5:.4f}",
         cell(row.fit_seconds, ".2f"), cell(row.batch_seconds, ".3f"),
         cell(row.online_ms, ".2f"), cell(row.peak_mib, ".0f"), cell(row.gpu_mib, ".0f"))
        for row in rows])


def extraction_speed(folder: Path, count: int, device: str) -> tuple[float, int]:
    """Images per second of FeatureExtractor.embed on `count` files of `folder` (decode included),
    after one warm-up batch."""
    from engine.features.backbone import get_extractor
    from engine.features.images import list_image_files

    files = list_image_files(folder)[:count]
    extractor = get_extractor(device=device)
    extractor.embed(files[: extractor.batch_size])
    started = time.perf_counter()
    extractor.embed(files)
    return len(files) / (time.perf_counter() - started), len(files)


def main(argv: Sequence[str] | None = None) -> int:
    if "--scale" in (sys.argv[1:] if argv is None else argv):  # the scale table
        return __import__("engine.bench.scale", fromlist=["main"]).main(argv)
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gallery", type=Path, help="image folder (default: the demo gallery)")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="N clustered random features instead of images")
    source.add_argument("--features", type=Path, metavar="PATH",
                        help="a labelled features file (.npy/.npz/.safetensors, see the "
                        "README's 'Bring your own features') instead of images")
    parser.add_argument("--queries", type=Path, metavar="PATH",
                        help="with --features and --gnd: a features file of the query vectors "
                        "(same dimension), ranked against the whole --features gallery")
    parser.add_argument("--gnd", type=Path, metavar="PATH",
                        help="with --features and --queries: a revisitop ground truth "
                        "(gnd_roxford5k.pkl, gnd_rparis6k.pkl); prints the revisited table "
                        "(Easy/Medium/Hard mAP and mP@1/5/10, junk removed per setting)")
    parser.add_argument("--dim", type=int, default=1280, help="feature size for --synthetic")
    parser.add_argument("--spread", type=float, default=0.6,
                        help="cluster noise for --synthetic (see synthetic_collection)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="leave-one-out")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="re-rankers to run, optionally with parameters, e.g. "
                        "gnn:lambda_value=0 "
                        f"(default all: {', '.join(list_rerankers())})")
    parser.add_argument("--top", type=int, default=None,
                        help="ranking length (default: full ranking; 100 for --synthetic)")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda[:N]; "
                        "with --card: instead of the card's")
    parser.add_argument("--extraction", type=int, default=0, metavar="N",
                        help="also time feature extraction on N images of the gallery")
    parser.add_argument("--online-queries", type=int, default=None, metavar="N",
                        help=f"queries timed online (default {ONLINE_QUERIES}; 5 for --synthetic)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--online", action="store_true",
                        help="print the online latency table instead: training-free methods "
                        "(or --methods) with the authors' defaults and the demo presets, "
                        "median ms of single held-out queries")
    parser.add_argument("--busy", action="store_true",
                        help="with --online: also time the queries beside a second CPU-bound "
                        "process (a pure-Python loop)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="print the asymmetric query-model table instead (SSP against "
                        "symmetric lite0/lite2, untrained and ridge maps; engine.bench.asymmetric)")
    parser.add_argument("--card-out", type=Path, default=None, metavar="PATH",
                        help="where the run card goes (default: <cache root>/runs/"
                        "bench-<UTC time>.json; the cache root is --cache-dir, else "
                        "$RETRIEVAL_EXPLORER_CACHE, else ~/.cache/retrieval-explorer)")
    parser.add_argument("--card", type=Path, default=None, metavar="PATH",
                        help="run what this run card describes again and print its figures "
                        "beside the new ones (mAP differences, time ratios)")
    args = parser.parse_args(argv)
    device_given, args.device = args.device, args.device or "auto"
    if args.asymmetric:
        from engine.bench import asymmetric as bench_asymmetric
        from engine.search.gallery import DEMO_GALLERY

        protocol = "oxford17-heldout" if args.protocol == "leave-one-out" else args.protocol
        forwarded = ["--gallery", str(args.gallery or DEMO_GALLERY), "--protocol", protocol,
                     "--device", args.device]
        if args.cache_dir:
            forwarded += ["--cache-dir", str(args.cache_dir)]
        return bench_asymmetric.main(forwarded)
    configure_logging(fmt="%(levelname)s %(name)s: %(message)s")
    budget = configure_threads()
    card = None
    if args.card is not None:
        card = RunCard.load(args.card)
        card_out = args.card_out
        args = parser.parse_args(replay_argv(card, device_given))
        args.card_out = card_out
    run = _bench(parser, args, budget.describe())
    print(run.table)
    now = bench_card(run, args, _device(args), parse_method)
    if card is not None:
        print()
        print(comparison(card, now))
    path = now.save(args.card_out or default_card_path(_cache_root(args)))
    print(f"\nrun card: {path}")
    return 0


def _device(args: argparse.Namespace) -> str:
    from engine.core.device import resolve_device

    return str(resolve_device(args.device))


def _cache_root(args: argparse.Namespace) -> Path:
    from engine.search.gallery import default_cache_root

    return Path(args.cache_dir) if args.cache_dir else default_cache_root()


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, budget: str
           ) -> BenchRun:
    """Run the table the options ask for (main, revisited or online)."""
    device = _device(args)
    if args.online:
        return _main_online(args, device, budget)
    methods = args.methods or list_rerankers()
    if args.queries is not None or args.gnd is not None:
        if args.features is None or args.queries is None or args.gnd is None:
            parser.error("--queries and --gnd go together, with --features (the gallery)")
        return _main_revisited(args, methods, device)
    backbone = weights = None
    if args.synthetic:
        features, labels = synthetic_collection(args.synthetic, args.dim, spread=args.spread)
        title = (f"synthetic N={args.synthetic}, d={args.dim}, spread {args.spread}, "
                 f"protocol {args.protocol}, device {device}")
        top = args.top or 100
        state_dir = None
        entry = _synthetic_entry(args)
    elif args.features:
        from engine.search.gallery import Gallery

        gallery = Gallery.open_features(args.features, cache_root=args.cache_dir,
                                        device=args.device)
        if gallery.labels is None or (gallery.labels < 0).all():
            parser.error(f"{args.features} has no labels (an .npz 'labels' array)")
        features, labels = gallery.features, gallery.labels
        state_dir = gallery.state_dir / "bench"
        title = (f"{args.features.name} ({gallery.size} items, d={features.shape[1]}), "
                 f"protocol {args.protocol}, device {device}")
        top = args.top
        entry = gallery_entry(gallery)
        backbone, weights = gallery.meta.backbone, gallery.meta.weights
    else:
        from engine.search.gallery import DEMO_GALLERY, Gallery

        folder = args.gallery or DEMO_GALLERY
        gallery = Gallery.open(folder, cache_root=args.cache_dir, device=args.device,
                               progress=lambda fraction, message: logger.info(message)
                               if int(fraction * 100) % 10 == 0 else None)
        if gallery.labels is None:
            parser.error(f"{folder} has no labels (labels.csv or class sub-folders)")
        features, labels = gallery.features, gallery.labels
        state_dir = gallery.state_dir / "bench"
        title = (f"{Path(folder).name} ({gallery.size} images, {gallery.meta.backbone}), "
                 f"protocol {args.protocol}, device {device}")
        top = args.top
        entry = gallery_entry(gallery)
        backbone, weights = gallery.meta.backbone, gallery.meta.weights
        if args.extraction:
            speed, count = extraction_speed(Path(folder), args.extraction, args.device)
            print(f"feature extraction: {speed:.1f} images/s over {count} images "
                  f"(JPEG decode + resize + {gallery.meta.backbone}, {device})")
    online_queries = args.online_queries or (5 if args.synthetic else ONLINE_QUERIES)
    rows = run(features, labels, args.protocol, methods, top, device, online_queries,
               state_dir)
    return BenchRun("table", title, format_table(rows, title), list(TABLE_HEADERS),
                    table_figures(rows), entry, args.protocol, list(methods), backbone,
                    weights)


def _synthetic_entry(args: argparse.Namespace) -> dict[str, Any]:
    """A run card's gallery for a synthetic collection: its recipe (it is drawn again from
    it, with its fixed seed)."""
    from engine.core.storage import fingerprint

    recipe = {"n": args.synthetic, "dim": args.dim, "spread": args.spread}
    return {"name": f"synthetic N={args.synthetic}", "fingerprint": fingerprint(recipe),
            "size": args.synthetic, "path": None, "kind": "synthetic", "recipe": recipe}


def _main_revisited(args: argparse.Namespace, methods: Sequence[str], device: str
                    ) -> BenchRun:
    from engine.evaluation.revisited import align_revisitop_gnd, load_revisitop_gnd
    from engine.search.features_file import load_features_file
    from engine.search.gallery import Gallery

    data = load_revisitop_gnd(args.gnd)
    gallery = Gallery.open_features(args.features, cache_root=args.cache_dir, device=args.device)
    queries = load_features_file(args.queries)
    if queries.features.shape[1] != gallery.features.shape[1]:
        raise InvalidInputError(
            f"the queries in {args.queries.name} have {queries.features.shape[1]} dimensions, "
            f"the gallery {args.features.name} {gallery.features.shape[1]}")
    gnd = align_revisitop_gnd(data, gallery.files, queries.names)
    rows = run_revisited(gallery.features, queries.features, gnd, methods, args.top, device,
                         gallery.state_dir / "bench")
    title = (f"revisited {args.gnd.name}: {len(queries.names)} queries ({args.queries.name}) "
             f"against {gallery.size} items ({args.features.name}, "
             f"d={gallery.features.shape[1]}), device {device}, percent")
    headers = ["method"]
    for protocol in REVISITED_PROTOCOLS:
        letter = protocol[0].upper()
        headers += [f"{letter} mAP", *(f"{letter} mP@{kappa}" for kappa in REVISITED_KAPPAS)]
    figures = [[row.method,
                *(value for protocol in REVISITED_PROTOCOLS
                  for value in (row.scores.map[protocol],
                                *(row.scores.mp_at[protocol][k] for k in REVISITED_KAPPAS))),
                row.fit_seconds, row.batch_seconds] for row in rows]
    return BenchRun("revisited", title, format_revisited_table(rows, title),
                    [*headers, "fit s", "batch s"], figures, gallery_entry(gallery),
                    f"revisited Oxford/Paris ({args.gnd.name}; {len(queries.names)} queries of "
                    f"{args.queries.name})", list(methods), gallery.meta.backbone,
                    gallery.meta.weights)


def _main_online(args: argparse.Namespace, device: str, budget: str) -> BenchRun:
    from engine.evaluation.tuning import load_presets
    from engine.search.gallery import DEMO_GALLERY

    backbone = weights = None
    if args.synthetic:
        features, _ = synthetic_collection(args.synthetic, args.dim, spread=args.spread)
        source = f"synthetic N={args.synthetic}, d={args.dim}, spread {args.spread}"
        entry = _synthetic_entry(args)
    else:
        from engine.search.gallery import Gallery

        folder = args.gallery or DEMO_GALLERY
        gallery = Gallery.open(folder, cache_root=args.cache_dir, device=args.device)
        features = gallery.features
        source = f"{Path(folder).name} ({gallery.size} images, {gallery.meta.backbone})"
        entry = gallery_entry(gallery)
        backbone, weights = gallery.meta.backbone, gallery.meta.weights
    specs = online_specs(args.methods or training_free_methods(), load_presets(DEMO_GALLERY))
    rows, note = run_online(features, specs, args.top, device,
                            args.online_queries or ONLINE_QUERIES, args.busy)
    title = (f"Online ms/query (median over single queries), {source}, device {device}, "
             f"{note}; threads: {budget}")
    figures = [[f"{row.method} ({row.parameters})", row.fit_seconds, row.quiet_ms,
                row.quiet_cpu_ms, row.busy_ms] for row in rows]
    return BenchRun("online", title, format_online_table(rows, title),
                    ["method", "fit s", "online ms/query (quiet)", "CPU ms/query (quiet)",
                     "online ms/query (busy)"], figures, entry,
                    f"online: {args.online_queries or ONLINE_QUERIES} held-out queries",
                    [spec for spec, _ in specs], backbone, weights)


if __name__ == "__main__":
    sys.exit(main())
