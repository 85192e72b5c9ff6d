"""Work a user asks for and waits on: planned before it starts (what, about how long), run
on the explorer's request queue, beside the background jobs; uploads keep their names."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from engine.asymmetric import SSPConfig
from engine.core.jobs import DONE, JobQueue
from engine.core.plans import Plan
from engine.errors import InvalidInputError, UnsafePathError
from engine.explorer import Explorer
from tests.galleries import CLASSES, make_gallery

TINY_SSP = SSPConfig(subspaces=8, centroids=8, views=1, epochs=2, warmup_epochs=1,
                     batch_size=8, trainable_stages=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this module's galleries and cache live (its explorer's only allowed root)."""
    return tmp_path_factory.mktemp("requests")


@pytest.fixture(scope="module")
def queued(small: Path, extractor) -> Explorer:
    """An explorer on a 9-image gallery with a background queue and a request queue, neither
    started (the tests run them)."""
    jobs = JobQueue(budget=contextlib.nullcontext)
    requests = JobQueue(budget=contextlib.nullcontext)
    explorer = Explorer(extractor, device="cpu", cache_root=small / "cache",
                        allowed_roots=[small], methods=["k_reciprocal"], jobs=jobs,
                        requests=requests)
    explorer.ssp_config = TINY_SSP
    explorer.open_folder(make_gallery(small / "nine", per_class=3))
    return explorer


def titles(plan: Plan) -> list[str]:
    return [step.title for step in plan.steps]


def test_an_explorer_with_jobs_has_a_request_queue_of_its_own(extractor, small) -> None:
    jobs = JobQueue(budget=contextlib.nullcontext)
    explorer = Explorer(extractor, device="cpu", cache_root=small / "cache", jobs=jobs)
    assert explorer.requests is not None and explorer.requests is not jobs
    assert Explorer(extractor, device="cpu", cache_root=small / "cache").requests is None


def test_a_new_folder_is_planned_then_opened_as_a_request(queued: Explorer, small: Path) -> None:
    folder = make_gallery(small / "planned", per_class=3)
    plan = queued.plan_gallery(folder)
    assert [step.title for step in plan.steps] == [
        "indexes the 9 images of planned with tf_efficientnet_lite0"]
    assert 0 < plan.seconds < 60 and plan.text().startswith("indexes the 9 images")
    job = queued.request_gallery(folder)
    assert titles(job.plan) == titles(plan) and queued.requests.get(job.key) is job
    assert queued.request_gallery(folder) is job  # asked twice: one job
    assert queued.jobs.get((job.key,)) is None  # not on the background queue
    queued.requests.run_pending()
    assert job.state == DONE and job.result.title == "planned (9 images)"
    assert queued.plan_gallery(folder) == Plan()  # open: nothing to do
    with pytest.raises(UnsafePathError):
        queued.plan_gallery(small.parent)


def test_a_plan_counts_only_the_images_not_cached(queued: Explorer, small: Path) -> None:
    folder = make_gallery(small / "grown", per_class=2)
    fresh = Explorer(queued.extractor, device="cpu", cache_root=queued.cache_root,
                     allowed_roots=[small])
    fresh.open_folder(folder)
    assert fresh.plan_gallery(folder) == Plan()
    other = Explorer(queued.extractor, device="cpu", cache_root=queued.cache_root,
                     allowed_roots=[small])
    assert other.plan_gallery(folder) == Plan()  # not open here, but cached
    shutil.copy(folder / next(iter(sorted(p.name for p in folder.glob("*.jpg")))),
                folder / "copy.jpg")
    plan = other.plan_gallery(folder)
    assert [step.title for step in plan.steps] == [
        "indexes 1 new image (of 7) of grown with tf_efficientnet_lite0"]


def test_a_query_model_is_planned_then_built_as_a_request_with_its_map(queued: Explorer
                                                                       ) -> None:
    base = queued.session(None)
    plan = queued.plan_query_model(None, "lite2")
    assert [step.title for step in plan.steps] == [
        "indexes the 9 images of nine with tf_efficientnet_lite2"]
    assert plan.seconds > 0
    assert queued.plan_query_model(None, "lite0") == Plan()
    ssp = queued.plan_query_model(None, "ssp")
    assert [step.title for step in ssp.steps] == [plan.steps[0].title,
                                                  "trains the SSP query model"]
    assert ssp.steps[1].seconds > 0
    job = queued.request_query_model(None, "lite2")
    assert titles(job.plan) == titles(plan) and job.title == "Query model symmetric lite2"
    queued.requests.run_pending()
    lite2 = job.result
    assert job.state == DONE and lite2.key == f"{base.key}@lite2"
    assert lite2.title == "nine (9 images, symmetric lite2)"
    assert queued.plan_query_model(None, "lite2") == Plan()
    # the variant's embedding map is scheduled like the first gallery's, and computed
    assert queued.jobs.get((lite2.key, "map", "backbone")) is not None
    assert lite2.embedding_map("backbone", fit=False) is None
    queued.jobs.run_pending()
    assert lite2.embedding_map("backbone", fit=False) is not None
    # SSP now has its gallery cached: only the training is left, then nothing
    assert [step.title for step in queued.plan_query_model(None, "ssp").steps] == [
        "trains the SSP query model"]
    built = queued.request_query_model(None, "ssp")
    queued.requests.run_pending()
    assert built.state == DONE and built.result.asymmetric
    assert queued.plan_query_model(None, "ssp") == Plan()
    fresh = Explorer(queued.extractor, device="cpu", cache_root=queued.cache_root,
                     allowed_roots=[queued.allowed_roots[0]], methods=["k_reciprocal"])
    fresh.ssp_config = TINY_SSP
    fresh.open_folder(base.gallery.root)
    assert fresh.plan_query_model(None, "ssp") == Plan()  # everything saved: instant


def test_ssp_on_a_gallery_smaller_than_its_anchors_is_refused_at_planning(queued: Explorer,
                                                                          small: Path) -> None:
    explorer = Explorer(queued.extractor, device="cpu", cache_root=queued.cache_root,
                        allowed_roots=[small], methods=["k_reciprocal"])
    explorer.open_folder(make_gallery(small / "few", per_class=1))
    with pytest.raises(InvalidInputError, match="at least 256 training images"):
        explorer.plan_query_model(None, "ssp")  # before indexing it with lite2


def test_an_uploaded_zip_keeps_its_file_name(queued: Explorer, small: Path,
                                             tmp_path: Path) -> None:
    source = make_gallery(tmp_path / "source", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "flowers"), "zip", source)
    session = queued.open_zip(archive)
    assert session.gallery.root.name != "flowers"  # content-addressed
    assert session.title == f"flowers.zip ({len(CLASSES)} images)"
    assert (session.title, session.key) in queued.choices()
    # reopened by another process, the name stays; a new upload of it may rename it
    fresh = Explorer(queued.extractor, device="cpu", cache_root=queued.cache_root,
                     allowed_roots=[small])
    reopened = fresh.open_folder(session.gallery.root, check_allowed=False)
    assert reopened.title == session.title
    assert fresh.open_zip(archive, name="spring.zip").title == (
        f"spring.zip ({len(CLASSES)} images)")
    root = fresh.extract_upload(archive, name="summer.zip")
    assert fresh.plan_gallery(root, check_allowed=False) == Plan()  # cached
    assert fresh.open_folder(root, check_allowed=False).title.startswith("summer.zip")
