"""SSP's training: the learning-rate schedule, the cached-activation path (lowers the loss,
trains only the last stages) and the full path (every layer, bf16 autocast on the CPU)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from engine.asymmetric.config import SSPConfig
from engine.asymmetric.network import QueryNetwork
from engine.asymmetric.training import (
    cache_activations,
    lr_factor,
    train_cached,
    train_full,
    training_transform,
)
from tests.engine.asymmetric.ssp_data import CPU, TINY, tiny_images, unit_anchors, unit_rows


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[:11]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def small_transform(augment: bool, size: int = 64):
    return training_transform({"input_size": (3, size, size), "mean": (0.5,) * 3,
                              "std": (0.5,) * 3}, augment)


def tiny_trunk() -> torch.nn.Module:
    """A timm EfficientNet of two small blocks without grouped convolutions (bf16 grouped
    convolutions have no fast CPU kernel, so a bf16 lite0 step takes minutes on a CPU)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    return EfficientNet(decode_arch_def([["cn_r1_k3_s1_c8"], ["er_r1_k3_s2_e2_c16"]]),
                        num_features=32, stem_size=8)


def test_training_on_cached_activations_lowers_the_loss(random_network):
    torch.manual_seed(0)  # the new head's initialisation, whatever ran before
    network = copy.deepcopy(random_network)
    network.projection = torch.nn.Linear(network.projection.in_features, 64)  # a small head
    images = tiny_images(16)
    split = network.n_stages - 1
    cache = cache_activations(network, images, split, 2, small_transform(False),
                              small_transform(True), CPU)
    assert cache.activations.shape[:2] == (32, 192) and cache.activations.dtype == torch.float16
    frozen_before = network.trunk.blocks[0][0].conv_dw.weight.clone()
    trained_before = network.trunk.blocks[split][0].conv_pw.weight.clone()
    config = SSPConfig(**{**TINY, "epochs": 40, "warmup_epochs": 0, "batch_size": 16,
                          "learning_rate": 0.01})
    targets = torch.from_numpy(unit_rows(16, 64, seed=1))
    losses = train_cached(network, cache, targets, unit_anchors(8, 8, 8), config, CPU,
                          max_steps=40)
    assert len(losses) == 40
    assert max(losses[-3:]) < 0.6 * losses[0]
    torch.testing.assert_close(network.trunk.blocks[0][0].conv_dw.weight, frozen_before)
    assert not torch.equal(network.trunk.blocks[split][0].conv_pw.weight, trained_before)


def test_full_path_trains_every_layer_under_bf16_autocast_on_the_cpu():
    network = QueryNetwork(tiny_trunk(), 32, 3.0)
    dtypes = []
    hook = network.trunk.conv_head.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype))
    stem_before = network.trunk.conv_stem.weight.clone()
    head_before = network.projection.weight.clone()
    config = SSPConfig(**{**TINY, "batch_size": 4, "warmup_epochs": 0, "training": "full"})
    losses = train_full(network, tiny_images(8), torch.from_numpy(unit_rows(8, 32)),
                        unit_anchors(4, 8, 8), small_transform(True, 32), config, CPU,
                        autocast=True, max_steps=2, workers=1)
    hook.remove()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(dtypes) == 2 and all(dtype == torch.bfloat16 for dtype in dtypes)
    assert not torch.equal(network.trunk.conv_stem.weight, stem_before)
    assert not torch.equal(network.projection.weight, head_before)
    assert not network.training and not any(p.requires_grad for p in network.parameters())
