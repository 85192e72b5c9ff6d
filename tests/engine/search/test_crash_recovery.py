"""A process killed with SIGKILL while it indexes a gallery or trains a learned method leaves
every cache file whole (the previous version or the new one, never half of one), and the next
start resumes or rebuilds to exactly what a clean run gives.

Each test runs the work in a child python, reads its progress lines and kills it (SIGKILL, no
clean-up runs) when a seeded random one of them appears, several times in a row; then it reopens
in this process and compares with a clean build.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.core.storage import load_checked_npz, load_json
from engine.core.types import GalleryContext
from engine.rerank import create_reranker
from engine.rerank.ssr import progress_interval
from engine.search.gallery import CHECKPOINT_BATCHES, Gallery
from engine.search.index import faiss_module
from tests.child_output import QueuedOutput

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
DEMO_IMAGES = REPO / "assets" / "demo_gallery" / "images"
SEED = 20240607
DEADLINE_S = 180.0
CHILD_BATCH = 4
"""The child embeds 4 images a batch (16 a checkpoint chunk): several progress lines and
checkpoints even on a small gallery."""

GALLERY_CHILD = """
import sys
from engine.features.backbone import FeatureExtractor
from engine.search.gallery import Gallery

extractor = FeatureExtractor(device="cpu", batch_size=int(sys.argv[3]))
print("started", flush=True)
Gallery.open(sys.argv[1], extractor=extractor, cache_root=sys.argv[2], device="cpu",
             checkpoint_seconds=0,
             progress=lambda fraction, message: print("progress", message, flush=True))
print("done", flush=True)
"""

SSR_CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from engine.rerank import create_reranker
from engine.core.types import GalleryContext

features = np.load(sys.argv[1])["features"]
ssr = create_reranker("ssr", device="cpu", **json.loads(sys.argv[3]))
print("started", flush=True)
ssr.fit(GalleryContext(features=features, fingerprint="crash-test", state_dir=Path(sys.argv[2])),
        progress=lambda fraction, message: print("progress", message, flush=True))
print("done", flush=True)
"""


class Child(QueuedOutput):
    """A child python whose output lines a thread queues, so the test waits for each line with
    a deadline instead of sleeping."""

    def __init__(self, code: str, *args: str) -> None:
        super().__init__(subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}))

    def next_line(self, deadline: float) -> str | None:
        """The next output line, None once the child has closed its output."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.process.kill()
            raise AssertionError("the child printed nothing before the deadline:\n"
                                 + "\n".join(self.output)) from None
        if line is not None:
            self.output.append(line)
        return line


def kill_at_progress_line(code: str, args: list[str], line_number: int) -> str:
    """Run `code`; SIGKILL it when its `line_number`-th progress line appears. Returns
    "killed", or "finished" when the child completed first."""
    child = Child(code, *args)
    deadline = time.monotonic() + DEADLINE_S
    seen = 0
    while (line := child.next_line(deadline)) is not None:
        if line.startswith("progress"):
            seen += 1
            if seen == line_number:
                child.process.send_signal(signal.SIGKILL)
                break
    code_ = child.process.wait(timeout=DEADLINE_S)
    assert code_ in (0, -signal.SIGKILL), "\n".join(child.output)
    return "killed" if code_ == -signal.SIGKILL else "finished"


# -- indexing ------------------------------------------------------------------------------------

def copy_images(root: Path, numbers: list[int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for number in numbers:
        shutil.copy(DEMO_IMAGES / f"image_{number:04d}.jpg", root)


def gallery_numbers(per_class: int) -> list[int]:
    """`per_class` demo images of each of three classes (label = (number - 1) // 80)."""
    return [label * 80 + offset + 1 for label in range(3) for offset in range(per_class)]


def assert_cache_files_whole(cache_dir: Path) -> None:
    """Every cache file present is a complete one: the checked .npz files verify, faiss reads
    the index, the manifest parses (a killed writer leaves at most a temporary)."""
    if (cache_dir / "features.npz").exists():
        load_checked_npz(cache_dir / "features.npz")
    if (cache_dir / "knn.npz").exists():
        load_checked_npz(cache_dir / "knn.npz")
    if (cache_dir / "index.faiss").exists():  # a flat index holds no vectors: faiss reads it
        faiss_module().read_index(str(cache_dir / "index.faiss"))
    if (cache_dir / "manifest.json").exists():
        assert isinstance(load_json(cache_dir / "manifest.json"), dict)
    names = {p.name for p in cache_dir.iterdir()}
    debris = {name for name in names if name.startswith(".") and name.endswith(".tmp")}
    assert names - debris <= {"features.npz", "index.faiss", "knn.npz", "manifest.json"}


def saved_rows(cache_dir: Path) -> int:
    path = cache_dir / "features.npz"
    return len(load_checked_npz(path)["files"]) if path.exists() else 0


@pytest.mark.parametrize("kills, per_class", [
    pytest.param(2, 10, id="2-kills-30-images"),
    pytest.param(3, 24, id="3-kills-72-images", marks=pytest.mark.slow),
])
def test_a_killed_indexing_run_resumes_to_a_clean_build(kills, per_class, tmp_path, extractor,
                                                        monkeypatch):
    """A gallery indexed once (the previous cache), then grown by two thirds and reopened by
    children killed mid-embedding: the old rows survive, each kill keeps the checkpoints saved
    so far, and the next open embeds only what no checkpoint saved and equals a clean build."""
    numbers = gallery_numbers(per_class)
    old = [n for n in numbers if (n - 1) % 80 < per_class // 3]
    folder, cache_root = tmp_path / "flowers", tmp_path / "cache"
    copy_images(folder, old)
    previous = Gallery.open(folder, extractor=extractor, cache_root=cache_root, device="cpu")
    copy_images(folder, [n for n in numbers if n not in old])  # old files keep their mtimes
    cache_dir = previous.cache_dir
    rng = np.random.default_rng(SEED)
    outcomes, rows = [], [saved_rows(cache_dir)]
    for round_ in range(kills):
        # A child prints a progress line per batch of the images no checkpoint holds yet; the
        # first kill comes after its first checkpoint (a line of the second chunk), later
        # ones anywhere.
        batches = -(-(len(numbers) - rows[-1]) // CHILD_BATCH)
        lowest = CHECKPOINT_BATCHES + 1 if round_ == 0 else 1
        line = int(rng.integers(min(lowest, batches), batches + 1))
        outcomes.append((line, kill_at_progress_line(
            GALLERY_CHILD, [str(folder), str(cache_root), str(CHILD_BATCH)], line)))
        assert_cache_files_whole(cache_dir)
        rows.append(saved_rows(cache_dir))
    logger.info("indexing children (kill line, outcome): %s; rows saved after each: %s",
                outcomes, rows)
    assert rows == sorted(rows), rows  # a kill never loses a checkpoint already saved
    assert rows[1] >= rows[0] + CHECKPOINT_BATCHES * CHILD_BATCH  # the first one was kept
    assert any(outcome == "killed" for _, outcome in outcomes), outcomes

    embedded: list[str] = []
    original = extractor.embed_files
    monkeypatch.setattr(extractor, "embed_files", lambda paths, progress=None: embedded.extend(
        Path(p).name for p in paths) or original(paths, progress))
    reopened = Gallery.open(folder, extractor=extractor, cache_root=cache_root, device="cpu")
    monkeypatch.undo()
    # resumed: the previous cache's rows and every checkpointed row are reused
    assert len(embedded) == len(numbers) - rows[-1]
    assert not set(embedded) & set(previous.files)
    old_rows = [reopened.files.index(name) for name in previous.files]
    np.testing.assert_array_equal(reopened.features[old_rows], previous.features)

    clean = Gallery.open(folder, extractor=extractor, cache_root=tmp_path / "clean",
                         device="cpu")
    assert reopened.files == clean.files and reopened.fingerprint == clean.fingerprint
    np.testing.assert_allclose(reopened.features, clean.features, atol=1e-5)  # batch sizes differ
    np.testing.assert_array_equal(reopened.knn.indices, clean.knn.indices)
    queries = clean.features[::5]
    np.testing.assert_array_equal(reopened.search(queries, 10).indices,
                                  clean.search(queries, 10).indices)
    again = Gallery.open(folder, extractor=extractor, cache_root=cache_root, device="cpu")
    np.testing.assert_array_equal(again.features, reopened.features)


# -- training ------------------------------------------------------------------------------------

FAST_SSR = {"k": 10, "hidden": 16, "episodes": 200, "q_steps": 1}
"""A progress line at the start and every 1 % of the episodes: 101 lines to be killed at."""
TWO_STEP_SSR = {"k": 10, "hidden": 32, "episodes": 300, "q_steps": 2}
"""The one-step module (300 episodes) is trained and saved first, then the two-step module
starts from it (50 episodes): the two-step module's first line comes after the first save."""


def step_lines(episodes: int) -> int:
    """How many progress lines one step of SSR's fit prints: one (pseudo-labels) and one per
    `progress_interval` episodes (the last episode always)."""
    return 1 + -(-episodes // progress_interval(episodes))


def progress_lines(params: dict[str, int]) -> int:
    """How many progress lines SSR's fit prints (a step past the first trains episodes // 6)."""
    lines = step_lines(params["episodes"])
    if params["q_steps"] > 1:
        lines += step_lines(params["episodes"] // 6)
    return lines


def fit_ssr(features: np.ndarray, state_dir: Path, params: dict[str, int], **changed
            ) -> tuple[object, list[str]]:
    messages: list[str] = []
    ssr = create_reranker("ssr", device="cpu", **{**params, **changed})
    ssr.fit(GalleryContext(features=features, fingerprint="crash-test", state_dir=state_dir),
            progress=lambda fraction, message: messages.append(message))
    return ssr, messages


def assert_state_files_whole(state_dir: Path) -> None:
    from safetensors.torch import load_file

    for manifest in state_dir.rglob("*.json"):
        assert isinstance(json.loads(manifest.read_text()), dict)
    for weights in state_dir.rglob("*.safetensors"):
        load_file(str(weights))


@pytest.mark.parametrize("kills, params", [
    pytest.param(2, FAST_SSR, id="2-kills-one-step"),
    pytest.param(3, TWO_STEP_SSR, id="3-kills-two-steps", marks=pytest.mark.slow),
])
def test_a_killed_training_run_leaves_state_that_loads_and_resumes(kills, params, tmp_path,
                                                                    demo_features):
    """SSR trained in children killed at a random progress line: the state saved before (another
    seed) still loads without training, and the interrupted setting loads what was saved (a
    finished first step is not retrained) and ranks exactly as a clean training does."""
    features = demo_features.features[::4][:60]
    features_file = tmp_path / "features.npz"
    np.savez(features_file, features=features)
    state_dir = tmp_path / "state"
    previous, _ = fit_ssr(features, state_dir, params, seed=1)
    previous_files = len(list(state_dir.rglob("*.json")))
    rng = np.random.default_rng(SEED)
    outcomes = []
    for round_ in range(kills):
        saved = len(list(state_dir.rglob("*.json"))) - previous_files
        lines = progress_lines(params) if saved == 0 else 1
        # With two steps, the first kill comes after the first step is saved (at the second
        # step's pseudo-labels line); later ones at any line the child will print.
        line = (step_lines(params["episodes"]) + 1 if round_ == 0 and params["q_steps"] > 1
                else int(rng.integers(1, lines + 1)))
        outcomes.append((line, kill_at_progress_line(
            SSR_CHILD, [str(features_file), str(state_dir), json.dumps(params)], line)))
        assert_state_files_whole(state_dir)
    assert any(outcome == "killed" for _, outcome in outcomes), outcomes

    loaded, messages = fit_ssr(features, state_dir, params, seed=1)
    assert not [m for m in messages if "training episode" in m], messages
    np.testing.assert_array_equal(loaded.rerank(None, 10).indices,
                                  previous.rerank(None, 10).indices)
    saved_steps = len(list(state_dir.rglob("*.json"))) - previous_files
    logger.info("training children (kill line, outcome): %s; steps saved: %d", outcomes,
                saved_steps)
    resumed, messages = fit_ssr(features, state_dir, params)
    first_step = f"/{params['episodes']}"
    trained_first_step = any(m.endswith(first_step) for m in messages)
    assert trained_first_step == (saved_steps == 0), (saved_steps, messages)
    if params["q_steps"] > 1:
        assert saved_steps >= 1  # the first step survived the kills and was reused
    clean, _ = fit_ssr(features, tmp_path / "clean", params)
    expected, got = clean.rerank(None, 10), resumed.rerank(None, 10)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.distances, expected.distances, atol=1e-6)
