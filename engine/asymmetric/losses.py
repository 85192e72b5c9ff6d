"""SSP's label-free loss: for each PQ subspace, the KL divergence between the soft assignments
of the gallery feature and of the query feature to that subspace's anchors, computed in float32
even under autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.errors import InvalidInputError


def anchor_log_probs(features: torch.Tensor, anchors: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Log soft-assignments of each feature's sub-vectors to the anchors, in float32.

    Args:
        features: (B, d); split into M sub-vectors of d / M, each L2-normalised.
        anchors: (M, K, d / M) unit sub-vectors.
    Returns:
        (B, M, K) log_softmax over K of <f_m, c_{m,k}> / temperature.
    """
    m, _, sub = anchors.shape
    if features.ndim != 2 or features.shape[1] != m * sub:
        raise InvalidInputError(f"features of shape {tuple(features.shape)} do not fit anchors "
                                f"of {m} subspaces x {sub} dimensions")
    with torch.autocast(features.device.type, enabled=False):
        parts = F.normalize(features.float().reshape(features.shape[0], m, sub), dim=-1)
        logits = torch.einsum("bms,mks->bmk", parts, anchors.float()) / temperature
        return torch.log_softmax(logits, dim=-1)


def ssp_loss(query: torch.Tensor, target: torch.Tensor, anchors: torch.Tensor,
             temperature: float = 0.1) -> torch.Tensor:
    """The structure-similarity loss: mean over batch and subspaces of KL(p_m || r_m), with
    p = soft assignment of the gallery feature `target` (no gradient) and r that of the query
    model's feature `query`, both (B, d). Returns a float32 scalar."""
    log_r = anchor_log_probs(query, anchors, temperature)
    with torch.no_grad():
        log_p = anchor_log_probs(target.detach(), anchors, temperature)
    with torch.autocast(query.device.type, enabled=False):
        return (log_p.exp() * (log_p - log_r)).sum(dim=-1).mean()
