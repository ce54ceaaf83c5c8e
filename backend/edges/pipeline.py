"""Edge circuits and edge sweeps end to end: method -> kept edges -> shared evaluation -> results.

The CLI, the worker's job functions and the bench call these; JSON is made in one place
(``EdgeCircuit.to_json``, ``EdgeSweep.to_json``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from backend.circuits.results import Stat
from backend.edges.attention import MAX_PROMPTS, circuit_heads, head_attention
from backend.edges.context import EdgeContext, Progress
from backend.edges.evaluation import EdgeMetrics, curve_area, evaluate, log_spaced_counts
from backend.edges.registry import EdgeRun, get_edge_method, target_count
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


def run_edge_sweep(adapter: ModelAdapter, batch: PromptBatch, config: EdgeSweepConfig, *,
                   model_name: str = "", task_name: str = "", progress: Progress | None = None) -> EdgeSweep:
    """Every method at every edge count on the same prompts; faithfulness curves and their area."""
    methods = [get_edge_method(m) for m in config.methods]
    unknown = set(config.options) - {m.name for m in methods}
    if unknown:
        raise InvalidParameterError(f"options given for methods not in the sweep: {', '.join(sorted(unknown))}")
    options = {m.name: m.options(config.options.get(m.name)) for m in methods}
    t0 = time.perf_counter()
    ctx = EdgeContext.create(adapter, batch, batch_size=config.batch_size, seed=config.seed)
    E = ctx.graph.n_edges
    counts = sorted(set(config.counts or log_spaced_counts(E)))
    for c in counts:
        target_count(E, edges=c)
    rows: list[EdgeSweepRow] = []
    total = len(methods) * len(counts)
    for i, m in enumerate(methods):
        for j, c in enumerate(counts):
            done = i * len(counts) + j
            ctx.progress = (None if progress is None else
                            lambda f, msg, done=done: progress((done + f) / total, msg))
            run = m.run(ctx, c, options[m.name])
            ev = evaluate(ctx, run.kept, seed=config.seed)
            rows.append(EdgeSweepRow(m.name, c, int(run.kept.sum()), ev.kl_stat, ev.recovered_stat,
                                     ev.accuracy_stat, ev.recovered_of_means, run.cost.as_dict(ctx.n_prompts)))
            if progress is not None:
                progress((done + 1) / total, f"{m.name} at {c} edges: KL {ev.kl_stat.mean:.3f}")
    area = {}
    for m in methods:
        mine = [r for r in rows if r.method == m.name]
        xs = [max(r.n_kept, 1) for r in mine]
        order = sorted(range(len(mine)), key=lambda k: xs[k])
        area[m.name] = {"kl": curve_area([xs[k] for k in order], [mine[k].kl.mean for k in order], E),
                        "recovered": curve_area([xs[k] for k in order],
                                                [mine[k].recovered_of_means for k in order], E)}
    return EdgeSweep(model_name or adapter.name, task_name, len(batch), [m.name for m in methods], counts,
                     options, ctx.graph.counts(), rows, area, time.perf_counter() - t0)


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
