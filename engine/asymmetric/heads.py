"""Closed-form maps from the query model's pooled features to the gallery model's features: the
orthogonal Procrustes rotation that starts SSP's linear head, the cross-validated ridge map (an
alternative start, and a baseline row of the asymmetric benchmark), and the head's
initialisation from either."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.errors import InvalidInputError

RIDGE_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RIDGE_FOLDS = 5


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


def init_head(projection: torch.nn.Linear, pooled: np.ndarray, targets: np.ndarray,
              how: str) -> dict[str, Any]:
    """Set the query network's linear head to the Procrustes or ridge map from the pooled
    features of the training images, (n, d_in), to their gallery features, (n, d_out); return
    what was chosen (for the manifest). "random" leaves PyTorch's initialisation."""
    if how == "random":
        return {}
    if how == "procrustes":
        weights, bias, chosen = fit_procrustes(pooled, targets), np.zeros(
            targets.shape[1], np.float32), {}
    else:
        weights, bias, alpha = fit_ridge(pooled, targets)
        chosen = {"ridge_alpha": alpha}
    with torch.no_grad():
        projection.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
        projection.bias.copy_(torch.from_numpy(bias))
    return chosen
