"""The closed-form query models on the page's engine: planned and built like SSP (a request,
saved beside the lite2 gallery cache, loaded by a fresh explorer), queried through lite0 and
their map, and every query model's search side by side in an asymmetric Compare table."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from engine.asymmetric import QUERY_MODELS, SSPConfig
from engine.core.jobs import DONE, JobQueue
from engine.core.plans import Plan
from engine.explorer import Explorer
from engine.explorer.results import BASELINE_TITLE
from tests.galleries import make_gallery

TINY_SSP = SSPConfig(subspaces=8, centroids=8, views=1, epochs=2, warmup_epochs=1,
                     batch_size=8, trainable_stages=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("maps") / "nine", per_class=3)


@pytest.fixture(scope="module")
def built(folder: Path, extractor) -> Explorer:
    """An explorer on a 9-image gallery with its procrustes and ridge variants built as
    requests, and SSP built (tiny) for the Compare rows."""
    explorer = Explorer(extractor, device="cpu", cache_root=folder.parent / "cache",
                        allowed_roots=[folder.parent], methods=["k_reciprocal"],
                        requests=JobQueue(budget=contextlib.nullcontext))
    explorer.ssp_config = TINY_SSP
    explorer.open_folder(folder)
    return explorer


def ap_oracle(order: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one full ranking: the mean precision at each relevant item."""
    hits = relevant[order]
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def test_the_switch_offers_both_maps():
    assert QUERY_MODELS["procrustes"].closed_form == "procrustes"
    assert QUERY_MODELS["ridge"].closed_form == "ridge"
    for name in ("procrustes", "ridge"):
        spec = QUERY_MODELS[name]
        assert spec.asymmetric and spec.gallery_backbone == "tf_efficientnet_lite2"


def test_each_map_is_planned_built_queried_and_loaded_again(built: Explorer, folder: Path):
    base = built.session(None)
    indexing = "indexes the 9 images of nine with tf_efficientnet_lite2"
    for name, title in (("procrustes", "Procrustes"), ("ridge", "ridge")):
        plan = built.plan_query_model(None, name)
        steps = [step.title for step in plan.steps]
        assert steps[-1] == f"fits the {title} query map" and 0 < plan.steps[-1].seconds < 60
        assert steps[:-1] in ([indexing], [])  # the lite2 index is shared once built
        job = built.request_query_model(None, name)
        built.requests.run_pending()
        assert job.state == DONE, job.error
        session = job.result
        assert session.key == f"{base.key}@{name}" and session.asymmetric
        assert built.plan_query_model(None, name) == Plan()
        encoder = session.query_encoder
        assert encoder.kind == name and not encoder.loaded and encoder.n_training == 9
        saved = list((session.gallery.state_dir / "query-maps").glob(f"{name}-*.json"))
        assert len(saved) == 1
        # a pick: lite0's feature of its image, mapped; ranked online without itself
        pick = built.query(session.key, source_file=base.gallery.files[4])
        expected = encoder.map(base.gallery.features[4][None, :])[0]
        np.testing.assert_allclose(pick.feature, expected, atol=1e-4)
        assert pick.embedded_by == (f"query: tf_efficientnet_lite0 + {title} map · gallery: "
                                    "tf_efficientnet_lite2")
        assert set(pick.rankings) == {"baseline", "k_reciprocal"}
        for ranking in pick.rankings.values():
            assert ranking.how == "online" and 4 not in ranking.indices
            assert sorted(ranking.indices.tolist()) == [r for r in range(9) if r != 4]
        # an upload: embedded by lite0 (with its ImageNet guesses) and mapped
        upload = built.query(session.key, base.gallery.path_of(4))
        np.testing.assert_allclose(upload.feature, expected, atol=1e-4)
        assert len(upload.imagenet) == 3 and len(upload.rankings["baseline"].indices) == 9
    fresh = Explorer(built.extractor, device="cpu", cache_root=built.cache_root,
                     allowed_roots=built.allowed_roots, methods=["k_reciprocal"])
    fresh.open_folder(folder)
    for name in ("procrustes", "ridge"):
        assert fresh.plan_query_model(None, name) == Plan()  # saved: nothing to do
        loaded = fresh.with_query_model(None, name).query_encoder
        assert loaded.loaded
        np.testing.assert_array_equal(
            loaded.weights, built.session(f"{base.key}@{name}").query_encoder.weights)


def test_an_asymmetric_compare_table_has_a_row_per_query_model(built: Explorer):
    base = built.session(None)
    for name in ("procrustes", "ridge", "ssp"):
        built.with_query_model(None, name)
    session = built.session(f"{base.key}@procrustes")
    titles = {spec.name: f"{BASELINE_TITLE}, queries by {spec.title}"
              for spec in QUERY_MODELS.values()}
    rows = {row.method: row for row in session.scores_rows(compute=True)}
    assert set(titles.values()) <= set(rows)
    # the symmetric rows are the two galleries' own baselines
    assert rows[titles["lite0"]].map == base.scores("baseline").map
    assert rows[titles["lite2"]].map == session.scores("baseline").map
    # an asymmetric row: each image's mapped lite0 feature against the other lite2 rows
    gallery, labels = session.gallery, session.gallery.labels
    queries = session.query_encoder.map(base.gallery.features)
    similarities = queries @ gallery.features.T
    aps = []
    for row in range(gallery.size):
        others = np.array([other for other in range(gallery.size) if other != row])
        order = others[np.argsort(-similarities[row, others], kind="stable")]
        aps.append(ap_oracle(order, labels == labels[row]))
    assert rows[titles["procrustes"]].map == pytest.approx(np.mean(aps), abs=1e-6)
    assert rows[titles["procrustes"]].n_queries == 9
    assert rows[titles["ridge"]].params["map"] == "ridge"
    # cached: every asymmetric session of the gallery reads them without computing
    ssp = built.session(f"{base.key}@ssp")
    cached = {row.method: row.map for row in ssp.scores_rows()}
    assert {title: rows[title].map for title in titles.values()}.items() <= cached.items()
    # a symmetric session's table has no such rows
    assert not any(row.method in titles.values() for row in base.scores_rows())


def test_building_a_map_with_a_job_queue_scores_the_query_models_in_the_background(
        built: Explorer, folder: Path):
    """The page's explorer: the rows are a background job of the new session, cached for its
    Compare table (the map itself is loaded: `built` saved it)."""
    jobs = JobQueue(budget=contextlib.nullcontext)
    explorer = Explorer(built.extractor, device="cpu", cache_root=built.cache_root,
                        allowed_roots=built.allowed_roots, methods=[], jobs=jobs)
    explorer.open_folder(folder)
    session = explorer.with_query_model(None, "ridge")
    assert session.query_encoder.loaded
    job = jobs.get((session.key, "scores", "query models"))
    assert job is not None and job.title == "Query-model scores"
    jobs.run_pending()
    assert job.state == DONE, job.error
    shown = [row.method for row in session.scores_rows()]
    assert f"{BASELINE_TITLE}, queries by {QUERY_MODELS['ridge'].title}" in shown
    assert f"{BASELINE_TITLE}, queries by {QUERY_MODELS['ssp'].title}" not in shown  # not built
