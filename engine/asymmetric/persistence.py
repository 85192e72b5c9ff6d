"""SSP's saved state, in the engine's one layout (`engine.core.state`): the trained modules'
weights and the anchors as tensors, and a manifest with both models' feature fingerprints, the
training-set fingerprint, the PQ config and the hyperparameters. On load, any damage or mismatch
with what the caller expects raises CacheError, so the caller retrains instead of using a wrong
model."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.asymmetric.anchors import PQ_ITERATIONS, PQ_RESTARTS
from engine.asymmetric.config import SSPConfig
from engine.asymmetric.network import QueryNetwork, frozen_stages, query_extractor
from engine.asymmetric.training import (
    COLOR_JITTER,
    COLOR_JITTER_P,
    CROP_SCALE,
    MOMENTUM,
    WARMUP_START,
    WEIGHT_DECAY,
)
from engine.core.state import load_state, save_state
from engine.core.storage import fingerprint
from engine.errors import CacheError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from engine.asymmetric.model import QueryModel
    from engine.features.backbone import FeatureMeta

STATE_KIND = "ssp"
STATE_VERSION = 2           # 2: the layout of engine.core.state (1: its own manifest)


def training_fingerprint(gallery_features: np.ndarray) -> str:
    """Identifies a training set by its gallery-model features (same images, same features)."""
    array = np.ascontiguousarray(gallery_features, np.float32)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def state_key(config: SSPConfig, query_meta: FeatureMeta, gallery_meta: FeatureMeta,
              training: str) -> str:
    """The saved state's file name: everything the trained model depends on."""
    return fingerprint({"version": STATE_VERSION, "query": query_meta.fingerprint,
                        "gallery": gallery_meta.fingerprint, "training": training,
                        "config": config.as_dict()})


@dataclass(frozen=True)
class SavedQueryModel:
    """What `read_query_model` verified and rebuilt: the network with its trained weights, how
    it was made, and the manifest (training time, losses, details)."""

    network: QueryNetwork
    config: SSPConfig
    query_meta: FeatureMeta
    transform: Callable[[Any], torch.Tensor]
    gallery_meta: FeatureMeta
    anchors: np.ndarray
    training_fingerprint: str
    manifest: dict[str, Any]


def save_query_model(model: QueryModel, path: str | Path) -> None:
    """Save `model` at `path` with `engine.core.state.save_state`: the trained modules'
    weights and the anchors in `path`.safetensors, the manifest in `path`.json."""
    split = 0 if _saves_everything(model.query_meta) else _frozen_stages_of(model)
    prefixes = sorted(model.network.trained_modules(split))
    tensors = {f"network.{name}": value for name, value in model.network.state_dict().items()
               if any(name == p or name.startswith(p + ".") for p in prefixes)}
    tensors["anchors"] = model.anchors
    save_state(path, kind=STATE_KIND, version=STATE_VERSION, fingerprint=model.fingerprint,
               tensors=tensors, metadata={
                   "query_meta": model.query_meta.to_dict(),
                   "query_fingerprint": model.query_meta.fingerprint,
                   "gallery_meta": model.gallery_meta.to_dict(),
                   "gallery_fingerprint": model.gallery_meta.fingerprint,
                   "training_fingerprint": model.training_fingerprint,
                   "pq": {"subspaces": model.config.subspaces,
                          "centroids": model.config.centroids, "dim": model.dim,
                          "iterations": PQ_ITERATIONS, "restarts": PQ_RESTARTS,
                          "seed": model.config.seed},
                   "config": model.config.as_dict(),
                   "hyperparameters": {"optimiser": "SGD", "nesterov": True,
                                       "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                                       "warmup_start": WARMUP_START,
                                       "schedule": "linear warm-up, cosine to 0",
                                       "crop_scale": list(CROP_SCALE),
                                       "color_jitter": list(COLOR_JITTER),
                                       "color_jitter_p": COLOR_JITTER_P},
                   "saved_prefixes": prefixes,
                   "train_seconds": model.train_seconds,
                   "losses": model.losses,
                   "details": model.details,
               })


def read_query_model(path: str | Path, *, gallery_meta: FeatureMeta | None = None,
                     training_fingerprint: str | None = None,
                     config: SSPConfig | None = None) -> SavedQueryModel:
    """Read a saved query model; raise CacheError when it is missing or damaged (see
    `engine.core.state.load_state`), or when it was made with another query backbone (weights,
    preprocessing), another gallery model, other training images or another config than the
    ones given."""
    from engine.features.backbone import FeatureMeta

    try:
        state = load_state(path, kind=STATE_KIND, version=STATE_VERSION, fingerprint=None)
        manifest, tensors = state.manifest, dict(state.tensors)
        saved_config = SSPConfig(**manifest["config"])
        if config is not None and saved_config != config:
            raise CacheError("it was trained with another SSP config")
        saved_gallery = FeatureMeta(**{
            **manifest["gallery_meta"],
            **{key: tuple(manifest["gallery_meta"][key])
               for key in ("input_size", "mean", "std")}})
        if saved_gallery.fingerprint != manifest["gallery_fingerprint"]:
            raise CacheError("the manifest's gallery meta does not match its fingerprint")
        if gallery_meta is not None and gallery_meta.fingerprint != saved_gallery.fingerprint:
            raise CacheError(
                f"it targets gallery features {saved_gallery.fingerprint} "
                f"({saved_gallery.backbone}), not {gallery_meta.fingerprint} "
                f"({gallery_meta.backbone})")
        if (training_fingerprint is not None
                and manifest["training_fingerprint"] != training_fingerprint):
            raise CacheError("it was trained on other images")
        extractor = query_extractor(saved_config)
        if extractor.meta.fingerprint != manifest["query_fingerprint"]:
            raise CacheError(
                f"the query backbone {saved_config.query_backbone} now has other weights "
                "or preprocessing than when it was trained")
        anchors = tensors.pop("anchors").numpy()
        pq = manifest["pq"]
        if anchors.shape != (pq["subspaces"], pq["centroids"],
                             saved_gallery.dim // pq["subspaces"]):
            raise CacheError(f"anchors of shape {anchors.shape} do not fit the PQ config")
        network = QueryNetwork(copy.deepcopy(extractor.model).float(), saved_gallery.dim,
                               saved_config.gem_p)
        state_dict = network.state_dict()
        prefixes = manifest["saved_prefixes"]
        expected = {name for name in state_dict
                    if any(name == p or name.startswith(p + ".") for p in prefixes)}
        loaded = {name.removeprefix("network."): value for name, value in tensors.items()}
        if set(loaded) != expected:
            raise CacheError("the weights file holds other tensors than the network's")
        network.load_state_dict(loaded, strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as error:
        raise CacheError(f"the saved SSP query model {path} is unusable ({error})"
                         ) from error
    return SavedQueryModel(network, saved_config, extractor.meta, extractor.transform,
                           saved_gallery, anchors, manifest["training_fingerprint"], manifest)


def _saves_everything(query_meta: FeatureMeta) -> bool:
    """Random-init trunks cannot be rebuilt from their weights id: save the whole network."""
    return query_meta.weights == "random-init"


def _frozen_stages_of(model: QueryModel) -> int:
    """The number of frozen stages of the trained model (0 when everything trained)."""
    if model.details.get("mode") == "cached":
        return frozen_stages(model.network, model.config)
    return 0
