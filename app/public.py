"""Hosted (public) mode: the galleries visitors of a page open to anyone may upload.

A public page opens no folder a visitor names: its galleries are the ones opened at start-up and
the zips its visitors upload. Each upload is extracted (safely, under tighter limits than on a
private page) into a temporary folder of the browser session that uploaded it, is offered only
in that session's gallery choices, and is deleted with everything made from it (the extracted
files, the gallery caches of every query model, the thumbnails) when the session ends, when the
session uploads more than `UploadLimits.per_session` zips or when the server holds more than
`UploadLimits.total` of them (the oldest go first).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.thumbnails import ThumbnailCache
from engine import (
    Explorer,
    GallerySession,
    ProgressCallback,
    extract_zip,
    load_json,
    write_upload_name,
)
from engine.errors import CacheError, EngineError, InvalidInputError, UnsafePathError

logger = logging.getLogger(__name__)

UPLOADS_FOLDER = "public-uploads"
"""Folder under the cache root that holds the public uploads (one sub-folder per process)."""
FOLDERS_DISABLED = ("This public page does not open folders on the server; upload a .zip of "
                    "images instead.")


@dataclass(frozen=True)
class UploadLimits:
    """What one upload, and all uploads together, may take on a public page.

    archive_bytes: the largest .zip accepted (also the server's limit on any uploaded file).
    extracted_bytes: the largest total of the extracted files.
    entries: the most entries (files and folders) of one zip: it bounds the images to embed.
    per_session: uploaded galleries one browser session keeps; one more closes its oldest.
    total: uploaded galleries the server keeps; one more closes the oldest of anyone's.
    """

    archive_bytes: int = 200 << 20
    extracted_bytes: int = 400 << 20
    entries: int = 3000
    per_session: int = 2
    total: int = 8


@dataclass(frozen=True)
class Upload:
    """One open uploaded gallery: its key, the session that owns it and its extraction folder."""

    key: str
    owner: str
    folder: Path


class PublicUploads:
    """The uploaded galleries of a public page, by owner (the browser session's hash).

    Everything lives under `root`, a fresh folder per process inside `<cache>/public-uploads`
    (what processes that are gone left there is deleted at start, with their gallery caches):
    one temporary folder per session, one extraction per zip inside it.
    """

    def __init__(self, explorer: Explorer, limits: UploadLimits | None = None) -> None:
        self.explorer = explorer
        self.limits = limits or UploadLimits()
        base = explorer.cache_root / UPLOADS_FOLDER
        _remove_leftovers(base, explorer.cache_root)
        base.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=base)).resolve()
        self._thumbnails = ThumbnailCache(explorer.thumbnail_root)
        self._uploads: dict[str, Upload] = {}  # by gallery key, oldest first
        self._session_folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    def uploads(self, owner: str | None = None) -> list[Upload]:
        """The open uploads (of one owner when given), oldest first."""
        with self._lock:
            return [upload for upload in self._uploads.values()
                    if owner is None or upload.owner == owner]

    def open_zip(self, archive: str | os.PathLike, owner: str | None,
                 progress: ProgressCallback | None = None) -> GallerySession:
        """Extract an uploaded zip into the owner's folder and open it as the owner's gallery.

        Raises:
            InvalidInputError, UnsafePathError, EmptyGalleryError: as `extract_zip` and
                `Explorer.open_folder`, with the upload's name in place of server paths.
        """
        if not owner:
            raise InvalidInputError("an upload needs a browser session; reload the page")
        label = Path(archive).name
        with self._lock:
            folder = self._session_folders.get(owner)
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
                self._session_folders[owner] = folder
        limits = self.limits
        extracted = extract_zip(archive, folder, max_archive_bytes=limits.archive_bytes,
                                max_extracted_bytes=limits.extracted_bytes,
                                max_entries=limits.entries)
        extraction = folder / extracted.root.relative_to(folder).parts[0]
        write_upload_name(extracted.root, label)  # the gallery is listed by the zip's name
        try:
            session = self.explorer.open_folder(extracted.root, progress=progress,
                                                check_allowed=False)
        except EngineError as error:
            shutil.rmtree(extraction, ignore_errors=True)
            # The engine names the folder; a visitor only knows the file they uploaded.
            raise type(error)(str(error).replace(str(extracted.root), label)) from None
        with self._lock:
            self._uploads.pop(session.key, None)
            self._uploads[session.key] = Upload(session.key, owner, extraction)
            own = [upload for upload in self._uploads.values() if upload.owner == owner]
            evicted = own[:max(0, len(own) - self.limits.per_session)]
            others = [upload for upload in self._uploads.values() if upload not in evicted]
            evicted += others[:max(0, len(others) - self.limits.total)]
            for upload in evicted:
                del self._uploads[upload.key]
        for upload in evicted:
            logger.info("closing the upload %s: over the limit of uploads kept", upload.key)
            self._delete(upload)
        return session

    def choices(self, owner: str | None) -> list[tuple[str, str]]:
        """(title, key) of the galleries the owner may choose: the start-up ones and its own
        uploads (with their query-model variants), not other sessions' uploads."""
        with self._lock:
            hidden = {key for key, upload in self._uploads.items() if upload.owner != owner}
        sessions = list(self.explorer.galleries.values())  # a copy: others open and close
        return [(session.title, session.key) for session in sessions
                if session.base_key not in hidden]

    def release(self, owner: str | None) -> int:
        """The owner's browser session ended: delete its uploads and its folder; returns how
        many galleries were closed."""
        if not owner:
            return 0
        with self._lock:
            mine = [upload for upload in self._uploads.values() if upload.owner == owner]
            for upload in mine:
                del self._uploads[upload.key]
            folder = self._session_folders.pop(owner, None)
        for upload in mine:
            self._delete(upload)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if mine:
            logger.info("session ended: closed %d uploaded galleries", len(mine))
        return len(mine)

    def _delete(self, upload: Upload) -> None:
        """Close the upload's galleries, then delete their thumbnails, caches and files. While
        a background job of theirs is still running (it cannot be stopped, and would write
        into the cache again), the caches are deleted by a job queued right after it."""
        closed = self.explorer.close(upload.key)
        if closed:
            gallery = closed[0].gallery  # the variants show the same files
            for row in range(gallery.size):
                self._thumbnails.forget(gallery.path_of(row))
        caches = [session.gallery.cache_dir for session in closed]

        def delete_caches(progress: object = None) -> None:
            for cache in caches:
                shutil.rmtree(cache, ignore_errors=True)

        keys = {session.key for session in closed}
        jobs = self.explorer.jobs
        if jobs is not None and jobs.running(lambda key: isinstance(key, tuple)
                                             and key[0] in keys) is not None:
            jobs.submit(("delete", upload.key, time.monotonic_ns()),
                        "Deleting a closed upload's caches",
                        delete_caches, first=True)
        else:
            delete_caches()
        shutil.rmtree(upload.folder, ignore_errors=True)


def refuse_folder() -> None:
    """What a public page answers to any folder path: a typed refusal."""
    raise UnsafePathError(FOLDERS_DISABLED)


def _remove_leftovers(base: Path, cache_root: Path) -> None:
    """Delete what public processes that are gone left under `base` (a killed process runs no
    clean-up): their upload folders (`run-<pid>-*`) and the gallery caches made from them."""
    stale = [run.resolve() for run in (base.glob("run-*") if base.is_dir() else [])
             if run.is_dir() and not run.is_symlink() and not _process_alive(run.name)]
    if not stale:
        return
    galleries = cache_root / "galleries"
    for cache_dir in (galleries.iterdir() if galleries.is_dir() else []):
        try:
            root = Path(str(load_json(cache_dir / "manifest.json").get("root", "")))
        except (CacheError, AttributeError):
            continue
        if root.is_absolute() and any(root.is_relative_to(run) for run in stale):
            shutil.rmtree(cache_dir, ignore_errors=True)
    for run in stale:
        shutil.rmtree(run, ignore_errors=True)
    logger.info("removed %d upload folders of public processes that are gone", len(stale))


def _process_alive(run_name: str) -> bool:
    """Whether the process that made `run-<pid>-...` is still running (then its folder stays)."""
    try:
        pid = int(run_name.split("-")[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
