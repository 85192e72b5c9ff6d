"""SSP's loss against a hand-written KL: zero for equal structures, gradient into the query only,
float32 under bf16 autocast, and a width that does not fit the anchors refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.asymmetric.losses import anchor_log_probs, ssp_loss
from engine.errors import InvalidInputError
from tests.engine.asymmetric.ssp_data import unit_anchors


def hand_kl(query: np.ndarray, target: np.ndarray, anchors: np.ndarray,
            temperature: float) -> float:
    """The paper's loss with plain loops in float64."""
    m, k, sub = anchors.shape
    total = 0.0
    for b in range(query.shape[0]):
        for s in range(m):
            q = query[b, s * sub:(s + 1) * sub].astype(np.float64)
            g = target[b, s * sub:(s + 1) * sub].astype(np.float64)
            q, g = q / np.linalg.norm(q), g / np.linalg.norm(g)
            lq = np.array([q @ anchors[s, n] for n in range(k)]) / temperature
            lg = np.array([g @ anchors[s, n] for n in range(k)]) / temperature
            p = np.exp(lg - lg.max())
            p /= p.sum()
            r = np.exp(lq - lq.max())
            r /= r.sum()
            total += sum(p[n] * (np.log(p[n]) - np.log(r[n])) for n in range(k))
    return total / (query.shape[0] * m)


def test_loss_is_zero_for_equal_features_and_positive_otherwise():
    anchors = unit_anchors(4, 8, 5)
    features = torch.randn(6, 20)
    assert ssp_loss(features, features.clone(), anchors).item() == 0.0
    # a feature and its rescaled sub-vectors give the same structure: still zero
    rescaled = features.reshape(6, 4, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None]
    assert ssp_loss(rescaled.reshape(6, 20), features, anchors).item() == pytest.approx(
        0.0, abs=1e-6)
    other = torch.randn(6, 20)
    assert ssp_loss(other, features, anchors).item() > 1e-3


def test_loss_matches_a_hand_written_kl_and_flows_only_into_the_query():
    anchors = unit_anchors(3, 5, 4, seed=1)
    query = torch.randn(2, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = ssp_loss(query, target, anchors, temperature=0.1)
    expected = hand_kl(query.detach().numpy(), target.detach().numpy(), anchors.numpy(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert target.grad is None


def test_loss_is_float32_under_bf16_autocast():
    anchors = unit_anchors(4, 16, 8)
    query, target = torch.randn(3, 32), torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssp_loss(query.bfloat16(), target, anchors)
    outside = ssp_loss(query.bfloat16().float(), target, anchors)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(outside.item(), rel=1e-6)


def test_anchor_log_probs_refuses_a_width_that_does_not_fit():
    with pytest.raises(InvalidInputError, match="do not fit"):
        anchor_log_probs(torch.randn(2, 30), unit_anchors(4, 8, 5), 0.1)
