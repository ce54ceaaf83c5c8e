"""HAP, hybrid attribution and pruning (seed 002; DESIGN 8.2).

EAP (or EAP-IG) scores pick a high-potential subgraph: the top fraction rho of all edges by
|score|. Every other edge is fixed to its corrupted state and left out of the mask parameters;
Edge Pruning then runs on the kept edges only, to the same target sparsity of the *full* graph.
The retention fraction is not published: rho is a parameter (it must be at least the kept
fraction 1 - sparsity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from backend.edges.context import EdgeContext
from backend.edges.edge_pruning import PruningOptions, PruningResult, edge_pruning
from backend.errors import InvalidParameterError


def high_potential(scores: Tensor, rho: float) -> Tensor:
    """[E] bool: the top ceil(rho * E) edges by |score|."""
    n = max(1, math.ceil(rho * len(scores)))
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[torch.topk(scores.abs(), n).indices] = True
    return kept


def hap(ctx: EdgeContext, scores: Tensor, rho: float, n_keep: int, opts: PruningOptions) -> tuple[PruningResult, Tensor]:
    """Edge Pruning inside the top-rho subgraph of ``scores``: (result, the subgraph [E] bool)."""
    if not 0.0 < rho <= 1.0:
        raise InvalidParameterError(f"hap: rho must be in (0, 1], got {rho}")
    free = high_potential(scores, rho)
    if int(free.sum()) < n_keep:
        raise InvalidParameterError(
            f"hap: rho={rho} keeps {int(free.sum())} candidate edges, fewer than the {n_keep} the target needs")
    return edge_pruning(ctx, n_keep, opts, free=free), free
