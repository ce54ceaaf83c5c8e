"""The learned cluster scorer (DESIGN 8.3 step 3): a small graph neural network that predicts a
cluster's ablation effect from its statistics, trained across tasks and models.

Samples: every level (>= 1) of a task's hierarchy is one graph. Its nodes are the clusters of
that level, with the features of `cluster_features`; its edges are the coarsened symmetric
|adjacency|, normalised as D^-1/2 (A + I) D^-1/2; each node's label is the cluster's true
ablation effect, the mean per-prompt |change of M| removing only it over the span
(`FeatureAblation.abs_effect`): the quantity the exact search ranks clusters by, so the scorer
stands in for it. Its baseline is the unsigned attribution mass (`search.mass_score`).

Among the inputs are the log of that mass and of the cluster's first-order effect prompt by
prompt, mean_p |sum_{i in C} S_pi| (FAP summed over the members before the absolute value, so
members pulling M opposite ways on a prompt cancel as they do when the cluster is removed).

Model (`ClusterGNN`): a learned log-linear blend of mass and first-order effect, plus a residual
(a linear skip and two rounds of message passing h <- relu(W_self h + W_nbr A_hat h) with a
linear read-out) weighted by alpha. It predicts the log of the effect, trained by Adam on the
squared error after centring prediction and target within each task: effects span four
decades, so a plain squared error would fit only the largest clusters, and only the ranking
within a task matters (the search compares clusters of one level; its threshold is a share of
the level's total), so an offset per task is free. The blend is fitted first, the residual on
top of it; alpha is then chosen by leave-one-task-out *within* the training tasks, so the
message passing counts only as far as it ranks unseen tasks better. Measured here it does not
(it learns task-specific corrections: on modadd-113 mass alone is already 0.997), and alpha
comes out 0; what transfers is the blend. Plain PyTorch rather than PyTorch Geometric: the
graphs are small and dense (a few to a few hundred clusters per level), so a dense A_hat @ h is
the whole of message passing; PyG would add compiled extension wheels that must match the
installed torch build (none is published for every CPU torch) and buy nothing at this size.

Evaluation is leave-one-task-out: train on every other task, predict the held-out task's
clusters, and report the Spearman correlation with the true effect next to the plain
attribution-mass ranking's (the baseline it has to beat), both over the held-out task's
clusters of every level together.
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

from backend.circuits.stats import paired_spearman_difference
from backend.errors import NotFoundError, UserError
from backend.hagd.feature_graph import FeatureGraph
from backend.hagd.hierarchy import Cluster, Hierarchy, coarsen
from backend.hagd.search import ClusterScore, cluster_codes, mass_score
from backend.hagd.verify import FeatureAblation

FEATURE_NAMES = ("log_size", "feature_share", "layer_lo", "layer_hi", "layer_span", "mass", "abs_mass",
                 "mean_abs_fap", "direct", "act_mean", "log_act_max", "prompt_share", "level",
                 "log_mass", "log_first_order", "first_order_share")
LOG_FLOOR = 1e-4  # effects and masses below 0.01% of the span (or of the total) count as this


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

    @property
    def log_y(self) -> Tensor:
        return torch.log(self.y.clamp_min(0) + LOG_FLOOR)


def first_order_effect(graph: FeatureGraph, members: np.ndarray) -> float:
    """mean_p |sum_{i in members} S_pi|: the first-order change of M removing the feature nodes
    `members`, prompt by prompt (|sum of the mean S| for graphs stored without per-prompt FAP)."""
    if graph.prompt_fap is None or not len(graph.prompt_fap):
        return float(abs(graph.fap[members].sum()))
    return float(np.abs(graph.prompt_fap[:, members].sum(1)).mean())


def cluster_features(graph: FeatureGraph, hierarchy: Hierarchy, level: int, n_layers: int) -> Tensor:
    """[k, len(FEATURE_NAMES)] statistics of every cluster of `level` (scale-free where possible)."""
    feats = graph.is_feature
    total_abs = float(np.abs(graph.fap).sum()) or 1.0
    total_direct = float(np.abs(graph.target).sum()) or 1.0
    max_abs = float(graph.abs_fap.max()) or 1.0
    total_mass = float(graph.abs_fap.sum()) or 1.0
    total_first = first_order_effect(graph, graph.feature_nodes) or total_abs
    top = max(len(hierarchy.levels) - 1, 1)
    rows = []
    for c in hierarchy.levels[level]:
        m = np.array(c.members)
        f = m[feats[m]]
        layers = graph.layer[f] if len(f) else np.array([0])
        mass, first = graph.abs_fap[f].sum() / total_mass, first_order_effect(graph, f) / total_first
        rows.append([
            math.log1p(len(f)), len(f) / len(m), layers.min() / n_layers, layers.max() / n_layers,
            (layers.max() - layers.min()) / n_layers,
            graph.fap[f].sum() / total_abs, np.abs(graph.fap[f]).sum() / total_abs,
            graph.abs_fap[f].mean() / max_abs if len(f) else 0.0,
            graph.target[m].sum() / total_direct,
            graph.act_mean[f].mean() if len(f) else 0.0,
            math.log1p(max(float(graph.act_max[f].max()) if len(f) else 0.0, 0.0)),
            graph.n_prompts[m].mean() / max(graph.n_prompt_total, 1), level / top,
            math.log(mass + LOG_FLOOR), math.log(first + LOG_FLOOR), first])
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
    """Predicted log effect (up to a constant per task) of every cluster of a level:
    (x [k, f] raw `cluster_features`, a_hat [k, k]) -> [k].

    blend(x) = w_m log mass + w_f log first-order effect (starts at the mass ranking, w = (1, 0))
    plus alpha times a residual: a linear skip and two rounds of dense message passing
    h <- relu(W_self h + W_nbr A_hat h) over the standardised features, then a linear read-out.
    alpha is not trained with the rest: `fit_scorer` chooses it on tasks held out of training.
    """

    def __init__(self, n_in: int = len(FEATURE_NAMES), hidden: int = 32, rounds: int = 2) -> None:
        super().__init__()
        self.blend = nn.Linear(2, 1, bias=False)
        self.skip = nn.Linear(n_in, 1)
        self.embed = nn.Linear(n_in, hidden)
        self.self_w = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(rounds))
        self.nbr_w = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(rounds))
        self.out = nn.Linear(hidden, 1)
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.register_buffer("alpha", torch.tensor(1.0))
        with torch.no_grad():
            self.blend.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.skip.weight.zero_()
            self.out.weight.zero_()  # the residual starts at a constant: the blend alone

    def blend_part(self, x: Tensor) -> Tensor:
        return self.blend(x[:, _BLEND]).squeeze(-1)

    def residual(self, x: Tensor, a_hat: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        h = torch.relu(self.embed(z))
        for w_self, w_nbr in zip(self.self_w, self.nbr_w):
            h = torch.relu(w_self(h) + w_nbr(a_hat @ h))
        return (self.skip(z) + self.out(h)).squeeze(-1)

    def forward(self, x: Tensor, a_hat: Tensor, alpha: float | None = None) -> Tensor:
        alpha = float(self.alpha) if alpha is None else alpha
        out = self.blend_part(x)
        return out + alpha * self.residual(x, a_hat) if alpha else out


_BLEND = [FEATURE_NAMES.index("log_mass"), FEATURE_NAMES.index("log_first_order")]
ALPHAS = (0.0, 0.25, 0.5, 1.0)
SCORER_FORMAT = 2  # 2: blend + gated residual, raw features in


def centred_loss(pred: Tensor, log_y: Tensor) -> Tensor:
    """Mean squared error of [k] predictions against [k] log effects, both centred."""
    return (((pred - pred.mean()) - (log_y - log_y.mean())) ** 2).mean()


def _fit(model: ClusterGNN, samples: list[LevelSample], params, epochs: int, lr: float, decay: float,
         alpha: float) -> None:
    """Adam on the task-centred squared error of the log effect (each task weighs the same)."""
    opt = torch.optim.Adam(params, lr=lr, weight_decay=decay)
    tasks = sorted({s.task for s in samples})
    by_task = [[s for s in samples if s.task == t] for t in tasks]
    targets = [torch.cat([s.log_y for s in group]) for group in by_task]
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = sum(centred_loss(torch.cat([model(s.x, s.a_hat, alpha) for s in group]), target)
                   for group, target in zip(by_task, targets)) / len(tasks)
        loss.backward()
        opt.step()


def train_gnn(samples: list[LevelSample], epochs: int = 300, lr: float = 3e-3, seed: int = 0,
              hidden: int = 32, decay: float = 1e-2) -> ClusterGNN:
    """The blend first (alone, lr 1e-2, no decay), then the residual on top of the frozen blend
    (weight decay `decay`), both on the task-centred squared error of the log effect; alpha = 1."""
    if not samples:
        raise UserError("the scorer needs at least one training sample (a hierarchy with two levels)")
    torch.manual_seed(seed)
    model = ClusterGNN(hidden=hidden)
    x = torch.cat([s.x for s in samples])
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    _fit(model, samples, model.blend.parameters(), epochs, 1e-2, 0.0, alpha=0.0)
    model.blend.requires_grad_(False)
    residual = [p for n, p in model.named_parameters() if not n.startswith("blend")]
    _fit(model, samples, residual, epochs, lr, decay, alpha=1.0)
    return model.eval()


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.allclose(a, a[0]) or np.allclose(b, b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def task_family(label: str) -> str:
    """The task a sample label ("task+option=value@model") belongs to: "modadd+corrupt=b@modadd-113"
    and "modadd@modadd-113" are one task, held out together."""
    return label.split("@")[0].split("+")[0]


def _predict(model: ClusterGNN, samples: list[LevelSample], alpha: float) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(s.x, s.a_hat, alpha) for s in samples]).numpy()


def fit_scorer(samples: list[LevelSample], **train_args: Any) -> tuple[ClusterGNN, dict[float, float]]:
    """`train_gnn` on every sample, with alpha (the residual's weight) chosen among ALPHAS by
    leave-one-task-out within `samples`: the residual enters only as far as it ranks tasks it
    was not trained on better. Returns the model and the inner mean Spearman per alpha."""
    families = sorted({task_family(s.task) for s in samples})
    inner: dict[float, list[float]] = {a: [] for a in ALPHAS}
    if len(families) > 2:  # inner folds need at least two training tasks to learn anything shared
        for family in families:
            train = [s for s in samples if task_family(s.task) != family]
            model = train_gnn(train, **train_args)
            for task in sorted({s.task for s in samples if task_family(s.task) == family}):
                test = [s for s in samples if s.task == task]
                true = torch.cat([s.y for s in test]).numpy()
                for a in ALPHAS:
                    rho = _spearman(_predict(model, test, a), true)
                    if rho is not None:
                        inner[a].append(rho)
    scores = {a: float(np.mean(v)) for a, v in inner.items() if v}
    model = train_gnn(samples, **train_args)
    model.alpha.fill_(max(scores, key=scores.get) if scores else 0.0)
    return model, scores


def leave_one_task_out(samples: list[LevelSample], **train_args: Any) -> list[dict[str, Any]]:
    """Per held-out source: Spearman with the true effect of the scorer (`fit_scorer`, trained
    without any source of the same task, `task_family`), of its blend alone and of attribution mass,
    and the scorer's gain over mass with a paired bootstrap 95% CI over the source's clusters
    (clusters of every level pooled and resampled as if independent, which nested clusters are
    not quite: read the CI as indicative)."""
    rows, models = [], {}
    for task in sorted({s.task for s in samples}):
        family = task_family(task)
        train = [s for s in samples if task_family(s.task) != family]
        test = [s for s in samples if s.task == task]
        if not train:
            continue
        if family not in models:
            models[family] = fit_scorer(train, **train_args)[0]
        model = models[family]
        true = torch.cat([s.y for s in test]).numpy()
        mass = torch.cat([s.mass for s in test]).numpy()
        predicted = _predict(model, test, float(model.alpha))
        gain = (paired_spearman_difference(predicted, mass, true, seed=train_args.get("seed", 0))
                if len(true) >= 3 else None)
        rows.append({"heldout": task, "clusters": int(len(true)),
                     "gnn_spearman": _spearman(predicted, true),
                     "blend_spearman": _spearman(_predict(model, test, 0.0), true),
                     "mass_spearman": _spearman(mass, true), "alpha": float(model.alpha),
                     "gain_over_mass": list(gain) if gain else None,
                     "blend": [round(w, 3) for w in model.blend.weight[0].detach().tolist()],
                     "train_tasks": sorted({s.task for s in train})})
    return rows


@dataclass
class Scorer:
    """A trained scorer (`ClusterGNN`, its input standardisation and alpha inside) and what it
    was trained and tested on."""

    model: ClusterGNN
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        loto = [r["gnn_spearman"] for r in self.info.get("loto", []) if r["gnn_spearman"] is not None]
        mass = [r["mass_spearman"] for r in self.info.get("loto", []) if r["mass_spearman"] is not None]
        return {"trained_on": self.info.get("tasks", []), "loto": self.info.get("loto", []),
                "heldout_spearman": float(np.mean(loto)) if loto else None,
                "mass_heldout_spearman": float(np.mean(mass)) if mass else None,
                "alpha": float(self.model.alpha), "blend": self.model.blend.weight[0].detach().tolist()}

    def score_fn(self, graph: FeatureGraph, hierarchy: Hierarchy, n_layers: int | None = None) -> ClusterScore:
        """Predicted ablation effect of clusters, up to a factor per level (each level predicted
        once, on its whole graph): what the search's threshold, a share of the level, needs."""
        layers = n_layers or max(int(graph.layer.max()) + 1, 1)
        cache: dict[int, np.ndarray] = {}

        def score(clusters: list[Cluster]) -> np.ndarray:
            out = []
            for c in clusters:
                if c.level not in cache:
                    with torch.no_grad():
                        x = cluster_features(graph, hierarchy, c.level, layers)
                        log_effect = self.model(x, level_adjacency(graph, hierarchy, c.level))
                        cache[c.level] = torch.exp(log_effect - log_effect.max()).numpy()
                out.append(cache[c.level][c.index])
            return np.array(out)
        return score

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": SCORER_FORMAT, "state": self.model.state_dict(), "hidden": self.model.embed.out_features,
                    "features": FEATURE_NAMES, "info": self.info}, path)
        return path


def load_scorer(path: str | Path | None) -> Scorer:
    """A scorer saved by `Scorer.save` (`piescope hagd-scorer`)."""
    if not path or not Path(path).is_file():
        raise NotFoundError(f"no HAGD scorer at {path}; build one with `piescope hagd-scorer`")
    data = torch.load(path, weights_only=False)
    if data.get("format") != SCORER_FORMAT or tuple(data.get("features", ())) != FEATURE_NAMES:
        raise UserError(f"{path} is a scorer of an earlier PIEscope (other features or model); "
                        "rebuild it with `piescope hagd-scorer`")
    model = ClusterGNN(hidden=data["hidden"])
    model.load_state_dict(data["state"])
    return Scorer(model.eval(), info=data["info"])


def build_scorer(samples: list[LevelSample], **train_args: Any) -> Scorer:
    """Leave-one-task-out evaluation, then the scorer fitted on every task (`fit_scorer`)."""
    loto = leave_one_task_out(samples, **train_args)
    model, inner = fit_scorer(samples, **train_args)
    return Scorer(model, info={"tasks": sorted({s.task for s in samples}), "loto": loto,
                               "alpha_inner_spearman": {str(a): v for a, v in inner.items()},
                               "n_samples": len(samples), "n_clusters": int(sum(len(s.y) for s in samples))})
