"""Ablation of feature sets, and HAGD's verification (DESIGN 8.3 step 6).

A circuit is a set of features (layer, feature index); on each prompt it stands for every
occurrence of those features, at any position. Ablation is PIE's evaluation intervention
(`Evaluator`): a removed occurrence's Delta-writes are subtracted from `mlp_out`.

- sufficiency(S) = (M_keep(S) - M_none) / (M_clean - M_none): keep only S (every other active
  occurrence removed), the share of the metric preserved;
- necessity(S) = (M_clean - M_remove(S)) / (M_clean - M_none): remove only S, the share lost.

M is averaged over prompts before the ratio (a ratio of means: per-prompt ratios explode on
prompts where M_clean is close to M_none). Keeping everything is the clean run exactly, so the
full set has sufficiency 1; the empty set is the all-removed run, sufficiency 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backend.circuits.attribution import Attributor, PromptRuns
from backend.circuits.evaluation import Evaluator


def feature_codes(layer: np.ndarray | torch.Tensor, feature: np.ndarray | torch.Tensor, n_features: int) -> torch.Tensor:
    """One integer per (layer, feature): layer * F + feature."""
    return torch.as_tensor(layer, dtype=torch.long) * n_features + torch.as_tensor(feature, dtype=torch.long)


class FeatureAblation:
    """Keep-only and remove-only runs of feature sets over prepared prompt batches.

    Counts `evaluations` (feature sets run, each over every prompt) and patched forwards.
    """

    def __init__(self, attr: Attributor, runs_list: list[PromptRuns]) -> None:
        self.attr, self.runs_list = attr, runs_list
        self.evaluator = Evaluator(attr)
        self.F = attr.tc.n_features
        self.codes = [feature_codes(r.occ.layer, r.occ.feature, self.F) for r in runs_list]
        self.evaluations = 0
        self.m_clean = torch.cat([r.clean_metric for r in runs_list]).float()          # [N]
        self.m_none = torch.cat([self.evaluator.m_none(r) for r in runs_list]).float()  # [N]

    @property
    def span(self) -> float:
        """mean M_clean - mean M_none: the behaviour there is to preserve."""
        return float(self.m_clean.mean() - self.m_none.mean())

    @property
    def patched_forwards(self) -> int:
        return sum(r.counters["patched_forwards"] for r in self.runs_list)

    @torch.no_grad()
    def metric(self, feature_sets: list[torch.Tensor], keep: bool) -> torch.Tensor:
        """M per prompt with only each set kept (keep=True) or only it removed: [S, N]."""
        if not feature_sets:
            return torch.zeros(0, len(self.m_clean))
        self.evaluations += len(feature_sets)
        out = []
        for runs, codes in zip(self.runs_list, self.codes):
            masks = [torch.isin(codes, s.to(codes.device)) for s in feature_sets]
            if not keep:
                masks = [~m for m in masks]
            out.append(torch.stack([r.m_circuit for r in self.evaluator.evaluate(runs, masks)]).float())
        return torch.cat(out, dim=1)

    def sufficiency(self, feature_sets: list[torch.Tensor]) -> np.ndarray:
        """[S] share of M preserved keeping only each set."""
        m = self.metric(feature_sets, keep=True).mean(1)
        return ((m - self.m_none.mean()) / self.span).numpy()

    def necessity(self, feature_sets: list[torch.Tensor]) -> np.ndarray:
        """[S] share of M lost removing only each set."""
        m = self.metric(feature_sets, keep=False).mean(1)
        return ((self.m_clean.mean() - m) / self.span).numpy()

    def abs_effect(self, feature_sets: list[torch.Tensor]) -> np.ndarray:
        """[S] mean over prompts of |M_clean - M_remove(S)|, over the span: how much removing each
        set moves M on a prompt, whichever way. Unlike necessity, a set that raises M on some
        prompts and lowers it on others (or holds members pulling both ways) does not cancel out."""
        m = self.metric(feature_sets, keep=False)                                      # [S, N]
        return ((self.m_clean[None] - m).abs().mean(1) / abs(self.span)).numpy()


@dataclass
class Verification:
    """Sufficiency and necessity of one circuit over several seeds (prompt sets)."""

    n_features: int
    sufficiency: list[float]
    necessity: list[float]
    seeds: list[int]

    @property
    def sufficiency_mean(self) -> float:
        return float(np.mean(self.sufficiency))

    @property
    def sufficiency_std(self) -> float:
        return float(np.std(self.sufficiency, ddof=1)) if len(self.sufficiency) > 1 else 0.0

    @property
    def necessity_mean(self) -> float:
        return float(np.mean(self.necessity))

    @property
    def necessity_std(self) -> float:
        return float(np.std(self.necessity, ddof=1)) if len(self.necessity) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "seeds": self.seeds, "sufficiency": self.sufficiency,
                "necessity": self.necessity, "sufficiency_mean": self.sufficiency_mean,
                "sufficiency_std": self.sufficiency_std, "necessity_mean": self.necessity_mean,
                "necessity_std": self.necessity_std}


@dataclass
class SetEvaluation:
    """Every circuit on one seed's prompt set: sufficiency and necessity, in the circuits' order."""

    seed: int
    sufficiency: list[float]
    necessity: list[float]


def evaluate_set(circuits: dict[str, torch.Tensor], ablation: FeatureAblation, seed: int) -> SetEvaluation:
    """Each named circuit (feature codes) on one prompt set; all of them in the same batched forwards."""
    sets = list(circuits.values())
    return SetEvaluation(seed, [float(s) for s in ablation.sufficiency(sets)],
                         [float(e) for e in ablation.necessity(sets)])


def merge_verification(circuits: dict[str, torch.Tensor], sets: list[SetEvaluation]) -> dict[str, Verification]:
    """Each circuit's sufficiency and necessity over the prompt sets, in their order."""
    return {n: Verification(int(c.numel()), [s.sufficiency[i] for s in sets], [s.necessity[i] for s in sets],
                            [s.seed for s in sets]) for i, (n, c) in enumerate(circuits.items())}


def verify(circuits: dict[str, torch.Tensor], ablations: dict[int, FeatureAblation]) -> dict[str, Verification]:
    """Each named circuit (feature codes) on each seed's prompts: sufficiency and necessity.

    ablations: seed -> the FeatureAblation of that seed's prompt set (prepared once, shared by
    every circuit; all circuits of a seed are evaluated in the same batched forwards).
    """
    return merge_verification(circuits, [evaluate_set(circuits, a, seed) for seed, a in ablations.items()])
