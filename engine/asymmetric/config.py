"""SSP's configuration: how the query model is built and trained, validated on construction
and recorded in the saved state's manifest."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

QUERY_BACKBONE = "tf_efficientnet_lite0"
GALLERY_BACKBONE = "tf_efficientnet_lite2"
TRAINING_MODES = ("auto", "cached", "full")
HEAD_INITS = ("procrustes", "ridge", "random")


@dataclass(frozen=True)
class SSPConfig:
    """How the query model is built and trained (recorded in the saved state's manifest).

    subspaces: PQ subspaces M (must divide the gallery dimension). The authors use 32; with a
        few hundred training images, fewer and wider subspaces keep more of the structure of
        images unlike the training ones (label-free validation on held-out k-means clusters
        of the training images rose from M = 32 to M = 4 and was flat below), so 4 here.
    centroids: anchors per subspace K (a power of two; 256 = 8 bits as the authors).
    temperature: softmax temperature of the anchor similarities (0.1).
    gem_p: the fixed GeM exponent (3).
    training: "cached" (frozen early stages, cached activations; CPU), "full" (every layer from
        images, bf16 autocast; GPU) or "auto" (full on CUDA, cached otherwise).
    trainable_stages: cached path only: how many of lite0's last block stages train (with
        conv_head and the head); the stages before them are frozen and cached.
    views: cached path only: views cached per image, the evaluation view plus views - 1
        augmented ones.
    epochs: passes over the training images (one random view of each image per pass).
    warmup_epochs: linear warm-up from training.WARMUP_START x the peak rate, then cosine to 0.
    batch_size, learning_rate: SGD's (Nesterov, momentum 0.9, weight decay 1e-6).
    head_init: how the linear layer starts: "procrustes" (the orthogonal map that best takes the
        query model's pooled features of the training images to their gallery features, bias
        0), "ridge" (the closed-form ridge map, cross-validated alpha) or "random" (PyTorch's).
    train_head: train the linear layer (False keeps its initial map and trains the trunk only).
    freeze_bn: keep BatchNorm statistics frozen (train their affine weights only).
    augment: use the authors' augmentation (off: every view is the evaluation view).
    query_weights: lite0 weights ("auto" = the packaged ImageNet file; "none" for tests).
    seed: seeds PQ, augmentation, initialisation and batch order.
    """

    query_backbone: str = QUERY_BACKBONE
    query_weights: str = "auto"
    subspaces: int = 4
    centroids: int = 256
    temperature: float = 0.1
    gem_p: float = 3.0
    training: str = "auto"
    trainable_stages: int = 1
    views: int = 2
    epochs: int = 20
    warmup_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 0.05
    head_init: str = "procrustes"
    train_head: bool = True
    freeze_bn: bool = True
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints = ("subspaces", "centroids", "views", "epochs", "batch_size")
        for name in (*positive_ints, "trainable_stages", "warmup_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidInputError(f"SSPConfig.{name} must be an integer, got {value!r}")
            if value < (1 if name in positive_ints else 0):
                raise InvalidInputError(f"SSPConfig.{name} must be >= "
                                        f"{1 if name in positive_ints else 0}, got {value}")
        if self.centroids < 2 or self.centroids & (self.centroids - 1) or self.centroids > 65536:
            raise InvalidInputError(
                f"SSPConfig.centroids must be a power of two in [2, 65536], got {self.centroids}")
        for name in ("temperature", "gem_p", "learning_rate"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise InvalidInputError(f"SSPConfig.{name} must be a finite number > 0, "
                                        f"got {value!r}")
        for name in ("train_head", "freeze_bn", "augment"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidInputError(f"SSPConfig.{name} must be true or false, "
                                        f"got {getattr(self, name)!r}")
        if self.training not in TRAINING_MODES:
            raise InvalidInputError(f"SSPConfig.training must be one of {TRAINING_MODES}, "
                                    f"got {self.training!r}")
        if self.head_init not in HEAD_INITS:
            raise InvalidInputError(f"SSPConfig.head_init must be one of {HEAD_INITS}, "
                                    f"got {self.head_init!r}")
        if self.warmup_epochs > self.epochs:
            raise InvalidInputError(f"SSPConfig.warmup_epochs ({self.warmup_epochs}) exceeds "
                                    f"epochs ({self.epochs})")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mode_for(self, device: torch.device) -> str:
        """The training path this config takes on `device`."""
        if self.training != "auto":
            return self.training
        return "full" if device.type == "cuda" else "cached"
