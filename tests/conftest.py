"""Shared fixtures: the backbone (loaded once) and real demo-gallery features (embedded once).

The plain-loop oracles of tests/engine/rerank/oracles.py are importable as `oracles` (the
`pythonpath` setting of pyproject.toml, as pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tie_aware import perturb_ulps

from tests.galleries import app_root, explorer, tiny_gallery  # noqa: F401  (shared fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "assets" / "demo_gallery"
DEMO_IMAGES = DEMO_DIR / "images"

PER_CLASS = 17  # 17 classes x 17 images = 289 real images, embedded once per session


@dataclass(frozen=True)
class DemoFeatures:
    """Real lite0 features of a class-balanced subset of the demo gallery.

    paths: image files, row-aligned with `features` (n, 1280) float32 unit rows and
    `labels` (n,) int64 (Oxford-17 class, 0..16).
    """

    paths: list[Path]
    features: np.ndarray
    labels: np.ndarray


def demo_labels() -> dict[str, int]:
    """file name -> label from the demo gallery's labels.csv."""
    with open(DEMO_DIR / "labels.csv", newline="") as handle:
        return {row["file"]: int(row["label"]) for row in csv.DictReader(handle)}


def demo_image(number: int) -> Path:
    """Path of demo thumbnail image_NNNN.jpg (1..1360; label = (number - 1) // 80)."""
    return DEMO_IMAGES / f"image_{number:04d}.jpg"


@pytest.fixture(scope="session")
def extractor():
    """The default lite0 extractor on the CPU, shared by the whole session."""
    from engine.features.backbone import get_extractor

    return get_extractor(device="cpu")


@pytest.fixture(scope="session")
def demo_features(extractor, tmp_path_factory) -> DemoFeatures:
    """Embed PER_CLASS images of each class once; cached as .npz in a session temp folder."""
    if not DEMO_IMAGES.is_dir():
        pytest.skip(f"demo gallery missing at {DEMO_IMAGES}")
    labels = demo_labels()
    numbers = [c * 80 + i + 1 for c in range(17) for i in range(PER_CLASS)]
    paths = [demo_image(n) for n in numbers]
    cache = tmp_path_factory.getbasetemp() / "demo_features.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            features = stored["features"]
    else:
        features = extractor.embed(paths)
        np.savez(cache, features=features)
    label_array = np.array([labels[p.name] for p in paths], np.int64)
    return DemoFeatures(paths=paths, features=features, labels=label_array)


@pytest.fixture(scope="session")
def split_features(demo_features) -> tuple[np.ndarray, np.ndarray]:
    """~200 real features spread over all classes: every 10th a query, the rest the gallery."""
    rows = np.unique(np.linspace(0, len(demo_features.paths) - 1, 200).astype(int))
    chosen = demo_features.features[rows]
    is_query = np.arange(len(rows)) % 10 == 0
    return chosen[is_query], chosen[~is_query]


@pytest.fixture(scope="session")
def perturbed_split_features(split_features) -> tuple[np.ndarray, np.ndarray]:
    """`split_features` with each value moved by a few ulps (`tie_aware.perturb_ulps`),
    seeded."""
    queries, gallery = split_features
    return perturb_ulps(queries, seed=1), perturb_ulps(gallery, seed=2)


@pytest.fixture(params=["original", "perturbed"])
def oracle_split_features(request) -> tuple[np.ndarray, np.ndarray]:
    """`split_features`, then the same perturbed by a few ulps: the oracle comparisons run on
    both, so a comparison that passes only on one CPU's bits (a near-tie resolved one way)
    fails here too."""
    name = "split_features" if request.param == "original" else "perturbed_split_features"
    return request.getfixturevalue(name)


# -- the bad-input table (tests/test_bad_input.py) ----------------------------------------------
_bad_input_rows: list[tuple[str, str, str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the (input, where, outcome) rows a test recorded as its `bad_input` property."""
    if report.when == "call":
        _bad_input_rows.extend((*row, report.outcome) for name, row in report.user_properties
                               if name == "bad_input")


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the bad inputs tried and what became of them as a Markdown table (in the CI log,
    `-q` included), when tests/test_bad_input.py ran."""
    if not _bad_input_rows:
        return
    terminalreporter.section("bad input: inputs tried and outcomes")
    terminalreporter.write_line("| input | where | outcome | test |")
    terminalreporter.write_line("|---|---|---|---|")
    for what, where, outcome, result in _bad_input_rows:
        cells = [text.replace("|", "\\|") for text in (what, where, outcome, result)]
        terminalreporter.write_line(f"| {' | '.join(cells)} |")
