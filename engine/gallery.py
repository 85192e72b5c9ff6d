"""A gallery: a folder of images, their labels, cached features, a faiss index and a kNN graph.

Cache layout (one folder per gallery folder and backbone, under the cache root):
    manifest.json   how the features were made, the file list fingerprint, counts
    features.npz    files, sizes, mtimes, features (only decodable files), skipped files
    index.faiss     the faiss index
    knn.npz         the gallery kNN graph (self included)
Every file is written atomically, so a crash leaves the previous cache intact. Reopening a
gallery embeds only files that are new or changed (by size and mtime).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.backbone import FeatureExtractor, FeatureMeta, get_extractor
from engine.device import resolve_device
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError
from engine.images import list_image_files
from engine.index import SearchIndex
from engine.rerank.base import GalleryContext, KnnGraph, RerankResult, check_features
from engine.rerank.ops import knn_graph
from engine.storage import atomic_save_npz, atomic_write_json, fingerprint, load_json, load_npz

logger = logging.getLogger(__name__)

DEMO_GALLERY = Path(__file__).resolve().parent.parent / "assets" / "demo_gallery"
DEFAULT_KNN_DEPTH = 64
CACHE_VERSION = 2

ProgressCallback = Callable[[float, str], None]


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

    @property
    def size(self) -> int:
        return len(self.files)

    @property
    def state_dir(self) -> Path:
        """Where learned re-rankers keep their state for this gallery."""
        return self.cache_dir / "state"

    def path_of(self, position: int) -> Path:
        return self.root / self.files[position]

    def class_of(self, position: int) -> str | None:
        if self.labels is None or self.labels[position] < 0:
            return None
        return self.class_names[int(self.labels[position])]

    def context(self) -> GalleryContext:
        """What re-rankers fit on: features, the shared kNN graph, fingerprint, state folder."""
        return GalleryContext(features=self.features, knn=self.knn, fingerprint=self.fingerprint,
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
             index_kind: str = "flat", device: str = "auto") -> Gallery:
        """Index a folder (or load its cache) and return the gallery.

        Args:
            folder: images, searched recursively; labels from labels.csv or sub-folders.
            extractor: the backbone (default: the shared lite0 extractor).
            cache_root: where caches live (default `default_cache_root()`).
            progress: called with (fraction in [0, 1], message) while embedding.
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
        cache_dir = (Path(cache_root) if cache_root else default_cache_root()) / "galleries" / (
            f"{root.name}-{fingerprint([str(root), meta.fingerprint])}")
        features, kept, skipped = _embed_incrementally(
            cache_dir, meta, extractor, root, files, sizes, mtimes, progress)
        if not kept:
            raise EmptyGalleryError(
                f"gallery {root} has no decodable images ({len(skipped)} skipped): add .jpg/.png "
                "files")
        kept_files = [files[i] for i in kept]
        gallery_fingerprint = fingerprint({
            "version": CACHE_VERSION, "meta": meta.fingerprint,
            "files": [[files[i], int(sizes[i]), int(mtimes[i])] for i in kept]})
        index, knn = _index_and_graph(cache_dir, gallery_fingerprint, features, knn_depth,
                                      index_kind, device)
        labels = read_labels(root, kept_files)
        label_array = None
        class_names: list[str] = []
        if labels is not None:
            label_array = np.array([labels.by_file.get(f, -1) for f in kept_files], np.int64)
            class_names = labels.class_names
        atomic_write_json(cache_dir / "manifest.json", {
            "version": CACHE_VERSION, "root": str(root), "meta": meta.to_dict(),
            "fingerprint": gallery_fingerprint, "n_images": len(kept_files),
            "n_skipped": len(skipped), "index_kind": index.kind, "knn_depth": knn.depth})
        return cls(root=root, files=kept_files, features=features, meta=meta,
                   fingerprint=gallery_fingerprint, cache_dir=cache_dir, index=index, knn=knn,
                   labels=label_array, class_names=class_names, skipped=skipped)


def _embed_incrementally(cache_dir: Path, meta: FeatureMeta, extractor: FeatureExtractor,
                         root: Path, files: list[str], sizes: np.ndarray, mtimes: np.ndarray,
                         progress: ProgressCallback | None
                         ) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Features of every decodable file, reusing cached rows of unchanged files."""
    cached: dict[tuple[str, int, int], np.ndarray] = {}
    cached_skips: dict[tuple[str, int, int], str] = {}
    features_path = cache_dir / "features.npz"
    if features_path.is_file():
        try:
            stored = load_npz(features_path)
            if str(stored["meta_fingerprint"]) != meta.fingerprint:
                raise CacheError("features were made with another backbone or preprocessing")
            stored_features = check_features(stored["features"], "cached features", meta.dim)
            for row, key in enumerate(zip(stored["files"].tolist(), stored["sizes"].tolist(),
                                          stored["mtimes"].tolist(), strict=True)):
                cached[key] = stored_features[row]
            for key, reason in zip(zip(stored["skipped_files"].tolist(),
                                       stored["skipped_sizes"].tolist(),
                                       stored["skipped_mtimes"].tolist(), strict=True),
                                   stored["skipped_reasons"].tolist(), strict=True):
                cached_skips[key] = reason
        except (CacheError, KeyError, ValueError) as error:  # ValueError: ragged arrays
            logger.warning("ignoring the feature cache %s (%s); re-embedding", features_path,
                           error)
            cached, cached_skips = {}, {}
    keys = [(f, int(s), int(m)) for f, s, m in zip(files, sizes, mtimes, strict=True)]
    todo = [i for i, key in enumerate(keys) if key not in cached and key not in cached_skips]
    if todo:
        logger.info("embedding %d new or changed images of %s (%d cached)", len(todo), root,
                    len(keys) - len(todo))

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done / total, f"embedding images {done}/{total}")

        new_features, new_kept, failures = extractor.embed_files(
            [root / files[i] for i in todo], report)
        for row, position in enumerate(new_kept):
            cached[keys[todo[position]]] = new_features[row]
        for position, reason in failures.items():
            cached_skips[keys[todo[position]]] = reason
    kept = [i for i, key in enumerate(keys) if key in cached]
    skipped = {keys[i][0]: cached_skips[keys[i]] for i, key in enumerate(keys)
               if key in cached_skips}
    for name, reason in skipped.items():
        logger.warning("skipped %s: %s", name, reason)
    features = (np.stack([cached[keys[i]] for i in kept]).astype(np.float32) if kept
                else np.zeros((0, meta.dim), np.float32))
    if todo:
        skipped_keys = [keys[i] for i in range(len(keys)) if keys[i] in cached_skips]
        atomic_save_npz(
            features_path, meta_fingerprint=np.array(meta.fingerprint), features=features,
            files=np.array([keys[i][0] for i in kept], dtype=str),
            sizes=np.array([keys[i][1] for i in kept], np.int64),
            mtimes=np.array([keys[i][2] for i in kept], np.int64),
            skipped_files=np.array([k[0] for k in skipped_keys], dtype=str),
            skipped_sizes=np.array([k[1] for k in skipped_keys], np.int64),
            skipped_mtimes=np.array([k[2] for k in skipped_keys], np.int64),
            skipped_reasons=np.array([cached_skips[k] for k in skipped_keys], dtype=str))
    return features, kept, skipped


def _index_and_graph(cache_dir: Path, gallery_fingerprint: str, features: np.ndarray,
                     knn_depth: int, index_kind: str, device: str
                     ) -> tuple[SearchIndex, KnnGraph]:
    """Load the cached index and kNN graph when they match the gallery, else build and save."""
    index_path, knn_path = cache_dir / "index.faiss", cache_dir / "knn.npz"
    depth = min(knn_depth, features.shape[0])
    try:
        manifest = load_json(cache_dir / "manifest.json") if index_path.is_file() else {}
        if not isinstance(manifest, dict):
            raise CacheError("manifest.json is not a JSON object")
        if (manifest.get("fingerprint") == gallery_fingerprint
                and manifest.get("index_kind") == index_kind and index_path.is_file()
                and knn_path.is_file() and manifest.get("knn_depth", 0) >= depth):
            index = SearchIndex.load(index_path, device=device)
            stored = load_npz(knn_path)
            knn = KnnGraph(stored["indices"][:, :depth], stored["similarities"][:, :depth],
                           stored["farthest"], canonical=True)
            if index.size == features.shape[0] and knn.indices.shape[0] == features.shape[0]:
                return index, knn
    except (CacheError, KeyError, ValueError, IndexError) as error:
        logger.warning("rebuilding the index of %s (%s)", cache_dir, error)
    index = SearchIndex(features, kind=index_kind, device=device)
    # The exact graph with canonical similarities, as the re-rankers would compute it, so they
    # can share it (an approximate index serves search only).
    knn = knn_graph(features, depth, resolve_device(device))
    index.save(index_path)
    atomic_save_npz(knn_path, indices=knn.indices, similarities=knn.similarities,
                    farthest=knn.farthest)
    return index, knn
