"""HAGD end to end: the job function the CLI, the worker and the bench call (DESIGN 8.3).

1. attribute the task's prompts (FAP) and build the aggregated feature attribution graph over
   the top-`pool` occurrences per prompt;
2. coarsen it into a hierarchy by repeated spectral clustering;
3. search coarse to fine (cluster scores: exact ablation, the attribution-mass baseline, or
   the learned scorer), then the differentiable mask search over the surviving features;
4. verify the circuit, FAP's top features and random features of the same size by ablation
   on `verify_seeds` fresh prompt sets: sufficiency and necessity, mean and std.

The prompt sets of step 4 are independent tasks (`HagdVerifier.verify_set`): they run one after
the other here (`local_map`), or, given `verify_map` (`backend.executors.ray_executor.task_map`),
on Ray actors that each hold the model and transcoder once, and merge into the same verification
(`merge_verification`, in seed order). Steps 1-3 run in the calling process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from backend.circuits.attribution import CORRUPTIONS, GRAD_MODES, Attributor, PromptRuns
from backend.circuits.pipeline import MapShards, local_map
from backend.errors import InvalidParameterError
from backend.hagd.feature_graph import FeatureGraph, build_feature_graph, feature_fap
from backend.hagd.hierarchy import Hierarchy, build_hierarchy
from backend.hagd.search import (ClusterScore, ablation_score, coarse_to_fine, mask_search, mass_score)
from backend.hagd.verify import FeatureAblation, SetEvaluation, evaluate_set, feature_codes, merge_verification
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch, Task

Progress = Callable[[float, str], None]
SCORES = ("ablation", "mass", "scorer")


@dataclass
class HagdConfig:
    """HAGD's options (the CLI's --options JSON and the job's options map onto these).

    pool: occurrences per prompt in the graph (top by |FAP|); ratio: coarsening per level; top:
    stop at this many clusters; threshold: a cluster is expanded when its |score| is at least
    this share of its level's; score: ablation | mass | scorer (the learned GNN, `scorer_path`);
    lam, steps, lr, metric_weight: the mask search (`search.mask_search`); verify_seeds x verify_n
    prompts for verification.
    """

    pool: int = 50
    ratio: float = 4.0
    top: int = 5
    threshold: float = 0.002
    score: str = "ablation"
    scorer_path: str | None = None
    lam: float = 0.05
    steps: int = 150
    lr: float = 0.1
    metric_weight: float = 1.0
    verify_seeds: int = 5
    verify_n: int | None = None
    seed: int = 0
    batch_size: int = 16
    corruption: str = "corrupted_prompt"
    grad: str = "replacement"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise InvalidParameterError(f"unknown cluster score '{self.score}'; known: {', '.join(SCORES)}")
        if self.score == "scorer" and not self.scorer_path:
            raise InvalidParameterError("score 'scorer' needs scorer_path (a file written by `piescope hagd-scorer`)")
        if self.corruption not in CORRUPTIONS or self.grad not in GRAD_MODES:
            raise InvalidParameterError(f"corruption must be one of {CORRUPTIONS}, grad one of {GRAD_MODES}")
        for name in ("pool", "top", "verify_seeds", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise InvalidParameterError(f"{name} must be a positive whole number, not {getattr(self, name)!r}")
        if self.verify_n is not None and self.verify_n <= 0:
            raise InvalidParameterError("verify_n must be positive")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> HagdConfig:
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidParameterError(f"unknown HAGD option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**options)
        except TypeError as err:
            raise InvalidParameterError(f"bad HAGD options: {err}") from None


@dataclass
class HagdResult:
    """Everything a HAGD run found; JSON is made here (`to_json`) and only here."""

    model: str
    transcoder: str
    task: str
    n_prompts: int
    config: dict[str, Any]
    graph: dict[str, Any]            # summary + nodes + strongest links
    hierarchy: dict[str, Any]        # Hierarchy.to_json
    levels: list[int]                # clusters per level, finest first
    search: dict[str, Any]           # survivors, evaluations, trace
    circuit: list[dict[str, Any]]    # {id, layer, feature, mask}
    verification: dict[str, dict[str, Any]]  # method -> Verification.to_json
    seconds: dict[str, float]
    scorer: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _prepare(attr: Attributor, batch: PromptBatch, size: int) -> list[PromptRuns]:
    return [attr.prepare(batch.subset(slice(s, s + size)), offset=s) for s in range(0, len(batch), size)]


def _graph_json(graph: FeatureGraph, max_links: int = 5000) -> dict[str, Any]:
    """Nodes with their statistics and the strongest links (the dense matrix stays out)."""
    a = graph.adjacency
    src, dst = np.nonzero(a)
    order = np.argsort(-np.abs(a[src, dst]))[:max_links]
    nodes = [{"id": graph.ids[i], "kind": graph.kinds[i], "layer": int(graph.layer[i]),
              "feature": int(graph.feature[i]), "position": int(graph.position[i]),
              "target": float(graph.target[i]), "fap": float(graph.fap[i]), "abs_fap": float(graph.abs_fap[i]),
              "act_mean": float(graph.act_mean[i]), "n_prompts": int(graph.n_prompts[i])} for i in range(len(graph))]
    return {"n_nodes": len(graph), "n_features": int(graph.is_feature.sum()), "n_edges": int(len(src)),
            "nodes": nodes, "links": [{"source": graph.ids[src[k]], "target": graph.ids[dst[k]],
                                       "weight": float(a[src[k], dst[k]])} for k in order]}


def cluster_score(config: HagdConfig, graph: FeatureGraph, hierarchy: Hierarchy,
                  ablation: FeatureAblation) -> tuple[ClusterScore, dict[str, Any]]:
    """The cluster scoring function the config names, and what to report about it."""
    if config.score == "ablation":
        return ablation_score(graph, ablation), {"kind": "ablation"}
    if config.score == "mass":
        return mass_score(graph), {"kind": "mass"}
    from backend.hagd.scorer import load_scorer
    scorer = load_scorer(config.scorer_path)
    return scorer.score_fn(graph, hierarchy), {"kind": "scorer", **scorer.summary()}


@dataclass(frozen=True)
class VerifySet:
    """One of the verification's fresh prompt sets: the unit an executor runs anywhere."""

    index: int
    of: int
    seed: int

    @property
    def label(self) -> str:
        return f"verification on prompt set {self.index + 1} of {self.of} (seed {self.seed})"


def verify_sets(config: HagdConfig) -> list[VerifySet]:
    """The verification's prompt sets: seeds seed + 1, ..., seed + verify_seeds."""
    return [VerifySet(i, config.verify_seeds, config.seed + 1 + i) for i in range(config.verify_seeds)]


class HagdVerifier:
    """One model and transcoder (an Attributor) that verifies circuits on fresh prompt sets of
    `task`: the in-process run and every executor's workers call `verify_set`, so there is one
    code path for the science. n: the prompts of the run (verify_n, when set, overrides it)."""

    def __init__(self, attr: Attributor, task: Task, n: int, config: HagdConfig) -> None:
        self.attr, self.task, self.config = attr, task, config
        self.n = config.verify_n or n

    def verify_set(self, unit: VerifySet, circuits: dict[str, torch.Tensor],
                   progress: Progress | None = None) -> SetEvaluation:
        """Every circuit (feature codes) kept alone and removed alone on the unit's prompt set."""
        if progress is not None:
            progress(0.0, unit.label)
        batch = self.task.build(self.attr.adapter.tokenizer, self.n, seed=unit.seed)
        ablation = FeatureAblation(self.attr, _prepare(self.attr, batch, self.config.batch_size))
        return evaluate_set(circuits, ablation, unit.seed)


def run_hagd(adapter: ModelAdapter, transcoder: Transcoder, task: Task, n: int, config: HagdConfig, *,
             model_name: str, transcoder_name: str, task_name: str,
             progress: Progress | None = None, verify_map: MapShards | None = None) -> HagdResult:
    """HAGD on n prompts of `task` (see the module docstring); `verify_map` runs the verification's
    prompt sets (default: here, one after the other)."""
    progress = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    attr = Attributor(adapter, transcoder, config.corruption, config.grad)
    batch = task.build(adapter.tokenizer, n, seed=config.seed)
    progress(0.0, "attributing prompts")
    runs_list = _prepare(attr, batch, config.batch_size)
    graph = build_feature_graph(attr, runs_list, pool=config.pool,
                                progress=lambda f, m: progress(0.05 + 0.35 * f, m))
    seconds["graph"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    progress(0.4, "spectral hierarchy")
    hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=config.ratio, top=config.top, seed=config.seed)
    seconds["hierarchy"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    progress(0.45, "coarse-to-fine search")
    ablation = FeatureAblation(attr, runs_list)
    score, scorer_info = cluster_score(config, graph, hierarchy, ablation)
    search = coarse_to_fine(hierarchy, graph, score, threshold=config.threshold)
    evaluations = ablation.evaluations
    survivors = feature_codes(graph.layer[search.survivors], graph.feature[search.survivors], transcoder.n_features)
    seconds["coarse_to_fine"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    progress(0.55, f"mask search over {len(survivors)} features")
    found = mask_search(ablation, survivors, lam=config.lam, steps=config.steps, lr=config.lr, seed=config.seed,
                        metric_weight=config.metric_weight)
    seconds["mask_search"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    circuit = found.codes
    baselines = equal_size_baselines(runs_list, transcoder.n_features, len(circuit), config.seed)
    circuits = {"hagd": circuit, **baselines}
    run_sets = verify_map or local_map(HagdVerifier(attr, task, n, config))
    sets = run_sets("verify_set", [(unit, circuits) for unit in verify_sets(config)],
                    lambda f, m: progress(0.75 + 0.25 * f, m))
    verified = merge_verification(circuits, sets)
    seconds["verify"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    progress(1.0, "done")

    F = transcoder.n_features
    mask_of = dict(zip(found.survivors.tolist(), found.mask.tolist()))
    return HagdResult(
        model=model_name, transcoder=transcoder_name, task=task_name, n_prompts=len(batch),
        config=asdict(config), graph=_graph_json(graph), hierarchy=hierarchy.to_json(), levels=hierarchy.counts(),
        search={"survivors": len(search.survivors), "evaluations": search.evaluations,
                "ablation_evaluations": evaluations, "trace": search.trace,
                "mask_curve": found.curve[:: max(1, len(found.curve) // 50)]},
        circuit=[{"id": f"{c // F}_{c % F}", "layer": c // F, "feature": c % F, "mask": mask_of.get(c)}
                 for c in circuit.tolist()],
        verification={k: v.to_json() for k, v in verified.items()}, seconds=seconds, scorer=scorer_info)


def equal_size_baselines(runs_list: list[PromptRuns], n_features: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """FAP's top-k features (by mean |S| over the prompts) and k random active features."""
    totals = feature_fap(runs_list)
    keys = sorted(totals, key=lambda key: (-totals[key][1], key))
    codes = [layer * n_features + f for layer, f in keys]
    rng = np.random.default_rng(seed)
    random = rng.choice(len(codes), size=min(k, len(codes)), replace=False) if codes else []
    return {"fap": torch.tensor(sorted(codes[:k]), dtype=torch.long),
            "random": torch.tensor(sorted(codes[i] for i in random), dtype=torch.long)}


def scorer_samples(adapter: ModelAdapter, transcoder: Transcoder, task: Task, n: int, config: HagdConfig,
                   label: str, progress: Progress | None = None):
    """Training samples for the learned scorer: every level of this task's hierarchy with the
    true ablation effect of every cluster (`scorer.level_samples`)."""
    from backend.hagd.scorer import level_samples
    attr = Attributor(adapter, transcoder, config.corruption, config.grad)
    runs_list = _prepare(attr, task.build(adapter.tokenizer, n, seed=config.seed), config.batch_size)
    graph = build_feature_graph(attr, runs_list, pool=config.pool, progress=progress)
    hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=config.ratio, top=config.top, seed=config.seed)
    return level_samples(label, graph, hierarchy, FeatureAblation(attr, runs_list), adapter.n_layers)
