"""Edge circuits and edge sweeps end to end: method -> kept edges -> shared evaluation -> results.

The CLI, the worker's job functions and the bench call these; JSON is made in one place
(``EdgeCircuit.to_json``, ``EdgeSweep.to_json``).

An edge sweep is split like a PIE sweep (`backend.circuits.pipeline`): its (method, edge count)
points are independent tasks (`EdgeSweepPoints.point`) that run one after the other here
(`local_map`) or on Ray actors that each hold the model and one EdgeContext
(`backend.executors.ray_executor`), merged into the same EdgeSweep by `merge_edge_sweep`.

EAP / EAP-IG scores are computed once per sweep, each as a task of its own before the points,
and the driver ships them to the points whose method reads them (HAP, EAP, EAP-IG, ACDC with a
pool), rather than every actor re-deriving them on its EdgeContext: (1) each is computed once,
not once per actor; (2) every point sees the very same tensor, so top-n and HAP's top-rho
candidate set cannot tie-break differently where a device's backward pass is not bitwise
reproducible (CUDA atomics), and the kept sets equal the in-process ones by construction; (3)
their cost is charged once, to the first row that reads them, exactly as one loop over one
context charges it, whatever actor ran which point. They are [E] vectors, small to ship.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from backend.circuits.pipeline import MapShards, local_map
from backend.circuits.results import Stat
from backend.edges.attention import MAX_PROMPTS, circuit_heads, head_attention
from backend.edges.context import Cost, EdgeContext, Progress, Timer
from backend.edges.evaluation import EdgeMetrics, curve_area, evaluate, log_spaced_counts
from backend.edges.registry import EdgeRun, ScoreKey, compute_scores, get_edge_method, target_count
from backend.errors import InvalidParameterError
from backend.models.adapters import ModelAdapter
from backend.tasks import PromptBatch


@dataclass
class EdgeConfig:
    """One edge circuit request: a method, its options and a target (edge count or sparsity)."""

    method: str
    edges: int | None = None
    sparsity: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 16
    attention_prompts: int = MAX_PROMPTS   # prompts whose attention patterns the circuit's heads store


@dataclass
class EdgeCircuit:
    model: str
    task: str
    method: str
    n_prompts: int
    options: dict[str, Any]
    graph: dict[str, int]
    n_target: int
    kept: list[dict]              # {"id", "writer", "reader", "score"} per kept edge, best first
    kept_counts: dict[str, int]   # kept edges by reader kind
    metrics: dict
    cost: dict
    details: dict
    seconds: float
    attention: dict | None = None  # backend.edges.attention.HeadAttention JSON (stored apart, not in to_json)

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_kept / self.graph["edges"]

    def to_json(self) -> dict:
        out = {"kind": "edge-circuit", **asdict(self), "n_kept": self.n_kept, "sparsity": self.sparsity}
        out.pop("attention")
        return out


def describe(ctx: EdgeContext, run: EdgeRun, metrics: EdgeMetrics, model: str, task: str,
             seconds: float) -> EdgeCircuit:
    g = ctx.graph
    idx = torch.nonzero(run.kept).squeeze(1)
    if run.scores is not None:
        idx = idx[torch.argsort(run.scores[idx].abs(), descending=True, stable=True)]
    kept = [{"id": g.edge_id(int(e)), "writer": g.writers[int(g.edge_writer[e])].name,
             "reader": g.readers[int(g.edge_reader[e])].name,
             "score": float(run.scores[e]) if run.scores is not None else None} for e in idx]
    kinds = {k: 0 for k in ("q", "k", "v", "mlp", "logits")}
    for e in idx:
        kinds[g.readers[int(g.edge_reader[e])].kind] += 1
    details = {k: v for k, v in run.details.items() if k != "history"}
    if "history" in run.details:  # every 10th step is enough to see the trajectory
        details["history"] = run.details["history"][::10] + run.details["history"][-1:]
    return EdgeCircuit(model, task, run.method, ctx.n_prompts, run.details.get("options", {}), g.counts(),
                       run.n_target, kept, kinds, metrics.as_dict(), run.cost.as_dict(ctx.n_prompts),
                       details, seconds)


def run_edges(adapter: ModelAdapter, batch: PromptBatch, config: EdgeConfig, *, model_name: str = "",
              task_name: str = "", progress: Progress | None = None,
              ctx: EdgeContext | None = None) -> EdgeCircuit:
    """Find one edge circuit and evaluate it on the same prompts."""
    method = get_edge_method(config.method)
    options = method.options(config.options)
    t0 = time.perf_counter()
    ctx = ctx or EdgeContext.create(adapter, batch, batch_size=config.batch_size, seed=config.seed,
                                    progress=progress)
    n = target_count(ctx.graph.n_edges, config.edges, config.sparsity)
    run = method.run(ctx, n, options)
    metrics = evaluate(ctx, run.kept, seed=config.seed)
    circuit = describe(ctx, run, metrics, model_name or adapter.name, task_name, time.perf_counter() - t0)
    # Outside the method's time: one clean forward of a few prompts, for the dashboard.
    heads = circuit_heads(ctx.graph, [e["id"] for e in circuit.kept])
    circuit.attention = head_attention(adapter, batch, heads, config.attention_prompts).to_json()
    return circuit


@dataclass
class EdgeSweepRow:
    method: str
    n_target: int
    n_kept: int
    kl: Stat
    recovered: Stat
    accuracy: Stat
    recovered_of_means: float
    cost: dict


@dataclass
class EdgeSweep:
    model: str
    task: str
    n_prompts: int
    methods: list[str]
    counts: list[int]
    options: dict[str, dict]
    graph: dict[str, int]
    rows: list[EdgeSweepRow]
    area: dict[str, dict[str, float]]   # method -> {"kl": ..., "recovered": ...} over log counts
    seconds: float

    def to_json(self) -> dict:
        return {"kind": "edge-sweep", **asdict(self)}


@dataclass
class EdgeSweepConfig:
    methods: list[str]
    counts: list[int] | None = None      # default: 8 log-spaced counts up to the whole graph
    options: dict[str, dict] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class EdgePoint:
    """One (method, edge count) of an edge sweep: the unit an executor runs anywhere."""

    method: str
    count: int

    @property
    def label(self) -> str:
        return f"{self.method} at {self.count} edges"


@dataclass
class EdgeSweepPlan:
    """A validated edge sweep: what every point and the merge agree on."""

    config: EdgeSweepConfig
    methods: list[str]
    options: dict[str, dict]                  # per method, defaults filled in
    counts: list[int]
    score_keys: dict[str, tuple[ScoreKey, ...]]  # per method, the attribution scores it reads

    @property
    def points(self) -> list[EdgePoint]:
        """Methods x counts, in the order of the sweep's rows."""
        return [EdgePoint(m, c) for m in self.methods for c in self.counts]

    @property
    def needed(self) -> list[ScoreKey]:
        """Every attribution score some method reads, in order of first use."""
        return list(dict.fromkeys(k for m in self.methods for k in self.score_keys[m]))


def edge_sweep_options(config: EdgeSweepConfig) -> dict[str, dict]:
    """Each method's options, defaults filled in; an unknown method (404) or option (422) fails
    here, before anything is loaded."""
    methods = [get_edge_method(m) for m in config.methods]
    unknown = set(config.options) - {m.name for m in methods}
    if unknown:
        raise InvalidParameterError(f"options given for methods not in the sweep: {', '.join(sorted(unknown))}")
    return {m.name: m.options(config.options.get(m.name)) for m in methods}


def plan_edge_sweep(config: EdgeSweepConfig, n_edges: int) -> EdgeSweepPlan:
    """Check an edge sweep's config against a graph of n_edges edges -> its plan."""
    options = edge_sweep_options(config)
    counts = sorted(set(config.counts or log_spaced_counts(n_edges)))
    for c in counts:
        target_count(n_edges, edges=c)
    keys = {m: get_edge_method(m).score_keys(o) for m, o in options.items()}
    return EdgeSweepPlan(config, list(options), options, counts, keys)


@dataclass
class PointRun:
    """One point's row, its kept edges [E] bool, and its cost with the attribution scores it read
    excluded (the merge charges those to the first row that reads them, as one loop over a
    context would)."""

    row: EdgeSweepRow
    kept: Tensor
    cost: Cost


class EdgeSweepPoints:
    """One model and prompt batch (one EdgeContext, its corrupted runs made once) that runs an
    edge sweep's tasks: the in-process sweep and every executor's workers call these two methods,
    so there is one code path for the science."""

    def __init__(self, adapter: ModelAdapter, batch: PromptBatch, config: EdgeSweepConfig) -> None:
        self.ctx = EdgeContext.create(adapter, batch, batch_size=config.batch_size, seed=config.seed)
        self.plan = plan_edge_sweep(config, self.ctx.graph.n_edges)
        self.ctx.parts  # noqa: B018 -- made now, so that no point's time includes them

    def scores(self, key: ScoreKey, progress: Progress | None = None) -> tuple[Tensor, Cost]:
        """Attribution scores [E] on this context's prompts, and what they cost."""
        self.ctx.progress, self.ctx.cost = progress, Cost()
        with Timer(self.ctx.cost):
            self.ctx.cache[key] = compute_scores(self.ctx, key)
        return self.ctx.cache[key], self.ctx.cost

    def point(self, point: EdgePoint, scores: dict[ScoreKey, Tensor], progress: Progress | None = None) -> PointRun:
        """The method's circuit at the point's edge count, evaluated on this context's prompts;
        `scores`: the attribution scores the method reads (computed once for the whole sweep)."""
        ctx, config = self.ctx, self.plan.config
        ctx.cache.update(scores)
        ctx.progress = progress
        run = get_edge_method(point.method).run(ctx, point.count, self.plan.options[point.method])
        ev = evaluate(ctx, run.kept, seed=config.seed)
        if progress is not None:
            progress(1.0, f"{point.label}: KL {ev.kl_stat.mean:.3f}")
        row = EdgeSweepRow(point.method, point.count, int(run.kept.sum()), ev.kl_stat, ev.recovered_stat,
                           ev.accuracy_stat, ev.recovered_of_means, {})
        return PointRun(row, run.kept, run.cost)


def run_edge_sweep(adapter: ModelAdapter, batch: PromptBatch, config: EdgeSweepConfig, *,
                   model_name: str = "", task_name: str = "", progress: Progress | None = None) -> EdgeSweep:
    """Every method at every edge count on the same prompts; faithfulness curves and their area,
    in this process."""
    t0 = time.perf_counter()
    points = EdgeSweepPoints(adapter, batch, config)
    sweep = merge_edge_sweep(points.plan, points.ctx.graph.counts(), len(batch), local_map(points),
                             model_name=model_name or adapter.name, task_name=task_name, progress=progress)
    sweep.seconds = time.perf_counter() - t0
    return sweep


def merge_edge_sweep(plan: EdgeSweepPlan, graph: dict[str, int], n_prompts: int, map_tasks: MapShards, *,
                     model_name: str, task_name: str, progress: Progress | None = None) -> EdgeSweep:
    """The edge sweep of `plan` on a graph with these counts (`EdgeGraph.counts`) and n_prompts
    prompts, its tasks run by `map_tasks`.

    First every attribution score some method reads, once (one task per score); then every
    (method, count) point with the scores its method reads. The points are independent (Edge
    Pruning and HAP seed their own generators), so where they ran does not change them; rows come
    in methods x counts order, and each score's cost is charged to the first row reading it.
    """
    say = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    needed = plan.needed
    share = 0.1 if needed else 0.0
    scored = map_tasks("scores", [(k,) for k in needed], lambda f, m: say(share * f, m)) if needed else []
    scores = {k: s for k, (s, _) in zip(needed, scored)}
    charge = {k: c for k, (_, c) in zip(needed, scored)}
    points = plan.points
    runs: list[PointRun] = map_tasks("point", [(p, {k: scores[k] for k in plan.score_keys[p.method]})
                                               for p in points], lambda f, m: say(share + (1 - share) * f, m))
    rows = []
    for p, run in zip(points, runs):
        cost = run.cost
        for k in plan.score_keys[p.method]:
            if k in charge:  # the first row that reads this score pays for it
                cost = _plus(cost, charge.pop(k))
        run.row.cost = cost.as_dict(n_prompts)
        rows.append(run.row)
    say(1.0, "done")
    E = graph["edges"]
    area = {}
    for m in plan.methods:
        mine = [r for r in rows if r.method == m]
        xs = [max(r.n_kept, 1) for r in mine]
        order = sorted(range(len(mine)), key=lambda k: xs[k])
        area[m] = {"kl": curve_area([xs[k] for k in order], [mine[k].kl.mean for k in order], E),
                   "recovered": curve_area([xs[k] for k in order], [mine[k].recovered_of_means for k in order], E)}
    return EdgeSweep(model_name, task_name, n_prompts, list(plan.methods), plan.counts, plan.options, dict(graph),
                     rows, area, time.perf_counter() - t0)


def _plus(a: Cost, b: Cost) -> Cost:
    return Cost(a.forward_rows + b.forward_rows, a.backward_rows + b.backward_rows, a.seconds + b.seconds,
                a.steps + b.steps)


def plot_edge_sweep(sweep: EdgeSweep, path: str) -> str:
    """KL and logit difference recovered against edges kept (log x), one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in sweep.methods:
        rows = sorted((r for r in sweep.rows if r.method == m), key=lambda r: r.n_kept)
        x = [max(r.n_kept, 1) for r in rows]
        axes[0].plot(x, [r.kl.mean for r in rows], marker="o", label=m)
        axes[0].fill_between(x, [r.kl.ci95[0] for r in rows], [r.kl.ci95[1] for r in rows], alpha=0.15)
        axes[1].plot(x, [r.recovered_of_means for r in rows], marker="o", label=m)
    for ax, label in zip(axes, ("KL(full || circuit)", "logit difference recovered")):
        ax.set_xscale("log")
        ax.set_xlabel("edges kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{sweep.model} · {sweep.task} · N={sweep.n_prompts}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
