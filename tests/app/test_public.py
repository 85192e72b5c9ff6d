"""Hosted (public) mode: the page served on 127.0.0.1 refuses crafted file requests and folder
galleries, and keeps each uploaded zip in its session's temporary folder until the session
ends (deleted then, with its caches and thumbnails), under size and count limits."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import gradio as gr
import httpx
import numpy as np
import pytest

from app.handlers import PageHandlers
from app.page import build_app, launch_options
from app.public import FOLDERS_DISABLED, PublicUploads, UploadLimits
from app.thumbnails import ThumbnailCache
from engine.errors import InvalidInputError, UnknownNameError
from engine.explorer import BASELINE, Explorer, GallerySession
from engine.search.gallery import DEMO_GALLERY
from tests.app.conftest import free_port
from tests.galleries import CLASSES, make_gallery

REPO = Path(__file__).resolve().parents[2]
LIMITS = UploadLimits(archive_bytes=2 << 20, extracted_bytes=4 << 20, entries=40,
                      per_session=2, total=3)
DEADLINE_S = 60

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


class Progress:
    """Stands in for gr.Progress."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture(scope="module")
def public_page(explorer: Explorer) -> tuple[gr.Blocks, PageHandlers]:
    """The public page of the session's explorer (built, not served) and its handlers."""
    handlers = PageHandlers(explorer, PublicUploads(explorer, LIMITS))
    return build_app(explorer, handlers=handlers), handlers


@pytest.fixture(scope="module")
def public(public_page: tuple[gr.Blocks, PageHandlers]) -> PublicUploads:
    uploads = public_page[1].public
    assert uploads is not None
    return uploads


@pytest.fixture(scope="module")
def public_server(explorer: Explorer, public_page: tuple[gr.Blocks, PageHandlers]
                  ) -> Iterator[str]:
    """The public page served on 127.0.0.1 with the public launch options; yields its URL."""
    demo, _ = public_page
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, **launch_options(explorer, public=True, upload_limits=LIMITS))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


@pytest.fixture
def leaves_no_upload(public: PublicUploads, explorer: Explorer) -> Iterator[None]:
    """Checks that a test released every upload it made (the explorer is shared)."""
    before = explorer.choices()
    yield
    assert public.uploads() == []
    assert explorer.choices() == before


def zip_gallery(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"{folder.name}/{path.name}")
    return archive


def small_zip(tmp_path: Path, name: str, per_class: int = 2) -> Path:
    """A zip of `per_class` demo images per class of CLASSES (distinct names: distinct zips)."""
    return zip_gallery(make_gallery(tmp_path / name, per_class=per_class),
                       tmp_path / f"{name}.zip")


def request(owner: str) -> gr.Request:
    return gr.Request(session_hash=owner)


def raw_get(base: str, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no client-side normalisation of '..' or escapes)."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def fn_index(demo: gr.Blocks, function: Any) -> int:
    """The index of the event that runs `function` (a bound handler, which the page wraps with
    `app.feedback.shown_in`)."""
    found = [index for index, block_fn in demo.fns.items()
             if getattr(block_fn.fn, "__wrapped__", block_fn.fn) == function]
    assert len(found) == 1, found
    return found[0]


# -- the file route ----------------------------------------------------------------------------
@pytest.fixture
def planted_links(explorer: Explorer, session_gallery: GallerySession) -> Iterator[dict[str, Path]]:
    """Symbolic links planted inside the served thumbnail folder, pointing out of it."""
    folder = explorer.thumbnail_root / "zz-planted"
    folder.mkdir(parents=True, exist_ok=True)
    links = {"passwd": folder / "passwd.jpg", "root": folder / "root",
             "gallery_image": folder / "gallery.jpg"}
    links["passwd"].symlink_to("/etc/passwd")
    links["root"].symlink_to("/", target_is_directory=True)
    links["gallery_image"].symlink_to(session_gallery.gallery.path_of(0))
    try:
        yield links
    finally:
        for link in links.values():
            link.unlink()
        folder.rmdir()


@pytest.fixture(scope="module")
def session_gallery(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


def attack_targets(explorer: Explorer, session: GallerySession,
                   links: dict[str, Path]) -> dict[str, str]:
    """Paths that the file route must refuse: by name, what follows `/gradio_api/file=`."""
    thumbs = str(explorer.thumbnail_root)
    up = "../" * 12
    return {
        "absolute": "/etc/passwd",
        "encoded": quote("/etc/passwd", safe=""),
        "encoded slash": "/etc%2Fpasswd",
        "double encoded": quote(quote("/etc/passwd", safe=""), safe=""),
        "relative dotdot": f"{up}etc/passwd",
        "dotdot from the served folder": f"{thumbs}/{up}etc/passwd",
        "encoded dotdot from the served folder": f"{thumbs}/" + "%2e%2e/" * 12 + "etc/passwd",
        "encoded slashes and dots": quote(f"{thumbs}/{up}etc/passwd", safe=""),
        "backslashes": f"{thumbs}\\..\\..\\..\\..\\..\\..\\etc\\passwd",
        "file url": "file:///etc/passwd",
        "link to a file outside": str(links["passwd"]),
        "link to a folder outside": f"{links['root']}/etc/passwd",
        "link to a gallery image": str(links["gallery_image"]),
        "a gallery image": str(session.gallery.path_of(0)),
        "the gallery's features": str(session.gallery.cache_dir / "features.npz"),
        "the app's source, absolute": str(REPO / "launch.py"),
        "the app's source, relative": "launch.py",
        "the demo gallery's labels": str(DEMO_GALLERY / "labels.csv"),
    }


def test_the_file_route_serves_a_thumbnail(public_server: str, explorer: Explorer,
                                           session_gallery: GallerySession) -> None:
    """The control of the refusals below: the route does serve what it should."""
    thumbnail = ThumbnailCache(explorer.thumbnail_root).get(session_gallery.gallery.path_of(0))
    status, body = raw_get(public_server, f"/gradio_api/file={thumbnail}")
    assert status == 200
    assert body == thumbnail.read_bytes() and body[:2] == b"\xff\xd8"


def test_the_file_route_refuses_everything_outside_the_thumbnails(
        public_server: str, explorer: Explorer, session_gallery: GallerySession,
        planted_links: dict[str, Path]) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    for name, target in attack_targets(explorer, session_gallery, planted_links).items():
        status, body = raw_get(public_server, f"/gradio_api/file={target}")
        assert status in (400, 403, 404), (name, status)
        assert passwd[:32] not in body, name
        assert b"root:" not in body, name


def test_the_query_api_refuses_a_server_path_as_its_image(public_server: str) -> None:
    """An API caller naming a file on the server instead of uploading one gets an error and
    nothing of the file (Gradio accepts only files in its upload folder)."""
    payload = {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                        None, True, "", 10, ""]}
    with httpx.Client(base_url=public_server, timeout=60) as client:
        event_id = client.post("/gradio_api/call/query", json=payload).json()["event_id"]
        stream = client.get(f"/gradio_api/call/query/{event_id}").text
    assert "event: error" in stream
    assert "root:" not in stream and "/bin/" not in stream


def test_the_public_page_hides_no_exception_text(explorer: Explorer) -> None:
    options = launch_options(explorer, public=True, upload_limits=LIMITS)
    assert options["show_error"] is False
    assert options["max_file_size"] == LIMITS.archive_bytes
    # the thumbnails and the downloads (files named with a random token), nothing else
    assert options["allowed_paths"] == [str(explorer.thumbnail_root),
                                        str(explorer.cache_root / "exports")]
    assert launch_options(explorer)["show_error"] is True


def test_a_gallery_error_reaches_the_served_page_as_our_message(
        public_server: str, session_gallery: GallerySession) -> None:
    """With show_error off our typed messages (gr.Error) still reach the caller."""
    from gradio_client import Client

    client = Client(public_server, verbose=False)
    with pytest.raises(Exception, match="is not an image of the gallery"):
        client.predict(None, "../../etc/passwd", True, api_name="/query")


# -- folders -----------------------------------------------------------------------------------
def test_the_public_page_has_no_folder_event(public_page: tuple[gr.Blocks, PageHandlers],
                                             public_server: str,
                                             explorer: Explorer) -> None:
    demo, handlers = public_page
    assert not any(getattr(block_fn.fn, "__name__", "") == "open_folder"
                   for block_fn in demo.fns.values())
    assert handlers.ui.folder.visible is False
    assert handlers.ui.open_folder.visible is False
    folder_id = handlers.ui.folder._id
    config = httpx.get(f"{public_server}/config", timeout=30).json()
    assert all(folder_id not in dependency["inputs"]
               for dependency in config["dependencies"])
    # the control: a private page wires it
    private = PageHandlers(explorer)
    private_demo = build_app(explorer, handlers=private)
    # (the event runs the handler wrapped by app.feedback.shown_in)
    assert any(getattr(block_fn.fn, "__wrapped__", None) == private.open_folder
               for block_fn in private_demo.fns.values())


def test_the_public_page_attaches_no_query_features(public_page: tuple[gr.Blocks,
                                                                      PageHandlers],
                                                   session_gallery: GallerySession,
                                                   tmp_path: Path) -> None:
    """Query features go with features files, which a public page never opens: the box is
    hidden, no event takes it, and the handler refuses."""
    demo, handlers = public_page
    assert handlers.ui.attach_queries.visible is False
    assert not any(getattr(getattr(block_fn.fn, "__wrapped__", None), "__name__", "")
                   == "attach_queries" for block_fn in demo.fns.values())
    queries = tmp_path / "queries.npz"
    np.savez(queries, features=np.eye(2, 8, dtype=np.float32))
    with pytest.raises(gr.Error, match="public page attaches no query features"):
        handlers.attach_queries(session_gallery.key, str(queries), None)
    assert session_gallery.query_set is None


@pytest.mark.parametrize("folder", ["/", "/etc", "tiny", "demo", "../..", "  "])
def test_the_public_folder_handler_refuses_every_path(public_page: tuple[gr.Blocks,
                                                                         PageHandlers],
                                                      explorer: Explorer, tiny_gallery: Path,
                                                      folder: str) -> None:
    _, handlers = public_page
    path = {"tiny": str(tiny_gallery), "demo": str(DEMO_GALLERY)}.get(folder, folder)
    before = explorer.choices()
    with pytest.raises(gr.Error) as raised:
        list(handlers.open_folder(path))
    assert raised.value.message == FOLDERS_DISABLED
    assert explorer.choices() == before


def test_public_launch_takes_no_allowed_folder(tiny_gallery: Path) -> None:
    """launch.py --public opens no folder a user names: --allow-folder is refused."""
    import launch

    args = launch.parse_args(["--public"])
    assert args.public and args.allow_folder is None
    with pytest.raises(SystemExit):
        launch.parse_args(["--public", "--allow-folder", str(tiny_gallery)])


# -- uploads -----------------------------------------------------------------------------------
def test_an_upload_is_its_sessions_until_the_session_ends(
        public_page: tuple[gr.Blocks, PageHandlers], public: PublicUploads,
        explorer: Explorer, tmp_path: Path, leaves_no_upload: None) -> None:
    _, handlers = public_page
    updates: dict = {}
    for step in handlers.open_zip(request("alice"), str(small_zip(tmp_path, "flowers"))):
        updates.update(step)
    [upload] = public.uploads("alice")
    session = explorer.session(upload.key)
    root, cache_dir = session.gallery.root, session.gallery.cache_dir
    assert session.gallery.size == 2 * len(CLASSES)
    assert root.is_relative_to(public.root) and root.is_relative_to(upload.folder)
    assert upload.folder.parent.name.startswith("session-")
    status = updates[handlers.ui.gallery_status]
    assert "flowers" in status and str(public.root) not in status and "/" not in status
    assert session.title.startswith("flowers.zip (")  # listed by its name, not a hash
    keys = [key for _, key in updates[handlers.ui.gallery].choices]
    assert upload.key in keys
    assert upload.key not in [key for _, key in handlers.gallery_choices(request("bob"))]
    thumbnails = ThumbnailCache(explorer.thumbnail_root)
    made = [thumbnails.get(session.gallery.path_of(row)) for row in range(2)]
    assert all(path.is_file() for path in made)

    handlers.end_session(request("bob"))  # another session's end changes nothing
    assert public.uploads("alice") == [upload]
    handlers.end_session(request("alice"))
    assert public.uploads("alice") == []
    with pytest.raises(UnknownNameError, match="open it again"):
        explorer.session(upload.key)
    assert not upload.folder.parent.exists() and not root.exists()
    assert not cache_dir.exists()
    assert not any(path.exists() for path in made)


def test_uploads_are_limited_per_session_and_in_total(public: PublicUploads, explorer: Explorer,
                                                      tmp_path: Path,
                                                      leaves_no_upload: None) -> None:
    zips = {name: small_zip(tmp_path, name, per_class=1) for name in "abcd"}
    first = public.open_zip(zips["a"], "alice")
    second = public.open_zip(zips["b"], "alice")
    assert [u.key for u in public.uploads("alice")] == [first.key, second.key]
    again = public.open_zip(zips["a"], "alice")  # the same zip again: the same gallery
    assert again is first
    assert [u.key for u in public.uploads("alice")] == [second.key, first.key]
    third = public.open_zip(zips["c"], "alice")  # a third: alice's oldest (b) is closed
    assert [u.key for u in public.uploads("alice")] == [first.key, third.key]
    assert not second.gallery.root.exists() and not second.gallery.cache_dir.exists()
    with pytest.raises(UnknownNameError):
        explorer.session(second.key)
    bob = public.open_zip(zips["d"], "bob")
    assert [u.key for u in public.uploads()] == [first.key, third.key, bob.key]
    carol = public.open_zip(zips["b"], "carol")  # over the total of 3: the oldest of all goes
    assert [u.key for u in public.uploads()] == [third.key, bob.key, carol.key]
    assert not first.gallery.root.exists() and not first.gallery.cache_dir.exists()
    for owner in ("alice", "bob", "carol"):
        public.release(owner)
    assert list(public.root.iterdir()) == []


def test_oversized_and_crowded_zips_are_refused_and_leave_nothing(
        public: PublicUploads, tmp_path: Path, leaves_no_upload: None) -> None:
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_STORED) as handle:
        handle.writestr("big/noise.jpg", os.urandom(LIMITS.archive_bytes + 1))
    crowded = tmp_path / "crowded.zip"
    with zipfile.ZipFile(crowded, "w") as handle:
        for number in range(LIMITS.entries + 1):
            handle.writestr(f"crowded/{number}.jpg", b"")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("bomb/zeros.jpg", bytes(LIMITS.extracted_bytes + 1))
    for archive, message in ((big, "the limit is 2.0 MiB"), (crowded, "the limit is 40"),
                             (bomb, "the limit is 4.0 MiB")):
        with pytest.raises(InvalidInputError, match=message):
            public.open_zip(archive, "mallory")
        assert public.uploads("mallory") == []
        assert [path for path in public.root.rglob("*") if not path.is_dir()] == []
    public.release("mallory")
    assert list(public.root.iterdir()) == []


def test_the_start_up_gallery_cannot_be_closed(explorer: Explorer) -> None:
    with pytest.raises(InvalidInputError, match="cannot be closed"):
        explorer.close(explorer.default_key)
    assert explorer.session(None).key == explorer.default_key


def test_an_upload_needs_a_session(public: PublicUploads, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="browser session"):
        public.open_zip(small_zip(tmp_path, "orphan", per_class=1), None)


def test_a_served_upload_is_deleted_when_its_tab_closes(
        public_server: str, public_page: tuple[gr.Blocks, PageHandlers],
        public: PublicUploads, tmp_path: Path, leaves_no_upload: None) -> None:
    """The whole path through the server: a browser session (its heartbeat) uploads a zip and
    opens it; closing the heartbeat (the tab) runs the page's unload event, which deletes it."""
    demo, handlers = public_page
    archive = small_zip(tmp_path, "served")
    owner = "served-session"
    with httpx.Client(base_url=public_server, timeout=120) as client, \
            client.stream("GET", f"/gradio_api/heartbeat/{owner}") as heartbeat:
        alive = heartbeat.iter_lines()  # kept: dropping the iterator closes the connection
        assert next(alive) == "data: ALIVE"  # connected, as a browser tab is
        with open(archive, "rb") as handle:
            [uploaded] = client.post("/gradio_api/upload",
                                     files={"files": (archive.name, handle)}).json()
        joined = client.post("/gradio_api/queue/join", json={
            "data": [{"path": uploaded, "orig_name": archive.name,
                      "meta": {"_type": "gradio.FileData"}}],
            "fn_index": fn_index(demo, handlers.open_zip), "session_hash": owner,
            "event_data": None, "trigger_id": handlers.ui.open_zip._id})
        assert joined.status_code == 200, joined.text
        completed = None
        with client.stream("GET", "/gradio_api/queue/data",
                           params={"session_hash": owner}) as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line.removeprefix("data:"))
                    if message.get("msg") == "process_completed":
                        completed = message
                        break
        assert completed is not None and completed["success"], completed
        [upload] = public.uploads(owner)
        assert upload.folder.is_dir()
    deadline = time.monotonic() + DEADLINE_S
    pause = threading.Event()
    # the unload event runs in a server thread: the upload leaves the list, then its files go
    while (public.uploads(owner) or upload.folder.parent.exists()) \
            and time.monotonic() < deadline:
        pause.wait(0.1)  # the poll's interval
    assert public.uploads(owner) == []
    assert not upload.folder.parent.exists()


def test_a_closed_upload_drops_its_jobs_and_its_caches_outlive_a_running_one(
        explorer: Explorer, tmp_path: Path) -> None:
    """With background jobs: a visitor leaves while one of their upload's jobs runs. Its
    waiting jobs never run, and its caches are deleted once the running job has finished (it
    would write into them again), by a job queued right after it."""
    from engine.core.jobs import JobQueue

    jobs = JobQueue(budget=contextlib.nullcontext)
    own = Explorer(explorer.extractor, device="cpu", cache_root=explorer.cache_root,
                   allowed_roots=[], jobs=jobs)
    own.open_folder(explorer.session(None).gallery.root, check_allowed=False)
    uploads = PublicUploads(own, LIMITS)
    cache_dir = uploads.open_zip(small_zip(tmp_path, "carols"), "carol").gallery.cache_dir
    [upload] = uploads.uploads("carol")
    queued = [job.key for job in jobs.jobs() if job.key[0] == upload.key]
    assert queued  # its preparation waits in the queue
    release, ran = threading.Event(), []
    jobs.submit((upload.key, "fit", "stand-in"), "a long training",
                lambda progress: (ran.append("training"), release.wait(DEADLINE_S)),
                first=True)
    jobs.start()
    deadline = time.monotonic() + DEADLINE_S
    while not ran and time.monotonic() < deadline:
        release.wait(0.01)
    uploads.release("carol")
    assert cache_dir.exists()  # the running job may still write there
    assert all(jobs.get(key) is None for key in queued)
    release.set()
    assert jobs.wait_idle(timeout=DEADLINE_S)
    assert not cache_dir.exists()
    assert not any(job.key[0] == upload.key and job.state == "done"
                   and job.key[1:] != ("fit", "stand-in") for job in jobs.jobs())


def test_a_link_opens_no_other_visitors_upload(
        public_page: tuple[gr.Blocks, PageHandlers], public: PublicUploads,
        explorer: Explorer, tmp_path: Path, leaves_no_upload: None) -> None:
    """A link names a gallery by its key; on a public page a visitor reopens only the
    galleries offered to them, never another session's upload."""
    _, handlers = public_page
    ui = handlers.ui
    session = public.open_zip(small_zip(tmp_path, "private", per_class=1), "alice")
    file = session.gallery.files[0]

    def opened_by(visitor: str) -> dict[Any, Any]:
        link = request(visitor)
        link.query_params = {"gallery": session.key, "file": file}
        return handlers.restore(link, BASELINE, "backbone", True, 5)

    mallory = opened_by("mallory")
    assert "gallery is not open" in mallory[ui.message]
    assert ui.state not in mallory or mallory[ui.state].result.gallery_key != session.key
    alice = opened_by("alice")
    assert ui.message not in alice
    assert alice[ui.state].result.gallery_key == session.key
    public.release("alice")
