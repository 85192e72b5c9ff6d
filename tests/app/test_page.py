"""The explorer session and page on a tiny gallery (24 demo thumbnails of 3 classes)."""

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from app.page import PageHandlers, build_app, launch_options
from app.session import BASELINE, ExplorerSession
from engine.gallery import DEMO_GALLERY
from engine.rerank import list_rerankers

PER_CLASS = 8
CLASSES = {0: "daffodil", 1: "snowdrop", 2: "lily_valley"}
REPO = Path(__file__).resolve().parents[2]

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


def demo_file(label: int, offset: int) -> Path:
    """The demo gallery has 80 images per class, numbered from 1 in label order."""
    return DEMO_GALLERY / "images" / f"image_{label * 80 + offset + 1:04d}.jpg"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ExplorerSession:
    root = tmp_path_factory.mktemp("tiny_gallery")
    rows = []
    for label, name in CLASSES.items():
        for offset in range(PER_CLASS):
            source = demo_file(label, offset)
            shutil.copy(source, root / source.name)
            rows.append({"file": source.name, "label": label, "class_name": name})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "label", "class_name"])
        writer.writeheader()
        writer.writerows(rows)
    return ExplorerSession.load(root, device="cpu",
                                cache_root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def handlers(session: ExplorerSession) -> PageHandlers:
    return PageHandlers(session)


def test_session_fits_every_registered_reranker(session: ExplorerSession) -> None:
    assert session.gallery.size == PER_CLASS * len(CLASSES)
    assert not session.unavailable
    assert [name for name, _ in session.methods()] == [BASELINE, *list_rerankers()]


@pytest.mark.parametrize("leave_out", [True, False])
def test_query_of_a_gallery_image_ranks_with_every_method(session: ExplorerSession,
                                                          leave_out: bool) -> None:
    source = session.gallery.files[3]
    result = session.query(source_file=source, leave_out_source=leave_out)
    assert result.source_class == "daffodil"
    assert len(result.imagenet) == 3
    assert list(result.rankings) == [name for name, _ in session.methods()]
    assert set(result.timings) == {"embed", *result.rankings}
    for ranking in result.rankings.values():
        assert ranking.indices.shape == ranking.distances.shape == (10,)
        assert len(set(ranking.indices.tolist())) == 10
        assert np.all(np.diff(ranking.distances) >= -1e-6)
        assert all(session.gallery.path_of(row).is_file() for row in ranking.indices)
        assert (3 in ranking.indices.tolist()) != leave_out
    if not leave_out:  # the image itself is the nearest for the baseline
        assert result.rankings[BASELINE].indices[0] == 3


def test_query_of_an_upload_has_no_class(session: ExplorerSession) -> None:
    upload = demo_file(1, PER_CLASS)  # a snowdrop that is not in the tiny gallery
    result = session.query(upload)
    assert result.source_file is None and result.source_class is None
    for ranking in result.rankings.values():
        assert len(ranking.indices) == 10
        # The tiny gallery's snowdrops are among the nearest of a snowdrop.
        assert session.gallery.class_of(int(ranking.indices[0])) == "snowdrop"


def test_k_is_capped_by_the_gallery(session: ExplorerSession) -> None:
    size = session.gallery.size
    kept = session.query(source_file=session.gallery.files[0], k=100, leave_out_source=False)
    left_out = session.query(source_file=session.gallery.files[0], k=100)
    for name in kept.rankings:
        assert len(kept.rankings[name].indices) == size
        assert len(left_out.rankings[name].indices) == size - 1


def test_api_query_returns_files_and_distances(handlers: PageHandlers,
                                               session: ExplorerSession) -> None:
    summary = handlers.query(None, session.gallery.files[PER_CLASS], True)
    assert summary["query"]["class"] == "snowdrop"
    assert set(summary["methods"]) == {name for name, _ in session.methods()}
    for method in summary["methods"].values():
        assert len(method["files"]) == len(method["distances"]) == 10
        assert all((session.gallery.root / file).is_file() for file in method["files"])
        assert session.gallery.files[PER_CLASS] not in method["files"]


def test_render_captions_mark_class_matches(handlers: PageHandlers,
                                            session: ExplorerSession) -> None:
    summary = handlers.query(None, session.gallery.files[0], True)
    imagenet, *galleries, timings = handlers.render(summary)
    assert len(imagenet) == 3
    assert len(galleries) == len(session.methods())
    for gallery in galleries:
        captions = [item["caption"] for item in gallery.value]
        assert len(captions) == 10
        assert captions[0].startswith("1 · ")
        assert all(caption.endswith((" ✓", " ✗")) for caption in captions)
    assert "embed" in timings


def test_upload_clears_the_gallery_pick(handlers: PageHandlers) -> None:
    dropdown, summary = handlers.upload(str(demo_file(2, PER_CLASS)), True)
    assert dropdown is None
    assert summary["query"]["file"] is None


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\ntruncated"])
def test_query_rejects_a_non_image_upload(handlers: PageHandlers, tmp_path: Path,
                                          content: bytes) -> None:
    upload = tmp_path / "upload.png"
    upload.write_bytes(content)
    with pytest.raises(gr.Error, match=r"upload\.png"):
        handlers.query(str(upload), None, True)


def test_query_rejects_missing_and_unknown_inputs(handlers: PageHandlers) -> None:
    with pytest.raises(gr.Error, match="Upload an image"):
        handlers.query(None, None, True)
    with pytest.raises(gr.Error, match="not an image of the gallery"):
        handlers.query(None, "../../etc/passwd", True)


def test_the_page_builds_with_a_query_endpoint(session: ExplorerSession) -> None:
    demo = build_app(session)
    assert isinstance(demo, gr.Blocks)
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "query" in api_names
    options = launch_options(session)
    assert str(session.gallery.root) in options["allowed_paths"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_served_api_answers_a_query(session: ExplorerSession) -> None:
    from gradio_client import Client, handle_file

    demo = build_app(session)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_options(session))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary = client.predict(None, session.gallery.files[0], True, api_name="/query")
        assert summary["query"]["class"] == "daffodil"
        assert len(summary["methods"][BASELINE]["files"]) == 10
        uploaded = client.predict(handle_file(str(demo_file(0, PER_CLASS))), None, True,
                                  api_name="/query")
        assert uploaded["query"]["file"] is None
    finally:
        demo.close()


def test_engine_does_not_import_gradio() -> None:
    code = ("import engine, engine.gallery, engine.rerank, sys; "
            "engine.rerank.list_rerankers(); assert 'gradio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
