"""launch.py and the Space image: the command line, the Dockerfile's promises (parsed, so that
they cannot drift silently), and the bake: `launch.py --prepare-only` on the CPU builds a cache
that a later `launch.py --public` serves from without recomputing anything."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import launch
from engine.search.gallery import DEMO_GALLERY
from tests.app.conftest import free_port
from tests.galleries import make_gallery

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SERVE_DEADLINE_S = 300
# What a start logs when it computes instead of loading (engine/search/gallery.py,
# views/embedding_map.py, rerank/ssr.py, rerank/sgrr.py, asymmetric/), or when a background job
# fails (engine/core/jobs.py).
RECOMPUTING = re.compile(r"embedding \d+ new or changed images|re-embedding|building the index|"
                         r"fitting the embedding map|refitting|retraining|"
                         r"SSP query model trained|background job .* failed")
SERVING = "preparing the rest in the background"
PREPARED = "background preparation done"


# -- the command line --------------------------------------------------------------------------
def test_host_and_port_follow_the_gradio_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = launch.parse_args([])
    assert (args.host, args.port, args.public, args.query_models) == ("127.0.0.1", 7860,
                                                                      False, [])
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    assert (launch.parse_args([]).host, launch.parse_args([]).port) == ("0.0.0.0", 7861)
    assert launch.parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"


def test_query_models_are_a_checked_comma_list() -> None:
    assert launch.parse_args(["--query-models", "lite2,ssp"]).query_models == ["lite2", "ssp"]
    assert launch.parse_args(["--query-models", ""]).query_models == []
    with pytest.raises(SystemExit):
        launch.parse_args(["--query-models", "lite2,lite7"])


def test_public_takes_no_allowed_folder() -> None:
    assert launch.parse_args(["--public"]).public
    with pytest.raises(SystemExit):
        launch.parse_args(["--public", "--allow-folder", str(REPO)])


def test_features_parse_and_need_what_they_name(tmp_path: Path) -> None:
    args = launch.parse_args(["--features", "v.npz", "--features-images", "photos"])
    assert (args.features, args.features_images, args.gallery) == ("v.npz", "photos", None)
    with pytest.raises(SystemExit):
        launch.parse_args(["--features-images", "photos"])
    with pytest.raises(SystemExit):
        launch.parse_args(["--features", "v.npz", "--query-models", "lite2"])


def test_query_features_and_ground_truth_parse_and_need_what_they_name() -> None:
    args = launch.parse_args(["--features", "db.npz", "--features-queries", "q.npz",
                              "--ground-truth", "gnd.pkl"])
    assert (args.features, args.features_queries, args.ground_truth) == ("db.npz", "q.npz",
                                                                         "gnd.pkl")
    assert launch.parse_args(["--features", "db.npz"]).features_queries is None
    with pytest.raises(SystemExit):
        launch.parse_args(["--features-queries", "q.npz"])
    with pytest.raises(SystemExit):
        launch.parse_args(["--features", "db.npz", "--ground-truth", "gnd.pkl"])


def test_prepare_only_with_query_features_fills_the_revisited_table(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A features gallery with queries and ground truth: the bake queues and computes the
    revisited Compare rows of every method (here one training-free method, to stay quick); a
    ground truth of another query set stops the start with its reason."""
    import engine.explorer.session
    from tests.engine.explorer.test_query_features import constructed

    monkeypatch.setattr(engine.explorer.session, "list_rerankers", lambda: ["k_reciprocal"])
    db, queries, truth = constructed(tmp_path)
    where = ["--features", str(db), "--features-queries", str(queries), "--cache-dir",
             str(tmp_path / "cache"), "--device", "cpu"]
    assert launch.main(["--prepare-only", *where, "--ground-truth", str(truth)]) == 0
    stored = json.loads(next((tmp_path / "cache" / "galleries").glob(
        "db.npz-*/revisited-scores.json")).read_text())
    assert sorted(entry["method"] for entry in stored.values()) == ["baseline",
                                                                     "k_reciprocal"]
    other = tmp_path / "allowed" / "gnd_other.pkl"
    other.write_bytes(truth.read_bytes().replace(b"qa", b"qz"))
    caplog.clear()
    assert launch.main(["--prepare-only", *where, "--ground-truth", str(other)]) == 2
    assert "1 item missing from the queries: 'qz'" in caplog.text


# -- the Dockerfile ----------------------------------------------------------------------------
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile in order: continuation lines joined, comments
    dropped (also between continued lines, as Docker does)."""
    parsed, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        parsed.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends in a continued line"
    return parsed


def env_of(parsed: list[tuple[str, str]]) -> dict[str, str]:
    """Every ENV and ARG default (key=value form), later ones winning, ${VAR} not expanded."""
    values: dict[str, str] = {}
    for keyword, arguments in parsed:
        if keyword in ("ENV", "ARG"):
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                if sep:
                    values[key] = value
    return values


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: values.get(match[1], match[0]), text)


def position(parsed: list[tuple[str, str]], keyword: str, pattern: str) -> int:
    """Index of the only instruction `keyword` whose arguments match `pattern`."""
    found = [index for index, (kw, arguments) in enumerate(parsed)
             if kw == keyword and re.search(pattern, arguments)]
    assert len(found) == 1, (keyword, pattern, found)
    return found[0]


def test_the_image_starts_from_python_3_11_pinned() -> None:
    parsed = instructions()
    assert parsed[0][0] == "FROM" or parsed[0][0] == "ARG"
    [image] = [arguments for keyword, arguments in parsed if keyword == "FROM"]
    name, _, tag = image.partition(":")
    assert name == "python" and tag.startswith("3.11") and tag != "latest"


def test_the_image_installs_the_pinned_cuda_torch_and_the_requirements() -> None:
    parsed = instructions()
    values = env_of(parsed)
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$",
                           (REPO / "requirements.txt").read_text(), re.MULTILINE))
    install = parsed[position(parsed, "RUN", r"pip install .*torch==")][1]
    index = re.search(r"--(?:extra-)?index-url[ =]\"?([^\s\"]+)", install)
    assert index is not None
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", expand(index[1], values))
    assert f"torch=={pins['torch']}" in install.split()
    assert f"torchvision=={pins['torchvision']}" in install.split()
    assert re.search(r"pip install .*-r \S*requirements\.txt", install)


def test_the_image_runs_as_uid_1000_with_its_caches_in_its_home() -> None:
    parsed = instructions()
    create = position(parsed, "RUN", r"useradd .*--uid 1000")
    user = position(parsed, "USER", r".")
    assert create < user and parsed[user][1] in ("1000", "1000:1000", "user")
    assert not [arguments for keyword, arguments in parsed[user + 1:] if keyword == "USER"]
    for keyword, arguments in parsed[user + 1:]:
        if keyword in ("COPY", "ADD"):
            assert re.match(r"--chown=(1000|user)(:(1000|user))? ", arguments), arguments
    values = env_of(parsed)
    home = values["HOME"]
    assert home == "/home/user"
    for name in ("RETRIEVAL_EXPLORER_CACHE", "HF_HOME", "TORCH_HOME", "MPLCONFIGDIR",
                 "NUMBA_CACHE_DIR"):
        assert values[name].startswith(home + "/"), name


def test_the_image_serves_the_public_page_on_port_7860() -> None:
    parsed = instructions()
    values = env_of(parsed)
    assert values["GRADIO_SERVER_NAME"] == "0.0.0.0"
    assert ("EXPOSE", "7860") in parsed
    commands = [arguments for keyword, arguments in parsed if keyword == "CMD"]
    assert len(commands) == 1 and parsed[-1][0] == "CMD"
    command = json.loads(commands[0])  # the exec form: signals reach python
    assert command[:2] == ["python", "launch.py"] and "--public" in command
    assert "--allow-folder" not in command and "--share" not in command
    arguments = launch.parse_args(command[2:])
    assert arguments.public and arguments.port == 7860 and arguments.host == "0.0.0.0"


def test_the_image_bakes_the_demo_with_the_launch_script_as_its_user() -> None:
    parsed = instructions()
    bake = position(parsed, "RUN", r"python launch\.py .*--prepare-only")
    command = shlex.split(expand(parsed[bake][1], env_of(parsed)))
    arguments = launch.parse_args(command[2:])
    assert arguments.prepare_only and arguments.device == "cpu"  # no GPU during a build
    assert arguments.gallery is None  # the demo gallery
    assert arguments.cache_dir is None  # $RETRIEVAL_EXPLORER_CACHE, in the user's home
    copies = [index for index, (keyword, _) in enumerate(parsed) if keyword in ("COPY", "ADD")]
    user = position(parsed, "USER", r".")
    assert user < bake and max(copies) < bake < len(parsed) - 1
    copied = " ".join(parsed[index][1] for index in copies)
    for needed in ("engine", "app", "assets", "launch.py", "requirements.txt"):
        assert needed in copied, needed


def test_the_build_context_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", ".cache", "**/__pycache__", ".pytest_cache"} <= ignored
    assert not ignored & {"engine", "app", "assets", "launch.py", "requirements.txt"}


# -- the bake ----------------------------------------------------------------------------------
def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under `folder`."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*") if path.is_file()}


def serve_until_warm(command: list[str], log: Path,
                     on_serving: Any = None) -> tuple[float, str]:
    """Run `launch.py` until the page answers and its background preparation is done; returns
    the seconds to the first answer and the log. `on_serving(url)` is called once the page
    answers. The process is stopped in any case."""
    port = launch.parse_args(command).port
    started = time.monotonic()
    ready = None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "launch.py", *command], cwd=REPO, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        pause = threading.Event()
        while time.monotonic() - started < SERVE_DEADLINE_S:
            assert process.poll() is None, log.read_text()[-3000:]
            if ready is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                        ready = time.monotonic() - started
                        if on_serving is not None:
                            on_serving(f"http://127.0.0.1:{port}/")
                except httpx.HTTPError:
                    pass
            if ready is not None and PREPARED in log.read_text():
                break
            pause.wait(0.2)  # the poll's interval
        else:
            pytest.fail(f"not serving within {SERVE_DEADLINE_S} s:\n{log.read_text()[-3000:]}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return ready, log.read_text()


@pytest.mark.parametrize("which", ["tiny", pytest.param("demo", marks=pytest.mark.slow)])
def test_a_baked_cache_is_served_without_recomputing(tmp_path: Path, which: str) -> None:
    """The image's bake step, then the image's start: the start computes nothing (no file of
    the bake is rewritten, no new state appears, nothing is embedded, fitted or trained).

    tiny: 24 images, lite0 only (fast). demo: exactly the Dockerfile's bake (the demo gallery
    and the query models lite2 and ssp), served with those query models loaded at start.
    """
    gallery = make_gallery(tmp_path / "tiny", ssr_preset=True) if which == "tiny" else None
    models = [] if which == "tiny" else ["lite2", "ssp"]
    cache = tmp_path / "cache"
    where = ["--cache-dir", str(cache), "--device", "cpu", "--query-models", ",".join(models)]
    if gallery is not None:
        where += ["--gallery", str(gallery)]
    assert launch.main(["--prepare-only", *where]) == 0
    baked = files_of(cache)
    gallery_caches = sorted((cache / "galleries").iterdir())
    assert len(gallery_caches) == 1 + ("lite2" in models)  # ssp searches lite2's index
    manifests = {}
    for gallery_cache in gallery_caches:
        made = files_of(gallery_cache)
        for name in ("features.npz", "index.faiss", "knn.npz", "manifest.json", "scores.json",
                     "maps/backbone.npz"):
            assert name in made, (gallery_cache.name, name)
        assert any(name.startswith("state/ssr/") for name in made)
        assert any(name.startswith("state/sgrr/") for name in made)
        manifest = json.loads((gallery_cache / "manifest.json").read_text())
        assert manifest["root"] == str((gallery or DEMO_GALLERY).resolve())
        manifests[f"galleries/{gallery_cache.name}/manifest.json"] = manifest
    assert ("ssp" in models) == any("/state/ssp/" in name for name in baked)

    seconds, log = serve_until_warm(
        ["--public", "--host", "127.0.0.1", "--port", str(free_port()), *where],
        tmp_path / "serve.log")
    assert not RECOMPUTING.search(log), RECOMPUTING.search(log)
    served = files_of(cache)
    for name, stamp in baked.items():
        if name in manifests:  # rewritten at every open, with the same content
            assert json.loads((cache / name).read_text()) == manifests[name]
        else:
            assert served.get(name) == stamp, f"{name} was rewritten by the start"
    new = [name for name in served if name not in baked
           and not name.startswith(("thumbnails/", "public-uploads/"))]
    assert new == [], "the start computed state the bake did not"
    assert seconds < SERVE_DEADLINE_S


def test_every_start_serves_and_prepares_the_rest_in_the_background(tmp_path: Path) -> None:
    """Several starts in a row, the first from an empty cache: each serves the page (no import
    may race a background job), before its background preparation ends when there is work
    left, and a query made at once gets the baseline and, for every method, a ranking or its
    state."""
    from gradio_client import Client, handle_file

    gallery = make_gallery(tmp_path / "tiny", ssr_preset=True)
    where = ["--gallery", str(gallery), "--cache-dir", str(tmp_path / "cache"), "--device",
             "cpu"]
    answers = []

    def query_at_once(url: str) -> None:
        answers.append(Client(url, verbose=False).predict(
            handle_file(str(gallery / "image_0001.jpg")), None, False,
            api_name="/query"))

    for start in range(3):
        log_path = tmp_path / f"start-{start}.log"
        seconds, log = serve_until_warm(["--port", str(free_port()), *where], log_path,
                                        query_at_once)
        assert seconds < SERVE_DEADLINE_S
        assert "Traceback" not in log and "DeadlockError" not in log, log[-3000:]
        assert log.index(SERVING) < log.index(PREPARED)
        if start == 0:
            assert "background job done in" in log  # the first start had work left to do
        else:
            assert not RECOMPUTING.search(log), RECOMPUTING.search(log)
    from engine.rerank import list_rerankers

    assert len(answers) == 3
    for answer in answers:
        assert "baseline" in answer["methods"]
        assert set(answer["methods"]) | set(answer["not_ready"]) == {"baseline",
                                                                     *list_rerankers()}
