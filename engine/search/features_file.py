"""Bring your own features: read and check a features file, so that a gallery can be opened
from vectors another model made instead of from images (`Gallery.open_features`).

Formats (never unpickled: a file holding Python objects is refused, not loaded):
- `.npy`: an (N, d) float16 or float32 array, memory-mapped (`np.load(mmap_mode="r")`).
- `.npz`: `features` (N, d), optional `labels` (N,) int, `names` (N,) strings (the item names,
  file names relative to the image folder when there is one) and `class_names` strings. An npz
  member is read into memory (a compressed member cannot be memory-mapped); one larger than the
  available memory is refused with the advice to save the features as a `.npy`.
- `.safetensors`: tensor `features` (F16 or F32, memory-mapped at its offset) and optional
  `labels` (I32 or I64); names and class names from a sidecar `<file>.json`
  (`{"names": [...], "class_names": [...]}`) when there is one.

Checks: 2-D with N >= 1 and d >= 1, float16 or float32, finite rows, as many names and labels
as rows, unique names, labels in [-1, len(class_names)). float16 stays float16.

Metric: the index, the kNN graph and every re-ranker rank by cosine (the inner product of unit
rows). "cosine" rows that are not unit are normalised with a warning (normalize="warn", a copy
in memory in the file's dtype) or refused (normalize="refuse"). "euclidean" is accepted only
when the rows are already unit, where Euclidean distance ranks exactly as cosine
(|a - b|^2 = 2 - 2 a.b); other Euclidean features are refused, since ranking them would need an
L2 index and re-rankers on L2 distances, which the engine does not have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.storage import sha256_file
from engine.core.types import UNIT_NORM_TOLERANCE
from engine.errors import InvalidInputError
from engine.features.backbone import FeatureMeta

logger = logging.getLogger(__name__)

FORMATS = (".npy", ".npz", ".safetensors")
FEATURE_FILE_FORMATS = FORMATS
"""The suffixes of the features files a gallery opens from (the engine's public name)."""
METRICS = ("cosine", "euclidean")
NORMALIZE = ("warn", "refuse")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}
CHECK_ROWS = 65536
"""Rows checked at a time (finiteness, norms), so that a memory-mapped file is never read whole
into memory by the checks."""
PICKLE_REFUSAL = "holds Python objects (a pickle), which is never loaded"


@dataclass(frozen=True)
class FeaturesFile:
    """A checked features file.

    features: (N, d) float16 or float32 unit rows; a read-only memory map of the file when
        `memory_mapped`, else in memory.
    names: N unique item names. labels: (N,) int64 with -1 for unlabelled items, or None.
    sha256: the file's content hash (with its sidecar's); caches are keyed on it.
    normalised: rows this loader normalised (cosine, normalize="warn").
    """

    path: Path
    features: np.ndarray
    names: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    sha256: str
    metric: str
    memory_mapped: bool
    normalised: int = 0

    @property
    def meta(self) -> FeatureMeta:
        """How the features were made, as far as the engine knows: "features file <name>" with
        the content hash and dimension, so that caches and learned state keyed on it change
        with the file."""
        return features_file_meta(self.path.name, self.sha256, int(self.features.shape[1]))


def features_file_meta(name: str, sha256: str, dim: int) -> FeatureMeta:
    """The `FeatureMeta` of features read from the file `name` (no backbone, no preprocessing:
    the file's content hash stands for the weights)."""
    return FeatureMeta(backbone=f"features file {name}", weights=f"sha256:{sha256}",
                       input_size=(0, 0, 0), interpolation="none", crop_pct=0.0,
                       crop_mode="none", mean=(), std=(), pooling="none", dim=dim)


def available_memory() -> int | None:
    """Bytes of memory available now (os.sysconf), or None where the system does not say."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def load_features_file(path: str | os.PathLike, *, names: Sequence[str] | None = None,
                       labels: Sequence[int] | np.ndarray | None = None,
                       metric: str = "cosine", normalize: str = "warn") -> FeaturesFile:
    """Read and check a features file (see the module docstring).

    Args:
        path: a .npy, .npz or .safetensors file.
        names: item names overriding the file's (default: the file's, else "item-<row>").
        labels: (N,) int labels overriding the file's (-1 = unlabelled); class names are then
            the file's, else the label numbers.
        metric: "cosine" or "euclidean" (see the module docstring).
        normalize: "warn" (normalise non-unit rows, logging it) or "refuse".

    Raises:
        InvalidInputError: naming what is wrong with the file or the arguments.
    """
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if normalize not in NORMALIZE:
        raise InvalidInputError(f"normalize must be one of {', '.join(NORMALIZE)}, got "
                                f"{normalize!r}")
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise InvalidInputError(f"features file {source} does not exist or is not a file")
    suffix = source.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInputError(f"features file {source.name} must be one of "
                                f"{', '.join(FORMATS)}, got {suffix or 'no extension'!r}")
    reader = {".npy": _read_npy, ".npz": _read_npz, ".safetensors": _read_safetensors}[suffix]
    features, stored, memory_mapped, sidecar = reader(source)
    what = f"features file {source.name}"
    features = _check_matrix(features, what)
    size = int(features.shape[0])
    item_names = _names(names if names is not None else stored.get("names"), size, what)
    class_names = [str(name) for name in stored.get("class_names", [])]
    label_array = _labels(labels if labels is not None else stored.get("labels"), size,
                          class_names, what)
    if label_array is not None and not class_names:
        class_names = [str(n) for n in range(int(label_array.max()) + 1)]
    _check_memory(features, what)
    features, normalised = _unit_rows(features, what, metric, normalize)
    digest = sha256_file(source)
    if sidecar is not None:
        digest = f"{digest}+{sha256_file(sidecar)[:16]}"
    return FeaturesFile(path=source, features=features, names=item_names, labels=label_array,
                        class_names=class_names, sha256=digest, metric=metric,
                        memory_mapped=memory_mapped and normalised == 0, normalised=normalised)


Read = tuple[np.ndarray, dict[str, Any], bool, Path | None]


def _read_npy(path: Path) -> Read:
    """The array of a .npy, memory-mapped; its header is read first, so that an object array
    is refused before any of it is loaded."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            _, _, dtype = header(handle)
    except (ValueError, OSError, EOFError) as error:
        if _is_pickle(path):
            raise InvalidInputError(f"features file {path.name} {PICKLE_REFUSAL}") from error
        raise InvalidInputError(f"features file {path.name} is not a readable .npy file "
                                f"({error})") from error
    if dtype.hasobject:
        raise InvalidInputError(f"features file {path.name} {PICKLE_REFUSAL}; save a float "
                                "array with np.save")
    _check_dtype(dtype, f"features file {path.name}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), {}, True, None
    except (ValueError, OSError) as error:
        raise InvalidInputError(f"features file {path.name} is not a readable .npy file "
                                f"({error})") from error


def _read_npz(path: Path) -> Read:
    """The members of an .npz, in memory (see the module docstring)."""
    what = f"features file {path.name}"
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError) as error:
        if _is_pickle(path):
            raise InvalidInputError(f"{what} {PICKLE_REFUSAL}") from error
        raise InvalidInputError(f"{what} is not a readable .npz file ({error})") from error
    if "features.npy" not in sizes:
        raise InvalidInputError(f"{what} has no array named 'features' (it has "
                                f"{sorted(name.removesuffix('.npy') for name in sizes)})")
    available = available_memory()
    if available is not None and sizes["features.npy"] > available:
        raise InvalidInputError(
            f"{what}: its features take {sizes['features.npy'] / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB of memory available, and an .npz member cannot be "
            "memory-mapped: save them with np.save as a .npy file, which is")
    stored: dict[str, Any] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in ("features", "labels", "names", "class_names"):
                if key in archive.files:
                    stored[key] = archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InvalidInputError(f"{what} {PICKLE_REFUSAL}; save names as a string array "
                                    "(np.array(names, dtype=str))") from error
        raise InvalidInputError(f"{what} is not a readable .npz file ({error})") from error
    except (OSError, zipfile.BadZipFile) as error:
        raise InvalidInputError(f"{what} is not a readable .npz file ({error})") from error
    for key in ("names", "class_names"):
        if key in stored and stored[key].dtype.kind not in "US":
            raise InvalidInputError(f"{what}: '{key}' must be strings, got dtype "
                                    f"{stored[key].dtype}")
        if key in stored:
            stored[key] = [str(value) for value in stored[key].reshape(-1).tolist()]
    features = stored.pop("features")
    _check_dtype(features.dtype, what)
    return features, stored, False, None


def _read_safetensors(path: Path) -> Read:
    """`features` (memory-mapped) and `labels` of a .safetensors file, read from its header
    (8 bytes little-endian length, then JSON), and names from a sidecar JSON."""
    what = f"features file {path.name}"
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(path.stat().st_size, 100 * 2**20):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{what} is not a readable .safetensors file ({error})"
                                ) from error
    start = 8 + length

    def tensor(name: str) -> np.ndarray:
        entry = header[name]
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise InvalidInputError(f"{what}: tensor {name!r} has dtype {entry.get('dtype')}; "
                                    f"use one of {', '.join(SAFETENSORS_DTYPES)}")
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or (
                start + end > path.stat().st_size):
            raise InvalidInputError(f"{what}: tensor {name!r} does not fit its offsets")
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)

    if "features" not in header:
        raise InvalidInputError(f"{what} has no tensor named 'features' (it has "
                                f"{sorted(k for k in header if k != '__metadata__')})")
    try:
        features = tensor("features")
        stored: dict[str, Any] = {}
        if "labels" in header:
            stored["labels"] = np.array(tensor("labels"))
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(f"{what} has a malformed header ({error})") from error
    _check_dtype(features.dtype, what)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return features, stored, True, None
    try:
        extra = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{sidecar.name}, beside {path.name}, is not readable JSON "
                                f"({error})") from error
    for key in ("names", "class_names"):
        values = extra.get(key) if isinstance(extra, dict) else None
        if values is not None:
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise InvalidInputError(f"{sidecar.name}: '{key}' must be a list of strings")
            stored[key] = values
    return features, stored, True, sidecar


def _is_pickle(path: Path) -> bool:
    """Whether the file starts like a pickle (protocol 2 or later)."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.hasobject:
        raise InvalidInputError(f"{what} {PICKLE_REFUSAL}")
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise InvalidInputError(f"{what} has dtype {dtype}; features must be float16 or "
                                "float32 (convert with .astype(np.float32))")


def _check_matrix(features: np.ndarray, what: str) -> np.ndarray:
    """The (N, d) features with N, d >= 1 and finite rows (checked in blocks)."""
    if features.ndim != 2:
        raise InvalidInputError(f"{what} must hold a 2-D (N, d) array, got shape "
                                f"{features.shape}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise InvalidInputError(f"{what} is empty (shape {features.shape}): it needs at least "
                                "one row of at least one dimension")
    bad_count, first = 0, None
    for begin in range(0, features.shape[0], CHECK_ROWS):
        finite = np.isfinite(features[begin:begin + CHECK_ROWS]).all(axis=1)
        bad = np.flatnonzero(~finite)
        if bad.size and first is None:
            first = begin + int(bad[0])
        bad_count += int(bad.size)
    if bad_count:
        raise InvalidInputError(f"{what} has {bad_count} row{'s' if bad_count > 1 else ''} with "
                                f"NaN or infinite values (the first is row {first}); "
                                "re-extract or drop them")
    return features


def _names(values: Any, size: int, what: str) -> list[str]:
    if values is None:
        width = len(str(size - 1))
        return [f"item-{row:0{width}d}" for row in range(size)]
    names = [str(value) for value in values]
    if len(names) != size:
        raise InvalidInputError(f"{what}: {len(names)} names for {size} rows")
    seen: set[str] = set()
    for name in names:
        if not name.strip():
            raise InvalidInputError(f"{what}: an item name is empty")
        if name in seen:
            raise InvalidInputError(f"{what}: the name {name!r} is given to two items; names "
                                    "must be unique")
        seen.add(name)
    return names


def _labels(values: Any, size: int, class_names: list[str], what: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != size:
        raise InvalidInputError(f"{what}: labels must be one int per row ({size}), got shape "
                                f"{array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{what}: labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    high = len(class_names) if class_names else None
    out_of_range = (array < -1) | ((array >= high) if high is not None else False)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        allowed = f"[-1, {high})" if high is not None else ">= -1"
        raise InvalidInputError(f"{what}: labels must be in {allowed} (-1: unlabelled); row "
                                f"{row} has {int(array[row])}")
    return None if (array < 0).all() else array


def _check_memory(features: np.ndarray, what: str) -> None:
    """Refuse features whose float32 index would not fit in the available memory (the flat
    index and the kNN graph hold a float32 copy, whatever the file's dtype)."""
    needed = int(features.shape[0]) * int(features.shape[1]) * 4
    available = available_memory()
    if available is not None and needed > available:
        raise InvalidInputError(
            f"{what} is memory-mapped, but its search index needs a float32 copy of "
            f"{needed / 2**30:.1f} GiB and only {available / 2**30:.1f} GiB of memory is "
            "available: open a subset, or reduce the dimension")


def _unit_rows(features: np.ndarray, what: str, metric: str, normalize: str
               ) -> tuple[np.ndarray, int]:
    """The features as unit rows (see the module docstring) and how many rows were scaled."""
    count, first, first_norm, zero = 0, None, 0.0, None
    for begin in range(0, features.shape[0], CHECK_ROWS):
        norms = np.linalg.norm(np.asarray(features[begin:begin + CHECK_ROWS], np.float32),
                               axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
        if off.size and first is None:
            first, first_norm = begin + int(off[0]), float(norms[off[0]])
        count += int(off.size)
        zeros = np.flatnonzero(norms == 0)
        if zeros.size and zero is None:
            zero = begin + int(zeros[0])
    if count == 0:
        return features, 0
    summary = (f"{count} row{'s' if count > 1 else ''} of {what} {'are' if count > 1 else 'is'} "
               f"not unit-norm (the first is row {first}, norm {first_norm:.4g})")
    if metric == "euclidean":
        raise InvalidInputError(
            f"{summary}: Euclidean distances between them are not supported yet, because the "
            "index, the kNN graph and the re-rankers rank by cosine (an L2 index and re-rankers "
            "on L2 distances would be needed). Open them with metric='cosine' if cosine suits "
            "them; on unit rows Euclidean ranks as cosine and is accepted")
    if normalize == "refuse":
        raise InvalidInputError(f"{summary}: cosine needs unit rows; divide each row by its norm "
                                "or open with normalize='warn'")
    if zero is not None:
        raise InvalidInputError(f"{summary}, and row {zero} is all zeros, which has no "
                                "direction: drop the zero rows")
    logger.warning("%s: normalised them in memory (cosine)", summary)
    array = np.asarray(features, np.float32)
    array = array / np.linalg.norm(array, axis=1, keepdims=True)
    return array.astype(features.dtype), count


def load_query_features(path: str | os.PathLike, *, dim: int, class_names: Sequence[str],
                        metric: str = "cosine", normalize: str = "warn",
                        gallery_name: str = "the gallery") -> FeaturesFile:
    """Read and check a file of query features for a gallery opened from a features file (a
    query/gallery split): the same formats and checks as `load_features_file` (finite rows,
    `metric` and `normalize` handled alike), and the dimension must be the gallery's `dim`.
    Query labels are put in the gallery's label space (`class_names`) by class name, or by
    number when the query file names no classes; a class the gallery lacks becomes -1 (the
    query is then not scored by labels), with a warning.

    Raises:
        InvalidInputError: naming what is wrong, with both dimensions for a mismatch.
    """
    loaded = load_features_file(path, metric=metric, normalize=normalize)
    found = int(loaded.features.shape[1])
    if found != dim:
        raise InvalidInputError(
            f"the query features in {loaded.path.name} have {found} dimensions but "
            f"{gallery_name} has {dim}: queries must come from the model that made the "
            "gallery's features")
    labels = map_query_labels(loaded.labels, loaded.class_names, list(class_names),
                              loaded.path.name)
    return dataclasses.replace(loaded, labels=labels, class_names=list(class_names))


def map_query_labels(labels: np.ndarray | None, query_classes: Sequence[str],
                     gallery_classes: Sequence[str], what: str) -> np.ndarray | None:
    """Query labels (indices into `query_classes`) as gallery labels (indices into
    `gallery_classes`): by class name; when no query class name is a gallery class and the
    query classes are the bare numbers a file without class names gets ("0", "1", ...), by
    number. Classes the gallery lacks become -1 (logged). None when nothing is labelled."""
    if labels is None:
        return None
    by_name = {name: row for row, name in enumerate(gallery_classes)}
    used = sorted({int(label) for label in labels.tolist() if label >= 0})
    numbered = all(query_classes[label] == str(label) for label in used)
    if numbered and not any(query_classes[label] in by_name for label in used):
        table = {label: (label if label < len(gallery_classes) else -1) for label in used}
    else:
        table = {label: by_name.get(query_classes[label], -1) for label in used}
    missing = [query_classes[label] for label in used if table[label] < 0]
    if missing:
        logger.warning("%s: %d query class%s not in the gallery (%s): those queries are not "
                       "scored by labels", what, len(missing), "es" if len(missing) > 1 else "",
                       ", ".join(missing[:5]))
    mapped = np.array([table.get(int(label), -1) if label >= 0 else -1
                       for label in labels.tolist()], dtype=np.int64)
    return None if (mapped < 0).all() else mapped
