"""Embed an image folder on a Ray cluster: a Dataset of file paths, an actor pool of backbones.

The driver lists the folder and plans the shards (`engine.distributed.shards`), keeps the ones
already written, and streams the files of the others through `Dataset.map_batches` with
`EmbedBatch`, a callable class that loads the backbone once per actor and embeds with
`FeatureExtractor.embed_files` (the same decoding, preprocessing and model as one process, so
the features are the single-process extractor's). The driver writes each shard as soon as all
its files have come back, so a killed run loses only the shards in flight.

Actors take one GPU each when the cluster has GPUs, else a fraction of a CPU, so that on a small
machine the pool never waits for a CPU that the driver or a read task holds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.distributed.shards import (
    DEFAULT_SHARD_SIZE,
    ShardPlan,
    plan_shards,
    reused_shard,
    write_manifest,
    write_shard,
)
from engine.errors import InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
REPO_ROOT = Path(__file__).resolve().parents[2]

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbedSummary:
    """What a run did: shards in all, written now and reused, files embedded now, skipped
    files with reasons (this run's and the reused shards'), and the images per second of the
    files embedded now."""

    out: Path
    shards: int
    written: int
    reused: int
    files: int
    embedded: int
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def import_ray() -> Any:
    """`ray` with Ray Data, or MissingDependencyError saying what to install."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise MissingDependencyError(
            "distributed embedding needs Ray Data: pip install -r requirements-scale.txt"
        ) from error
    return ray


def local_runtime_env() -> dict[str, Any]:
    """The runtime env of a local cluster: workers import `engine` from this checkout."""
    path = os.environ.get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)}}


class EmbedBatch:
    """The actors' callable: loads the backbone once, then embeds batches of file paths.

    A batch is {"path", "name", "shard"} arrays; the result adds `feature` (n, dim) float32
    (zeros for a skipped file) and `error` ("" or why the file was skipped).
    """

    def __init__(self, backbone: str, weights: str, meta_fingerprint: str,
                 batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 1) -> None:
        import torch

        from engine.features.backbone import FeatureExtractor

        torch.set_num_threads(max(1, threads))
        self.extractor = FeatureExtractor(backbone, weights, device="auto",
                                          batch_size=batch_size, workers=1)
        if self.extractor.meta.fingerprint != meta_fingerprint:
            raise InvalidInputError(
                f"the backbone {backbone} on this node is not the driver's (weights "
                f"{self.extractor.meta.weights}); install the same weights on every node")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(path) for path in batch["path"].tolist()]
        features, kept, failures = self.extractor.embed_files(paths)
        rows = np.zeros((len(paths), self.extractor.dim), np.float32)
        rows[kept] = features
        errors = np.array([failures.get(i, "") for i in range(len(paths))], dtype=str)
        return {"name": batch["name"], "shard": batch["shard"], "feature": rows,
                "error": errors}


def embed_folder(folder: str | os.PathLike, out: str | os.PathLike, *,
                 backbone: str | None = None, weights: str = "auto", address: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, actors: int | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, num_cpus: int | None = None,
                 progress: ProgressCallback | None = None) -> EmbedSummary:
    """Embed `folder`'s images into shards under `out`, skipping shards already written.

    Args:
        folder: the image folder; on a cluster, a path every node reads (shared storage).
        out: the output folder (the driver writes it): shards and manifest.json.
        backbone, weights: as `FeatureExtractor` (default the engine's backbone, packaged
            weights; every node must have the same weights).
        address: a Ray cluster ("auto", "ray://host:10001"); None: $RAY_ADDRESS, else an
            already initialised Ray, else a local cluster of `num_cpus` CPUs (default all).
        batch_size: files per `map_batches` call. actors: the pool's size (default: one per
            GPU, else one per CPU but one). shard_size: files per shard.
        progress: called with (files done, files to embed) as results come back.

    Returns:
        The run's `EmbedSummary`.

    Raises:
        MissingDependencyError: Ray is not installed. InvalidInputError: bad arguments or
        folder. EmptyGalleryError: the folder has no image files.
    """
    from engine.features.backbone import DEFAULT_BACKBONE, FeatureExtractor

    for name, value in (("batch_size", batch_size), ("actors", actors), ("num_cpus", num_cpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    ray = import_ray()
    root = Path(folder).resolve()
    out = Path(out).resolve()
    backbone = backbone or DEFAULT_BACKBONE
    # The driver's backbone fixes the meta that keys the shards (and checks every actor's).
    meta = FeatureExtractor(backbone, weights, device="cpu", batch_size=1, workers=1).meta
    plans = plan_shards(root, meta, shard_size)
    skipped: dict[str, str] = {}
    todo = []
    for plan in plans:
        reused = reused_shard(out, plan, meta.fingerprint)
        if reused is None:
            todo.append(plan)
        else:
            skipped.update(reused)
    started_ray = _connect(ray, address, num_cpus)
    try:
        started = time.perf_counter()
        embedded, new_skips = _run(ray, root, out, todo, meta, backbone, weights, batch_size,
                                   actors, progress)
        seconds = time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()
    skipped.update(new_skips)
    write_manifest(out, root, meta, plans, skipped)
    summary = EmbedSummary(out=out, shards=len(plans), written=len(todo),
                           reused=len(plans) - len(todo),
                           files=sum(len(plan.names) for plan in plans), embedded=embedded,
                           skipped=skipped, seconds=seconds if todo else 0.0)
    logger.info("%s: %d shards (%d written, %d reused), %d files, %d skipped", out,
                summary.shards, summary.written, summary.reused, summary.files, len(skipped))
    return summary


def _connect(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to `address`, $RAY_ADDRESS or a running Ray, else start a local cluster;
    True when this call started Ray (and must shut it down)."""
    if ray.is_initialized():
        if address is not None:
            logger.info("Ray is already initialised; ignoring address %s", address)
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=local_runtime_env())
    return True


def actor_resources(cluster: dict[str, float], actors: int | None) -> tuple[int, dict[str, float]]:
    """The pool's size and each actor's resources: one GPU per actor when the cluster has GPUs,
    else an equal share of all CPUs but one (at most one CPU, at least a quarter)."""
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    if gpus > 0:
        size = actors or gpus
        return size, {"num_gpus": 1, "num_cpus": min(1.0, max(0.25, (cpus - 1) / size))}
    size = actors or max(1, int(cpus) - 1)
    return size, {"num_cpus": min(1.0, max(0.25, (cpus - 1) / size))}


def _run(ray: Any, root: Path, out: Path, todo: list[ShardPlan], meta: Any, backbone: str,
         weights: str, batch_size: int, actors: int | None,
         progress: ProgressCallback | None) -> tuple[int, dict[str, str]]:
    """Embed the files of `todo` on the cluster, writing each shard when it is complete;
    returns the files embedded and the skipped ones with their reasons."""
    if not todo:
        return 0, {}
    size, resources = actor_resources(ray.cluster_resources(), actors)
    threads = max(1, math.floor(resources["num_cpus"]))
    logger.info("embedding %d shards with %d actors (%s each)", len(todo), size, resources)
    items = [{"path": str(root / name), "name": name, "shard": plan.index}
             for plan in todo for name in plan.names]
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items),
                                                                 max(len(todo), size * 2)))
    embedded_rows = dataset.map_batches(
        EmbedBatch, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"backbone": backbone, "weights": weights,
                               "meta_fingerprint": meta.fingerprint, "batch_size": batch_size,
                               "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=size), **resources)
    by_index = {plan.index: plan for plan in todo}
    features: dict[int, dict[str, np.ndarray]] = {plan.index: {} for plan in todo}
    skipped: dict[int, dict[str, str]] = {plan.index: {} for plan in todo}
    done = embedded = 0
    lost: dict[str, str] = {}
    for batch in embedded_rows.iter_batches(batch_size=None, batch_format="numpy"):
        complete = set()
        for name, shard, row, error in zip(batch["name"].tolist(), batch["shard"].tolist(),
                                           batch["feature"], batch["error"].tolist(),
                                           strict=True):
            if error:
                skipped[shard][name] = error
            else:
                features[shard][name] = np.array(row, np.float32)
                embedded += 1
            complete.add(shard)
        done += len(batch["name"])
        for shard in complete:
            plan = by_index[shard]
            if len(features[shard]) + len(skipped[shard]) == len(plan.names):
                lost.update(skipped[shard])
                write_shard(out, plan, meta, features.pop(shard), skipped.pop(shard))
                logger.info("wrote %s", plan.file_name)
        if progress is not None:
            progress(done, len(items))
    if features:
        raise InvalidInputError(f"{len(features)} shards did not come back whole from the "
                                "cluster; run again to embed them")
    return embedded, lost

