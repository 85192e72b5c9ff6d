"""GNN re-ranking's private sparse helpers (Zhang et al.): row-sparse adjacency and its row
normalisation on torch sparse tensors. Used by `gnn.py` only."""

from __future__ import annotations

import torch


def sparse_rows(row_ids: torch.Tensor, column_ids: torch.Tensor, values: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
    """A coalesced COO sparse tensor from (row, column, value) triplets (duplicates summed)."""
    return torch.sparse_coo_tensor(torch.stack([row_ids, column_ids]), values, shape,
                                   check_invariants=False).coalesce()


def normalise_sparse_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Divide every row of a coalesced COO matrix by its L2 norm (empty rows stay empty)."""
    rows = matrix.indices()[0]
    values = matrix.values()
    norms = torch.zeros(matrix.shape[0], dtype=values.dtype, device=values.device)
    norms.index_add_(0, rows, values * values)
    norms = norms.sqrt()
    return torch.sparse_coo_tensor(matrix.indices(), values / norms[rows], matrix.shape,
                                   check_invariants=False, is_coalesced=True)
