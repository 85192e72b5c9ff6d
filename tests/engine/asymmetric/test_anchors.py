"""SSP's PQ anchors: shape, unit sub-vectors, fitted to the data; bad inputs refused."""

from __future__ import annotations

import numpy as np
import pytest

from engine.asymmetric.anchors import train_anchors
from engine.errors import InvalidInputError
from tests.engine.asymmetric.ssp_data import unit_anchors, unit_rows


def test_pq_anchors_have_the_configured_shape_and_unit_sub_vectors():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 64)).astype(np.float32)
    features = centres[rng.integers(0, 20, 600)] + 0.05 * rng.standard_normal((600, 64))
    anchors = train_anchors(features.astype(np.float32), subspaces=8, centroids=256)
    assert anchors.shape == (8, 256, 8)
    assert anchors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(anchors, axis=-1), 1.0, atol=1e-5)
    # the anchors come from the data: its sub-vectors lie closer to them than to random ones
    parts = features.reshape(600, 8, 8)
    parts = parts / np.linalg.norm(parts, axis=-1, keepdims=True)
    fitted = np.einsum("nms,mks->nmk", parts, anchors).max(axis=-1).mean()
    random = unit_anchors(8, 256, 8, seed=5).numpy()
    chance = np.einsum("nms,mks->nmk", parts, random).max(axis=-1).mean()
    assert fitted > 0.99 > chance


def test_bad_anchor_inputs_raise_invalid_input_errors():
    with pytest.raises(InvalidInputError, match="divide"):
        train_anchors(unit_rows(300, 100), subspaces=32)
    with pytest.raises(InvalidInputError, match="at least 256"):
        train_anchors(unit_rows(100, 64), subspaces=8)
    nan_rows = unit_rows(300, 64)
    nan_rows[3, 5] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        train_anchors(nan_rows, subspaces=8)
