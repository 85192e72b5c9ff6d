"""Atomic file writes, manifests and safe paths.

Every write goes to a temporary file in the destination folder, is flushed to disk and then
renamed over the destination, so a crash leaves either the old file or the new one, never a
half-written one. A process killed mid-write (SIGKILL runs no clean-up) leaves its temporary
behind; `remove_stale_temporaries` sweeps those. Checked .npz files carry a sha256 of their
arrays, so a damaged file is detected on load however it was damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CacheError, UnsafePathError

TEMPORARY_SUFFIX = ".tmp"
CHECKSUM_KEY = "checksum"


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it over `destination` on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=TEMPORARY_SUFFIX, dir=destination.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, destination)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def atomic_write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `destination` atomically."""
    with atomic_path(destination) as temporary, open(temporary, "wb") as handle:
        handle.write(data)


def atomic_write_json(destination: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON atomically."""
    atomic_write_bytes(destination, json.dumps(payload, indent=2, sort_keys=True).encode())


def atomic_save_npz(destination: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save arrays as an uncompressed .npz atomically (no pickled objects allowed)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(destination, buffer.getvalue())


def arrays_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex sha256 over the names, dtypes, shapes and bytes of `arrays` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def atomic_save_checked_npz(destination: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`atomic_save_npz` plus a `checksum` array (`arrays_checksum`) that
    `load_checked_npz` verifies, so the file vouches for itself without a manifest."""
    if CHECKSUM_KEY in arrays:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum")
    atomic_save_npz(destination, **arrays, **{CHECKSUM_KEY: np.array(arrays_checksum(arrays))})


def load_checked_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a file written by `atomic_save_checked_npz` (checksum removed).

    Raises CacheError when the file is unreadable, has no checksum (an older format) or its
    arrays do not match the checksum (flipped bytes, an edited array).
    """
    arrays = load_npz(path)
    stored = arrays.pop(CHECKSUM_KEY, None)
    if stored is None or stored.shape != ():
        raise CacheError(f"cache file {path} has no checksum (an older format); it will be "
                         "rebuilt")
    if str(stored) != arrays_checksum(arrays):
        raise CacheError(f"cache file {path} does not match its checksum (damaged); it will be "
                         "rebuilt")
    return arrays


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 3600.0
                             ) -> list[Path]:
    """Delete the temporaries `atomic_path` left in `folder` (not recursive) when a process was
    killed mid-write; only ones untouched for `older_than_s`, so that a write in progress in
    another process is left alone. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    cutoff = time.time() - older_than_s
    for path in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another process renamed or removed it meanwhile
            continue
    return removed


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an .npz written by `atomic_save_npz`; corrupt files raise CacheError."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CacheError(f"cache file {path} is unreadable ({error}); it will be rebuilt"
                         ) from error


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a damaged file raises CacheError."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CacheError(f"{path} is unreadable ({error})") from error


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def safe_join(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """Join `relative` under `root`, refusing absolute paths and anything that escapes `root`."""
    root_path = Path(root).resolve()
    relative = Path(relative)
    if relative.is_absolute():
        raise UnsafePathError(f"absolute path {str(relative)!r} is not allowed inside {root_path}")
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafePathError(f"path {str(relative)!r} escapes its folder {root_path}")
    return candidate
