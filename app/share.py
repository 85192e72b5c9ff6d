"""The view as a link: the query (a gallery file, or an uploaded file by its hash), the
gallery, the tab and the parameters that differ from the gallery's setting, as a URL query
string; and the store of uploaded queries that such a link names.

    ?gallery=<key>&file=<gallery file>&tab=k_reciprocal&k_reciprocal.k1=30
    ?gallery=<key>&upload=<hash>&class=daisy&tab=compare
    ?gallery=<key>&query=<name>&tab=compare      (a query of the gallery's query features)

Pure functions over plain values (no gradio): `app.handlers` writes the string into a hidden
textbox that the page's script puts in the address bar, and reads the page's URL back on load.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

UPLOAD_HASH = re.compile(r"^[0-9a-f]{16}$")
UPLOAD_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


@dataclass(frozen=True)
class SharedView:
    """What a link reopens (any part may be missing)."""

    gallery: str | None = None
    file: str | None = None
    query: str | None = None
    """The name of a query of the gallery's query features (`GallerySession.query_set`)."""
    upload: str | None = None
    query_class: str | None = None
    tab: str | None = None
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    """method -> parameter name -> the value as typed in the link (validated by the engine)."""


def encode(view: SharedView) -> str:
    """The URL query string of a view (empty parts left out, parameters as method.name)."""
    pairs: list[tuple[str, str]] = []
    for key, value in (("gallery", view.gallery), ("file", view.file),
                       ("query", view.query), ("upload", view.upload), ("class", view.query_class),
                       ("tab", view.tab)):
        if value:
            pairs.append((key, str(value)))
    for method, params in view.params.items():
        pairs += [(f"{method}.{name}", str(value)) for name, value in params.items()]
    return urlencode(pairs)


def decode(query: Mapping[str, str], methods: list[str]) -> SharedView:
    """The view a link's query parameters describe; unknown keys are ignored (a link may come
    from another version of the page), an upload that is not a hash is dropped."""
    params: dict[str, dict[str, str]] = {}
    for key, value in query.items():
        method, _, name = key.partition(".")
        if name and method in methods:
            params.setdefault(method, {})[name] = value
    upload = query.get("upload") or None
    return SharedView(gallery=query.get("gallery") or None, file=query.get("file") or None,
                      query=query.get("query") or None,
                      upload=upload if upload and UPLOAD_HASH.match(upload) else None,
                      query_class=query.get("class") or None, tab=query.get("tab") or None,
                      params=params)


def changed_params(params: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters whose value differs from the gallery's setting (what a link carries)."""
    return {name: value for name, value in params.items()
            if name in defaults and _differs(value, defaults[name])}


def _differs(value: Any, default: Any) -> bool:
    try:
        return abs(float(value) - float(default)) > 1e-12
    except (TypeError, ValueError):
        return str(value) != str(default)


class QueryUploads:
    """Uploaded query files kept by content hash, so that a link can name an upload.

    A private page keeps them under the cache root; a public page keeps none (its visitors'
    uploads are theirs, see `app.public`), so its links carry gallery picks only.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def keep(self, path: str | Path) -> Path:
        """Copy an uploaded file into the store (once per content); returns the kept file,
        named by the hash of its bytes (its stem, what a link carries)."""
        source = Path(path)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        suffix = source.suffix.lower() if UPLOAD_SUFFIX.match(source.suffix) else ""
        target = self.root / f"{digest}{suffix}"
        if not target.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            partial.replace(target)
        return target

    def find(self, digest: str) -> Path | None:
        """The kept file of a hash, or None (unknown or malformed hash)."""
        if not UPLOAD_HASH.match(digest or "") or not self.root.is_dir():
            return None
        return next((path for path in sorted(self.root.glob(f"{digest}*"))
                     if not path.name.endswith(".partial")), None)
