"""SSP's trained query model: `QueryModel` (fit, embed, save, load) and `fit_or_load`, which
loads the saved model for these training images, gallery model and config, or trains and saves
one."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.asymmetric.anchors import train_anchors
from engine.asymmetric.config import SSPConfig
from engine.asymmetric.heads import init_head
from engine.asymmetric.losses import ssp_loss
from engine.asymmetric.network import QueryNetwork, frozen_stages, query_extractor
from engine.asymmetric.persistence import (
    read_query_model,
    save_query_model,
    state_key,
    training_fingerprint,
)
from engine.asymmetric.training import (
    ProgressCallback,
    cache_activations,
    train_cached,
    train_full,
    training_transform,
)
from engine.core.device import resolve_device
from engine.core.types import check_features
from engine.errors import CacheError, InvalidInputError

if TYPE_CHECKING:
    from engine.features.backbone import FeatureExtractor, FeatureMeta

logger = logging.getLogger(__name__)


class QueryModel:
    """A trained SSP query encoder: images in, features in the gallery model's space out.

    Build it with `fit_or_load` (or `QueryModel.fit` / `QueryModel.load`). `embed` takes paths,
    bytes or PIL images like `FeatureExtractor.embed` and applies lite0's evaluation transform.

    Attributes:
        config: the SSPConfig it was trained with.
        query_meta: FeatureMeta of the query backbone's extractor (its preprocessing, weights).
        gallery_meta: FeatureMeta of the gallery model whose space the features live in.
        anchors: (M, K, d / M) float32 unit PQ centroids.
        training_fingerprint: identifies the training images (via their gallery features).
        train_seconds: training time (as recorded when the state was made).
        losses: loss per epoch of the training run.
        fingerprint: identifies this query model (its saved state's key).
    """

    def __init__(self, network: QueryNetwork, config: SSPConfig, query_meta: FeatureMeta,
                 gallery_meta: FeatureMeta, anchors: np.ndarray, training_fingerprint: str,
                 transform: Callable[[Any], torch.Tensor], device: torch.device, *,
                 train_seconds: float | None = None, losses: Sequence[float] = (),
                 details: dict[str, Any] | None = None) -> None:
        self.network = network.to(device).eval()
        self.config = config
        self.query_meta = query_meta
        self.gallery_meta = gallery_meta
        self.anchors = anchors
        self.training_fingerprint = training_fingerprint
        self.transform = transform
        self.device = device
        self.train_seconds = train_seconds
        self.losses = list(losses)
        self.details = dict(details or {})
        self.loaded = False
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.gallery_meta.dim)

    @property
    def fingerprint(self) -> str:
        return state_key(self.config, self.query_meta, self.gallery_meta,
                         self.training_fingerprint)

    @property
    def parameter_count(self) -> int:
        """Parameters of the query network (trunk without classifier, and head)."""
        return sum(p.numel() for p in self.network.parameters())

    # -- inference -------------------------------------------------------------------------------
    def embed(self, images: Sequence[Any], progress: Callable[[int, int], None] | None = None,
              batch_size: int = 32) -> np.ndarray:
        """Embed query images (paths, bytes, PIL images or arrays); a bad image raises
        InvalidImageError.

        Returns:
            (n, dim) float32 L2-normalised rows in the gallery model's feature space.
        """
        from engine.features.images import load_image

        def prepare(chunk: Sequence[Any]) -> torch.Tensor:
            return torch.stack([self.transform(load_image(source)) for source in chunk])

        total = len(images)
        if total == 0:
            return np.zeros((0, self.dim), np.float32)
        starts = list(range(0, total, batch_size))
        outputs = []
        with ThreadPoolExecutor(1) as pool:
            ahead = [pool.submit(prepare, images[s:s + batch_size]) for s in starts[:1]]
            for number, start in enumerate(starts):
                if number + 1 < len(starts):
                    following = starts[number + 1]
                    ahead.append(pool.submit(prepare, images[following:following + batch_size]))
                batch = ahead[number].result().to(self.device)
                ahead[number] = None
                with self._lock, torch.inference_mode(), torch.autocast(
                        self.device.type, dtype=torch.bfloat16,
                        enabled=self.device.type == "cuda"):
                    outputs.append(self.network(batch).float().cpu().numpy())
                if progress is not None:
                    progress(min(start + batch_size, total), total)
        return np.ascontiguousarray(np.concatenate(outputs), dtype=np.float32)

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def fit(cls, training_images: Sequence[Any], gallery_features: np.ndarray,
            gallery_meta: FeatureMeta, config: SSPConfig | None = None, device: str = "auto",
            progress: ProgressCallback | None = None) -> QueryModel:
        """Train a query model (no saving; see `fit_or_load`).

        Args:
            training_images: n images (paths, bytes, PIL images).
            gallery_features: (n, d) float32 gallery-model features of the same images.
            gallery_meta: how those features were made (d = gallery_meta.dim).
        """
        config = config or SSPConfig()
        torch_device = resolve_device(device)
        targets = _check_training(training_images, gallery_features, gallery_meta, config)
        report = progress or (lambda fraction, message: None)
        started, cpu_started = time.perf_counter(), time.process_time()
        extractor = query_extractor(config)
        report(0.0, "SSP: training the PQ anchors")
        anchors = train_anchors(targets, config.subspaces, config.centroids, config.seed)
        torch.manual_seed(config.seed)
        network = QueryNetwork(copy.deepcopy(extractor.model).float(), gallery_meta.dim,
                               config.gem_p).to(torch_device).eval()
        transform_config = _transform_config(extractor.meta)
        train_transform = training_transform(transform_config, config.augment)
        anchor_tensor = torch.from_numpy(anchors)
        target_tensor = torch.from_numpy(targets)
        mode = config.mode_for(torch_device)
        details: dict[str, Any] = {"mode": mode, "device": str(torch_device),
                                   "n_training": len(training_images)}
        if mode == "cached":
            split = frozen_stages(network, config)
            cache = cache_activations(
                network, training_images, split, config.views, extractor.transform,
                train_transform, torch_device, config.seed,
                progress=lambda f, m: report(0.05 + 0.35 * f, m))
            details["cache_mib"] = cache.activations.numel() * 2 / 2**20
            details["cache_seconds"] = time.perf_counter() - started
            details["cache_cpu_seconds"] = time.process_time() - cpu_started
            if config.head_init != "random":
                clean = cache.activations[::cache.views]
                chunks = []
                for start in range(0, len(clean), 64):  # reported: a cancel stops here too
                    report(0.4, f"SSP: the head's initial map {start}/{len(clean)}")
                    with torch.inference_mode():
                        chunks.append(network.pooled(network.trained_part(
                            clean[start:start + 64].to(torch_device, torch.float32),
                            split)).cpu())
                details.update(init_head(network.projection, torch.cat(chunks).numpy(),
                                         targets, config.head_init))
            losses = train_cached(network, cache, target_tensor, anchor_tensor, config,
                                  torch_device, lambda f, m: report(0.4 + 0.6 * f, m))
        else:
            if config.head_init != "random":
                pooled = _pooled_features(network, training_images, extractor.transform,
                                          torch_device, report)
                details.update(init_head(network.projection, pooled, targets, config.head_init))
            losses = train_full(network, training_images, target_tensor, anchor_tensor,
                                train_transform, config, torch_device,
                                progress=lambda f, m: report(0.05 + 0.95 * f, m))
        seconds = time.perf_counter() - started
        # CPU time of all threads: with other jobs on the machine, wall time overstates cost
        details["cpu_seconds"] = time.process_time() - cpu_started
        report(1.0, f"SSP: trained in {seconds:.0f} s")
        logger.info("SSP query model trained in %.1f s (%s path, %d images, final loss %.4f)",
                    seconds, mode, len(training_images), losses[-1] if losses else float("nan"))
        return cls(network, config, extractor.meta, gallery_meta, anchors,
                   training_fingerprint(targets), extractor.transform, torch_device,
                   train_seconds=seconds, losses=losses, details=details)

    # -- state on disk ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `path`.safetensors (trained weights, anchors) and then `path`.json (manifest),
        each atomically; the manifest records the weights file's sha256."""
        save_query_model(self, path)

    @classmethod
    def load(cls, path: str | Path, *, gallery_meta: FeatureMeta | None = None,
             training_fingerprint: str | None = None, config: SSPConfig | None = None,
             device: str = "auto") -> QueryModel:
        """Load a saved query model; raise CacheError when it is missing or damaged, or when it
        was made with another query backbone (weights, preprocessing), another gallery model,
        other training images or another config than the ones given."""
        saved = read_query_model(path, gallery_meta=gallery_meta,
                                 training_fingerprint=training_fingerprint, config=config)
        manifest = saved.manifest
        model = cls(saved.network, saved.config, saved.query_meta, saved.gallery_meta,
                    saved.anchors, saved.training_fingerprint, saved.transform,
                    resolve_device(device), train_seconds=manifest.get("train_seconds"),
                    losses=manifest.get("losses", ()), details=manifest.get("details"))
        model.loaded = True
        return model


def _transform_config(meta: FeatureMeta) -> dict[str, Any]:
    return {"input_size": meta.input_size, "mean": meta.mean, "std": meta.std}


def _pooled_features(network: QueryNetwork, images: Sequence[Any],
                     transform: Callable[[Any], torch.Tensor], device: torch.device,
                     report: ProgressCallback, batch_size: int = 32) -> np.ndarray:
    """The head's inputs (GeM + L2 of the trunk) of the evaluation view of each image."""
    from engine.features.images import load_image

    pooled = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            report(0.0, f"SSP: the head's initial map {start}/{len(images)}")
            batch = torch.stack([transform(load_image(source))
                                 for source in images[start:start + batch_size]]).to(device)
            pooled.append(network.pooled(network.trained_part(
                network.frozen_part(batch, 0), 0)).cpu())
    return torch.cat(pooled).numpy()


def _check_training(training_images: Sequence[Any], gallery_features: Any,
                    gallery_meta: FeatureMeta, config: SSPConfig) -> np.ndarray:
    """Validate the training set; return the gallery features as (n, d) float32."""
    if training_images is None or len(training_images) == 0:
        raise InvalidInputError("SSP needs training images (none were given): pass the images "
                                "the query model should learn from")
    targets = check_features(gallery_features, "gallery features of the training images",
                             gallery_meta.dim, unit_norm=False)
    if len(targets) != len(training_images):
        raise InvalidInputError(f"{len(training_images)} training images but "
                                f"{len(targets)} rows of gallery features")
    if gallery_meta.dim % config.subspaces:
        raise InvalidInputError(f"SSPConfig.subspaces={config.subspaces} must divide the "
                                f"gallery dimension {gallery_meta.dim}")
    if len(targets) < config.centroids:
        raise InvalidInputError(f"SSP's anchors need at least {config.centroids} training "
                                f"images (one per PQ centroid), got {len(targets)}")
    return targets


ESTIMATE_BATCH = 4
"""Images per timed batch when estimating SSP's training time (`estimate_training_seconds`)."""


def saved_model_path(gallery_features: np.ndarray, state_dir: str | Path,
                     gallery_meta: FeatureMeta, config: SSPConfig | None = None) -> Path:
    """Where `fit_or_load` keeps the query model trained on images with these gallery-model
    features (a stem: the state is its .json and .safetensors)."""
    config = config or SSPConfig()
    targets = check_features(gallery_features, "gallery features of the training images",
                             gallery_meta.dim, unit_norm=False)
    key = state_key(config, query_extractor(config).meta, gallery_meta,
                    training_fingerprint(targets))
    return Path(state_dir) / "ssp" / key


def estimate_training_seconds(n_images: int, gallery_meta: FeatureMeta,
                              config: SSPConfig | None = None, device: str = "auto",
                              preparation_seconds: float = 0.0) -> float:
    """Seconds `QueryModel.fit` would take on `n_images` images here, from its config and the
    costs measured now on `ESTIMATE_BATCH` random images (after a warm-up) under the
    background thread budget that training runs under:

    - "cached" path: decoding (`preparation_seconds` an image) and the frozen stages' forward
      of `views` views of each image, the head's initial map (one forward of the trained
      stages an image), then `epochs` x `n_images` training steps of the trained stages (forward
      and backward, an image each).
    - "full" path: the head's initial map (one forward an image), then `epochs` x `n_images`
      steps of the whole network, each image decoded and augmented (on the loader's 4 threads,
      beside the model).

    PQ anchors and saving take under a second and are left out. About a second to measure.
    """
    from engine.core.threads import background_threads

    config = config or SSPConfig()
    torch_device = resolve_device(device)
    extractor = query_extractor(config)
    network = QueryNetwork(copy.deepcopy(extractor.model).float(), gallery_meta.dim,
                           config.gem_p).to(torch_device)
    images = torch.rand((ESTIMATE_BATCH, *extractor.meta.input_size), device=torch_device)
    targets = torch.nn.functional.normalize(
        torch.rand((ESTIMATE_BATCH, gallery_meta.dim), device=torch_device), dim=1)
    anchors = torch.nn.functional.normalize(torch.rand(
        (config.subspaces, config.centroids, gallery_meta.dim // config.subspaces),
        device=torch_device), dim=-1)
    mode = config.mode_for(torch_device)
    split = frozen_stages(network, config) if mode == "cached" else 0

    def timed(step: Callable[[], Any]) -> float:
        step()  # warm-up
        started = time.perf_counter()
        step()
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        return (time.perf_counter() - started) / ESTIMATE_BATCH

    with background_threads():
        network.eval()
        with torch.no_grad():  # not inference mode: the activations train below
            frozen = timed(lambda: network.frozen_part(images, split))
            activations = network.frozen_part(images, split).float()
            trained = timed(lambda: network.trained_part(activations, split))
        parameters = _trainable_for_estimate(network, split)
        optimiser = torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9)

        def train_step() -> None:
            with torch.autocast(torch_device.type, dtype=torch.bfloat16,
                                enabled=mode == "full" and torch_device.type == "cuda"):
                query = network.forward_from(activations if mode == "cached" else images,
                                             split)
            optimiser.zero_grad(set_to_none=True)
            ssp_loss(query, targets, anchors, config.temperature).backward()
            optimiser.step()

        step = timed(train_step)
    epochs_images = config.epochs * n_images
    if mode == "cached":
        return (n_images * (preparation_seconds + config.views * frozen + trained)
                + epochs_images * step)
    return n_images * (frozen + trained) + epochs_images * max(step, preparation_seconds / 4)


def _trainable_for_estimate(network: QueryNetwork, split: int) -> list[torch.nn.Parameter]:
    """requires_grad on the modules that train with `split` frozen stages, as `_set_trainable`
    does (the estimate's steps then do the same work as training's)."""
    network.requires_grad_(False)
    for module in network.trained_modules(split).values():
        module.requires_grad_(True)
    return [p for p in network.parameters() if p.requires_grad]


def fit_or_load(training_images: Sequence[Any], state_dir: str | Path, *,
                gallery_extractor: FeatureExtractor | None = None,
                gallery_features: np.ndarray | None = None,
                gallery_meta: FeatureMeta | None = None, config: SSPConfig | None = None,
                device: str = "auto", progress: ProgressCallback | None = None,
                retrain: bool = False) -> QueryModel:
    """The saved query model for these images, gallery model and config, else a trained one.

    Args:
        training_images: images the query model learns from (paths, bytes, PIL images);
            labels are never used.
        state_dir: folder of learned state (e.g. `Gallery.state_dir` of the gallery-model
            gallery); files go to `state_dir/ssp/<key>.{safetensors,json}`.
        gallery_extractor: the gallery model; embeds the training images when
            `gallery_features` is not given, and supplies `gallery_meta`.
        gallery_features: (n, d) gallery-model features of `training_images`, if at hand.
        gallery_meta: how `gallery_features` were made (default: `gallery_extractor.meta`).
        config: SSPConfig (default: the CPU recipe).
        progress: called with (fraction in [0, 1], message).
        retrain: ignore a saved state.
    Returns:
        the QueryModel (`loaded` tells whether it came from disk).
    """
    config = config or SSPConfig()
    if training_images is None or len(training_images) == 0:
        raise InvalidInputError("SSP needs training images (none were given)")
    meta = gallery_meta or (gallery_extractor.meta if gallery_extractor is not None else None)
    if meta is None:
        raise InvalidInputError("pass gallery_extractor or gallery_meta: SSP must know which "
                                "gallery model's space to learn")
    if gallery_features is None:
        if gallery_extractor is None:
            raise InvalidInputError("pass gallery_features or a gallery_extractor to make them")
        gallery_features = gallery_extractor.embed(
            training_images, lambda done, total: progress(0.0, f"SSP: embedding the training "
                                                               f"images {done}/{total}")
            if progress is not None else None)
    targets = _check_training(training_images, gallery_features, meta, config)
    training = training_fingerprint(targets)
    query_meta = query_extractor(config).meta
    path = Path(state_dir) / "ssp" / state_key(config, query_meta, meta, training)
    if not retrain and path.with_suffix(".json").is_file():
        try:
            model = QueryModel.load(path, gallery_meta=meta, training_fingerprint=training,
                                    config=config, device=device)
            logger.info("loaded the SSP query model %s", path.name)
            return model
        except CacheError as error:
            logger.warning("retraining the SSP query model: %s", error)
    model = QueryModel.fit(training_images, targets, meta, config, device, progress)
    model.save(path)
    return model
