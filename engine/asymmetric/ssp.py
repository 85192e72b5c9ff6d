"""SSP: structure similarity preservation for asymmetric retrieval (Wu, Wang, Zhou, Li;
arXiv 2403.00648). Not a re-ranker: it trains a light query encoder whose features live in the
space of a frozen, larger gallery encoder, so a phone-sized model can query a gallery indexed
with the big one.

1. Anchors: a product quantiser (M subspaces x K = 256 centroids) is trained with faiss on the
   gallery model's features of the training images; each centroid sub-vector is L2-normalised
   and frozen.
2. Loss (label-free): for each subspace m, with g_m and q_m the L2-normalised sub-vectors of the
   gallery and query features, KL(softmax(<g_m, c>/t) || softmax(<q_m, c>/t)) over the K
   anchors, t = 0.1, averaged over the batch and the subspaces, computed in float32.
3. Query model: `tf_efficientnet_lite0` trunk -> GeM (p = 3, fixed) -> L2 -> Linear to the gallery
   dimension -> L2 (the authors' head; lite0's conv_head already gives 1280 channels).
4. The linear head starts as the orthogonal Procrustes map from the query model's pooled
   features of the training images to their gallery features (closed form; a rotation keeps
   the geometry of images unlike the training ones far better than a least-squares map).
5. Training: SGD Nesterov (momentum 0.9, weight decay 1e-6), linear warm-up then cosine.
   "cached" (the CPU path): the early stages of lite0 are frozen and their activations cached
   once for a few augmented views of each image; the last stages, conv_head and the head train
   on those. "full" (the GPU path): the whole network trains from decoded, augmented images with
   bf16 autocast. Augmentation as the authors': RandomResizedCrop (scale 0.8-1) and
   ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8; the target is the gallery feature of the image.
   The default SSPConfig is the CPU recipe: M = 4 subspaces, the last block stage + conv_head +
   head trained for 20 epochs at lr 0.05 (batch 64, 2 warm-up epochs) on 2 cached views per image
   (the evaluation view and one augmented), BatchNorm statistics frozen.

Pitfalls of the authors' code that this avoids are listed in shared/methods/ssp.md (subspace
count hard-coded apart from the PQ's, centroids never assigned, fp16 logits).

The trained state (the trained modules' weights and the anchors in safetensors, a JSON manifest
with both models' feature fingerprints, the training-set fingerprint, the PQ config and the
hyperparameters) is written atomically and loaded instead of retraining; any mismatch retrains.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.device import resolve_device
from engine.core.storage import atomic_path, atomic_write_json, fingerprint, load_json, sha256_file
from engine.errors import CacheError, InvalidInputError

if TYPE_CHECKING:
    from engine.features.backbone import FeatureExtractor, FeatureMeta

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

STATE_VERSION = 1
QUERY_BACKBONE = "tf_efficientnet_lite0"
GALLERY_BACKBONE = "tf_efficientnet_lite2"
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
WARMUP_START = 0.1          # warm-up starts at 1/10 of the peak rate (the authors' 1e-4 -> 1e-3)
PQ_ITERATIONS = 10          # faiss k-means per subspace, as the authors
PQ_RESTARTS = 2
PQ_MAX_POINTS_PER_CENTROID = 1000
CROP_SCALE = (0.8, 1.0)
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_P = 0.8
TRAINING_MODES = ("auto", "cached", "full")
HEAD_INITS = ("procrustes", "ridge", "random")
RIDGE_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RIDGE_FOLDS = 5


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
    warmup_epochs: linear warm-up from WARMUP_START x the peak rate, then cosine to 0.
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


# -- math ----------------------------------------------------------------------------------------
def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of (B, C, H, W) activations over H, W, in float32: (B, C)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def anchor_log_probs(features: torch.Tensor, anchors: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Log soft-assignments of each feature's sub-vectors to the anchors, in float32.

    Args:
        features: (B, d); split into M sub-vectors of d / M, each L2-normalised.
        anchors: (M, K, d / M) unit sub-vectors.
    Returns:
        (B, M, K) log_softmax over K of <f_m, c_{m,k}> / temperature.
    """
    m, _, sub = anchors.shape
    if features.ndim != 2 or features.shape[1] != m * sub:
        raise InvalidInputError(f"features of shape {tuple(features.shape)} do not fit anchors "
                                f"of {m} subspaces x {sub} dimensions")
    with torch.autocast(features.device.type, enabled=False):
        parts = F.normalize(features.float().reshape(features.shape[0], m, sub), dim=-1)
        logits = torch.einsum("bms,mks->bmk", parts, anchors.float()) / temperature
        return torch.log_softmax(logits, dim=-1)


def ssp_loss(query: torch.Tensor, target: torch.Tensor, anchors: torch.Tensor,
             temperature: float = 0.1) -> torch.Tensor:
    """The structure-similarity loss: mean over batch and subspaces of KL(p_m || r_m), with
    p = soft assignment of the gallery feature `target` (no gradient) and r that of the query
    model's feature `query`, both (B, d). Returns a float32 scalar."""
    log_r = anchor_log_probs(query, anchors, temperature)
    with torch.no_grad():
        log_p = anchor_log_probs(target.detach(), anchors, temperature)
    with torch.autocast(query.device.type, enabled=False):
        return (log_p.exp() * (log_p - log_r)).sum(dim=-1).mean()


def train_anchors(features: np.ndarray, subspaces: int, centroids: int = 256, seed: int = 0
                  ) -> np.ndarray:
    """Product-quantiser codebooks of gallery-model features, as anchors.

    Args:
        features: (n, d) float32 gallery-model features, n >= centroids, finite.
        subspaces: M, must divide d.
        centroids: K per subspace, a power of two.
    Returns:
        (M, K, d / M) float32, every sub-vector of unit L2 norm.
    """
    from engine.search.index import _faiss

    array = _check_matrix(features, "anchor training features")
    n, dim = array.shape
    if subspaces < 1 or dim % subspaces:
        raise InvalidInputError(f"the PQ's {subspaces} subspaces must divide the feature "
                                f"dimension {dim} (e.g. 16, 32 or 64 for 1280)")
    if centroids < 2 or centroids & (centroids - 1):
        raise InvalidInputError(f"centroids per subspace must be a power of two, got {centroids}")
    if n < centroids:
        raise InvalidInputError(f"training the PQ anchors needs at least {centroids} images (one "
                                f"per centroid), got {n}: add images or lower `centroids`")
    faiss = _faiss()
    quantiser = faiss.ProductQuantizer(dim, subspaces, int(math.log2(centroids)))
    quantiser.cp.niter = PQ_ITERATIONS
    quantiser.cp.nredo = PQ_RESTARTS
    quantiser.cp.seed = int(seed)
    quantiser.cp.max_points_per_centroid = PQ_MAX_POINTS_PER_CENTROID
    quantiser.cp.min_points_per_centroid = 1  # few images per centroid is expected here
    quantiser.train(array)
    codebooks = faiss.vector_to_array(quantiser.centroids).reshape(
        subspaces, centroids, dim // subspaces)
    norms = np.linalg.norm(codebooks, axis=-1, keepdims=True)
    return (codebooks / np.maximum(norms, 1e-12)).astype(np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Closed-form ridge regression y ~ x W + b (intercept not penalised).

    Args:
        x: (n, d_in) float, y: (n, d_out) float.
        alpha: the penalty; None picks it from RIDGE_ALPHAS by RIDGE_FOLDS-fold cross-validated
            squared error (label-free: only x and y are used).
    Returns:
        W (d_in, d_out) float32, b (d_out,) float32, and the alpha used.
    """
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x64.ndim != 2 or y64.ndim != 2 or len(x64) != len(y64) or len(x64) == 0:
        raise InvalidInputError(f"ridge needs (n, d_in) and (n, d_out) arrays with the same n "
                                f"> 0, got {x64.shape} and {y64.shape}")

    def solve(xs: np.ndarray, ys: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
        x_mean, y_mean = xs.mean(axis=0), ys.mean(axis=0)
        xc, yc = xs - x_mean, ys - y_mean
        if len(xs) < xs.shape[1]:  # the dual form: an n x n system instead of d x d
            weights = xc.T @ np.linalg.solve(xc @ xc.T + penalty * np.eye(len(xs)), yc)
        else:
            weights = np.linalg.solve(xc.T @ xc + penalty * np.eye(xs.shape[1]), xc.T @ yc)
        return weights, y_mean - x_mean @ weights

    def held_out_errors(keep: np.ndarray, fold: np.ndarray) -> list[float]:
        """Squared error on `fold` of the ridge fitted on `keep`, for each of RIDGE_ALPHAS."""
        xs, ys = x64[keep], y64[keep]
        x_mean, y_mean = xs.mean(axis=0), ys.mean(axis=0)
        xc, yc, xf = xs - x_mean, ys - y_mean, x64[fold] - x_mean
        dual = len(xs) < xs.shape[1]  # predict through the kernel, never forming W
        gram = xc @ xc.T if dual else xc.T @ xc
        right = yc if dual else xc.T @ yc
        left = xf @ xc.T if dual else xf
        # left (G + a I)^-1 right, solved with the fold's few rows as right-hand sides
        identity = np.eye(len(gram))
        return [float(((np.linalg.solve(gram + penalty * identity, left.T).T @ right + y_mean
                        - y64[fold]) ** 2).sum()) for penalty in RIDGE_ALPHAS]

    if alpha is None:
        folds = min(RIDGE_FOLDS, len(x64))
        if folds < 2:
            alpha = RIDGE_ALPHAS[len(RIDGE_ALPHAS) // 2]
        else:
            order = np.random.default_rng(0).permutation(len(x64))
            errors = np.sum([held_out_errors(np.setdiff1d(order, fold), fold)
                             for fold in np.array_split(order, folds)], axis=0)
            alpha = RIDGE_ALPHAS[int(np.argmin(errors))]
    weights, bias = solve(x64, y64, float(alpha))
    return weights.astype(np.float32), bias.astype(np.float32), float(alpha)


def apply_ridge(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Map features with a fitted ridge and L2-normalise the rows: (n, d_out) float32."""
    mapped = np.asarray(x, np.float32) @ weights + bias
    return (mapped / np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
            ).astype(np.float32)


def fit_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Orthogonal Procrustes: the (d_in, d_out) matrix R with orthonormal rows or columns that
    minimises ||x R - y|| (R = U V^T from the SVD of x^T y); no centring, no scaling.

    A rotation keeps the query space's geometry, so it extrapolates to images unlike the
    training ones better than a least-squares map fitted on a few hundred of them.
    """
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x64.ndim != 2 or y64.ndim != 2 or len(x64) != len(y64) or len(x64) == 0:
        raise InvalidInputError(f"Procrustes needs (n, d_in) and (n, d_out) arrays with the "
                                f"same n > 0, got {x64.shape} and {y64.shape}")
    left, _, right = np.linalg.svd(x64.T @ y64, full_matrices=False)
    return (left @ right).astype(np.float32)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at `step` of `total`: linear from WARMUP_START to 1 over the
    first `warmup` steps, then cosine from 1 to 0."""
    if step < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _check_matrix(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    """(n, d) finite float32 (rows need not be unit norm)."""
    from engine.core.types import check_features

    return check_features(features, name, dim, unit_norm=False)


# -- the query network ---------------------------------------------------------------------------
class QueryNetwork(torch.nn.Module):
    """lite0 trunk -> GeM (fixed p) -> L2 -> Linear(trunk width, out_dim) -> L2.

    The trunk runs in two parts so the CPU path can cache the first: `frozen_part(x, split)`
    (stem and blocks[:split]) and `trained_part(a, split)` (blocks[split:], conv_head, bn2).
    """

    def __init__(self, trunk: torch.nn.Module, out_dim: int, gem_p: float) -> None:
        super().__init__()
        trunk.reset_classifier(0)
        self.trunk = trunk
        self.projection = torch.nn.Linear(int(trunk.num_features), out_dim)
        self.gem_p = float(gem_p)

    @property
    def n_stages(self) -> int:
        return len(self.trunk.blocks)

    def frozen_part(self, images: torch.Tensor, split: int) -> torch.Tensor:
        x = self.trunk.bn1(self.trunk.conv_stem(images))
        for stage in self.trunk.blocks[:split]:
            x = stage(x)
        return x

    def trained_part(self, activations: torch.Tensor, split: int) -> torch.Tensor:
        x = activations
        for stage in self.trunk.blocks[split:]:
            x = stage(x)
        return self.trunk.bn2(self.trunk.conv_head(x))

    def pooled(self, trunk_out: torch.Tensor) -> torch.Tensor:
        """The head's input: GeM then L2, (B, trunk width) float32."""
        return F.normalize(gem(trunk_out, self.gem_p), dim=1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(pooled).float(), dim=1)

    def forward_from(self, activations: torch.Tensor, split: int) -> torch.Tensor:
        return self.head(self.pooled(self.trained_part(activations, split)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.frozen_part(images, 0), 0)

    def trained_modules(self, split: int) -> dict[str, torch.nn.Module]:
        """The modules that train when the first `split` stages are frozen, by state-dict
        prefix."""
        modules: dict[str, torch.nn.Module] = {
            f"trunk.blocks.{i}": self.trunk.blocks[i] for i in range(split, self.n_stages)}
        if split == 0:
            modules.update({"trunk.conv_stem": self.trunk.conv_stem, "trunk.bn1": self.trunk.bn1})
        modules.update({"trunk.conv_head": self.trunk.conv_head, "trunk.bn2": self.trunk.bn2,
                        "projection": self.projection})
        return modules


def _train_transform(transform_config: dict[str, Any], augment: bool) -> Callable[[Any], Any]:
    """The authors' training augmentation at the query model's input size and normalisation."""
    from torchvision import transforms

    size = int(transform_config["input_size"][-1])
    steps = [transforms.RandomResizedCrop(size, scale=CROP_SCALE,
                                          interpolation=transforms.InterpolationMode.BICUBIC)]
    if augment:
        steps.append(transforms.RandomApply([transforms.ColorJitter(*COLOR_JITTER)],
                                            p=COLOR_JITTER_P))
    steps += [transforms.ToTensor(),
              transforms.Normalize(transform_config["mean"], transform_config["std"])]
    return transforms.Compose(steps)


def _split_for(network: QueryNetwork, config: SSPConfig) -> int:
    stages = network.n_stages
    if config.trainable_stages > stages:
        raise InvalidInputError(f"trainable_stages={config.trainable_stages} but "
                                f"{config.query_backbone} has {stages} block stages")
    return stages - config.trainable_stages


def _set_trainable(network: QueryNetwork, split: int, config: SSPConfig
                   ) -> list[torch.nn.Parameter]:
    """requires_grad on the trained modules only; BatchNorm in eval mode when frozen."""
    network.requires_grad_(False)
    for module in network.trained_modules(split).values():
        module.requires_grad_(True)
    if not config.train_head:
        network.projection.requires_grad_(False)
    parameters = [p for p in network.parameters() if p.requires_grad]
    freeze_bn = config.freeze_bn
    network.eval()
    if not freeze_bn:
        for module in network.trained_modules(split).values():
            module.train()
    return parameters


def _optimiser(parameters: list[torch.nn.Parameter], config: SSPConfig) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=config.learning_rate, momentum=MOMENTUM,
                           nesterov=True, weight_decay=WEIGHT_DECAY)


# -- the cached (CPU) path -----------------------------------------------------------------------
@dataclass
class ActivationCache:
    """Activations of the frozen stages for `views` views of each training image.

    activations: (n * views, C, H, W) float16 on the CPU, row i * views + v for image i, view v
    (v = 0 the evaluation view). split: the number of frozen block stages.
    """

    activations: torch.Tensor
    views: int
    split: int

    @property
    def n_images(self) -> int:
        return self.activations.shape[0] // self.views


def cache_activations(network: QueryNetwork, images: Sequence[Any], split: int, views: int,
                      eval_transform: Callable[[Any], torch.Tensor],
                      train_transform: Callable[[Any], torch.Tensor], device: torch.device,
                      seed: int = 0, batch_size: int = 32,
                      progress: ProgressCallback | None = None) -> ActivationCache:
    """Decode each image once, make its views (the evaluation view plus views - 1 augmented
    ones, seeded) and keep the frozen stages' output in float16 (the CPU path)."""
    from engine.features.images import load_image

    network.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    per_batch = max(1, batch_size // views)
    try:
        with ThreadPoolExecutor(1) as pool:
            decoded = [pool.submit(load_image, source) for source in images[:per_batch]]
            for position in range(len(images)):
                image = decoded[position].result()
                decoded[position] = None
                following = position + per_batch
                if following < len(images):
                    decoded.append(pool.submit(load_image, images[following]))
                pending.append(eval_transform(image))
                pending.extend(train_transform(image) for _ in range(views - 1))
                if len(pending) >= per_batch * views or position == len(images) - 1:
                    with torch.inference_mode():
                        batch = torch.stack(pending).to(device)
                        chunks.append(network.frozen_part(batch, split).to(
                            "cpu", torch.float16))
                    pending = []
                    if progress is not None:
                        progress((position + 1) / len(images),
                                 f"SSP: caching activations {position + 1}/{len(images)}")
    finally:
        torch.random.set_rng_state(generator_state)
    return ActivationCache(torch.cat(chunks), views, split)


class _TrainingLog:
    """The step schedule and loss log that the cached and the full training loops share:
    `total` steps (all epochs, or `max_steps`), warm-up then cosine learning rate, and the
    mean loss of each epoch (of each step when `max_steps` cuts training short)."""

    def __init__(self, n_images: int, config: SSPConfig, max_steps: int | None) -> None:
        per_epoch = math.ceil(n_images / config.batch_size)
        self.total = per_epoch * config.epochs if max_steps is None else min(
            max_steps, per_epoch * config.epochs)
        self.warmup = per_epoch * config.warmup_epochs
        self.learning_rate, self.per_step = config.learning_rate, max_steps is not None
        self.step = 0
        self.history: list[float] = []
        self.epoch_losses: list[float] = []

    def optimise(self, optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` at the schedule's learning rate."""
        for group in optimiser.param_groups:
            group["lr"] = self.learning_rate * lr_factor(self.step, self.total, self.warmup)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        self.epoch_losses.append(loss.item())
        self.step += 1
        if self.per_step:
            self.history.append(self.epoch_losses[-1])

    def end_epoch(self, progress: ProgressCallback | None) -> None:
        mean = float(np.mean(self.epoch_losses))
        if not self.per_step:
            self.history.append(mean)
            logger.debug("SSP epoch %d: loss %.5f", len(self.history), mean)
        if progress is not None:
            progress(self.step / self.total,
                     f"SSP: training step {self.step}/{self.total}, loss {mean:.4f}")
        self.epoch_losses = []


def train_cached(network: QueryNetwork, cache: ActivationCache, targets: torch.Tensor,
                 anchors: torch.Tensor, config: SSPConfig, device: torch.device,
                 progress: ProgressCallback | None = None, max_steps: int | None = None
                 ) -> list[float]:
    """Train blocks[cache.split:], conv_head and the head on cached activations.

    Each epoch visits every image once, through one of its cached views drawn at random.
    Returns the mean loss of each epoch (of each step when `max_steps` cuts training short).
    """
    parameters = _set_trainable(network, cache.split, config)
    optimiser = _optimiser(parameters, config)
    generator = torch.Generator().manual_seed(config.seed)
    n = cache.n_images
    log = _TrainingLog(n, config, max_steps)
    anchors, targets = anchors.to(device), targets.to(device)
    while log.step < log.total:
        order = torch.randperm(n, generator=generator)
        chosen = torch.randint(cache.views, (n,), generator=generator)
        for start in range(0, n, config.batch_size):
            if log.step >= log.total:
                break
            owners = order[start:start + config.batch_size]
            rows = owners * cache.views + chosen[owners]
            batch = cache.activations[rows].to(device, torch.float32)
            log.optimise(optimiser, ssp_loss(network.forward_from(batch, cache.split),
                                             targets[owners.to(device)], anchors,
                                             config.temperature))
        log.end_epoch(progress)
    network.requires_grad_(False).eval()
    return log.history


# -- the full (GPU) path -------------------------------------------------------------------------
def train_full(network: QueryNetwork, images: Sequence[Any], targets: torch.Tensor,
               anchors: torch.Tensor, train_transform: Callable[[Any], torch.Tensor],
               config: SSPConfig, device: torch.device, *, autocast: bool | None = None,
               progress: ProgressCallback | None = None, max_steps: int | None = None,
               workers: int = 4) -> list[float]:
    """Train every layer from decoded, augmented images (the GPU path).

    The forward runs under bf16 autocast (default: on CUDA), the loss in float32. Batches are
    decoded and augmented on `workers` threads one batch ahead of the model. Returns the mean
    loss of each epoch (of each step when `max_steps` cuts training short).
    """
    from engine.features.images import load_image

    use_autocast = device.type == "cuda" if autocast is None else autocast
    parameters = _set_trainable(network, 0, config)
    optimiser = _optimiser(parameters, config)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(images)
    log = _TrainingLog(n, config, max_steps)
    anchors, targets = anchors.to(device), targets.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        network.to(memory_format=torch.channels_last)

    def prepare(owners: torch.Tensor) -> torch.Tensor:
        return torch.stack([train_transform(load_image(images[int(i)])) for i in owners])

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)  # torchvision's random transforms draw from the global one
    with contextlib.ExitStack() as cleanup, ThreadPoolExecutor(max(1, workers)) as pool:
        cleanup.callback(torch.random.set_rng_state, generator_state)
        while log.step < log.total:
            order = torch.randperm(n, generator=generator)
            batches = [order[s:s + config.batch_size] for s in range(0, n, config.batch_size)]
            batches = batches[:log.total - log.step]
            ahead = [pool.submit(prepare, owners) for owners in batches[:1]]
            for number, owners in enumerate(batches):
                if number + 1 < len(batches):
                    ahead.append(pool.submit(prepare, batches[number + 1]))
                batch = ahead[number].result().to(device, non_blocking=True)
                ahead[number] = None
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    query = network(batch)
                log.optimise(optimiser, ssp_loss(query, targets[owners.to(device)], anchors,
                                                 config.temperature))
            log.end_epoch(progress)
    network.requires_grad_(False).eval()
    if channels_last:
        network.to(memory_format=torch.contiguous_format)
    return log.history


# -- the model -----------------------------------------------------------------------------------
def training_fingerprint(gallery_features: np.ndarray) -> str:
    """Identifies a training set by its gallery-model features (same images, same features)."""
    import hashlib

    array = np.ascontiguousarray(gallery_features, np.float32)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _query_extractor(config: SSPConfig) -> FeatureExtractor:
    """The shared CPU extractor of the query backbone: its meta, eval transform and weights."""
    from engine.features.backbone import get_extractor

    return get_extractor(config.query_backbone, config.query_weights, device="cpu")


def _saves_everything(query_meta: FeatureMeta) -> bool:
    """Random-init trunks cannot be rebuilt from their weights id: save the whole network."""
    return query_meta.weights == "random-init"


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
        extractor = _query_extractor(config)
        report(0.0, "SSP: training the PQ anchors")
        anchors = train_anchors(targets, config.subspaces, config.centroids, config.seed)
        torch.manual_seed(config.seed)
        network = QueryNetwork(copy.deepcopy(extractor.model).float(), gallery_meta.dim,
                               config.gem_p).to(torch_device).eval()
        transform_config = _transform_config(extractor.meta)
        train_transform = _train_transform(transform_config, config.augment)
        anchor_tensor = torch.from_numpy(anchors)
        target_tensor = torch.from_numpy(targets)
        mode = config.mode_for(torch_device)
        details: dict[str, Any] = {"mode": mode, "device": str(torch_device),
                                   "n_training": len(training_images)}
        if mode == "cached":
            split = _split_for(network, config)
            cache = cache_activations(
                network, training_images, split, config.views, extractor.transform,
                train_transform, torch_device, config.seed,
                progress=lambda f, m: report(0.05 + 0.35 * f, m))
            details["cache_mib"] = cache.activations.numel() * 2 / 2**20
            details["cache_seconds"] = time.perf_counter() - started
            details["cache_cpu_seconds"] = time.process_time() - cpu_started
            if config.head_init != "random":
                with torch.inference_mode():
                    clean = cache.activations[::cache.views]
                    pooled = torch.cat([
                        network.pooled(network.trained_part(
                            clean[s:s + 64].to(torch_device, torch.float32), split)).cpu()
                        for s in range(0, len(clean), 64)]).numpy()
                details.update(_init_head(network, pooled, targets, config.head_init))
            losses = train_cached(network, cache, target_tensor, anchor_tensor, config,
                                  torch_device, lambda f, m: report(0.4 + 0.6 * f, m))
        else:
            if config.head_init != "random":
                pooled = _pooled_features(network, training_images, extractor.transform,
                                          torch_device)
                details.update(_init_head(network, pooled, targets, config.head_init))
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
        each atomically; the manifest names the weights file's sha256."""
        from safetensors.torch import save_file

        path = Path(path)
        split = 0 if _saves_everything(self.query_meta) else _split_for_mode(self)
        prefixes = sorted(self.network.trained_modules(split))
        state = self.network.state_dict()
        tensors = {f"network.{name}": value.detach().cpu().contiguous()
                   for name, value in state.items()
                   if any(name == p or name.startswith(p + ".") for p in prefixes)}
        tensors["anchors"] = torch.from_numpy(np.ascontiguousarray(self.anchors))
        weights = path.with_suffix(".safetensors")
        weights.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as temporary:
            save_file(tensors, str(temporary))
        atomic_write_json(path.with_suffix(".json"), {
            "version": STATE_VERSION,
            "method": "ssp",
            "query_meta": self.query_meta.to_dict(),
            "query_fingerprint": self.query_meta.fingerprint,
            "gallery_meta": self.gallery_meta.to_dict(),
            "gallery_fingerprint": self.gallery_meta.fingerprint,
            "training_fingerprint": self.training_fingerprint,
            "pq": {"subspaces": self.config.subspaces, "centroids": self.config.centroids,
                   "dim": self.dim, "iterations": PQ_ITERATIONS, "restarts": PQ_RESTARTS,
                   "seed": self.config.seed},
            "config": self.config.as_dict(),
            "hyperparameters": {"optimiser": "SGD", "nesterov": True, "momentum": MOMENTUM,
                                "weight_decay": WEIGHT_DECAY, "warmup_start": WARMUP_START,
                                "schedule": "linear warm-up, cosine to 0",
                                "crop_scale": list(CROP_SCALE),
                                "color_jitter": list(COLOR_JITTER),
                                "color_jitter_p": COLOR_JITTER_P},
            "saved_prefixes": prefixes,
            "weights_sha256": sha256_file(weights),
            "train_seconds": self.train_seconds,
            "losses": self.losses,
            "details": self.details,
        })

    @classmethod
    def load(cls, path: str | Path, *, gallery_meta: FeatureMeta | None = None,
             training_fingerprint: str | None = None, config: SSPConfig | None = None,
             device: str = "auto") -> QueryModel:
        """Load a saved query model; raise CacheError when it is missing or damaged, or when it
        was made with another query backbone (weights, preprocessing), another gallery model,
        other training images or another config than the ones given."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from engine.features.backbone import FeatureMeta

        path = Path(path)
        weights, manifest_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if not (weights.is_file() and manifest_path.is_file()):
            raise CacheError(f"no saved SSP query model at {path}")
        manifest = load_json(manifest_path)
        try:
            if not isinstance(manifest, dict) or manifest.get("version") != STATE_VERSION:
                raise CacheError("the manifest has another format version")
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
            extractor = _query_extractor(saved_config)
            if extractor.meta.fingerprint != manifest["query_fingerprint"]:
                raise CacheError(
                    f"the query backbone {saved_config.query_backbone} now has other weights "
                    "or preprocessing than when it was trained")
            if sha256_file(weights) != manifest["weights_sha256"]:
                raise CacheError("the weights file does not match its manifest")
            tensors = load_file(str(weights))
            anchors = tensors.pop("anchors").numpy()
            pq = manifest["pq"]
            if anchors.shape != (pq["subspaces"], pq["centroids"],
                                 saved_gallery.dim // pq["subspaces"]):
                raise CacheError(f"anchors of shape {anchors.shape} do not fit the PQ config")
            network = QueryNetwork(copy.deepcopy(extractor.model).float(), saved_gallery.dim,
                                   saved_config.gem_p)
            state = network.state_dict()
            prefixes = manifest["saved_prefixes"]
            expected = {name for name in state
                        if any(name == p or name.startswith(p + ".") for p in prefixes)}
            loaded = {name.removeprefix("network."): value for name, value in tensors.items()}
            if set(loaded) != expected:
                raise CacheError("the weights file holds other tensors than the network's")
            network.load_state_dict(loaded, strict=False)
        except (KeyError, TypeError, ValueError, RuntimeError, OSError,
                SafetensorError) as error:
            raise CacheError(f"the saved SSP query model {path} is unusable ({error})"
                             ) from error
        model = cls(network, saved_config, extractor.meta, saved_gallery, anchors,
                    manifest["training_fingerprint"], extractor.transform,
                    resolve_device(device), train_seconds=manifest.get("train_seconds"),
                    losses=manifest.get("losses", ()), details=manifest.get("details"))
        model.loaded = True
        return model


def _split_for_mode(model: QueryModel) -> int:
    """The number of frozen stages of the trained model (0 when everything trained)."""
    if model.details.get("mode") == "cached":
        return _split_for(model.network, model.config)
    return 0


def _transform_config(meta: FeatureMeta) -> dict[str, Any]:
    return {"input_size": meta.input_size, "mean": meta.mean, "std": meta.std}


def _pooled_features(network: QueryNetwork, images: Sequence[Any],
                     transform: Callable[[Any], torch.Tensor], device: torch.device,
                     batch_size: int = 32) -> np.ndarray:
    """The head's inputs (GeM + L2 of the trunk) of the evaluation view of each image."""
    from engine.features.images import load_image

    pooled = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(load_image(source))
                                 for source in images[start:start + batch_size]]).to(device)
            pooled.append(network.pooled(network.trained_part(
                network.frozen_part(batch, 0), 0)).cpu())
    return torch.cat(pooled).numpy()


def _init_head(network: QueryNetwork, pooled: np.ndarray, targets: np.ndarray,
               how: str) -> dict[str, Any]:
    """Set the linear head to the Procrustes or ridge map from the pooled features of the
    training images to their gallery features; return what was chosen (for the manifest)."""
    if how == "random":
        return {}
    if how == "procrustes":
        weights, bias, chosen = fit_procrustes(pooled, targets), np.zeros(
            targets.shape[1], np.float32), {}
    else:
        weights, bias, alpha = fit_ridge(pooled, targets)
        chosen = {"ridge_alpha": alpha}
    with torch.no_grad():
        network.projection.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
        network.projection.bias.copy_(torch.from_numpy(bias))
    return chosen


def _check_training(training_images: Sequence[Any], gallery_features: Any,
                    gallery_meta: FeatureMeta, config: SSPConfig) -> np.ndarray:
    """Validate the training set; return the gallery features as (n, d) float32."""
    if training_images is None or len(training_images) == 0:
        raise InvalidInputError("SSP needs training images (none were given): pass the images "
                                "the query model should learn from")
    targets = _check_matrix(gallery_features, "gallery features of the training images",
                            gallery_meta.dim)
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


def state_key(config: SSPConfig, query_meta: FeatureMeta, gallery_meta: FeatureMeta,
              training: str) -> str:
    """The saved state's file name: everything the trained model depends on."""
    return fingerprint({"version": STATE_VERSION, "query": query_meta.fingerprint,
                        "gallery": gallery_meta.fingerprint, "training": training,
                        "config": config.as_dict()})


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
    query_meta = _query_extractor(config).meta
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
