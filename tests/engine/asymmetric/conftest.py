"""SSP's shared fixture: lite0 with random weights as a query network (built once per module)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.asymmetric.network import QueryNetwork
from engine.features.backbone import get_extractor
from tests.engine.asymmetric.ssp_data import DIM


@pytest.fixture(scope="module")
def random_network() -> QueryNetwork:
    model = copy.deepcopy(get_extractor("tf_efficientnet_lite0", "none", "cpu").model)
    torch.manual_seed(0)
    return QueryNetwork(model, DIM, 3.0).eval()
