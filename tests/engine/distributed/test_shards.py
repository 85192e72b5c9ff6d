"""Shards without Ray: the plan, the keys, writing, reading, resuming and merging."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from engine.distributed.shards import (
    MANIFEST_FILE,
    merge_shards,
    plan_shards,
    read_manifest,
    read_shard,
    reused_shard,
    shard_path,
    write_manifest,
    write_shard,
)
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError
from engine.features.backbone import FeatureMeta
from engine.search.features_file import load_features_file

META = FeatureMeta(backbone="toy", weights="none", input_size=(3, 8, 8),
                   interpolation="bicubic", crop_pct=1.0, crop_mode="center", mean=(0.5,) * 3,
                   std=(0.5,) * 3, pooling="avg", dim=4)


def toy_folder(root: Path, count: int = 7) -> Path:
    """`count` files a.jpg, b.jpg, ... in two class sub-folders (contents are not read)."""
    for number in range(count):
        folder = root / ("odd" if number % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{chr(97 + number)}.jpg").write_bytes(b"x" * (number + 1))
    return root


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, META.dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_all(root: Path, out: Path, shard_size: int, skip: tuple[str, ...] = ()) -> list:
    plans = plan_shards(root, META, shard_size)
    names = [name for plan in plans for name in plan.names]
    rows = dict(zip(names, unit_rows(len(names)), strict=True))
    for plan in plans:
        write_shard(out, plan, META, {n: rows[n] for n in plan.names if n not in skip},
                    {n: "not an image" for n in plan.names if n in skip})
    write_manifest(out, root, META, plans, {n: "not an image" for n in skip})
    return plans, rows


def test_plan_splits_the_sorted_listing_and_keys_each_shard(tmp_path):
    root = toy_folder(tmp_path / "images")
    plans = plan_shards(root, META, 3)
    assert [plan.names for plan in plans] == [
        ("even/a.jpg", "even/c.jpg", "even/e.jpg"), ("even/g.jpg", "odd/b.jpg", "odd/d.jpg"),
        ("odd/f.jpg",)]
    assert len({plan.key for plan in plans}) == 3
    assert [plan.key for plan in plan_shards(root, META, 3)] == [plan.key for plan in plans]
    other = FeatureMeta(**{**META.to_dict(), "weights": "sha256:other"})
    assert not {p.key for p in plan_shards(root, other, 3)} & {p.key for p in plans}
    (root / "odd" / "d.jpg").write_bytes(b"changed, longer")
    changed = plan_shards(root, META, 3)
    assert [p.key == q.key for p, q in zip(plans, changed, strict=True)] == [True, False, True]


def test_plan_refuses_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="shard_size"):
        plan_shards(toy_folder(tmp_path / "a"), META, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyGalleryError):
        plan_shards(tmp_path / "empty", META, 4)
    with pytest.raises(InvalidInputError, match="not a folder"):
        plan_shards(tmp_path / "missing", META, 4)


def test_shards_round_trip_and_resume_only_what_is_missing_or_stale(tmp_path):
    root, out = toy_folder(tmp_path / "images"), tmp_path / "out"
    plans, rows = write_all(root, out, 3, skip=("odd/b.jpg",))
    features, names, skipped = read_shard(out, plans[1], META.fingerprint)
    assert names == ["even/g.jpg", "odd/d.jpg"] and skipped == {"odd/b.jpg": "not an image"}
    np.testing.assert_array_equal(features, np.stack([rows[n] for n in names]))
    assert [reused_shard(out, plan, META.fingerprint) is not None for plan in plans] == [True] * 3
    shard_path(out, plans[0]).unlink()
    damaged = shard_path(out, plans[2])
    damaged.write_bytes(damaged.read_bytes()[:-20])
    assert [reused_shard(out, plan, META.fingerprint) is not None for plan in plans] == [
        False, True, False]
    with pytest.raises(CacheError, match="another backbone"):
        read_shard(out, plans[1], "other fingerprint")


def test_a_shard_must_account_for_every_file(tmp_path):
    root = toy_folder(tmp_path / "images")
    plan = plan_shards(root, META, 3)[0]
    with pytest.raises(InvalidInputError, match="lacks 1 files"):
        write_shard(tmp_path / "out", plan, META, {n: unit_rows(1)[0] for n in plan.names[:2]},
                    {})


def test_merge_writes_a_features_file_with_sub_folder_labels(tmp_path):
    root, out = toy_folder(tmp_path / "images"), tmp_path / "out"
    _, rows = write_all(root, out, 3, skip=("odd/b.jpg",))
    manifest = read_manifest(out)
    assert manifest.skipped == {"odd/b.jpg": "not an image"} and len(manifest.files) == 7
    assert [entry["files"] for entry in manifest.shards] == [3, 3, 1]
    loaded = load_features_file(merge_shards(out))
    expected = [n for n in sorted(rows) if n != "odd/b.jpg"]
    assert loaded.names == expected
    np.testing.assert_array_equal(loaded.features, np.stack([rows[n] for n in expected]))
    assert loaded.class_names == ["even", "odd"]
    assert loaded.labels.tolist() == [0 if n.startswith("even") else 1 for n in expected]


def test_merge_takes_labels_csv_and_needs_every_shard(tmp_path):
    root, out = toy_folder(tmp_path / "images"), tmp_path / "out"
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["file", "label", "class_name"], ["even/a.jpg", "1", "one"],
                          ["odd/b.jpg", "2", "two"]])
    plans, _ = write_all(root, out, 4)
    loaded = load_features_file(merge_shards(out, tmp_path / "merged.npz"))
    assert loaded.class_names == ["one", "two"]
    assert loaded.labels.tolist() == [0, -1, -1, -1, 1, -1, -1]
    shard_path(out, plans[1]).unlink()
    with pytest.raises(CacheError, match="missing"):
        merge_shards(out)


def test_merge_without_a_manifest_says_what_to_run(tmp_path):
    with pytest.raises(InvalidInputError, match=r"engine\.distributed embed"):
        merge_shards(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": 99}')
    with pytest.raises(InvalidInputError, match="format"):
        read_manifest(tmp_path)
