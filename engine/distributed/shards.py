"""Shards of a distributed embedding run: the plan, the files, the manifest and the merge.

Nothing here imports Ray: the driver plans and writes, the actors only embed.

Output folder layout:
    manifest.json           the folder, the backbone's `FeatureMeta` (and fingerprint), the
                            listed files, each shard (file name, key, files) and the skipped
                            files with their reasons
    shards/shard-NNNNN-KEY.npz
                            a checked npz (`atomic_save_checked_npz`): the shard's key and
                            meta fingerprint, `features` (n_ok, dim) float32, `names`, and the
                            skipped files' `skipped_names` / `skipped_reasons`
    features.npz            written by `merge_shards`: `features`, `names`, `labels`,
                            `class_names` (the format `engine.search.features_file` reads)

A shard is the run of `shard_size` consecutive files of the sorted listing. Its key is a
fingerprint of the backbone's meta and its files' names, sizes and mtimes, so a re-run reuses a
shard exactly when the same backbone would embed the same files, and recomputes a missing,
damaged or stale one. (Adding a file shifts the shards after it, which are then recomputed.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.storage import (
    atomic_save_checked_npz,
    atomic_save_npz,
    atomic_write_json,
    fingerprint,
    load_checked_npz,
    load_json,
)
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError
from engine.features.backbone import FeatureMeta
from engine.features.images import list_image_files

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MERGED_FILE = "features.npz"
SHARDS_FOLDER = "shards"
MANIFEST_FORMAT = 1
DEFAULT_SHARD_SIZE = 1024
"""Files per shard: what a killed run loses at most per actor, and the driver's buffer."""


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its position, its files (relative posix names, sorted) and its key."""

    index: int
    names: tuple[str, ...]
    key: str

    @property
    def file_name(self) -> str:
        return f"shard-{self.index:05d}-{self.key[:16]}.npz"


@dataclass
class Manifest:
    """What manifest.json holds (see the module docstring)."""

    folder: str
    meta: dict[str, Any]
    meta_fingerprint: str
    files: list[str]
    shards: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "folder": self.folder, "meta": self.meta,
                "meta_fingerprint": self.meta_fingerprint, "files": self.files,
                "shards": self.shards, "skipped": self.skipped}


def shard_key(meta: FeatureMeta, records: list[tuple[str, int, int]]) -> str:
    """The key of a shard: the backbone's fingerprint and each file's (name, size, mtime_ns)."""
    return fingerprint({"meta": meta.fingerprint, "files": [list(r) for r in records]})


def plan_shards(folder: str | os.PathLike, meta: FeatureMeta, shard_size: int = DEFAULT_SHARD_SIZE
                ) -> list[ShardPlan]:
    """The shards of `folder`'s images (`list_image_files`), `shard_size` files each.

    Raises:
        InvalidInputError: `folder` is not a folder or `shard_size` < 1.
        EmptyGalleryError: the folder has no image files.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InvalidInputError(f"shard_size must be a positive integer, got {shard_size!r}")
    root = Path(folder)
    paths = list_image_files(root)
    if not paths:
        raise EmptyGalleryError(f"{root} has no image files ({', '.join(sorted(_suffixes()))})")
    records = []
    for path in paths:
        stat = path.stat()
        records.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return [ShardPlan(index=number, names=tuple(r[0] for r in records[start:start + shard_size]),
                      key=shard_key(meta, records[start:start + shard_size]))
            for number, start in enumerate(range(0, len(records), shard_size))]


def _suffixes() -> set[str]:
    from engine.features.images import IMAGE_EXTENSIONS

    return set(IMAGE_EXTENSIONS)


def shard_path(out: str | os.PathLike, plan: ShardPlan) -> Path:
    return Path(out) / SHARDS_FOLDER / plan.file_name


def write_shard(out: str | os.PathLike, plan: ShardPlan, meta: FeatureMeta,
                features: dict[str, np.ndarray], skipped: dict[str, str]) -> Path:
    """Write one shard atomically: the rows of `features` ({name: (dim,) float32}) in the
    shard's file order, and the skipped files with their reasons.

    Raises:
        InvalidInputError: a file of the shard is neither embedded nor skipped.
    """
    missing = [name for name in plan.names if name not in features and name not in skipped]
    if missing:
        raise InvalidInputError(f"shard {plan.index} lacks {len(missing)} files, e.g. "
                                f"{missing[:3]}")
    kept = [name for name in plan.names if name in features]
    rows = (np.stack([features[name] for name in kept]).astype(np.float32, copy=False) if kept
            else np.zeros((0, meta.dim), np.float32))
    lost = [name for name in plan.names if name in skipped and name not in features]
    path = shard_path(out, plan)
    atomic_save_checked_npz(
        path, key=np.array(plan.key), meta_fingerprint=np.array(meta.fingerprint),
        features=rows, names=np.array(kept, dtype=str),
        skipped_names=np.array(lost, dtype=str),
        skipped_reasons=np.array([skipped[name] for name in lost], dtype=str))
    return path


def read_shard(out: str | os.PathLike, plan: ShardPlan, meta_fingerprint: str
               ) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """A written shard's features (n_ok, dim) float32, names and skipped {name: reason}.

    Raises:
        CacheError: the shard is missing, damaged, or not made for this key and backbone.
    """
    path = shard_path(out, plan)
    if not path.is_file():
        raise CacheError(f"shard {path.name} is missing")
    stored = load_checked_npz(path)
    if str(stored["key"]) != plan.key or str(stored["meta_fingerprint"]) != meta_fingerprint:
        raise CacheError(f"shard {path.name} was made for other files or another backbone")
    names = [str(name) for name in stored["names"].tolist()]
    skipped = dict(zip((str(n) for n in stored["skipped_names"].tolist()),
                       (str(r) for r in stored["skipped_reasons"].tolist()), strict=True))
    features = stored["features"]
    if features.dtype != np.float32 or features.shape[0] != len(names) \
            or sorted([*names, *skipped]) != sorted(plan.names):
        raise CacheError(f"shard {path.name} does not hold its files' features")
    return features, names, skipped


def reused_shard(out: str | os.PathLike, plan: ShardPlan, meta_fingerprint: str
                 ) -> dict[str, str] | None:
    """The skipped files of a shard already written, intact and made for this key and
    backbone; None when it must be (re)computed."""
    try:
        return read_shard(out, plan, meta_fingerprint)[2]
    except CacheError as error:
        if shard_path(out, plan).exists():
            logger.warning("recomputing %s: %s", plan.file_name, error)
        return None


def write_manifest(out: str | os.PathLike, folder: Path, meta: FeatureMeta,
                   plans: list[ShardPlan], skipped: dict[str, str]) -> Manifest:
    """Write manifest.json (atomically) for `plans`, all of them written."""
    manifest = Manifest(
        folder=str(folder), meta=meta.to_dict(), meta_fingerprint=meta.fingerprint,
        files=[name for plan in plans for name in plan.names],
        shards=[{"index": plan.index, "file": f"{SHARDS_FOLDER}/{plan.file_name}",
                 "key": plan.key, "files": len(plan.names), "first": plan.names[0],
                 "last": plan.names[-1]} for plan in plans],
        skipped=dict(sorted(skipped.items())))
    atomic_write_json(Path(out) / MANIFEST_FILE, manifest.to_json())
    return manifest


def read_manifest(out: str | os.PathLike) -> Manifest:
    """The manifest of an output folder.

    Raises:
        InvalidInputError: there is none, or it is not one this version wrote.
    """
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist: run `python -m engine.distributed "
                                "embed FOLDER --out DIR` first")
    try:
        stored = load_json(path)
    except CacheError as error:
        raise InvalidInputError(f"{path} is unreadable: {error}") from error
    if not isinstance(stored, dict) or stored.get("format") != MANIFEST_FORMAT:
        raise InvalidInputError(f"{path} is not a manifest of format {MANIFEST_FORMAT}")
    return Manifest(folder=stored["folder"], meta=stored["meta"],
                    meta_fingerprint=stored["meta_fingerprint"], files=stored["files"],
                    shards=stored["shards"], skipped=stored.get("skipped", {}))


def merge_shards(out: str | os.PathLike, destination: str | os.PathLike | None = None,
                 labels_folder: str | os.PathLike | None = None) -> Path:
    """Concatenate an output folder's shards into one features file the explorer opens.

    Rows follow the sorted file order; names are paths relative to the image folder (open the
    file with `images=<folder>` for thumbnails). Labels come from the folder's labels.csv or
    sub-folders (`engine.search.gallery.read_labels`) when the folder is reachable here.

    Args:
        out: the folder `embed_folder` wrote.
        destination: the features file (default `out/features.npz`).
        labels_folder: where labels.csv / the sub-folders are (default: the manifest's folder).

    Returns:
        The path of the features file: `features` (N, dim) float32, `names`, and `labels` (N,)
        int64 with `class_names` when the folder has labels.

    Raises:
        InvalidInputError: no manifest; CacheError: a shard is missing or damaged (re-run
        `embed`); EmptyGalleryError: every file was skipped.
    """
    from engine.search.gallery import read_labels

    manifest = read_manifest(out)
    rows, names = [], []
    start = 0
    for entry in manifest.shards:
        plan = ShardPlan(index=int(entry["index"]), key=str(entry["key"]),
                         names=tuple(manifest.files[start:start + int(entry["files"])]))
        start += len(plan.names)
        features, shard_names, _ = read_shard(out, plan, manifest.meta_fingerprint)
        rows.append(features)
        names.extend(shard_names)
    if not names:
        raise EmptyGalleryError(f"every file of {manifest.folder} was skipped; nothing to merge")
    arrays: dict[str, np.ndarray] = {"features": np.concatenate(rows),
                                     "names": np.array(names, dtype=str)}
    folder = Path(labels_folder or manifest.folder)
    if folder.is_dir():
        labels = read_labels(folder, names)
        if labels is not None:
            arrays["labels"] = np.array([labels.by_file.get(n, -1) for n in names], np.int64)
            arrays["class_names"] = np.array(labels.class_names, dtype=str)
    else:
        logger.warning("%s is not reachable here: the merged file has no labels", folder)
    destination = Path(destination) if destination is not None else Path(out) / MERGED_FILE
    atomic_save_npz(destination, **arrays)
    logger.info("merged %d shards into %s: %d items", len(manifest.shards), destination,
                len(names))
    return destination

