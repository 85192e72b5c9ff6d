"""A tiny labelled gallery (24 demo images of 3 classes) and an explorer over it with its
embedding map and Compare scores: shared by the explorer and the page tests (registered in
`tests/conftest.py`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from engine.explorer import Explorer
from engine.search.gallery import DEMO_GALLERY

PER_CLASS = 8
TINY_SSR = {"k": 10, "hidden": 32, "episodes": 40}
CLASSES = {0: "daffodil", 1: "snowdrop", 2: "lily_valley"}


def demo_file(label: int, offset: int) -> Path:
    """The demo gallery has 80 images per class, numbered from 1 in label order."""
    return DEMO_GALLERY / "images" / f"image_{label * 80 + offset + 1:04d}.jpg"


def make_gallery(root: Path, per_class: int = PER_CLASS, ssr_preset: bool = False) -> Path:
    """Copy `per_class` demo images of each class of CLASSES into root, with a labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in CLASSES.items():
        for offset in range(per_class):
            source = demo_file(label, offset)
            shutil.copy(source, root / source.name)
            rows.append({"file": source.name, "label": label, "class_name": name})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "label", "class_name"])
        writer.writeheader()
        writer.writerows(rows)
    if ssr_preset:
        # SSR trains at the first fit: a short run (a preset, as a user would set one). It
        # names only the parameters it changes, like a preset saved before later ones existed.
        (root / "presets.json").write_text(json.dumps({"ssr": {"params": TINY_SSR,
                                                               "note": "tiny test run"}}))
    return root


@pytest.fixture(scope="session")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny gallery, the cache and room for more galleries (the
    explorer's only allowed root)."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="session")
def tiny_gallery(app_root: Path) -> Path:
    return make_gallery(app_root / "tiny", ssr_preset=True)


@pytest.fixture(scope="session")
def explorer(tiny_gallery: Path, app_root: Path) -> Explorer:
    """The explorer on the tiny gallery, with its embedding map fitted and Compare scores."""
    explorer = Explorer.load(tiny_gallery, device="cpu", cache_root=app_root / "cache",
                             allowed_roots=[app_root])
    session = explorer.session(None)
    session.embedding_map()
    for method, _ in session.methods():
        session.scores(method)
    return explorer
