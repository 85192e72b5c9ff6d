"""SSP's query network: the lite0 trunk, GeM pooling with a fixed exponent, L2, a linear map to
the gallery model's dimension and L2 again (the authors' head). The trunk runs in two parts so
the CPU path can cache the output of its frozen early stages."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.asymmetric.config import SSPConfig
from engine.errors import InvalidInputError

if TYPE_CHECKING:
    from engine.features.backbone import FeatureExtractor


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of (B, C, H, W) activations over H, W, in float32: (B, C)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


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


def query_extractor(config: SSPConfig) -> FeatureExtractor:
    """The shared CPU extractor of the query backbone: its meta, eval transform and weights."""
    from engine.features.backbone import get_extractor

    return get_extractor(config.query_backbone, config.query_weights, device="cpu")


def frozen_stages(network: QueryNetwork, config: SSPConfig) -> int:
    """The cached path's split: how many of the network's block stages stay frozen (all but
    `config.trainable_stages`)."""
    stages = network.n_stages
    if config.trainable_stages > stages:
        raise InvalidInputError(f"trainable_stages={config.trainable_stages} but "
                                f"{config.query_backbone} has {stages} block stages")
    return stages - config.trainable_stages
