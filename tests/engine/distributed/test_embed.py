"""Embedding on a local Ray cluster: the single-process extractor's features, resume by shard,
bad files skipped and listed. Skipped where Ray is not installed (requirements-scale.txt),
except where RETRIEVAL_EXPLORER_REQUIRE_RAY is set (CI installs Ray and sets it: a missing Ray
is then a failure, not a silent skip)."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.distributed import embed_folder, merge_shards, read_manifest
from engine.distributed.embed import actor_resources, local_runtime_env
from engine.distributed.shards import SHARDS_FOLDER
from engine.features.backbone import FeatureExtractor
from engine.search.features_file import load_features_file
from tests.galleries import make_gallery

ray = (importlib.import_module("ray") if os.environ.get("RETRIEVAL_EXPLORER_REQUIRE_RAY")
       else pytest.importorskip(
           "ray", reason="Ray is an optional extra: pip install -r requirements-scale.txt"))

PER_CLASS = 3
SHARD_SIZE = 3
BAD_FILES = ("corrupt.jpg", "notes.jpg")
# Unit rows in float32: the cluster embeds with another batch split and thread count, so each
# reduction in the network sums in another order; each output moves by a few ulps (2**-23 at
# 1.0; measured 1.6e-7 on components up to 0.27). 32 ulps at 1.0 leaves room, and is far below
# what another backbone, weights or preprocessing changes (1e-2 and more).
TOLERANCE = 32 * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=local_runtime_env(),
             logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 demo images of 3 classes (labels.csv), a truncated JPEG and a text file named .jpg."""
    root = make_gallery(tmp_path_factory.mktemp("big") / "images", per_class=PER_CLASS)
    first = sorted(root.glob("image_*.jpg"))[0]
    (root / BAD_FILES[0]).write_bytes(first.read_bytes()[:3000])
    (root / BAD_FILES[1]).write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def first_run(cluster, folder: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    return out, embed_folder(folder, out, shard_size=SHARD_SIZE, batch_size=2, actors=2)


def test_the_cluster_embeds_as_one_process(first_run, folder):
    out, summary = first_run
    assert (summary.shards, summary.written, summary.reused) == (4, 4, 0)
    assert summary.files == 3 * PER_CLASS + 2 and summary.embedded == 3 * PER_CLASS
    merged = load_features_file(merge_shards(out))
    names = sorted(path.name for path in folder.glob("image_*.jpg"))
    assert merged.names == names
    expected, kept, failures = FeatureExtractor(device="cpu").embed_files(
        [folder / name for name in names])
    assert kept == list(range(len(names))) and not failures
    assert merged.features.dtype == np.float32 and merged.features.shape == expected.shape
    np.testing.assert_allclose(merged.features, expected, rtol=0, atol=TOLERANCE)
    assert merged.class_names == ["daffodil", "snowdrop", "lily_valley"]
    assert merged.labels.tolist() == [0] * PER_CLASS + [1] * PER_CLASS + [2] * PER_CLASS


def test_bad_files_are_skipped_and_listed(first_run):
    out, summary = first_run
    assert sorted(summary.skipped) == sorted(BAD_FILES)
    assert "truncated or corrupt" in summary.skipped["corrupt.jpg"]
    assert "not a recognised image" in summary.skipped["notes.jpg"]
    manifest = read_manifest(out)
    assert manifest.skipped == summary.skipped
    assert len(manifest.files) == summary.files and len(manifest.shards) == summary.shards
    assert not set(BAD_FILES) & set(load_features_file(merge_shards(out)).names)


def test_a_second_run_recomputes_only_the_missing_shard(first_run, folder):
    out, _ = first_run
    before = load_features_file(merge_shards(out)).features.copy()
    shards = sorted((out / SHARDS_FOLDER).glob("*.npz"))
    assert len(shards) == 4
    shards[1].unlink()
    unchanged = {path: path.stat().st_mtime_ns for path in shards if path != shards[1]}
    summary = embed_folder(folder, out, shard_size=SHARD_SIZE, batch_size=2, actors=1)
    assert (summary.written, summary.reused) == (1, 3)
    assert summary.embedded == SHARD_SIZE and sorted(summary.skipped) == sorted(BAD_FILES)
    assert shards[1].is_file()
    assert {path: path.stat().st_mtime_ns for path in unchanged} == unchanged
    np.testing.assert_allclose(load_features_file(merge_shards(out)).features, before, rtol=0,
                               atol=TOLERANCE)
    again = embed_folder(folder, out, shard_size=SHARD_SIZE)
    assert (again.written, again.reused, again.embedded) == (0, 4, 0)


def test_actor_resources_take_gpus_else_a_share_of_the_cpus():
    assert actor_resources({"CPU": 2.0}, 2) == (2, {"num_cpus": 0.5})
    assert actor_resources({"CPU": 2.0}, None) == (1, {"num_cpus": 1.0})
    assert actor_resources({"CPU": 16.0, "GPU": 4.0}, None) == (4, {"num_gpus": 1,
                                                                    "num_cpus": 1.0})


def test_a_copy_of_the_folder_elsewhere_reuses_nothing(first_run, folder, tmp_path):
    """Keys hold file sizes and mtimes: copied files (new mtimes) are embedded again."""
    copy = Path(shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copy))
    out, _ = first_run
    plans_out = tmp_path / "out"
    shutil.copytree(out / SHARDS_FOLDER, plans_out / SHARDS_FOLDER)
    summary = embed_folder(copy, plans_out, shard_size=SHARD_SIZE, batch_size=4)
    assert (summary.written, summary.reused) == (4, 0)
