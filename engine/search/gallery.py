"""A gallery: a folder of images, their labels, cached features, a faiss index and a kNN graph.

Cache layout (one folder per gallery folder and backbone, under the cache root):
    manifest.json   an `engine.core.state` manifest: how the features were made, the gallery
                    fingerprint, counts, the size and sha256 of index.faiss and knn.npz, and a
                    checksum of itself
    features.npz    files, sizes, mtimes, features (only decodable files), skipped files, and a
                    sha256 of those arrays
    index.faiss     the faiss index (a flat one holds no vectors: it searches the features in
                    place); the manifest records its kind and recall@10/@100 (`index_recall`)
    knn.npz         the gallery kNN graph (self included), with a sha256 of its arrays: exact up
                    to `EXACT_GRAPH_MAX` items, through an index above, with its measured recall
                    in the manifest (`knn_recall`, `knn_canonical`)
Every file is written atomically, so a crash leaves the previous cache intact. Reopening a
gallery embeds only files that are new or changed (by size and mtime); a long embedding run
saves its features every `checkpoint_seconds`, so a killed run resumes where it saved.

A gallery folder may ship its features (`shipped_features_path`: the demo does, so that a
fresh clone serves in seconds instead of embedding 1360 images first). They seed the feature
cache for files whose name, size and content sha256 match, once they pass the checks of any
cache (checksum, backbone fingerprint, width, unit norm) and a spot check: `SPOT_CHECKS` of
those files embedded now must agree with the shipped rows (cosine >= `SPOT_CHECK_COSINE`). A
file that fails is ignored with a warning, and the images are embedded as usual.

Every file is verified before it is used: features.npz by its own checksum (so it needs no
manifest, and a crash between two writes cannot orphan an embedding run), then its backbone
fingerprint, shapes, width, finiteness and unit norm; index.faiss and knn.npz by the sha256 the
manifest records, the gallery fingerprint they were built for, and their shapes. A file that
fails is rebuilt with a warning, never used.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.device import resolve_device
from engine.core.knn import approximate_knn_graph, knn_graph
from engine.core.state import StaleStateError, file_record, load_state, save_state
from engine.core.storage import (
    atomic_save_checked_npz,
    fingerprint,
    load_checked_npz,
    remove_stale_temporaries,
    sha256_file,
)
from engine.core.types import GalleryContext, KnnGraph, RerankResult, check_features
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError, UnsafePathError
from engine.features.backbone import FeatureExtractor, FeatureMeta, get_extractor
from engine.features.images import list_image_files
from engine.search.features_file import load_features_file
from engine.search.index import SearchIndex, choose_index_kind

logger = logging.getLogger(__name__)

DEMO_GALLERY = Path(__file__).resolve().parents[2] / "assets" / "demo_gallery"
DEFAULT_KNN_DEPTH = 64
CACHE_VERSION = 3
"""Part of the gallery fingerprint: bump it only when features or the kNN graph change meaning
(it re-keys every derived cache: scores, maps, learned state). 3: each item first in its own kNN
list, ahead of exact duplicates."""
MANIFEST_FORMAT = 4
"""Layout of manifest.json, an `engine.core.state` manifest (4: written by `save_state`, with
its kind; 3: sizes and sha256 of index.faiss and knn.npz, its own checksum)."""
INDEX_STATE = "gallery-index"
"""The kind of state manifest.json holds."""
CHECKPOINT_SECONDS = 30.0
"""An embedding run saves its features at least this often (after a chunk of batches)."""
CHECKPOINT_BATCHES = 4
"""Extractor batches embedded between two checks of the checkpoint clock."""
SPOT_CHECKS = 2
"""Shipped features re-embedded at load to check they match the installed backbone."""
SPOT_CHECK_COSINE = 0.999
"""Agreement asked of a re-embedded image: float32 features of the same network differ between
CPUs by ~1e-6 in cosine; another preprocessing or weights by far more than 1e-3."""

ProgressCallback = Callable[[float, str], None]


def shipped_features_path(folder: Path, backbone: str) -> Path:
    """Where a gallery folder ships its features for `backbone` (see the module docstring)."""
    return folder / "features" / f"{backbone}.npz"


def default_cache_root() -> Path:
    """$RETRIEVAL_EXPLORER_CACHE, else ~/.cache/retrieval-explorer."""
    configured = os.environ.get("RETRIEVAL_EXPLORER_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "retrieval-explorer"


@dataclass(frozen=True)
class Labels:
    """Per-file integer labels (-1 = unlabelled) and the class name of each label."""

    by_file: dict[str, int]
    class_names: list[str]


def read_labels(folder: Path, files: list[str]) -> Labels | None:
    """Labels from `labels.csv` (file,label[,class_name]) or from first-level sub-folder names.

    A labels.csv `file` may be relative to the folder or to an `images/` sub-folder. Label
    values are kept as names and numbered densely in sorted order (numerically when all are
    integers); an empty or negative label marks a file as unlabelled. Returns None when neither
    source exists.
    """
    csv_path = folder / "labels.csv"
    if csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise InvalidInputError(f"{csv_path} is unreadable: {error}") from error
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        if "file" not in header or "label" not in header:
            raise InvalidInputError(f"{csv_path} needs a header with 'file' and 'label' columns")
        file_at, label_at = header.index("file"), header.index("label")
        name_at = header.index("class_name") if "class_name" in header else None
        known = set(files)
        raw: dict[str, str] = {}
        names: dict[str, str] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(file_at, label_at):
                raise InvalidInputError(f"{csv_path} line {line} has no label: {row}")
            name = row[file_at].strip().replace("\\", "/")
            label = row[label_at].strip()
            if not label or label.startswith("-"):
                continue  # unlabelled
            for candidate in (name, f"images/{name}", name.removeprefix("images/")):
                if candidate in known:
                    raw[candidate] = label
                    if name_at is not None and len(row) > name_at and row[name_at].strip():
                        names[label] = row[name_at].strip()
                    break
        if not raw:
            raise InvalidInputError(f"no file named in {csv_path} is a labelled gallery image")
        return _number_labels(raw, names)
    nested = {name: name.split("/")[0] for name in files if "/" in name}
    if nested and len(nested) == len(files) and len(set(nested.values())) > 1:
        return _number_labels(nested, {})
    return None


def _number_labels(raw: dict[str, str], names: dict[str, str]) -> Labels:
    """Dense label numbers 0..C-1 in sorted order (numeric order when every value is an int)."""
    values = sorted(set(raw.values()),
                    key=(int if all(v.isdigit() for v in raw.values()) else str))
    numbers = {value: position for position, value in enumerate(values)}
    class_names = [names.get(value, value) for value in values]
    return Labels({file: numbers[value] for file, value in raw.items()}, class_names)


@dataclass
class Gallery:
    """An indexed image folder. Build it with `Gallery.open(folder)`.

    files: relative posix paths of the embedded images, row-aligned with `features`.
    labels: (G,) int64 with -1 for unlabelled files, or None when the gallery has no labels.
    skipped: {relative path: reason} for files that could not be decoded.
    source: the features file of a gallery opened from features (`open_features`), else None.
        Its `root` is then the image folder given for thumbnails, or the features file itself
        when there is none (so that `path_of` names a path that never exists).
    """

    root: Path
    files: list[str]
    features: np.ndarray
    meta: FeatureMeta
    fingerprint: str
    cache_dir: Path
    index: SearchIndex
    knn: KnnGraph
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    @property
    def size(self) -> int:
        return len(self.files)

    @property
    def has_images(self) -> bool:
        """Whether its items are image files (a features gallery without an image folder has
        none: queries must be its items or features)."""
        return self.source is None or self.root.is_dir()

    @property
    def state_dir(self) -> Path:
        """Where learned re-rankers keep their state for this gallery."""
        return self.cache_dir / "state"

    def path_of(self, position: int) -> Path:
        """The image file of a row; for a features gallery without images, a path under the
        features file, which never exists (the page draws a tile with its name)."""
        return self.root / self.files[position]

    def class_of(self, position: int) -> str | None:
        if self.labels is None or self.labels[position] < 0:
            return None
        return self.class_names[int(self.labels[position])]

    @functools.cached_property
    def method_features(self) -> np.ndarray:
        """The features as re-rankers read them: contiguous float32 rows. A float16 store is
        converted once here and shared by every method (a re-ranker converts what it is given
        to float32, so each would otherwise hold its own copy: 2.9 GiB each at 1M x 768)."""
        return np.ascontiguousarray(self.features, np.float32)

    def context(self) -> GalleryContext:
        """What re-rankers fit on: features (`method_features`), the shared kNN graph,
        fingerprint, state folder."""
        return GalleryContext(features=self.method_features, knn=self.knn,
                              fingerprint=self.fingerprint,
                              state_dir=self.state_dir, labels=self.labels)

    def search(self, query_features: np.ndarray, k: int) -> RerankResult:
        """Baseline ranking in the project's one result type: (Q, k) indices and distances
        (1 - cosine), best first."""
        distances, indices = self.index.search(query_features, k)
        return RerankResult(indices=indices, distances=distances,
                            details={"index": self.index.kind, "on_gpu": self.index.on_gpu})

    @classmethod
    def open(cls, folder: str | os.PathLike = DEMO_GALLERY,
             extractor: FeatureExtractor | None = None, cache_root: str | os.PathLike | None = None,
             progress: ProgressCallback | None = None, knn_depth: int = DEFAULT_KNN_DEPTH,
             index_kind: str = "auto", device: str = "auto",
             checkpoint_seconds: float = CHECKPOINT_SECONDS) -> Gallery:
        """Index a folder (or load its cache) and return the gallery.

        Args:
            folder: images, searched recursively; labels from labels.csv or sub-folders.
            extractor: the backbone (default: the shared lite0 extractor).
            cache_root: where caches live (default `default_cache_root()`).
            progress: called with (fraction in [0, 1], message) while embedding.
            checkpoint_seconds: save the features embedded so far at least this often, so that
                a killed run resumes from there (0: after every chunk of batches).
            index_kind: "auto" (exact up to `index.EXACT_SEARCH_MAX` items, then IVF or
                IVF-PQ: `index.choose_index_kind`), or "flat", "ivf", "ivfpq", "hnsw".
        """
        root = Path(folder).resolve()
        if not root.is_dir():
            raise InvalidInputError(f"gallery folder {root} does not exist or is not a folder")
        extractor = extractor or get_extractor(device=device)
        meta = extractor.meta
        paths = list_image_files(root)
        files = [path.relative_to(root).as_posix() for path in paths]
        stats = [path.stat() for path in paths]
        sizes = np.array([stat.st_size for stat in stats], np.int64)
        mtimes = np.array([stat.st_mtime_ns for stat in stats], np.int64)
        cache_dir = gallery_cache_dir(root, meta, cache_root)
        for stale in remove_stale_temporaries(cache_dir):
            logger.info("removed %s, left by an interrupted write", stale)
        features, kept, skipped = _embed_incrementally(
            cache_dir, meta, extractor, root, files, sizes, mtimes, progress, checkpoint_seconds)
        if not kept:
            raise EmptyGalleryError(
                f"gallery {root} has no decodable images ({len(skipped)} skipped): add .jpg/.png "
                "files")
        kept_files = [files[i] for i in kept]
        gallery_fingerprint = fingerprint({
            "version": CACHE_VERSION, "meta": meta.fingerprint,
            "files": [[files[i], int(sizes[i]), int(mtimes[i])] for i in kept]})
        index, knn, checksums, built = _index_and_graph(
            cache_dir, gallery_fingerprint, features, knn_depth, index_kind, device)
        labels = read_labels(root, kept_files)
        label_array = None
        class_names: list[str] = []
        if labels is not None:
            label_array = np.array([labels.by_file.get(f, -1) for f in kept_files], np.int64)
            class_names = labels.class_names
        save_state(cache_dir / "manifest", kind=INDEX_STATE, version=MANIFEST_FORMAT,
                   fingerprint=gallery_fingerprint, file_records=checksums, metadata={
                       "version": CACHE_VERSION, "root": str(root), "meta": meta.to_dict(),
                       "n_images": len(kept_files), "n_skipped": len(skipped),
                       "index_kind": index_kind, "knn_depth": knn.depth, **built})
        return cls(root=root, files=kept_files, features=features, meta=meta,
                   fingerprint=gallery_fingerprint, cache_dir=cache_dir, index=index, knn=knn,
                   labels=label_array, class_names=class_names, skipped=skipped)

    @classmethod
    def open_features(cls, path: str | os.PathLike, *, names: Sequence[str] | None = None,
                      labels: Sequence[int] | np.ndarray | None = None,
                      images: str | os.PathLike | None = None, metric: str = "cosine",
                      normalize: str = "warn", cache_root: str | os.PathLike | None = None,
                      device: str = "auto", knn_depth: int = DEFAULT_KNN_DEPTH,
                      index_kind: str = "auto") -> Gallery:
        """A gallery of the vectors in a features file (`features_file.load_features_file`
        reads and checks it: formats, metric and `normalize` are described there).

        The index and kNN graph are built and cached as for an image folder, in a cache folder
        of the file's path; they are keyed on the file's content hash, names and labels, so a
        changed file rebuilds them. Nothing in the cache is touched before the file passed its
        checks.

        Args:
            names, labels: override the file's item names and labels.
            images: a folder of the items' images, for thumbnails only: names are paths
                relative to it.
        """
        loaded = load_features_file(path, names=names, labels=labels, metric=metric,
                                    normalize=normalize)
        root = loaded.path
        if images is not None:
            root = Path(images).expanduser().resolve()
            if not root.is_dir():
                raise InvalidInputError(f"image folder {root} does not exist or is not a folder")
            for name in loaded.names:
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise UnsafePathError(f"item name {name!r} must be a path relative to the "
                                          f"image folder {root.name}")
            missing = sum(not (root / name).is_file() for name in loaded.names)
            if missing:
                logger.warning("%d of %d items of %s have no image in %s (shown as tiles)",
                               missing, len(loaded.names), loaded.path.name, root)
        meta = loaded.meta
        cache_dir = (Path(cache_root) if cache_root else default_cache_root()) / "galleries" / (
            f"{loaded.path.name}-{fingerprint([str(loaded.path), 'features file'])}")
        for stale in remove_stale_temporaries(cache_dir):
            logger.info("removed %s, left by an interrupted write", stale)
        gallery_fingerprint = fingerprint({
            "version": CACHE_VERSION, "meta": meta.fingerprint, "files": loaded.names,
            "labels": None if loaded.labels is None else loaded.labels.tolist(),
            "normalised": loaded.normalised})
        index, knn, checksums, built = _index_and_graph(
            cache_dir, gallery_fingerprint, loaded.features, knn_depth, index_kind, device)
        save_state(cache_dir / "manifest", kind=INDEX_STATE, version=MANIFEST_FORMAT,
                   fingerprint=gallery_fingerprint, file_records=checksums, metadata={
                       "version": CACHE_VERSION, "root": str(root),
                       "features_file": str(loaded.path), "meta": meta.to_dict(),
                       "n_images": len(loaded.names), "n_skipped": 0,
                       "index_kind": index_kind, "knn_depth": knn.depth, **built})
        logger.info("opened features file %s: %d items of %d dimensions (%s%s)",
                    loaded.path, len(loaded.names), meta.dim, loaded.features.dtype,
                    ", memory-mapped" if loaded.memory_mapped else "")
        return cls(root=root, files=loaded.names, features=loaded.features, meta=meta,
                   fingerprint=gallery_fingerprint, cache_dir=cache_dir, index=index, knn=knn,
                   labels=loaded.labels, class_names=loaded.class_names, source=loaded.path)


def gallery_cache_dir(root: Path, meta: FeatureMeta, cache_root: str | os.PathLike | None
                      ) -> Path:
    """The cache folder of the gallery folder `root` (resolved) embedded as `meta` says."""
    return (Path(cache_root) if cache_root else default_cache_root()) / "galleries" / (
        f"{root.name}-{fingerprint([str(root), meta.fingerprint])}")


@dataclass(frozen=True)
class GalleryScan:
    """What `Gallery.open` would find in a folder, read without embedding anything (for a
    plan of the work before it starts).

    files: image files listed (as `Gallery.open` lists them). to_embed: those neither in the
    feature cache (same name, size and mtime), nor skipped before, nor in the folder's shipped
    features (same name and size). features: (n, d) float32 cached features of every
    decodable file in gallery order when the feature cache holds them all, else None.
    """

    root: Path
    files: int
    to_embed: int
    features: np.ndarray | None
    samples: tuple[Path, ...] = ()
    """A few of the files to embed (to time their decoding)."""


def scan_gallery(folder: str | os.PathLike, meta: FeatureMeta,
                 cache_root: str | os.PathLike | None = None) -> GalleryScan:
    """How much of the folder is embedded already (see `GalleryScan`)."""
    root = Path(folder).resolve()
    paths = list_image_files(root)
    files = [path.relative_to(root).as_posix() for path in paths]
    stats = [path.stat() for path in paths]
    keys = [(name, int(stat.st_size), int(stat.st_mtime_ns))
            for name, stat in zip(files, stats, strict=True)]
    cached, cached_skips = _load_feature_cache(
        gallery_cache_dir(root, meta, cache_root) / "features.npz", meta)
    todo = [key for key in keys if key not in cached and key not in cached_skips]
    shipped = shipped_features_path(root, meta.backbone)
    if todo and shipped.is_file():
        try:
            stored = load_checked_npz(shipped)
            listed = set(zip(stored["files"].tolist(), stored["sizes"].tolist(), strict=True))
            todo = [key for key in todo if (key[0], key[1]) not in listed]
        except (CacheError, KeyError, ValueError):
            pass  # Gallery.open ignores such a file too, and embeds every image
    features = None
    if all(key in cached or key in cached_skips for key in keys):
        rows = [cached[key] for key in keys if key in cached]
        features = (np.stack(rows).astype(np.float32) if rows
                    else np.zeros((0, meta.dim), np.float32))
    waiting = {key[0] for key in todo}
    pending = [root / name for name in files if name in waiting]
    spread = np.linspace(0, len(pending) - 1, min(SCAN_SAMPLES, len(pending))).astype(int)
    samples = tuple(pending[i] for i in sorted(set(spread.tolist())))
    return GalleryScan(root, len(files), len(todo), features, samples)


SCAN_SAMPLES = 3
"""Files to embed that `scan_gallery` names, spread over the folder."""


CacheKey = tuple[str, int, int]
"""(relative file name, size in bytes, mtime in ns): a cached row is reused while all three
match."""


def _embed_incrementally(cache_dir: Path, meta: FeatureMeta, extractor: FeatureExtractor,
                         root: Path, files: list[str], sizes: np.ndarray, mtimes: np.ndarray,
                         progress: ProgressCallback | None, checkpoint_seconds: float
                         ) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Features of every decodable file, reusing cached rows of unchanged files.

    New files are embedded in chunks of `CHECKPOINT_BATCHES` batches; after a chunk, once
    `checkpoint_seconds` have passed since the last save (and after the last chunk), every row
    embedded so far is saved, so a killed run loses at most that much work.
    """
    features_path = cache_dir / "features.npz"
    cached, cached_skips = _load_feature_cache(features_path, meta)
    keys = [(f, int(s), int(m)) for f, s, m in zip(files, sizes, mtimes, strict=True)]
    todo = [i for i, key in enumerate(keys) if key not in cached and key not in cached_skips]
    if todo:
        seeded = _seed_from_shipped(root, files, todo, keys, cached, meta, extractor)
        if seeded:
            todo = [i for i in todo if keys[i] not in cached]
            _save_feature_cache(features_path, meta, keys, cached, cached_skips)
    if todo:
        logger.info("embedding %d new or changed images of %s (%d cached)", len(todo), root,
                    len(keys) - len(todo))
        chunk = CHECKPOINT_BATCHES * extractor.batch_size
        saved_at = time.monotonic()
        for begin in range(0, len(todo), chunk):
            part = todo[begin:begin + chunk]

            def report(done: int, total: int, begin: int = begin) -> None:
                if progress is not None:
                    progress((begin + done) / len(todo),
                             f"embedding images {begin + done}/{len(todo)}")

            new_features, new_kept, failures = extractor.embed_files(
                [root / files[i] for i in part], report)
            for row, position in enumerate(new_kept):
                cached[keys[part[position]]] = new_features[row]
            for position, reason in failures.items():
                cached_skips[keys[part[position]]] = reason
            last = begin + chunk >= len(todo)
            if last or time.monotonic() - saved_at >= checkpoint_seconds:
                _save_feature_cache(features_path, meta, keys, cached, cached_skips)
                saved_at = time.monotonic()
                if not last:
                    logger.info("saved a checkpoint of %s: %d of %d new images embedded", root,
                                begin + len(part), len(todo))
    kept = [i for i, key in enumerate(keys) if key in cached]
    skipped = {keys[i][0]: cached_skips[keys[i]] for i, key in enumerate(keys)
               if key in cached_skips}
    for name, reason in skipped.items():
        logger.warning("skipped %s: %s", name, reason)
    features = (np.stack([cached[keys[i]] for i in kept]).astype(np.float32) if kept
                else np.zeros((0, meta.dim), np.float32))
    return features, kept, skipped


def _load_features_file(path: Path, meta: FeatureMeta, what: str
                        ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The arrays of a features file and its checked features; CacheError unless its checksum
    holds, it was made by `meta`'s backbone and preprocessing, and its features have the
    backbone's width and are finite unit rows."""
    stored = load_checked_npz(path)
    if str(stored["meta_fingerprint"]) != meta.fingerprint:
        raise CacheError("features were made with another backbone, weights or preprocessing")
    try:
        return stored, check_features(stored["features"], what, meta.dim)
    except InvalidInputError as error:
        raise CacheError(str(error)) from error


def _seed_from_shipped(root: Path, files: list[str], todo: list[int], keys: list[CacheKey],
                       cached: dict[CacheKey, np.ndarray], meta: FeatureMeta,
                       extractor: FeatureExtractor) -> int:
    """Fill `cached` with the shipped features of the `todo` files that match them by name,
    size and content sha256, once the shipped file passes its checks; returns how many."""
    path = shipped_features_path(root, meta.backbone)
    if not path.is_file():
        return 0
    try:
        shipped, features = _load_features_file(path, meta, "shipped features")
        rows = {str(name): (int(size), str(digest), row) for row, (name, size, digest) in
                enumerate(zip(shipped["files"].tolist(), shipped["sizes"].tolist(),
                              shipped["sha256"].tolist(), strict=True))}
        if len(rows) != features.shape[0]:
            raise CacheError(f"{len(rows)} files but {features.shape[0]} feature rows")
        matched = {}
        for i in todo:
            size, digest, row = rows.get(files[i], (-1, "", -1))
            if size == keys[i][1] and digest == sha256_file(root / files[i]):
                matched[i] = row
        if not matched:
            return 0
        probes = list(matched)[:: max(1, len(matched) // SPOT_CHECKS)][:SPOT_CHECKS]
        fresh, kept, _ = extractor.embed_files([root / files[i] for i in probes])
        agreement = [float(fresh[n] @ features[matched[probes[k]]])
                     for n, k in enumerate(kept)]
        if len(agreement) < len(probes) or min(agreement) < SPOT_CHECK_COSINE:
            raise CacheError(f"re-embedded images agree only to cosine {agreement} with the "
                             "shipped features")
    except (CacheError, KeyError, ValueError, OSError) as error:
        logger.warning("not using the shipped features %s (%s); embedding the images", path,
                       error)
        return 0
    for i, row in matched.items():
        cached[keys[i]] = features[row]
    logger.info("took %d features from %s (checked: %d re-embedded images agree to cosine "
                ">= %.6f)", len(matched), path, len(probes), min(agreement))
    return len(matched)


def save_shipped_features(gallery: Gallery) -> Path:
    """Write the features of `gallery` into its folder (`shipped_features_path`), keyed by
    file name, size and content sha256, for `_seed_from_shipped` on other machines."""
    path = shipped_features_path(gallery.root, gallery.meta.backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [gallery.root / name for name in gallery.files]
    atomic_save_checked_npz(
        path, meta_fingerprint=np.array(gallery.meta.fingerprint),
        features=gallery.features.astype(np.float32), files=np.array(gallery.files, dtype=str),
        sizes=np.array([p.stat().st_size for p in paths], np.int64),
        sha256=np.array([sha256_file(p) for p in paths], dtype=str))
    return path


def _load_feature_cache(path: Path, meta: FeatureMeta
                        ) -> tuple[dict[CacheKey, np.ndarray], dict[CacheKey, str]]:
    """The cached feature of each (file, size, mtime) and the reason of each skipped one.

    Empty, with a warning, unless the file passes every check: its checksum, the backbone
    fingerprint, aligned arrays, and features of the backbone's width, finite and unit-norm.
    """
    if not path.is_file():
        if (path.parent / "manifest.json").is_file():
            logger.warning("the feature cache %s is missing; re-embedding", path)
        return {}, {}
    try:
        stored, features = _load_features_file(path, meta, "cached features")
        rows = list(zip(stored["files"].tolist(), stored["sizes"].tolist(),
                        stored["mtimes"].tolist(), strict=True))
        if len(rows) != features.shape[0]:
            raise CacheError(f"{len(rows)} files but {features.shape[0]} feature rows")
        cached = {(str(name), int(size), int(mtime)): features[row]
                  for row, (name, size, mtime) in enumerate(rows)}
        skips = zip(stored["skipped_files"].tolist(), stored["skipped_sizes"].tolist(),
                    stored["skipped_mtimes"].tolist(), stored["skipped_reasons"].tolist(),
                    strict=True)
        cached_skips = {(str(name), int(size), int(mtime)): str(reason)
                        for name, size, mtime, reason in skips}
    except (CacheError, KeyError, ValueError) as error:  # ValueError: ragged arrays
        logger.warning("ignoring the feature cache %s (%s); re-embedding", path, error)
        return {}, {}
    return cached, cached_skips


def _save_feature_cache(path: Path, meta: FeatureMeta, keys: list[CacheKey],
                        cached: dict[CacheKey, np.ndarray], cached_skips: dict[CacheKey, str]
                        ) -> None:
    """Write the rows and skips of the current files (in file order), checksummed."""
    done = [key for key in keys if key in cached]
    skipped = [key for key in keys if key in cached_skips]
    features = (np.stack([cached[key] for key in done]).astype(np.float32) if done
                else np.zeros((0, meta.dim), np.float32))
    atomic_save_checked_npz(
        path, meta_fingerprint=np.array(meta.fingerprint), features=features,
        files=np.array([key[0] for key in done], dtype=str),
        sizes=np.array([key[1] for key in done], np.int64),
        mtimes=np.array([key[2] for key in done], np.int64),
        skipped_files=np.array([key[0] for key in skipped], dtype=str),
        skipped_sizes=np.array([key[1] for key in skipped], np.int64),
        skipped_mtimes=np.array([key[2] for key in skipped], np.int64),
        skipped_reasons=np.array([cached_skips[key] for key in skipped], dtype=str))


EXACT_GRAPH_MAX = 20_000
"""The gallery kNN graph is exact (`knn.knn_graph`, canonical) up to this many items, and built
through an approximate index above (`knn.approximate_knn_graph`, its recall measured on a
sample). Measured on 2 cores: the exact graph takes about 20 s at 20k and 539 s at 100k (about
15 h at 1M); the approximate one is linear in the size (see the README's scale table)."""


def build_knn_graph(features: np.ndarray, depth: int, index: SearchIndex | None = None,
                    device: str = "cpu", progress: ProgressCallback | None = None) -> KnnGraph:
    """The gallery kNN graph of `depth`: exact up to `EXACT_GRAPH_MAX` items, else through
    `index` when it is approximate, or through an IVF (IVF-PQ when a float32 copy does not fit,
    `choose_index_kind`) built for the purpose when `index` is exact or missing."""
    size, dim = features.shape
    if size <= EXACT_GRAPH_MAX:
        return knn_graph(np.asarray(features, np.float32), depth, resolve_device(device))
    through = index
    if through is None or through.exact:
        kind, reason = choose_index_kind(size, dim, exact_max=0)
        logger.info("kNN graph of %d items through a %s index (%s)", size, kind, reason)
        through = SearchIndex(features, kind=kind, device="cpu", recall_queries=0)
    return approximate_knn_graph(features, depth, through,
                                 candidates=through.graph_width(depth), progress=progress)


def _index_and_graph(cache_dir: Path, gallery_fingerprint: str, features: np.ndarray,
                     knn_depth: int, index_kind: str, device: str
                     ) -> tuple[SearchIndex, KnnGraph, dict[str, dict[str, Any]], dict[str, Any]]:
    """Load the cached index and kNN graph when they pass `_load_index_and_graph`'s checks,
    else build and save them. Returns them, the {file: {bytes, sha256}} record of both and
    what the manifest records of them besides (`index_built`, `index_recall`, `knn_canonical`,
    `knn_recall`)."""
    depth = min(knn_depth, features.shape[0])
    try:
        return _load_index_and_graph(cache_dir, gallery_fingerprint, features, depth,
                                     index_kind, device)
    except _Outdated as reason:
        logger.info("building the index of %s (%s)", cache_dir, reason)
    except (CacheError, KeyError, ValueError, IndexError, TypeError) as error:
        logger.warning("rebuilding the index of %s (%s)", cache_dir, error)
    index = SearchIndex(features, kind=index_kind, device=device)
    # Canonical similarities, as the re-rankers would compute them, so they can share the
    # graph: exact up to EXACT_GRAPH_MAX items, through an approximate index above.
    knn = build_knn_graph(features, depth, index, device)
    index.save(cache_dir / "index.faiss")
    atomic_save_checked_npz(cache_dir / "knn.npz", indices=knn.indices,
                            similarities=knn.similarities, farthest=knn.farthest)
    return index, knn, {name: file_record(cache_dir / name) for name in INDEX_FILES}, (
        _index_metadata(index, knn))


def _index_metadata(index: SearchIndex, knn: KnnGraph) -> dict[str, Any]:
    """What the manifest keeps of the index and graph besides their files."""
    return {"index_built": index.kind, "index_recall": dict(index.recall),
            "knn_canonical": bool(knn.canonical), "knn_recall": knn.recall}


INDEX_FILES = ("index.faiss", "knn.npz")


class _Outdated(CacheError):
    """The cached index is intact but was built for other files or settings (or there is
    none yet): rebuilt as a matter of course, not a warning."""


def _load_index_and_graph(cache_dir: Path, gallery_fingerprint: str, features: np.ndarray,
                          depth: int, index_kind: str, device: str
                          ) -> tuple[SearchIndex, KnnGraph, dict[str, dict[str, Any]],
                                     dict[str, Any]]:
    """The cached index and kNN graph (and `_index_metadata`); CacheError unless the manifest
    is intact (`load_state`: its own checksum, both files match its sizes and sha256s, read
    before faiss parses a byte) and was written for this gallery, index kind and a deep
    enough graph (else `_Outdated`), and the files' shapes and values fit `features`."""
    if not (cache_dir / "manifest.json").is_file():
        if not any((cache_dir / name).exists() for name in INDEX_FILES):
            raise _Outdated("a new gallery")
        raise CacheError("manifest.json is missing")
    try:
        manifest = load_state(cache_dir / "manifest", kind=INDEX_STATE, version=MANIFEST_FORMAT,
                              fingerprint=gallery_fingerprint, files=INDEX_FILES).manifest
    except StaleStateError as error:
        raise _Outdated("the cached index was built for other files") from error
    if manifest.get("index_kind") != index_kind:
        raise _Outdated(f"the cached index is {manifest.get('index_kind')!r}, not "
                        f"{index_kind!r}")
    if not isinstance(manifest.get("knn_depth"), int) or manifest["knn_depth"] < depth:
        raise _Outdated(f"the cached kNN graph is shallower than {depth}")
    records = manifest["files"]
    size, dim = features.shape
    index = SearchIndex.load(cache_dir / "index.faiss", device=device, features=features,
                             recall=manifest.get("index_recall"))
    if index.kind != manifest.get("index_built", index.kind):
        raise CacheError(f"the cached index is {index.kind}, the manifest says "
                         f"{manifest['index_built']}")
    if (index.size, index.dim) != (size, dim):
        raise CacheError(f"the cached index holds {index.size} vectors of {index.dim} "
                         f"dimensions, not {size} of {dim}")
    stored = load_checked_npz(cache_dir / "knn.npz")
    indices, similarities, farthest = (stored["indices"], stored["similarities"],
                                       stored["farthest"])
    if (indices.ndim != 2 or indices.shape[0] != size or indices.shape[1] < depth
            or similarities.shape != indices.shape or farthest.shape != (size,)):
        raise CacheError(f"the cached kNN graph has shapes {indices.shape}, "
                         f"{similarities.shape}, {farthest.shape} for {size} images")
    if not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any() or (
            indices >= size).any():
        raise CacheError("the cached kNN graph names rows outside the gallery")
    if not (np.isfinite(similarities).all() and np.isfinite(farthest).all()):
        raise CacheError("the cached kNN graph has NaN or infinite similarities")
    if not (indices[:, 0] == np.arange(size)).all():
        raise _Outdated("the cached kNN graph does not list every item first in its own list")
    canonical = manifest.get("knn_canonical", True)
    recall = manifest.get("knn_recall")
    if not isinstance(canonical, bool) or not (recall is None or isinstance(recall, float)):
        raise CacheError("the manifest's kNN graph record is malformed")
    # The whole stored graph, even when deeper than asked: the manifest records its depth, so
    # that a shallower request never downgrades what the cache holds (methods slice it).
    knn = KnnGraph(indices, similarities, farthest, canonical=canonical, recall=recall)
    return index, knn, {name: records[name] for name in INDEX_FILES}, (
        _index_metadata(index, knn))
