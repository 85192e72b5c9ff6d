"""The closed-form maps of SSP's head: ridge (primal and dual forms, cross-validated alpha) and
orthogonal Procrustes recover known maps."""

from __future__ import annotations

import numpy as np
import pytest

from engine.asymmetric.heads import apply_ridge, fit_procrustes, fit_ridge
from engine.errors import InvalidInputError


def test_ridge_recovers_a_linear_map_in_both_forms():
    rng = np.random.default_rng(0)
    for n, d in ((200, 10), (10, 40)):  # primal (n >= d) and dual (n < d)
        x = rng.standard_normal((n, d))
        weights = rng.standard_normal((d, 3))
        y = x @ weights + 0.5
        fitted, bias, alpha = fit_ridge(x, y, alpha=1e-8)
        np.testing.assert_allclose(x @ fitted + bias, y, atol=1e-3)
        assert alpha == pytest.approx(1e-8)
    mapped = apply_ridge(x, fitted, bias)
    np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)
    _, _, chosen = fit_ridge(x, y)  # cross-validated choice from the grid
    assert chosen > 0


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    fitted = fit_procrustes(x, x @ rotation + 0.001 * rng.standard_normal((50, 6)))
    np.testing.assert_allclose(fitted, rotation, atol=1e-3)
    np.testing.assert_allclose(fitted.T @ fitted, np.eye(6), atol=1e-5)
    with pytest.raises(InvalidInputError, match="same n"):
        fit_procrustes(x, x[:10])
