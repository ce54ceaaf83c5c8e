"""The learned cluster scorer (DESIGN 8.3 step 3): a small graph neural network that predicts a
cluster's ablation effect from its statistics, trained across tasks and models.

Samples: every level (>= 1) of a task's hierarchy is one graph. Its nodes are the clusters of
that level, with the features of `cluster_features`; its edges are the coarsened symmetric
|adjacency|, normalised as D^-1/2 (A + I) D^-1/2; each node's label is the cluster's true
ablation effect, the mean per-prompt |change of M| removing only it over the span
(`FeatureAblation.abs_effect`): the quantity the exact search ranks clusters by, so the scorer
stands in for it. Its baseline is the unsigned attribution mass (`search.mass_score`).

Model: two rounds of message passing h <- relu(W_self h + W_nbr A_hat h), then a linear read-out,
trained by Adam on the mean squared error. Plain PyTorch rather than PyTorch Geometric: the
graphs are small and dense (a few to a few hundred clusters per level), so a dense A_hat @ h is
the whole of message passing; PyG would add compiled extension wheels that must match the
installed torch build (none is published for every CPU torch) and buy nothing at this size.

Evaluation is leave-one-task-out: train on every other task, predict the held-out task's
clusters, and report the Spearman correlation with the true effect next to the plain
attribution-mass ranking's (the baseline it has to beat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from backend.errors import NotFoundError, UserError
from backend.hagd.feature_graph import FeatureGraph
from backend.hagd.hierarchy import Cluster, Hierarchy, coarsen
from backend.hagd.search import ClusterScore, cluster_codes, mass_score
from backend.hagd.verify import FeatureAblation

FEATURE_NAMES = ("log_size", "feature_share", "layer_lo", "layer_hi", "layer_span", "mass", "abs_mass",
                 "mean_abs_fap", "direct", "act_mean", "log_act_max", "prompt_share", "level")


@dataclass
class LevelSample:
    """One level of one task's hierarchy: x [k, f], a_hat [k, k], y [k] true ablation effect
    (`FeatureAblation.abs_effect`), mass [k] unsigned attribution mass."""

    task: str
    level: int
    x: Tensor
    a_hat: Tensor
    y: Tensor
    mass: Tensor


def cluster_features(graph: FeatureGraph, hierarchy: Hierarchy, level: int, n_layers: int) -> Tensor:
    """[k, len(FEATURE_NAMES)] statistics of every cluster of `level` (scale-free where possible)."""
    feats = graph.is_feature
    total_abs = float(np.abs(graph.fap).sum()) or 1.0
    total_direct = float(np.abs(graph.target).sum()) or 1.0
    max_abs = float(graph.abs_fap.max()) or 1.0
    top = max(len(hierarchy.levels) - 1, 1)
    rows = []
    for c in hierarchy.levels[level]:
        m = np.array(c.members)
        f = m[feats[m]]
        layers = graph.layer[f] if len(f) else np.array([0])
        rows.append([
            math.log1p(len(f)), len(f) / len(m), layers.min() / n_layers, layers.max() / n_layers,
            (layers.max() - layers.min()) / n_layers,
            graph.fap[f].sum() / total_abs, np.abs(graph.fap[f]).sum() / total_abs,
            graph.abs_fap[f].mean() / max_abs if len(f) else 0.0,
            graph.target[m].sum() / total_direct,
            graph.act_mean[f].mean() if len(f) else 0.0,
            math.log1p(max(float(graph.act_max[f].max()) if len(f) else 0.0, 0.0)),
            graph.n_prompts[m].mean() / max(graph.n_prompt_total, 1), level / top])
    return torch.tensor(rows, dtype=torch.float32)


def level_adjacency(graph: FeatureGraph, hierarchy: Hierarchy, level: int) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 of the level's coarsened graph, A scaled to a unit maximum: [k, k]."""
    a = coarsen(graph.symmetric_weights(), hierarchy.labels(level))
    a = a / (a.max() or 1.0) + np.eye(len(a))
    d = 1.0 / np.sqrt(a.sum(1))
    return torch.tensor(d[:, None] * a * d[None, :], dtype=torch.float32)


def level_samples(task: str, graph: FeatureGraph, hierarchy: Hierarchy, ablation: FeatureAblation,
                  n_layers: int) -> list[LevelSample]:
    """Every level >= 1 with its clusters' true ablation effect (all clusters in one batched call)."""
    levels = range(1, len(hierarchy.levels))
    clusters = [c for l in levels for c in hierarchy.levels[l]]
    effects = ablation.abs_effect([cluster_codes(graph, c, ablation.F) for c in clusters]) if clusters else []
    mass_of = mass_score(graph)
    out, start = [], 0
    for l in levels:
        k = len(hierarchy.levels[l])
        mass = torch.tensor(mass_of(hierarchy.levels[l]), dtype=torch.float32)
        out.append(LevelSample(task, l, cluster_features(graph, hierarchy, l, n_layers),
                               level_adjacency(graph, hierarchy, l),
                               torch.tensor(np.asarray(effects[start:start + k]), dtype=torch.float32), mass))
        start += k
    return out


class ClusterGNN(nn.Module):
    """Two rounds of dense message passing and a linear read-out: (x [k, f], a_hat [k, k]) -> [k]."""

    def __init__(self, n_in: int = len(FEATURE_NAMES), hidden: int = 32, rounds: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, hidden)
        self.self_w = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(rounds))
        self.nbr_w = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(rounds))
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, a_hat: Tensor) -> Tensor:
        h = torch.relu(self.embed(x))
        for w_self, w_nbr in zip(self.self_w, self.nbr_w):
            h = torch.relu(w_self(h) + w_nbr(a_hat @ h))
        return self.out(h).squeeze(-1)


@dataclass
class Normalisation:
    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, samples: list[LevelSample]) -> Normalisation:
        x = torch.cat([s.x for s in samples])
        return cls(x.mean(0), x.std(0).clamp_min(1e-6))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def train_gnn(samples: list[LevelSample], epochs: int = 300, lr: float = 3e-3, seed: int = 0,
              hidden: int = 32) -> tuple[ClusterGNN, Normalisation]:
    """Adam on the mean squared error over every level graph of the training tasks."""
    if not samples:
        raise UserError("the scorer needs at least one training sample (a hierarchy with two levels)")
    torch.manual_seed(seed)
    norm = Normalisation.fit(samples)
    model = ClusterGNN(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = sum(((model(norm(s.x), s.a_hat) - s.y) ** 2).mean() for s in samples) / len(samples)
        loss.backward()
        opt.step()
    return model.eval(), norm


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.allclose(a, a[0]) or np.allclose(b, b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def leave_one_task_out(samples: list[LevelSample], **train_args: Any) -> list[dict[str, Any]]:
    """Per held-out task: Spearman of the GNN and of attribution mass with the true effect."""
    rows = []
    for task in sorted({s.task for s in samples}):
        train = [s for s in samples if s.task != task]
        test = [s for s in samples if s.task == task]
        if not train:
            continue
        model, norm = train_gnn(train, **train_args)
        with torch.no_grad():
            pred = torch.cat([model(norm(s.x), s.a_hat) for s in test]).numpy()
        true = torch.cat([s.y for s in test]).numpy()
        mass = torch.cat([s.mass for s in test]).numpy()
        rows.append({"heldout": task, "clusters": int(len(true)), "gnn_spearman": _spearman(pred, true),
                     "mass_spearman": _spearman(mass, true), "train_tasks": sorted({s.task for s in train})})
    return rows


@dataclass
class Scorer:
    """A trained GNN, its input normalisation, and what it was trained and tested on."""

    model: ClusterGNN
    norm: Normalisation
    n_layers_hint: int = 1
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        loto = [r["gnn_spearman"] for r in self.info.get("loto", []) if r["gnn_spearman"] is not None]
        mass = [r["mass_spearman"] for r in self.info.get("loto", []) if r["mass_spearman"] is not None]
        return {"trained_on": self.info.get("tasks", []), "loto": self.info.get("loto", []),
                "heldout_spearman": float(np.mean(loto)) if loto else None,
                "mass_heldout_spearman": float(np.mean(mass)) if mass else None}

    def score_fn(self, graph: FeatureGraph, hierarchy: Hierarchy, n_layers: int | None = None) -> ClusterScore:
        """Predicted ablation effect of clusters (each level predicted once, on its whole graph)."""
        layers = n_layers or max(int(graph.layer.max()) + 1, 1)
        cache: dict[int, np.ndarray] = {}

        def score(clusters: list[Cluster]) -> np.ndarray:
            out = []
            for c in clusters:
                if c.level not in cache:
                    with torch.no_grad():
                        x = cluster_features(graph, hierarchy, c.level, layers)
                        cache[c.level] = self.model(self.norm(x), level_adjacency(graph, hierarchy, c.level)).numpy()
                out.append(cache[c.level][c.index])
            return np.array(out)
        return score

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.model.state_dict(), "mean": self.norm.mean, "std": self.norm.std,
                    "hidden": self.model.embed.out_features, "features": FEATURE_NAMES, "info": self.info}, path)
        return path


def load_scorer(path: str | Path | None) -> Scorer:
    """A scorer saved by `Scorer.save` (`piescope hagd-scorer`)."""
    if not path or not Path(path).is_file():
        raise NotFoundError(f"no HAGD scorer at {path}; build one with `piescope hagd-scorer`")
    data = torch.load(path, weights_only=False)
    if tuple(data.get("features", ())) != FEATURE_NAMES:
        raise UserError(f"{path} was trained on other cluster features; rebuild it with `piescope hagd-scorer`")
    model = ClusterGNN(hidden=data["hidden"])
    model.load_state_dict(data["state"])
    return Scorer(model.eval(), Normalisation(data["mean"], data["std"]), info=data["info"])


def build_scorer(samples: list[LevelSample], **train_args: Any) -> Scorer:
    """Leave-one-task-out evaluation, then the final GNN trained on every task."""
    loto = leave_one_task_out(samples, **train_args)
    model, norm = train_gnn(samples, **train_args)
    return Scorer(model, norm, info={"tasks": sorted({s.task for s in samples}), "loto": loto,
                                     "n_samples": len(samples), "n_clusters": int(sum(len(s.y) for s in samples))})
