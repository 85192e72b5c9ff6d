"""Safe extraction of uploaded gallery zips, and the check that a typed-in folder is allowed.

An uploaded zip is untrusted. `extract_zip` refuses, before writing anything, archives whose
entries could land outside their folder (absolute paths, drive letters, `..`, symbolic links),
archives that are too large, have too many entries or are encrypted; it extracts only images and
the few gallery files the app reads, counts the bytes it actually writes (headers can lie), and
works in a temporary folder that is renamed into place only when everything succeeded. The
result is content-addressed (named after the zip's sha256), so uploading the same zip again
reopens the earlier extraction at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from engine.core.storage import atomic_write_json, load_json, safe_join
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError, UnsafePathError
from engine.features.images import IMAGE_EXTENSIONS

try:  # optional in some Python builds, as for zipfile itself
    import lzma
except ImportError:  # pragma: no cover
    lzma = None

logger = logging.getLogger(__name__)

MAX_ARCHIVE_BYTES: int = 1 << 30
"""Uploaded zips larger than this (1 GiB) are refused before they are read."""

MAX_EXTRACTED_BYTES: int = 2 << 30
"""Archives whose extracted files would take more than this (2 GiB) are refused."""

MAX_ENTRIES: int = 50_000
"""Archives with more entries than this (files, folders and skipped entries) are refused."""

GALLERY_FILES: frozenset[str] = frozenset({"labels.csv", "examples.txt", "presets.json"})
"""Non-image files the app reads from a gallery folder; extracted wherever they are."""

MARKER_FILE = ".extracted.json"
"""Written last into an extraction: its presence means the folder is complete."""

_MARKER_FORMAT = 1
_CHUNK_BYTES = 1 << 20
_CENTRAL_HEADER_BYTES = 46  # fixed part of a central-directory record
_TEMPORARY_PREFIX = ".extracting-"
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# What zipfile raises when it opens a damaged or unsupported archive (NotImplementedError: a
# newer zip version or compression method).
_OPEN_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    NotImplementedError,
)
# What a damaged member raises while it is read (bz2 reports bad data as OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    *_OPEN_ERRORS,
    zlib.error,
    OSError,
    *((lzma.LZMAError,) if lzma is not None else ()),
)


@dataclass(frozen=True)
class ExtractedArchive:
    """Where an uploaded zip was extracted.

    root: the gallery folder to open, resolved (the single top-level folder of the archive when
    all extracted files lie in one, else the extraction folder itself).
    skipped: entry name -> why it was not extracted (folder entry, not an image, hidden...).
    reused: True when an earlier extraction of the same bytes was returned without extracting.
    """

    root: Path
    skipped: dict[str, str] = field(default_factory=dict)
    reused: bool = False


def extract_zip(
    archive: str | os.PathLike,
    destination_root: str | os.PathLike,
    *,
    max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    max_extracted_bytes: int = MAX_EXTRACTED_BYTES,
    max_entries: int = MAX_ENTRIES,
) -> ExtractedArchive:
    """Extract the images and gallery files of a zip into destination_root/<sha256[:16]>.

    Every entry is checked before anything is written; an unsafe or oversized archive leaves
    nothing behind. Files are written to a temporary folder inside `destination_root` which is
    renamed into place at the end (if another process finished the same zip first, its folder is
    kept). Only files with a suffix of `IMAGE_EXTENSIONS` and the files of `GALLERY_FILES` are
    extracted; folder entries, other files, `__MACOSX/` and hidden names are listed in `skipped`.

    Args:
        archive: path of the uploaded .zip.
        destination_root: folder that holds one sub-folder per extracted archive.
        max_archive_bytes: largest accepted size of the .zip itself.
        max_extracted_bytes: largest total size of the extracted files, checked against the
            sizes the archive declares and again against the bytes actually written.
        max_entries: largest accepted number of entries in the archive.

    Returns:
        The gallery folder to open, the skipped entries and whether an earlier extraction
        was reused.

    Raises:
        UnsafePathError: an entry has an absolute path, a drive letter, a `..` component, is a
            symbolic link or would land outside the extraction folder.
        InvalidInputError: the file is missing, not a zip, corrupt or truncated, too large, has
            too many entries, expands beyond `max_extracted_bytes` or holds encrypted entries.
        EmptyGalleryError: the archive holds no image file.
    """
    archive = Path(archive)
    destination_root = Path(destination_root)
    if not archive.is_file():
        raise InvalidInputError(f"{archive} is not a file; upload a .zip of images")
    with open(archive, "rb") as handle:
        archive_bytes = os.fstat(handle.fileno()).st_size
        if archive_bytes > max_archive_bytes:
            raise InvalidInputError(
                f"{archive.name} is {_human_bytes(archive_bytes)}; the limit is "
                f"{_human_bytes(max_archive_bytes)}. Upload a smaller zip or open the folder "
                "directly"
            )
        digest = _sha256_stream(handle)
        handle.seek(0)
        target = destination_root / digest[:16]
        previous = _read_complete(target)
        if previous is not None:
            logger.info("reusing the extraction of %s at %s", archive.name, target)
            return previous
        try:
            _check_entry_count(handle, archive.name, max_entries)
            with zipfile.ZipFile(handle) as opened:
                return _extract_new(
                    opened,
                    archive.name,
                    digest,
                    target,
                    max_extracted_bytes=max_extracted_bytes,
                    max_entries=max_entries,
                )
        except _OPEN_ERRORS as error:
            raise InvalidInputError(
                f"{archive.name} is not a readable zip file ({error}); check that the upload "
                "finished and that it is a .zip"
            ) from error


UPLOAD_NAME_FILE = ".upload-name.json"
"""Written into an uploaded gallery's folder: the name the page shows for it (the uploaded
file's name; the folder itself is named after the zip's sha256). Hidden, so never listed as
an image."""
MAX_NAME_LENGTH = 120


def write_upload_name(root: str | os.PathLike, name: str) -> str:
    """Record `name` (reduced to a file name of at most `MAX_NAME_LENGTH` characters) as the
    name of the uploaded gallery at `root`; returns the name recorded. The last upload of the
    same bytes names them."""
    cleaned = clean_upload_name(name)
    atomic_write_json(Path(root) / UPLOAD_NAME_FILE, {"name": cleaned})
    return cleaned


def read_upload_name(root: str | os.PathLike) -> str | None:
    """The name recorded by `write_upload_name` for the gallery at `root`, None when there is
    none (a folder that was not uploaded) or the file is damaged."""
    path = Path(root) / UPLOAD_NAME_FILE
    if not path.is_file():
        return None
    try:
        name = load_json(path).get("name")
    except (CacheError, AttributeError):
        return None
    return clean_upload_name(name) if isinstance(name, str) and name.strip() else None


def clean_upload_name(name: str) -> str:
    """A name to show for an upload: the last part of a path (a browser may send one),
    without control characters, at most `MAX_NAME_LENGTH` characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(character for character in base if character.isprintable()).strip()
    return base[:MAX_NAME_LENGTH] or "upload.zip"


def resolve_allowed_folder(
    path: str | os.PathLike, allowed_roots: Iterable[str | os.PathLike] | str | os.PathLike
) -> Path:
    """Resolve a folder typed by a user and check that it lies inside an allowed root.

    Both `path` and the roots have `~` expanded and symbolic links resolved, so a link inside a
    root that points elsewhere is judged by where it points. Containment is checked before
    existence, so the answer does not reveal which folders exist outside the roots.

    Args:
        path: the folder to open.
        allowed_roots: folders the user may open, with everything below them; a single path
            counts as one root. Empty means nothing is allowed.

    Returns:
        The resolved, existing folder.

    Raises:
        UnsafePathError: the resolved folder is not one of the roots nor inside one.
        InvalidInputError: the path is empty, does not exist or is not a folder.
    """
    if isinstance(allowed_roots, (str, os.PathLike)):
        allowed_roots = [allowed_roots]
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InvalidInputError(f"give a folder path, got {path!r}")
    try:
        resolved = Path(path).expanduser().resolve()
        roots = [Path(root).expanduser().resolve() for root in allowed_roots]
    except (OSError, ValueError, RuntimeError) as error:
        raise InvalidInputError(f"{path!s} is not a usable path ({error})") from error
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none are configured"
        raise UnsafePathError(
            f"{path!s} (resolved to {resolved}) is outside the allowed folders ({allowed}); "
            "open a folder inside one of them or upload a zip"
        )
    if not resolved.exists():
        raise InvalidInputError(f"{path!s} does not exist; check the spelling")
    if not resolved.is_dir():
        raise InvalidInputError(f"{path!s} is not a folder; give the folder that holds the images")
    return resolved


def _extract_new(
    opened: zipfile.ZipFile,
    label: str,
    digest: str,
    target: Path,
    *,
    max_extracted_bytes: int,
    max_entries: int,
) -> ExtractedArchive:
    """Check every entry, extract the wanted ones to a temporary folder, rename it to `target`."""
    entries = opened.infolist()
    if len(entries) > max_entries:
        raise InvalidInputError(
            f"{label} has {len(entries):,} entries; the limit is {max_entries:,}. Split it into "
            "smaller zips"
        )
    wanted, skipped = _plan(entries, label)
    if not any(PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS for name in wanted):
        raise EmptyGalleryError(
            f"{label} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            f"{len(skipped)} entries were skipped"
        )
    _check_declared_size(wanted, label, max_extracted_bytes)
    relative_root = _single_top_folder(list(wanted))

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=_TEMPORARY_PREFIX, dir=target.parent))
    try:
        written = 0
        for name, info in wanted.items():
            written = _copy_entry(
                opened, info, safe_join(temporary, name), label, written, max_extracted_bytes
            )
        atomic_write_json(
            temporary / MARKER_FILE,
            {
                "format": _MARKER_FORMAT,
                "archive": label,
                "sha256": digest,
                "root": relative_root,
                "files": list(wanted),
                "skipped": skipped,
                "bytes": written,
            },
        )
        _move_into_place(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("extracted %d files of %s to %s", len(wanted), label, target)
    complete = _read_complete(target)
    if complete is None:  # renamed a moment ago; only outside interference gets here
        raise CacheError(f"the extraction of {label} at {target} vanished; upload it again")
    return ExtractedArchive(root=complete.root, skipped=complete.skipped, reused=False)


def _check_entry_count(handle: IO[bytes], label: str, max_entries: int) -> None:
    """Refuse an archive of more than `max_entries` entries before zipfile reads its directory.

    zipfile builds an object for every central-directory record before anything can be counted:
    a 1 GiB upload of empty entries (some 14 million) would take gigabytes of memory. Here the
    records' fixed headers are walked in a stream, stopping just past the limit (the end
    record's own count could be forged). An archive that cannot be walked is left to zipfile,
    which refuses it with its own message.
    """
    # zipfile's end-record reader (private, but unchanged since Python 2.6) handles zip64 and
    # archive comments; its field numbers are the module's _ECD_* constants.
    end = zipfile._EndRecData(handle)
    if not end:
        return
    size = end[zipfile._ECD_SIZE]
    start = end[zipfile._ECD_LOCATION] - size
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    count = walked = 0
    if start >= 0:
        handle.seek(start)
        while walked < size and count <= max_entries:
            header = handle.read(_CENTRAL_HEADER_BYTES)
            if len(header) != _CENTRAL_HEADER_BYTES or header[:4] != b"PK\x01\x02":
                break
            variable = sum(struct.unpack_from("<3H", header, 28))  # name, extra, comment
            handle.seek(variable, os.SEEK_CUR)
            walked += _CENTRAL_HEADER_BYTES + variable
            count += 1
    handle.seek(0)
    declared = end[zipfile._ECD_ENTRIES_TOTAL]
    if count > max_entries:
        many = (f"{declared:,} entries" if declared > max_entries
                else f"more than {max_entries:,} entries (its end record claims {declared:,})")
        raise InvalidInputError(
            f"{label} has {many}; the limit is {max_entries:,}. Split it into smaller zips"
        )


def _plan(
    entries: list[zipfile.ZipInfo], label: str
) -> tuple[dict[str, zipfile.ZipInfo], dict[str, str]]:
    """Split entries into those to extract (by normalised name) and those skipped (with why).

    Raises on the first unsafe or encrypted entry, whether or not it would be extracted.
    """
    wanted: dict[str, zipfile.ZipInfo] = {}
    skipped: dict[str, str] = {}
    for info in entries:
        parts = _safe_parts(info, label)
        if info.flag_bits & 0x1:
            raise InvalidInputError(
                f"{label}: entry {info.filename!r} is encrypted; zip the images again without "
                "a password"
            )
        reason = _skip_reason(info, parts)
        if reason is None:
            name = "/".join(parts)
            if name in wanted:
                reason = "duplicate of an earlier entry with the same name"
            else:
                wanted[name] = info
        if reason is not None:
            skipped[info.filename] = reason
    folders = set()
    for name in wanted:
        parts = name.split("/")
        folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    clashes = sorted(folders.intersection(wanted))
    if clashes:
        raise InvalidInputError(
            f"{label}: {clashes[0]!r} is both a file and a folder in the archive; rename one"
        )
    return wanted, skipped


def _safe_parts(info: zipfile.ZipInfo, label: str) -> tuple[str, ...]:
    """The path components of an entry, or UnsafePathError if it could leave its folder."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise UnsafePathError(
            f"{label}: entry {info.filename!r} has an absolute path; nothing was extracted. "
            "Zip the gallery with relative paths"
        )
    parts = _split(name)
    if ".." in parts:
        raise UnsafePathError(
            f"{label}: entry {info.filename!r} points outside the archive folder ('..'); "
            "nothing was extracted"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafePathError(
            f"{label}: entry {info.filename!r} is a symbolic link; nothing was extracted. "
            "Zip the files themselves, not links to them"
        )
    return parts


def _split(name: str) -> tuple[str, ...]:
    """Components of a '/'-separated name, without empty and '.' components."""
    return tuple(part for part in name.split("/") if part not in ("", "."))


def _skip_reason(info: zipfile.ZipInfo, parts: tuple[str, ...]) -> str | None:
    """Why an entry is not extracted, or None if it is."""
    if info.is_dir() or info.filename.replace("\\", "/").endswith("/"):
        return "folder entry"
    if not parts:
        return "empty name"
    if "__MACOSX" in parts:
        return "macOS metadata (__MACOSX)"
    if any(part.startswith(".") for part in parts):
        return "hidden file"
    if parts[-1] in GALLERY_FILES or PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS:
        return None
    return "not an image or a gallery file (labels.csv, examples.txt, presets.json)"


def _check_declared_size(
    wanted: dict[str, zipfile.ZipInfo], label: str, max_extracted_bytes: int
) -> None:
    """Refuse early when the sizes the archive declares already exceed the limit."""
    declared = sum(info.file_size for info in wanted.values())
    if declared > max_extracted_bytes:
        raise InvalidInputError(
            f"{label} expands to {_human_bytes(declared)}; the limit is "
            f"{_human_bytes(max_extracted_bytes)}. Upload a smaller zip or open the folder directly"
        )


def _copy_entry(
    opened: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    destination: Path,
    label: str,
    written: int,
    max_extracted_bytes: int,
) -> int:
    """Stream one entry to `destination` in chunks; return the running total of bytes written.

    The total is checked after every chunk, so a header that understates sizes cannot make the
    extraction exceed `max_extracted_bytes`.
    """
    try:
        source = opened.open(info)
    except _READ_ERRORS as error:
        raise _corrupt(label, info, error) from error
    with source:
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(destination, "xb") as output:
                while True:
                    try:
                        chunk = source.read(_CHUNK_BYTES)
                    except _READ_ERRORS as error:
                        raise _corrupt(label, info, error) from error
                    if not chunk:
                        return written
                    written += len(chunk)
                    if written > max_extracted_bytes:
                        raise InvalidInputError(
                            f"{label} expands to more than {_human_bytes(max_extracted_bytes)} "
                            "(the limit) although its headers claim less; the archive is "
                            "damaged or forged"
                        )
                    output.write(chunk)
        except OSError as error:  # writing: a name too long for the file system, a full disk
            raise InvalidInputError(
                f"{label}: entry {info.filename!r} cannot be written "
                f"({error.strerror or error}); nothing was extracted. Shorten the names in the "
                "zip, or upload it again later"
            ) from error


def _corrupt(label: str, info: zipfile.ZipInfo, error: BaseException) -> InvalidInputError:
    return InvalidInputError(
        f"{label}: entry {info.filename!r} cannot be read ({error or type(error).__name__}); "
        "the zip is damaged or truncated, upload it again"
    )


def _single_top_folder(names: list[str]) -> str:
    """The one top-level folder holding every name, or "" if there is none."""
    tops = {parts[0] if len(parts) > 1 else None for parts in map(_split, names)}
    if len(tops) == 1 and None not in tops:
        return next(iter(tops))
    return ""


def _move_into_place(temporary: Path, target: Path) -> None:
    """Rename the finished extraction to `target`; keep a complete one that got there first."""
    try:
        os.rename(temporary, target)
        return
    except OSError:
        if not target.exists():
            raise
    if _read_complete(target) is not None:
        logger.info("%s was extracted by another process meanwhile; keeping it", target)
        return
    logger.warning("replacing the incomplete extraction at %s", target)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()
    os.rename(temporary, target)


def _read_complete(target: Path) -> ExtractedArchive | None:
    """The finished extraction at `target`, or None if there is none or it is incomplete."""
    marker = target / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        payload = load_json(marker)
        if payload.get("format") != _MARKER_FORMAT:
            return None
        root = safe_join(target, payload["root"])
        skipped = {str(name): str(reason) for name, reason in payload["skipped"].items()}
    except (CacheError, AttributeError, KeyError, TypeError, UnsafePathError) as error:
        logger.warning("ignoring the damaged extraction marker %s (%s)", marker, error)
        return None
    if not root.is_dir():
        return None
    return ExtractedArchive(root=root, skipped=skipped, reused=True)


def _sha256_stream(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
        digest.update(block)
    return digest.hexdigest()


def _human_bytes(count: int) -> str:
    """A byte count in binary units, as the limits are set: 3 << 30 -> '3.0 GiB'."""
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
