"""The explorer's shared state on the tiny gallery: methods, queries, parameters, galleries."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidInputError, UnknownNameError, UnsafePathError
from engine.evaluation.tuning import PRESETS_FILE
from engine.explorer import BASELINE, CUSTOM, Explorer, GallerySession
from engine.explorer._cache import _LruCache
from engine.rerank import get_reranker_class, list_rerankers
from tests.galleries import CLASSES, PER_CLASS, demo_file, make_gallery

METHODS = [BASELINE, *list_rerankers()]
UPLOAD = demo_file(1, PER_CLASS)  # a snowdrop that is not in the tiny gallery
SNOWDROP = 1


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


@pytest.fixture(scope="module")
def own_explorer(explorer: Explorer, app_root: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    """An explorer with its own cache (presets, zips) sharing the session's backbone."""
    return Explorer(explorer.extractor, device="cpu",
                    cache_root=tmp_path_factory.mktemp("own_cache"), allowed_roots=[app_root])


def hand_ap(relevant: np.ndarray, n_positives: int) -> float:
    """Average precision by the textbook loop: precision at each hit, over all positives."""
    hits, total = 0, 0.0
    for position, hit in enumerate(relevant.tolist(), start=1):
        if hit:
            hits += 1
            total += hits / position
    return total / n_positives


# -- methods -----------------------------------------------------------------------------------
def test_session_holds_the_tiny_gallery(session: GallerySession) -> None:
    assert session.gallery.size == PER_CLASS * len(CLASSES)
    assert session.gallery.class_names == list(CLASSES.values())
    assert session.full_rankings
    assert not session.unavailable


@pytest.mark.parametrize("method", list_rerankers())
def test_every_registered_method_follows_the_baseline(session: GallerySession,
                                                      method: str) -> None:
    names = [name for name, _ in session.methods()]
    assert names[0] == BASELINE
    assert method in names[1:]
    assert dict(session.methods())[method] == (get_reranker_class(method).title or method)


# -- gallery picks -----------------------------------------------------------------------------
@pytest.mark.parametrize("row", [0, 11, 23])
def test_a_pick_left_out_takes_its_leave_one_out_row(explorer: Explorer,
                                                     session: GallerySession, row: int) -> None:
    size = session.gallery.size
    result = explorer.query(None, source_file=session.gallery.files[row])
    assert (result.source_row, result.leave_out) == (row, True)
    assert result.query_class == session.gallery.class_of(row)
    assert result.n_positives == PER_CLASS - 1
    assert list(result.rankings) == METHODS
    assert set(result.timings) == {"embed", *METHODS}
    for method, ranking in result.rankings.items():
        rankings = session.leave_one_out(method)
        assert ranking.how == "leave-one-out"
        np.testing.assert_array_equal(ranking.indices, rankings.indices[row])
        np.testing.assert_array_equal(ranking.distances, rankings.distances[row])
        assert ranking.indices.shape == (size - 1,)
        assert row not in ranking.indices.tolist()
        assert sorted(ranking.indices.tolist()) == sorted(set(range(size)) - {row})
        assert np.all(np.diff(ranking.distances) >= -1e-6)
        relevant = session.gallery.labels[ranking.indices] == session.gallery.labels[row]
        np.testing.assert_array_equal(ranking.relevant, relevant)
        assert ranking.ap == pytest.approx(hand_ap(relevant, PER_CLASS - 1))
        assert ranking.precision == pytest.approx(relevant[:result.top_n].mean())


def test_per_query_ap_is_that_query_term_of_the_compare_map(explorer: Explorer,
                                                            session: GallerySession) -> None:
    """The AP the page shows for a pick, averaged over every pick, is the Compare mAP."""
    per_query: dict[str, list[float]] = {method: [] for method in METHODS}
    for file in session.gallery.files:
        result = explorer.query(None, source_file=file, top_n=5)
        for method, ranking in result.rankings.items():
            per_query[method].append(ranking.ap)
    for method in METHODS:
        scores = session.scores(method)
        assert scores.n_queries == session.gallery.size
        assert np.mean(per_query[method]) == pytest.approx(scores.map, abs=1e-9)


def test_a_pick_kept_in_is_ranked_online_and_finds_itself(explorer: Explorer,
                                                          session: GallerySession) -> None:
    row = 5
    result = explorer.query(None, source_file=session.gallery.files[row], leave_out=False)
    assert result.leave_out is False
    assert result.n_positives == PER_CLASS
    for ranking in result.rankings.values():
        assert ranking.how == "online"
        assert ranking.indices.shape == (session.gallery.size,)
        assert row in ranking.indices.tolist()
    assert result.rankings[BASELINE].indices[0] == row


# -- uploads -----------------------------------------------------------------------------------
def test_an_upload_is_ranked_online_without_a_class(explorer: Explorer,
                                                    session: GallerySession) -> None:
    result = explorer.query(None, UPLOAD)
    assert result.source_row is None and result.source_file is None
    assert result.query_label is None and result.query_class is None
    assert result.n_positives is None and result.leave_out is False
    assert len(result.imagenet) == 3
    for ranking in result.rankings.values():
        assert ranking.how == "online"
        assert ranking.indices.shape == (session.gallery.size,)
        assert ranking.ap is None and ranking.precision is None and ranking.relevant is None
    # The tiny gallery's snowdrops are the nearest of a snowdrop.
    assert session.gallery.class_of(int(result.rankings[BASELINE].indices[0])) == "snowdrop"


def test_an_upload_with_its_class_is_scored_against_the_labels(
        explorer: Explorer, session: GallerySession) -> None:
    result = explorer.query(None, UPLOAD, query_class="snowdrop", top_n=6)
    assert (result.query_label, result.query_class) == (SNOWDROP, "snowdrop")
    assert result.n_positives == PER_CLASS  # the upload is not in the gallery
    for ranking in result.rankings.values():
        relevant = session.gallery.labels[ranking.indices] == SNOWDROP
        np.testing.assert_array_equal(ranking.relevant, relevant)
        assert relevant.sum() == PER_CLASS  # a full ranking holds every positive
        assert ranking.ap == pytest.approx(hand_ap(relevant, PER_CLASS))
        assert ranking.precision == pytest.approx(relevant[:6].sum() / 6)
    with pytest.raises(InvalidInputError, match="not a class"):
        explorer.query(None, UPLOAD, query_class="tulip")


# -- parameters --------------------------------------------------------------------------------
def test_custom_parameters_change_the_ranking_params(explorer: Explorer,
                                                     session: GallerySession) -> None:
    file = session.gallery.files[2]
    chosen = {"k1": 5, "k2": 3, "lambda_value": 0.5}
    custom = explorer.query(None, source_file=file, params={"k_reciprocal": chosen})
    ranking = custom.rankings["k_reciprocal"]
    assert ranking.params == chosen
    assert ranking.params_source == CUSTOM
    np.testing.assert_array_equal(
        ranking.indices, session.leave_one_out("k_reciprocal", chosen).indices[2])
    default = explorer.query(None, source_file=file)
    for method in list_rerankers():
        params, source = session.params_for(method)
        # the tiny gallery's only preset is a short SSR training run
        assert source == ("preset" if method == "ssr" else "authors' defaults")
        assert default.rankings[method].params == params
        assert default.rankings[method].params_source == source
    # Only the method given custom parameters changed.
    assert custom.rankings["gnn"].params_source == "authors' defaults"
    # Passing the defaults explicitly is not "custom".
    explicit = explorer.query(None, source_file=file,
                              params={"k_reciprocal": session.params_for("k_reciprocal")[0]})
    assert explicit.rankings["k_reciprocal"].params_source == "authors' defaults"


@pytest.mark.parametrize("params", [{"k1": 0}, {"k1": 10**6}, {"k1": 2.5},
                                    {"lambda_value": float("nan")}, {"bogus": 1}])
def test_invalid_parameters_are_refused(explorer: Explorer, session: GallerySession,
                                        params: dict) -> None:
    with pytest.raises(InvalidInputError):
        explorer.query(None, source_file=session.gallery.files[0],
                       params={"k_reciprocal": params})


def test_rerank_replaces_one_method_only(explorer: Explorer, session: GallerySession) -> None:
    result = explorer.query(None, UPLOAD, query_class="snowdrop")
    changed = explorer.rerank(result, "k_reciprocal", {"k1": 4, "k2": 2})
    assert changed.rankings["k_reciprocal"].params["k1"] == 4
    assert changed.rankings["k_reciprocal"].params_source == CUSTOM
    assert changed.rankings["k_reciprocal"].ap is not None
    assert changed.timings["k_reciprocal"] == changed.rankings["k_reciprocal"].seconds
    for method in METHODS:
        if method != "k_reciprocal":
            assert changed.rankings[method] is result.rankings[method]
            assert changed.timings[method] == result.timings[method]
    assert changed.feature is result.feature
    assert list(changed.rankings) == list(result.rankings)
    assert result.rankings["k_reciprocal"].params_source == "authors' defaults"  # untouched


def test_presets_are_saved_beside_the_gallery_cache(own_explorer: Explorer,
                                                    app_root: Path) -> None:
    own = own_explorer.open_folder(make_gallery(app_root / "preset_gallery", per_class=4))
    assert own.params_for("k_reciprocal")[1] == "authors' defaults"
    stored = own.save_preset("k_reciprocal", {"k1": 7, "k2": 3}, note="test")
    assert stored == {"k1": 7, "k2": 3, "lambda_value": 0.3}
    written = json.loads((own.gallery.state_dir / PRESETS_FILE).read_text())
    assert written["k_reciprocal"] == {"params": stored, "note": "test"}
    assert not (own.gallery.root / PRESETS_FILE).exists()  # the gallery folder is untouched
    assert own.params_for("k_reciprocal") == (stored, "preset")
    assert own.params_for("gnn")[1] == "authors' defaults"
    result = own_explorer.query(own.key, source_file=own.gallery.files[0])
    assert result.rankings["k_reciprocal"].params == stored
    assert result.rankings["k_reciprocal"].params_source == "preset"
    with pytest.raises(InvalidInputError):
        own.save_preset("k_reciprocal", {"k1": 0})
    assert own.params_for("k_reciprocal") == (stored, "preset")


# -- query validation --------------------------------------------------------------------------
@pytest.mark.parametrize("top_n", [0, -3, True, 2.5, "10", None])
def test_top_n_must_be_a_positive_integer(explorer: Explorer, session: GallerySession,
                                          top_n: object) -> None:
    with pytest.raises(InvalidInputError, match="positive integer"):
        explorer.query(None, source_file=session.gallery.files[0], top_n=top_n)


def test_top_n_is_capped_by_the_ranking(explorer: Explorer, session: GallerySession) -> None:
    result = explorer.query(None, source_file=session.gallery.files[0], top_n=100)
    assert result.top_n == session.gallery.size - 1
    distances, indices = result.top(BASELINE)
    assert len(indices) == len(distances) == session.gallery.size - 1


def test_query_needs_an_image_or_a_known_gallery_file(explorer: Explorer) -> None:
    with pytest.raises(InvalidInputError, match="give a query image"):
        explorer.query(None)
    with pytest.raises(InvalidInputError, match="not an image of the gallery"):
        explorer.query(None, source_file="../../etc/passwd")


def test_unknown_gallery_key(explorer: Explorer, session: GallerySession) -> None:
    with pytest.raises(UnknownNameError, match="no open gallery"):
        explorer.session("no-such-gallery")
    with pytest.raises(UnknownNameError):
        explorer.query("no-such-gallery", UPLOAD)
    assert explorer.session("") is explorer.session(None) is session


# -- galleries ---------------------------------------------------------------------------------
def test_a_second_gallery_opens_inside_the_allowed_root(explorer: Explorer,
                                                        app_root: Path) -> None:
    folder = make_gallery(app_root / "second", per_class=4)
    second = explorer.open_folder(folder)
    assert second.gallery.size == 4 * len(CLASSES)
    assert second.key in dict((key, title) for title, key in explorer.choices())
    assert explorer.session(second.key) is second
    assert second is not explorer.session(None)
    started = time.perf_counter()
    again = explorer.open_folder(str(folder) + "/")
    assert again is second
    assert time.perf_counter() - started < 1.0
    result = explorer.query(second.key, source_file=second.gallery.files[0])
    assert all(len(r.indices) == second.gallery.size - 1 for r in result.rankings.values())


@pytest.mark.parametrize("where", ["outside", "root", "dotdot"])
def test_folders_outside_the_allowed_roots_are_refused(explorer: Explorer, app_root: Path,
                                                       tmp_path: Path, where: str) -> None:
    folder = {"outside": tmp_path, "root": Path("/"),
              "dotdot": app_root / "tiny" / ".." / ".."}[where]
    with pytest.raises(UnsafePathError, match="outside the allowed folders"):
        explorer.open_folder(folder)


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"{folder.name}/{path.name}")
    return archive


def test_a_zip_of_a_gallery_opens(own_explorer: Explorer, app_root: Path,
                                  tmp_path: Path) -> None:
    folder = make_gallery(app_root / "zipped", per_class=3)
    opened = own_explorer.open_zip(zip_folder(folder, tmp_path / "gallery.zip"))
    assert opened.gallery.size == 3 * len(CLASSES)
    assert opened.gallery.class_names == list(CLASSES.values())
    assert opened.gallery.root.is_relative_to(own_explorer.upload_root)
    again = own_explorer.open_zip(zip_folder(folder, tmp_path / "same.zip"))
    assert again is opened


def test_a_zip_escaping_its_folder_leaves_nothing(own_explorer: Explorer,
                                                  tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(demo_file(0, 0), "fine.jpg")
        handle.write(demo_file(0, 1), "../evil.jpg")
    own_explorer.upload_root.mkdir(parents=True, exist_ok=True)
    before = sorted(own_explorer.upload_root.rglob("*"))
    galleries = dict(own_explorer.galleries)
    with pytest.raises(UnsafePathError):
        own_explorer.open_zip(archive)
    assert sorted(own_explorer.upload_root.rglob("*")) == before
    assert not (own_explorer.upload_root.parent / "evil.jpg").exists()
    assert own_explorer.galleries == galleries


def test_unreadable_images_are_listed_as_skipped(own_explorer: Explorer,
                                                 app_root: Path) -> None:
    folder = make_gallery(app_root / "with_corrupt", per_class=2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    opened = own_explorer.open_folder(folder)
    assert set(opened.gallery.skipped) == {"broken.jpg"}
    assert "broken.jpg" not in opened.gallery.files
    assert opened.gallery.size == 2 * len(CLASSES)


# -- embedding maps ----------------------------------------------------------------------------
def test_map_spaces_start_with_the_backbone(session: GallerySession) -> None:
    spaces = dict(session.map_spaces())
    assert next(iter(spaces)) == "backbone"
    assert session.gallery.meta.backbone in spaces["backbone"]


def test_query_map_positions(explorer: Explorer, session: GallerySession) -> None:
    layout = session.embedding_map("backbone", fit=False)
    assert layout is not None and layout.coordinates.shape == (session.gallery.size, 2)
    pick = explorer.query(None, source_file=session.gallery.files[9])
    np.testing.assert_array_equal(session.query_map_position(pick), layout.coordinates[9])
    upload = explorer.query(None, UPLOAD)
    position = np.asarray(session.query_map_position(upload))
    assert position.shape == (2,) and np.isfinite(position).all()


# -- the LRU cache -----------------------------------------------------------------------------
def test_lru_cache_builds_once_under_concurrency() -> None:
    cache = _LruCache(4)
    threads_count = 8
    built: list[int] = []
    started, release = threading.Event(), threading.Event()
    arrived = threading.Semaphore(0)
    barrier = threading.Barrier(threads_count)
    results: list[object] = []

    def build() -> object:
        built.append(1)
        started.set()
        assert release.wait(10)
        return object()

    def worker() -> None:
        barrier.wait()
        arrived.release()
        results.append(cache.get("key", build))

    threads = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for _ in range(threads_count):
        assert arrived.acquire(timeout=10)
    assert started.wait(10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(built) == 1
    assert len(results) == threads_count and all(value is results[0] for value in results)


def test_lru_cache_evicts_the_least_recently_used() -> None:
    cache = _LruCache(2)
    builds: list[str] = []

    def builder(key: str):
        return lambda: builds.append(key) or f"value-{key}"

    assert cache.get("a", builder("a")) == "value-a"
    cache.get("b", builder("b"))
    assert cache.get("a", builder("a")) == "value-a"  # a is now the most recent
    cache.get("c", builder("c"))  # evicts b
    assert builds == ["a", "b", "c"]
    cache.get("a", builder("a"))
    cache.get("b", builder("b"))
    assert builds == ["a", "b", "c", "b"]


def test_query_models_embed_each_side_with_its_model(tiny_gallery, app_root):
    """lite2: both sides lite2; SSP: queries by the SSP query model (a pick too), gallery by
    lite2; lite0 is the gallery as opened."""
    from engine.asymmetric import SSPConfig

    explorer = Explorer.load(tiny_gallery, device="cpu", cache_root=app_root / "cache",
                             allowed_roots=[app_root], methods=["gnn"])
    explorer.ssp_config = SSPConfig(subspaces=8, centroids=8, views=2, epochs=2,
                                    warmup_epochs=1, batch_size=8, trainable_stages=1)
    base = explorer.session(None)
    lite2 = explorer.with_query_model(base.key, "lite2")
    assert lite2.gallery.meta.backbone == "tf_efficientnet_lite2"
    assert base.gallery.meta.backbone == "tf_efficientnet_lite0"
    assert lite2.gallery.files == base.gallery.files
    assert explorer.with_query_model(lite2.key, "lite0") is base
    assert explorer.with_query_model(base.key, "lite2") is lite2
    with pytest.raises(InvalidInputError, match="query model"):
        explorer.with_query_model(base.key, "lite7")

    upload = explorer.query(lite2.key, base.gallery.path_of(3))
    np.testing.assert_allclose(upload.feature, lite2.gallery.features[3], atol=1e-4)
    assert upload.rankings["baseline"].indices[0] == 3
    assert upload.embedded_by == ("query: tf_efficientnet_lite2 · gallery: "
                                  "tf_efficientnet_lite2")

    ssp = explorer.with_query_model(base.key, "ssp")
    assert ssp.asymmetric and ssp.query_encoder is not None
    pick = explorer.query(ssp.key, source_file=base.gallery.files[3])
    expected = ssp.query_encoder.embed([ssp.gallery.path_of(3)])[0]
    np.testing.assert_allclose(pick.feature, expected, atol=1e-5)
    assert not np.allclose(pick.feature, ssp.gallery.features[3], atol=1e-3)
    assert pick.feature.shape == (ssp.gallery.features.shape[1],)
    for ranking in pick.rankings.values():
        assert ranking.how == "online" and 3 not in ranking.indices
    assert pick.embedded_by == ("query: tf_efficientnet_lite0 + SSP head · gallery: "
                                "tf_efficientnet_lite2")
    assert {lite2.key, ssp.key} <= {key for _, key in explorer.choices()}


def test_a_query_validates_each_methods_parameters_once(explorer, monkeypatch):
    """The query resolves each method's setting once and passes it down (fit, leave-one-out
    run, ranking): one `from_mapping` call per method with explicit parameters."""
    from engine.rerank.base import RerankParams

    session = explorer.session(None)
    params = {method: session.params_for(method)[0] for method, _ in session.methods()
              if method != BASELINE}
    checked: list[str] = []
    original = RerankParams.from_mapping.__func__

    def counting(cls, method, mapping):
        checked.append(method)
        return original(cls, method, mapping)

    monkeypatch.setattr(RerankParams, "from_mapping", classmethod(counting))
    result = explorer.query(None, source_file=session.gallery.files[0], params=params)
    assert sorted(checked) == sorted(params)
    assert set(params) <= set(result.rankings)


def test_prepare_views_computes_maps_and_scores_without_a_job_queue(explorer: Explorer,
                                                                   tmp_path: Path) -> None:
    """What the page shows for a newly opened gallery (maps, Compare scores) is one engine
    call; without a job queue it is computed there, with progress."""
    own = Explorer(explorer.extractor, device="cpu", cache_root=tmp_path / "cache",
                   allowed_roots=[tmp_path], methods=["k_reciprocal"])
    session = own.open_folder(make_gallery(tmp_path / "fresh", per_class=4))
    assert all(session.scores(method, cached_only=True) is None for method, _ in
               session.methods())
    reports: list[tuple[float, str]] = []
    session.prepare_views(lambda fraction, message: reports.append((fraction, message)))
    for method, title in session.methods():
        assert session.scores(method, cached_only=True) is not None
        assert any(message == f"scoring {title}" for _, message in reports)
    assert [space for space, _ in session.map_spaces()] == ["backbone"]
    assert session.embedding_map("backbone", fit=False) is not None


def test_details_are_read_through_the_documented_schema(explorer: Explorer) -> None:
    """`Ranking.detail` returns a documented detail (ICFRR's per-iteration history, SSR's
    training source) or None, and refuses a key no method documents."""
    session = explorer.session(None)
    result = explorer.query(None, source_file=session.gallery.files[0])
    icfrr = result.rankings["icfrr"]
    history = icfrr.detail("history")
    assert history is not None and history.ndim == 2 and history.shape[1] >= 1
    assert history[0, 0] in result.rankings[BASELINE].indices[:history.shape[1]]
    assert result.rankings[BASELINE].detail("history") is None
    assert isinstance(result.rankings["ssr"].detail("trained_on"), str)
    with pytest.raises(KeyError, match="not a documented detail"):
        icfrr.detail("bogus")
