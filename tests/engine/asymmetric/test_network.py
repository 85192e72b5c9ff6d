"""SSP's query network: the split forward (frozen part, then trained part) equals the whole
trunk, and the features are unit rows."""

from __future__ import annotations

import torch


def test_split_forward_equals_the_whole_trunk(random_network):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = random_network.trunk.forward_features(images)
        for split in (0, 3, random_network.n_stages):
            parts = random_network.trained_part(random_network.frozen_part(images, split), split)
            torch.testing.assert_close(parts, whole)
        features = random_network(images)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))
