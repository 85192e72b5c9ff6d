"""Saved learned state: one layout for every method that learns and every cache that records
files by checksum.

A state saved at `path` (a stem: the suffixes are appended to its name) is

    path.safetensors  the tensors, when there are any (safetensors: no code runs on load)
    path.json         the manifest: the caller's metadata at the top level, plus
                      format          the caller's format version (`version`)
                      kind            what the state is ("sgrr", "ssr", "gallery-index", ...)
                      fingerprint     what the state was made from; another one means rebuild
                      files           {name: {bytes, sha256}} of any extra files beside the
                                      manifest (an index, a model file)
                      weights_sha256  sha256 of path.safetensors, only when there are tensors
                      checksum        `storage.fingerprint` of every other field

Every file arrives by an atomic rename, the manifest last, so a manifest only ever vouches for
files complete on disk. A crash between the tensors' rename and the manifest's leaves new
tensors under the old manifest: their sha256 no longer matches, so the state is refused and
rebuilt, never used wrongly. `load_state` checks everything before a tensor is parsed, and
deletes nothing: the caller rebuilds and saves over it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.storage import (
    atomic_path,
    atomic_write_json,
    load_json,
    safe_join,
    sha256_file,
)
from engine.core.storage import (
    fingerprint as payload_fingerprint,
)
from engine.errors import CacheError, UnsafePathError

RESERVED = ("format", "kind", "fingerprint", "files", "weights_sha256", "checksum")
"""Manifest fields that `save_state` writes itself; metadata may not use them."""
TENSORS_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"


class MissingStateError(CacheError):
    """Nothing is saved at the path yet: build it, no warning needed."""


class StaleStateError(CacheError):
    """The state is intact but was made from other inputs (another fingerprint): rebuilt as a
    matter of course."""


@dataclass(frozen=True)
class LoadedState:
    """What `load_state` verified and read.

    manifest: every field of the manifest but its checksum (the caller's metadata included);
    tensors: name -> CPU torch tensor (empty when the state has none); files: name -> path of
    each extra file, its size and sha256 checked; contents: name -> the bytes of each file the
    caller asked `load_state` to read, the very bytes that were checked.
    """

    manifest: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest of the state saved at `path` (`path` + ".json")."""
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def tensors_path(path: str | os.PathLike) -> Path:
    """The tensors file of the state saved at `path` (`path` + ".safetensors")."""
    path = Path(path)
    return path.with_name(path.name + TENSORS_SUFFIX)


def file_record(path: Path) -> dict[str, Any]:
    """{bytes, sha256} of a file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def save_state(path: str | os.PathLike, *, kind: str, version: int, fingerprint: str,
               tensors: Mapping[str, Any] | None = None,
               files: Sequence[str | os.PathLike] = (),
               metadata: Mapping[str, Any] | None = None,
               file_records: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Save a state at `path` (a stem: `path` + ".safetensors" and `path` + ".json").

    Args:
        path: where the state lives, without the suffixes; its folder is created.
        kind: what the state is; `load_state` refuses a state of another kind.
        version: the caller's format version; bump it when what it saves changes, so that
            older states are rebuilt rather than misread.
        fingerprint: what the state was made from (features, parameters); `load_state` is
            given the one it expects.
        tensors: name -> torch tensor or numpy array, saved as safetensors (none: no tensors
            file).
        files: extra files already written (atomically) in the manifest's folder, recorded by
            size and sha256 so that `load_state` refuses them if they change.
        metadata: JSON-serialisable fields stored at the top level of the manifest (not the
            names in `RESERVED`).
        file_records: name -> {bytes, sha256} of extra files just verified by `load_state`
            (its `manifest["files"]`), recorded as given instead of hashed again.
    Returns:
        The manifest's path.
    """
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
        raise ValueError(f"metadata may not use the reserved manifest fields {clash}")
    manifest_file = manifest_path(path)
    folder = manifest_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for extra in files:
        extra = Path(extra) if Path(extra).is_absolute() else folder / extra
        if extra.resolve().parent != folder.resolve():
            raise UnsafePathError(f"{extra} is not in the state's folder {folder}")
        records[extra.name] = file_record(extra)
    for name, record in (file_records or {}).items():
        records[name] = {"bytes": record["bytes"], "sha256": record["sha256"]}
    manifest = {**metadata, "format": version, "kind": kind, "fingerprint": fingerprint,
                "files": records}
    if tensors is not None:
        from safetensors.torch import save_file

        weights = tensors_path(path)
        with atomic_path(weights) as temporary:
            save_file(_cpu_tensors(tensors), str(temporary))
        manifest["weights_sha256"] = sha256_file(weights)
    atomic_write_json(manifest_file, {**manifest, "checksum": payload_fingerprint(manifest)})
    return manifest_file


def _cpu_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    converted = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        converted[name] = value.detach().cpu().contiguous()
    return converted


def read_manifest(path: str | os.PathLike, *, kind: str, version: int) -> dict[str, Any]:
    """The manifest of the state at `path`, checked for its own checksum, kind and format
    version (not its fingerprint nor its files); see `load_state` for the errors."""
    manifest_file = manifest_path(path)
    name = manifest_file.name
    if not manifest_file.is_file():
        raise MissingStateError(f"no saved {kind} state at {manifest_file}")
    manifest = load_json(manifest_file)
    if not isinstance(manifest, dict):
        raise CacheError(f"{name} is not a JSON object")
    if manifest.get("format") != version:
        raise CacheError(f"{name} has format {manifest.get('format')!r}, not {version}")
    checksum = manifest.pop("checksum", None)
    if checksum != payload_fingerprint(manifest):
        raise CacheError(f"{name} does not match its checksum (edited or damaged)")
    if manifest.get("kind") != kind:
        raise CacheError(f"{name} holds a {manifest.get('kind')!r} state, not {kind!r}")
    return manifest


def load_state(path: str | os.PathLike, *, kind: str, version: int,
               fingerprint: str | None, files: Sequence[str] = (),
               read: Sequence[str] = ()) -> LoadedState:
    """Load and verify the state saved at `path` by `save_state`.

    The checks, in order, before any tensor is parsed: the manifest exists
    (`MissingStateError`), parses, has format `version`, matches its own checksum, is of `kind`,
    was made from `fingerprint` (`StaleStateError`; None skips this check), records every name in
    `files`, every file it records is present with the recorded size and sha256, and the
    tensors file matches its sha256.

    Args:
        path: the stem given to `save_state`.
        kind, version: what the caller saves now.
        fingerprint: what the caller expects the state to be made from.
        files: names of extra files the caller needs (each must be recorded).
        read: names of extra files whose contents the caller needs: each is read once, checked
            from those bytes and returned in `contents`, so that what the caller uses (say,
            unpickles) is exactly what was checked.
    Returns:
        The verified manifest, tensors (CPU torch), extra files and contents read.
    Raises:
        CacheError (or its subclasses above) with a message naming the file and the reason.
        Nothing on disk is deleted.
    """
    manifest = read_manifest(path, kind=kind, version=version)
    name = manifest_path(path).name
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise StaleStateError(f"{name} was made from {manifest.get('fingerprint')!r}, not "
                              f"{fingerprint!r}")
    records = manifest.get("files")
    if not isinstance(records, dict):
        raise CacheError(f"{name} records no checksums")
    folder = manifest_path(path).parent
    verified: dict[str, Path] = {}
    contents: dict[str, bytes] = {}
    for recorded in dict.fromkeys([*files, *read, *records]):
        try:
            file = safe_join(folder, str(recorded))
        except UnsafePathError as error:
            raise CacheError(f"{name} names a file outside its folder ({error})") from error
        record = records.get(recorded)
        if not file.is_file():
            raise CacheError(f"{recorded} is missing")
        if recorded in read:
            try:
                contents[recorded] = file.read_bytes()
            except OSError as error:
                raise CacheError(f"{recorded} is unreadable ({error})") from error
            found = {"bytes": len(contents[recorded]),
                     "sha256": hashlib.sha256(contents[recorded]).hexdigest()}
        else:
            found = file_record(file)
        if not isinstance(record, dict) or found != {
                "bytes": record.get("bytes"), "sha256": record.get("sha256")}:
            raise CacheError(f"{recorded} does not match the size and sha256 in {name}")
        verified[recorded] = file
    tensors = {}
    if "weights_sha256" in manifest:
        weights = tensors_path(path)
        if not weights.is_file():
            raise CacheError(f"{weights.name} is missing")
        if sha256_file(weights) != manifest["weights_sha256"]:
            raise CacheError(f"{weights.name} does not match its checksum in {name}")
        tensors = _read_tensors(weights)
    return LoadedState(manifest=manifest, tensors=tensors, files=verified, contents=contents)


def _read_tensors(weights: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CacheError(f"{weights.name} is unreadable ({error})") from error
