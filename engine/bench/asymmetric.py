"""Asymmetric retrieval benchmark: a light query model against a gallery indexed with a big one.

    python -m engine.bench.asymmetric --gallery path/to/oxford17 \
        --protocol oxford17-heldout

Rows (queries -> gallery):
  symmetric lite0            lite0 queries, lite0 gallery
  symmetric lite2            lite2 queries, lite2 gallery (the ceiling)
  lite0 -> lite2, untrained  lite0 queries, lite2 gallery (incompatible spaces: the floor)
  lite0 -> lite2, ridge map  lite0 queries mapped by a closed-form ridge regression fitted on
                             the training images' lite0 and lite2 features (alpha by 5-fold CV):
                             the page's "ridge" query model (`engine.asymmetric.maps`)
  lite0 -> lite2, Procrustes lite0 queries rotated by the orthogonal map fitted on the same pairs:
                             the page's "procrustes" query model
  SSP                        the SSP query model (lite0 + head, `engine.asymmetric`) from the query
                             images, lite2 gallery

The learners (ridge, SSP) see only the protocol's training images (oxford17-heldout: classes
0..8) or, for protocols without them, the gallery images; never a label. Every ranking covers
the whole gallery (mAP over the full ranking). Query cost is the median wall time of embedding
one query image (decode included) on the benchmark's device, and the query model's parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.logs import configure_logging
from engine.errors import InvalidInputError
from engine.evaluation.protocols import PROTOCOLS, make_split

logger = logging.getLogger("engine.bench.asymmetric")

TIMING_IMAGES = 20


@dataclass
class AsymmetricRow:
    """One line of the table; `indices` is the (Q, G) ranking (gallery rows of the split)."""

    method: str
    query_model: str
    gallery_model: str
    map: float
    p1: float
    p5: float
    train_seconds: float | None
    query_ms: float | None
    query_parameters: int
    note: str = ""
    indices: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64), repr=False)


def _parameters(model: Any) -> int:
    """Parameters of a timm model without its classifier (what a query embedding uses)."""
    classifier = model.get_classifier()
    return (sum(p.numel() for p in model.parameters())
            - sum(p.numel() for p in classifier.parameters()))


def _median_ms(embed: Callable[[Sequence[Any]], np.ndarray], images: Sequence[Any]) -> float:
    """Median wall time of embedding one image at a time (after one warm-up)."""
    embed(images[:1])
    timings = []
    for image in images:
        started = time.perf_counter()
        embed([image])
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def rank_all(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) gallery rows of each query by descending inner product."""
    from engine.search.index import exact_knn

    return exact_knn(gallery, len(gallery), queries=queries)[1]


def asymmetric_rows(folder: str | Path, protocol: str, *, config: Any = None,
                    device: str = "cpu", cache_root: str | Path | None = None,
                    state_dir: str | Path | None = None, timing_images: int = TIMING_IMAGES,
                    retrain: bool = False,
                    progress: Callable[[float, str], None] | None = None
                    ) -> list[AsymmetricRow]:
    """Evaluate the six asymmetric rows (see the module docstring) on a labelled folder.

    Args:
        folder: labelled image folder (labels.csv or class sub-folders).
        protocol: a protocol with separate queries (oxford17-heldout, oxford17-split).
        config: engine.asymmetric.SSPConfig of the query model (default: the CPU recipe).
        device: "cpu", "cuda" or "auto" for extraction, training and timing.
        cache_root: gallery caches (default: the engine's).
        state_dir: where the SSP state goes (default: the lite2 gallery's state folder).
        timing_images: query images timed one at a time (0: no timing).
        retrain: train SSP even when a saved state matches.
    """
    from engine.asymmetric import GALLERY_BACKBONE, MappedQueryModel, SSPConfig, fit_or_load
    from engine.evaluation.metrics import evaluate
    from engine.features.backbone import get_extractor
    from engine.search.gallery import Gallery

    config = config or SSPConfig()
    report = progress or (lambda fraction, message: logger.info(message))
    query_extractor = get_extractor(config.query_backbone, config.query_weights, device=device)
    gallery_extractor = get_extractor(GALLERY_BACKBONE, device=device)
    query_side = Gallery.open(folder, extractor=query_extractor, cache_root=cache_root,
                              device=device)
    gallery_side = Gallery.open(folder, extractor=gallery_extractor, cache_root=cache_root,
                                device=device, progress=report)
    if query_side.files != gallery_side.files:
        raise InvalidInputError(f"the two backbones decoded different files of {folder}")
    if gallery_side.labels is None:
        raise InvalidInputError(f"{folder} has no labels (labels.csv or class sub-folders)")
    labels = gallery_side.labels
    split = make_split(protocol, labels)
    if split.query_rows is None:
        raise InvalidInputError(f"protocol {protocol!r} has no separate queries; use one of "
                                f"{[name for name in PROTOCOLS if name != 'leave-one-out']}")
    training = split.training_rows if split.training_rows is not None else split.gallery_rows
    query_paths = [gallery_side.path_of(int(i)) for i in split.query_rows]
    training_paths = [gallery_side.path_of(int(i)) for i in training]
    timed = query_paths[:timing_images]
    query_name, gallery_name = config.query_backbone, GALLERY_BACKBONE
    small = query_side.features
    large = gallery_side.features

    def scored(method: str, queries: np.ndarray, gallery: np.ndarray, query_model: str,
               gallery_model: str, **extra: Any) -> AsymmetricRow:
        indices = rank_all(queries, gallery[split.gallery_rows])
        scores = evaluate(indices, labels[split.query_rows], labels[split.gallery_rows],
                          ks=(1, 5), n_positives=split.n_positives)
        return AsymmetricRow(method, query_model, gallery_model, scores.map,
                             scores.precision_at[1], scores.precision_at[5],
                             indices=indices, **extra)

    small_ms = _median_ms(query_extractor.embed, timed) if timed else None
    large_ms = _median_ms(gallery_extractor.embed, timed) if timed else None
    small_params = _parameters(query_extractor.model)
    large_params = _parameters(gallery_extractor.model)
    rows = [
        scored("symmetric lite0", small[split.query_rows], small, query_name, query_name,
               train_seconds=None, query_ms=small_ms, query_parameters=small_params),
        scored("symmetric lite2 (ceiling)", large[split.query_rows], large, gallery_name,
               gallery_name, train_seconds=None, query_ms=large_ms,
               query_parameters=large_params),
        scored("lite0 -> lite2, untrained", small[split.query_rows], large, query_name,
               gallery_name, train_seconds=None, query_ms=small_ms,
               query_parameters=small_params),
    ]
    for kind, method, query_model in (("ridge", "lite0 -> lite2, ridge map", "ridge"),
                                      ("procrustes", "lite0 -> lite2, Procrustes", "rotation")):
        mapped = MappedQueryModel.fit(kind, small[training], large[training],
                                      query_extractor.meta, gallery_side.meta, query_extractor)
        rows.append(scored(
            method, mapped.map(small[split.query_rows]), large,
            f"{query_name} + {query_model}", gallery_name, train_seconds=mapped.fit_seconds,
            query_ms=_median_ms(mapped.embed, timed) if timed else None,
            query_parameters=small_params + mapped.parameter_count,
            note="" if mapped.alpha is None else f"alpha {mapped.alpha:g}"))
    model = fit_or_load(training_paths, state_dir or gallery_side.state_dir,
                        gallery_features=large[training], gallery_meta=gallery_side.meta,
                        config=config, device=device, progress=report, retrain=retrain)
    queries = model.embed(query_paths)
    rows.append(scored(
        "SSP (lite0 + GeM + linear)", queries, large, f"{query_name} + SSP head", gallery_name,
        train_seconds=model.train_seconds,
        query_ms=_median_ms(model.embed, timed) if timed else None,
        query_parameters=model.parameter_count,
        note=("loaded; " if model.loaded else "") + f"{model.details.get('mode')} path, "
             f"{len(training)} training images, CPU time "
             f"{model.details.get('cpu_seconds', float('nan')):.0f} s"))
    return rows


def format_asymmetric_table(rows: Sequence[AsymmetricRow], title: str) -> str:
    """A Markdown table of the rows."""
    from engine.bench.tables import cell, markdown_table

    headers = ("method", "query model", "gallery model", "mAP", "P@1", "P@5", "train s",
               "query ms/image", "query params (M)", "note")
    return markdown_table(title, headers, [
        (row.method, row.query_model, row.gallery_model, f"{row.map:.4f}", f"{row.p1:.4f}",
         f"{row.p5:.4f}", cell(row.train_seconds, ".1f"), cell(row.query_ms, ".1f"),
         f"{row.query_parameters / 1e6:.2f}", row.note)
        for row in rows])


def _config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """'epochs=20' ... -> typed SSPConfig overrides."""
    from engine.asymmetric import SSPConfig

    types = {spec.name: spec.type for spec in dataclasses.fields(SSPConfig)}
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in types:
            raise InvalidInputError(f"unknown SSP setting {key!r}; known: {sorted(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        if kind == "bool":
            overrides[key] = value.strip().lower() in ("1", "true", "yes", "on")
        elif kind == "int":
            overrides[key] = int(value)
        elif kind == "float":
            overrides[key] = float(value)
        else:
            overrides[key] = value.strip()
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.asymmetric",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=Path, required=True, help="labelled image folder")
    parser.add_argument("--protocol", default="oxford17-heldout",
                        choices=sorted(name for name in PROTOCOLS if name != "leave-one-out"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None, help="gallery cache root")
    parser.add_argument("--state-dir", type=Path, default=None, help="SSP state folder")
    parser.add_argument("--timing-images", type=int, default=TIMING_IMAGES)
    parser.add_argument("--retrain", action="store_true", help="ignore a saved SSP state")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SSPConfig overrides, e.g. epochs=20 views=4")
    args = parser.parse_args(argv)
    configure_logging(fmt="%(levelname)s %(name)s: %(message)s")

    from engine.asymmetric import SSPConfig
    from engine.core.device import resolve_device

    config = SSPConfig(**_config_overrides(args.set))
    device = str(resolve_device(args.device))
    last = [-1.0]

    def progress(fraction: float, message: str) -> None:
        if fraction < last[0] or fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            logger.info(message)

    rows = asymmetric_rows(args.gallery, args.protocol, config=config, device=device,
                           cache_root=args.cache_dir, state_dir=args.state_dir,
                           timing_images=args.timing_images, retrain=args.retrain,
                           progress=progress)
    title = (f"{args.gallery.name}, protocol {args.protocol}, device {device}; SSP config: "
             + ", ".join(f"{k}={v}" for k, v in config.as_dict().items()))
    print(format_asymmetric_table(rows, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
