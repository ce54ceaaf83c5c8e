"""Coarse-to-fine search over the hierarchy, then a differentiable search at the finest level
(DESIGN 8.3 steps 4 and 5).

Coarse to fine: start with the top level's clusters; score each (its ablation effect, or a
prediction of it); expand only the clusters whose |score| is at least `threshold` times the
level's total |score| (the best one always), down to single nodes. Magnitudes, because a
cluster whose removal *raises* M (it argues against the answer, or interacts with another
cluster) is as much part of the mechanism: a circuit without it is not sufficient. Every cluster scored
counts as one evaluation: the cost is the sum of the frontier sizes, not 2^n.

Differentiable search: a membership logit theta_i per surviving feature, m_i = sigmoid(theta_i).
On every prompt the model runs with PIE's intervention made soft: each occurrence of a
surviving feature i keeps m_i of its Delta-writes, every other occurrence is removed, i.e.
mlp_out += -D_all + sum_o m_{f(o)} * Delta-write(o). Weights are frozen; only theta learns.
Loss = KL(clean || masked) / KL(clean || all removed) + mu * mean over prompts of
((M_masked - M_clean) / (M_clean - M_none))^2 + lambda * mean(m), by Adam. The circuit is
{i : m_i > 1/2}. With m in {0, 1} the run is exactly the evaluation of that kept set.

Why both terms: verification measures the share of M kept (sufficiency), and KL alone is not
that quantity (on modadd-113 the KL-only circuit preserved less of M in-sample than FAP's top
features of the same size). M alone, though, overfits the search prompts (per-prompt M is two
logits: its circuit lost ~20 points of sufficiency on fresh prompts where KL's held up). The
sum keeps the whole next-token distribution and the measured logit difference per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from backend.circuits.attribution import PromptRuns
from backend.circuits.evaluation import kl_divergence
from backend.errors import InvalidParameterError
from backend.hagd.feature_graph import FeatureGraph
from backend.hagd.hierarchy import Cluster, Hierarchy
from backend.hagd.verify import FeatureAblation, feature_codes
from backend.tasks import metric

ClusterScore = Callable[[list[Cluster]], np.ndarray]


@dataclass
class SearchResult:
    """What coarse-to-fine search kept: surviving graph nodes (features only) and its cost."""

    survivors: list[int]
    evaluations: int
    trace: list[dict[str, Any]] = field(default_factory=list)  # per level: scored, kept, cluster ids, scores


def cluster_codes(graph: FeatureGraph, cluster: Cluster, n_features: int) -> Tensor:
    """The feature codes of a cluster's feature members (tokens are never ablated)."""
    members = np.array([m for m in cluster.members if graph.kinds[m] == "feature"], dtype=int)
    return feature_codes(graph.layer[members], graph.feature[members], n_features)


def ablation_score(graph: FeatureGraph, ablation: FeatureAblation) -> ClusterScore:
    """Exact scores: the mean per-prompt |change of M| removing only the cluster, over the span
    (`FeatureAblation.abs_effect`; one evaluation each). Not the signed necessity: a cluster
    whose effects cancel across prompts or members would score ~0 and be dropped, though its
    features carry the behaviour prompt by prompt (measured on modadd-113: signed necessity
    dropped 19 of FAP's top 100 features at threshold 0.005)."""
    def score(clusters: list[Cluster]) -> np.ndarray:
        return ablation.abs_effect([cluster_codes(graph, c, ablation.F) for c in clusters])
    return score


def mass_score(graph: FeatureGraph) -> ClusterScore:
    """The attribution-mass baseline: the members' summed mean |FAP| over every feature's (the
    unsigned mass, for the same reason as `ablation_score`)."""
    total = float(graph.abs_fap.sum()) or 1.0

    def score(clusters: list[Cluster]) -> np.ndarray:
        return np.array([graph.abs_fap[c.members].sum() / total for c in clusters])
    return score


def coarse_to_fine(hierarchy: Hierarchy, graph: FeatureGraph, score: ClusterScore,
                   threshold: float = 0.02) -> SearchResult:
    """Surviving feature nodes after expanding only clusters that pass the threshold."""
    if not 0 <= threshold < 1:
        raise InvalidParameterError(f"the expansion threshold must be in [0, 1), not {threshold}")
    top = len(hierarchy.levels) - 1
    frontier = list(range(len(hierarchy.levels[top])))
    evaluations, trace = 0, []
    for level in range(top, 0, -1):
        clusters = [hierarchy.levels[level][i] for i in frontier]
        scores = np.asarray(score(clusters), dtype=float)
        evaluations += len(clusters)
        total = np.abs(scores).sum()
        keep = [i for i, s in enumerate(scores) if abs(s) > 0 and abs(s) >= threshold * total]
        if not keep:
            keep = [int(np.argmax(np.abs(scores)))]
        trace.append({"level": level, "scored": len(clusters), "kept": len(keep), "clusters": [c.id for c in clusters],
                      "scores": [round(float(s), 5) for s in scores]})
        frontier = [ch for i in keep for ch in clusters[i].children]
    survivors = sorted(hierarchy.levels[0][i].members[0] for i in frontier)
    survivors = [i for i in survivors if graph.kinds[i] == "feature"]
    return SearchResult(survivors, evaluations, trace)


# ------------------------------------------------------------------------------ mask search


class _MaskedRuns:
    """One batch's soft intervention: mlp_out += -D_all + sum_o m[idx(o)] * Delta-write(o).

    Per source layer, a dense [B*T, U] coefficient matrix (delta * m, scattered) times the
    decoder rows [U, n_t * d] of its U distinct surviving features: differentiable in m.
    """

    def __init__(self, ablation: FeatureAblation, runs: PromptRuns, codes: Tensor, survivors: Tensor) -> None:
        self.runs = runs
        tc, occ = ablation.attr.tc, runs.occ
        none = torch.zeros(len(occ), dtype=torch.bool, device=occ.delta.device)
        self.base = ablation.evaluator.removal_patch(runs, none).detach()    # -D_all [L, B, T, d]
        member = torch.isin(codes, survivors)
        index = torch.searchsorted(survivors.contiguous(), codes.clamp(max=int(survivors.max())))
        self.layers = []
        for layer in torch.unique(occ.layer[member]).tolist():
            sel = torch.nonzero(member & (occ.layer == layer), as_tuple=True)[0]
            feats, inv = torch.unique(occ.feature[sel], return_inverse=True)
            dec = tc.decoder_rows(layer, feats).detach()                       # [U, n_t, d]
            self.layers.append((layer, occ.row[sel], inv, occ.delta[sel].detach(), index[sel], dec))
        self.none_kl_sum = float(runs.none_kl.sum())  # filled by m_none, which FeatureAblation ran

    def patch(self, m: Tensor) -> Tensor:
        L, B, T, d = self.base.shape
        add = torch.zeros(L, B * T, d, dtype=self.base.dtype, device=self.base.device)
        for layer, rows, inv, delta, idx, dec in self.layers:
            U, n_t = dec.shape[0], dec.shape[1]
            coef = torch.zeros(B * T, U, dtype=dec.dtype, device=dec.device).index_put(
                (rows, inv), delta * m[idx], accumulate=True)
            writes = (coef @ dec.reshape(U, n_t * d)).view(B * T, n_t, d).transpose(0, 1)
            add = add.index_add(0, torch.arange(layer, layer + n_t, device=add.device), writes)
        return self.base + add.view(L, B, T, d)


@dataclass
class MaskResult:
    """The differentiable search's circuit (feature codes), final mask and loss curve."""

    codes: Tensor
    mask: np.ndarray
    survivors: Tensor
    curve: list[tuple[int, float, float]]  # (step, normalised KL, mean mask)


def _masked_logits(adapter, mr: _MaskedRuns, m: Tensor) -> Tensor:
    b = mr.runs.batch
    return adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos, patch=mr.patch(m)).logits


def mask_search(ablation: FeatureAblation, survivors: Tensor, *, lam: float = 0.05, steps: int = 150,
                lr: float = 0.1, init: float = 2.0, seed: int = 0, metric_weight: float = 1.0) -> MaskResult:
    """Optimise sigmoid membership over `survivors` (feature codes) in the frozen model;
    metric_weight is mu of the module docstring (0: KL alone)."""
    if steps < 0 or lam < 0 or lr <= 0 or metric_weight < 0:
        raise InvalidParameterError("mask search needs steps >= 0, lam >= 0, lr > 0 and metric_weight >= 0")
    survivors = torch.unique(survivors.long())
    if survivors.numel() == 0:
        return MaskResult(survivors, np.zeros(0), survivors, [])
    masked = [_MaskedRuns(ablation, r, c, survivors) for r, c in zip(ablation.runs_list, ablation.codes)]
    adapter = ablation.attr.adapter
    gen = torch.Generator().manual_seed(seed)
    theta = (init + 0.1 * torch.randn(len(survivors), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    # KL normalised by the all-removed run's mean KL, so lambda means the same on every task.
    scale = 1.0 / max(sum(mr.none_kl_sum for mr in masked), 1e-9)
    # The metric term per prompt, in units of the behaviour to preserve (as sufficiency is).
    m_scale = 1.0 / (max(abs(ablation.span), 1e-9) ** 2 * len(ablation.m_clean))
    curve = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            m = torch.sigmoid(theta)
            kl, err = torch.zeros(()), torch.zeros(())
            for mr in masked:
                logits = _masked_logits(adapter, mr, m)
                kl = kl + kl_divergence(mr.runs.clean_logits, logits).sum() * scale
                if metric_weight:
                    err = err + ((metric(logits, mr.runs.batch) - mr.runs.clean_metric) ** 2).sum() * m_scale
            loss = kl + metric_weight * err + lam * m.mean()
            loss.backward()
        opt.step()
        curve.append((step, float(kl.detach()), float(m.detach().mean())))
    m = torch.sigmoid(theta.detach())
    return MaskResult(survivors[m > 0.5], m.numpy(), survivors, curve)
