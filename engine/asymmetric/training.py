"""SSP's two training loops and what they share.

"cached" (the CPU path): the early stages of lite0 are frozen and their activations cached once
for a few views of each image (the evaluation view and augmented ones); the last stages,
conv_head and the head train on those. "full" (the GPU path): every layer trains from decoded,
augmented images under bf16 autocast. Both use SGD Nesterov (momentum 0.9, weight decay 1e-6)
with a linear warm-up then cosine learning rate, and the authors' augmentation:
RandomResizedCrop (scale 0.8-1) and ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8. The target of
every view is the gallery feature of its image.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.asymmetric.config import SSPConfig
from engine.asymmetric.losses import ssp_loss
from engine.asymmetric.network import QueryNetwork

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
WARMUP_START = 0.1          # warm-up starts at 1/10 of the peak rate (the authors' 1e-4 -> 1e-3)
CROP_SCALE = (0.8, 1.0)
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_P = 0.8


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at `step` of `total`: linear from WARMUP_START to 1 over the
    first `warmup` steps, then cosine from 1 to 0."""
    if step < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def training_transform(transform_config: dict[str, Any], augment: bool) -> Callable[[Any], Any]:
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

    def report_step(self, progress: ProgressCallback | None) -> None:
        """Report the step just done (so that a cancelled job stops within one step)."""
        if progress is not None:
            progress(self.step / self.total, f"SSP: training step {self.step}/{self.total}")

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
            log.report_step(progress)
        log.end_epoch(progress)
    network.requires_grad_(False).eval()
    return log.history


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
                log.report_step(progress)
            log.end_epoch(progress)
    network.requires_grad_(False).eval()
    if channels_last:
        network.to(memory_format=torch.contiguous_format)
    return log.history
