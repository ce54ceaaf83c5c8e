"""Prune and sweep: the job functions the CLI, the API and the benchmarks all call.

A sweep prepares each batch of prompts once (clean/corrupted runs, gradients, occurrences, FAP
scores) and reuses it for every method and budget; single effects computed for FActP or
FAP-Synergy are shared across budgets; every method's kept sets for all budgets are evaluated
in batched patched forwards.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backend.circuits import stats
from backend.circuits.attribution import Attributor, PromptRuns
from backend.circuits.limits import DEFAULT_TOST_MARGIN, MAX_K
from backend.circuits.evaluation import Evaluator, PromptMetrics
from backend.circuits.results import (AggregatedFeature, Circuit, FeatureOccurrence, PromptCircuit,
                                      SweepResult, SweepRow)
from backend.circuits.selection import BUDGETS, METHODS, SelectionContext, get_method
from backend.errors import InvalidParameterError
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    pass


@dataclass
class PruneConfig:
    method: str
    k: int
    budget: str = "global"
    corruption: str = "corrupted_prompt"
    grad: str = "replacement"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 16
    all_token_kl: bool = True
    completeness: bool = True
    prefix_cache: bool = True  # removal variants run from their first patched position (exact either way)


@dataclass
class SweepConfig:
    methods: list[str]
    ks: list[int]
    budget: str = "global"
    corruption: str = "corrupted_prompt"
    grad: str = "replacement"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method
    seed: int = 0
    random_seeds: int = 3
    random_curve: bool = True
    batch_size: int = 16
    all_token_kl: bool = False
    completeness: bool = True
    tost_margin: float = DEFAULT_TOST_MARGIN
    prefix_cache: bool = True  # removal variants run from their first patched position (exact either way)


def validate_k(k: int) -> int:
    if not isinstance(k, int) or k <= 0 or k > MAX_K:
        raise InvalidParameterError(f"K must be a whole number from 1 to {MAX_K}, not {k}")
    return k


def check_method(name: str, budget: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The method's options with defaults filled in; unknown method (404), budget or option (422)."""
    method = get_method(name)
    if budget not in BUDGETS:
        raise InvalidParameterError(f"unknown budget '{budget}'; known: {', '.join(BUDGETS)}")
    if budget not in method.budgets:
        raise InvalidParameterError(f"method '{name}' supports budget(s) {', '.join(method.budgets)}, not '{budget}'")
    return method.options(options)


def _batches(batch: PromptBatch, size: int):
    if size <= 0:
        raise InvalidParameterError(f"batch size must be positive, not {size}")
    for start in range(0, len(batch), size):
        yield start, batch.subset(slice(start, start + size))


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


# ---------------------------------------------------------------------------------------------
# prune


def run_prune(adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, config: PruneConfig, *,
              model_name: str, transcoder_name: str, task_name: str,
              progress: Progress | None = None) -> Circuit:
    """The top-K circuit of every prompt by one method, with PIE's metrics."""
    progress = progress or _no_progress
    validate_k(config.k)
    options = check_method(config.method, config.budget, config.options)
    method = METHODS[config.method]
    attr = Attributor(adapter, transcoder, config.corruption, config.grad, prefix_cache=config.prefix_cache)
    evaluator = Evaluator(attr)
    start_time = time.perf_counter()
    prompts: list[PromptCircuit] = []
    forwards = tokens = 0
    for start, part in _batches(batch, config.batch_size):
        progress(start / len(batch), f"attributing prompts {start + 1}-{start + len(part)} of {len(batch)}")
        runs = attr.prepare(part, offset=start)
        ctx = SelectionContext(runs, attr, evaluator, config.budget, config.seed)
        kept = method.select(ctx, config.k, options)
        metrics = evaluator.evaluate(runs, [kept], all_token=config.all_token_kl,
                                     completeness=config.completeness)[0]
        prompts += _prompt_circuits(adapter, runs, kept, metrics, start)
        forwards += runs.counters["patched_forwards"]
        tokens += runs.counters["tokens_forwarded"]
    progress(1.0, "done")
    kl = np.array([p.kl_last for p in prompts])
    faith = [p.faithfulness for p in prompts]
    completeness = [p.completeness for p in prompts if p.completeness is not None]
    return Circuit(
        model=model_name, transcoder=transcoder_name, task=task_name, method=config.method, k=config.k,
        budget=config.budget, corruption=config.corruption,
        options={**options, "grad": config.grad, **_selection(method.selection_notes(config.k, options))},
        prompts=prompts, features=_aggregate(prompts), kl=stats.summarize(kl, seed=config.seed),
        pred_change_rate=float(np.mean([p.pred_changed for p in prompts])),
        faithfulness_mean=_nan_stat(faith, np.nanmean), completeness_mean=_nan_stat(completeness, np.nanmean),
        seconds=time.perf_counter() - start_time,
        cost={"patched_forwards": forwards, "tokens_forwarded": tokens, "n_prompts": len(prompts)})


def _selection(notes: dict[str, Any]) -> dict[str, Any]:
    return {"selection": notes} if notes else {}


def _prompt_circuits(adapter: ModelAdapter, runs: PromptRuns, kept: torch.Tensor, m: PromptMetrics,
                     offset: int) -> list[PromptCircuit]:
    occ = runs.occ
    counts = occ.counts().tolist()
    ids = torch.nonzero(kept, as_tuple=True)[0]
    order = ids[torch.argsort(runs.fap[ids].abs(), descending=True, stable=True)]
    order = order[torch.argsort(occ.prompt[order], stable=True)]
    cols = {name: getattr(occ, name)[order].tolist() for name in ("prompt", "layer", "feature", "pos", "act", "delta")}
    scores = runs.fap[order].tolist()
    per_prompt: dict[int, list[FeatureOccurrence]] = defaultdict(list)
    for i, b in enumerate(cols["prompt"]):
        per_prompt[b].append(FeatureOccurrence(cols["layer"][i], cols["feature"][i], cols["pos"][i],
                                               scores[i], cols["act"][i], cols["delta"][i]))
    out = []
    for b, pair in enumerate(runs.batch.pairs):
        length = int(runs.batch.last_pos[b]) + 1
        tokens = adapter.tokenizer.convert_ids_to_tokens(runs.batch.clean_ids[b, :length].tolist()) \
            if adapter.tokenizer is not None else []
        out.append(PromptCircuit(
            index=offset + b, clean=pair.clean, corrupted=pair.corrupted, tokens=tokens, n_active=counts[b],
            kept=per_prompt[b], kl_last=float(m.kl_last[b]),
            kl_all=float(m.kl_all[b]) if m.kl_all is not None else None,
            pred_changed=bool(m.pred_changed[b]), faithfulness=float(m.faithfulness[b]),
            completeness=float(m.completeness[b]) if m.completeness is not None else None))
    return out


def _aggregate(prompts: list[PromptCircuit]) -> list[AggregatedFeature]:
    """Features kept on any prompt, by how many prompts kept them (then mean |score|)."""
    seen: dict[tuple[int, int], list[float]] = defaultdict(list)
    for p in prompts:
        per_feature: dict[tuple[int, int], float] = {}
        for o in p.kept:
            key = (o.layer, o.feature)
            per_feature[key] = max(per_feature.get(key, 0.0), abs(o.score))
        for key, score in per_feature.items():
            seen[key].append(score)
    rows = [AggregatedFeature(layer, feature, len(s), float(np.mean(s))) for (layer, feature), s in seen.items()]
    return sorted(rows, key=lambda r: (-r.n_prompts, -r.mean_abs_score, r.layer, r.feature))


# ---------------------------------------------------------------------------------------------
# sweep

# The paper's claim that an effective-budget test checks: FAP-Synergy at K=50 matches FAP at K=75.
CLAIMED_RATIO = 1.5


@dataclass
class _Point:
    """Per-prompt results of one (method, K) accumulated over batches."""

    kl: list[float] = field(default_factory=list)
    kl_all: list[float] = field(default_factory=list)
    pred: list[float] = field(default_factory=list)
    faith: list[float] = field(default_factory=list)
    completeness: list[float] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # per prompt, `_kept_digests`
    seconds: float = 0.0
    forwards: int = 0


def base_method(methods: list[str]) -> str:
    """The method every other one is compared with for effective budgets: FAP, else the first."""
    return "fap" if "fap" in methods else methods[0]


@dataclass
class SweepPlan:
    """A validated sweep: what every shard and the merge agree on."""

    config: SweepConfig
    ks: list[int]
    options: dict[str, dict[str, Any]]  # per method, defaults filled in
    base: str                           # the method effective budgets are measured against
    compared: list[str]                 # the other methods
    claimed: list[int]                  # round(1.5 K) off the grid ks, run for the base method


def plan_sweep(config: SweepConfig) -> SweepPlan:
    """Check a sweep's config (unknown method 404, bad budget/option/K 422) -> its plan."""
    if not config.methods:
        raise InvalidParameterError("a sweep needs at least one method")
    ks = sorted({validate_k(k) for k in config.ks})
    if not ks:
        raise InvalidParameterError("a sweep needs at least one budget K")
    options = {m: check_method(m, config.budget, config.options.get(m)) for m in config.methods}
    unknown = set(config.options) - set(config.methods)
    if unknown:
        raise InvalidParameterError(f"options given for method(s) not in the sweep: {', '.join(sorted(unknown))}")
    if config.random_seeds <= 0:
        raise InvalidParameterError("random_seeds must be at least 1")
    if not (isinstance(config.tost_margin, (int, float)) and math.isfinite(config.tost_margin)
            and config.tost_margin > 0):
        raise InvalidParameterError(f"the TOST margin must be a positive number of nats, not {config.tost_margin}")
    base = base_method(config.methods)
    compared = [m for m in config.methods if m != base]
    claimed = sorted({_claimed_budget(k) for k in ks} - set(ks)) if compared else []
    return SweepPlan(config, ks, options, base, compared, claimed)


@dataclass(frozen=True)
class Shard:
    """Prompts [start, stop) of a sweep: one batch, the unit an executor runs anywhere."""

    start: int
    stop: int

    @property
    def label(self) -> str:
        return f"prompts {self.start + 1}-{self.stop}"


def sweep_shards(n_prompts: int, batch_size: int) -> list[Shard]:
    """The batches of a sweep, in order (the in-process run and every executor use these)."""
    if batch_size <= 0:
        raise InvalidParameterError(f"batch size must be positive, not {batch_size}")
    return [Shard(start, min(start + batch_size, n_prompts)) for start in range(0, n_prompts, batch_size)]


@dataclass
class FirstPass:
    """One shard's first pass: every (method, K), the base method at round(1.5 K) (`extra`), the
    active counts and KL with nothing kept per prompt, and `none` = (M, KL) with nothing kept
    ([B] each, on the CPU: a shard result may travel to a driver without a GPU) for the second
    pass to reuse."""

    points: dict[tuple[str, int], _Point]
    extra: dict[int, _Point]
    n_active: list[int]
    kl_none: list[float]
    none: tuple[torch.Tensor, torch.Tensor]
    prep_seconds: float
    seconds: float = 0.0  # the whole shard, wall clock


@dataclass(frozen=True)
class SecondPlan:
    """What the second pass runs, read off the merged first pass: the base method at round(K')
    and the random-from-active curve's budgets not on the grid."""

    at_k_equivalent: list[int]
    curve_ks: list[int]


@dataclass
class SecondPass:
    extra: dict[int, _Point]
    curve: dict[int, _Point]
    prep_seconds: float
    seconds: float = 0.0


class SweepShards:
    """One model, transcoder and prompt batch that runs a sweep's shards: the in-process sweep
    and every executor's workers call these two methods, so there is one code path for the science.

    Shards are prompt batches: every (method, K) of a batch shares its prepared runs and its cache
    of exact single effects, so splitting methods apart would repeat the attribution.
    """

    def __init__(self, adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, config: SweepConfig):
        self.plan = plan_sweep(config)
        self.batch = batch
        self.attr = Attributor(adapter, transcoder, config.corruption, config.grad, prefix_cache=config.prefix_cache)
        self.evaluator = Evaluator(self.attr)

    def _prepared(self, shard: Shard, none: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[SelectionContext, float]:
        t0 = time.perf_counter()
        runs = self.attr.prepare(self.batch.subset(slice(shard.start, shard.stop)), offset=shard.start)
        if none is not None:  # the second pass: no need to run "nothing kept" again
            runs.m_none, runs.none_kl = (t.to(self.attr.device) for t in none)
        ctx = SelectionContext(runs, self.attr, self.evaluator, self.plan.config.budget, self.plan.config.seed)
        return ctx, time.perf_counter() - t0

    def _evaluate(self, ctx: SelectionContext, name: str, k: int, point: _Point, full: bool) -> None:
        """Accumulate (name, k) on this shard; ``full``: a sweep row (all-token KL and completeness
        as configured), else KL only (the random curve, the effective-budget runs)."""
        config = self.plan.config
        t0 = time.perf_counter()
        runs = ctx.runs
        before = runs.counters["patched_forwards"]
        opts = self.plan.options.get(name, {})
        seeds: list[int | None] = list(range(config.random_seeds)) if name == "random" else [None]
        masks = [METHODS[name].select(ctx, k, {**opts, **({"seed": s} if s is not None else {})}) for s in seeds]
        _accumulate(point, self.evaluator.evaluate(runs, masks, all_token=full and config.all_token_kl,
                                                   completeness=full and config.completeness))
        point.kept += _kept_digests(runs, masks)
        point.seconds += time.perf_counter() - t0
        point.forwards += runs.counters["patched_forwards"] - before

    def first_pass(self, shard: Shard, progress: Progress | None = None) -> FirstPass:
        """Every (method, K) on this shard, and the base method at round(1.5 K)."""
        progress, t0 = progress or _no_progress, time.perf_counter()
        plan, span = self.plan, shard.label
        steps = len(plan.config.methods) + 1 + bool(plan.claimed)
        progress(0.0, f"attributing {span} of {len(self.batch)}")
        ctx, prep = self._prepared(shard)
        out = FirstPass(defaultdict(_Point), defaultdict(_Point), ctx.occ.counts().tolist(),
                        _kl_none(self.evaluator, ctx.runs), (ctx.runs.m_none.cpu(), ctx.runs.none_kl.cpu()), prep)
        for i, name in enumerate(plan.config.methods):
            progress((1 + i) / steps, f"{name} on {span}")
            for k in plan.ks:
                self._evaluate(ctx, name, k, out.points[(name, k)], full=True)
        if plan.claimed:
            progress((steps - 1) / steps, f"{plan.base} at 1.5 K on {span}")
            for k in plan.claimed:
                self._evaluate(ctx, plan.base, k, out.extra[k], full=False)
        out.points, out.extra = dict(out.points), dict(out.extra)
        out.seconds = time.perf_counter() - t0
        return out

    def second_pass(self, shard: Shard, follow: SecondPlan, none: tuple[torch.Tensor, torch.Tensor],
                    progress: Progress | None = None) -> SecondPass:
        """The base method at round(K') and the random curve off the grid, on this shard."""
        progress, t0 = progress or _no_progress, time.perf_counter()
        what = " and ".join(([f"{self.plan.base} at K'"] if follow.at_k_equivalent else [])
                            + (["random-from-active curve"] if follow.curve_ks else []))
        progress(0.0, f"{what} on {shard.label}")
        ctx, prep = self._prepared(shard, none)
        out = SecondPass({k: _Point() for k in follow.at_k_equivalent}, {k: _Point() for k in follow.curve_ks}, prep)
        for k in follow.at_k_equivalent:
            self._evaluate(ctx, self.plan.base, k, out.extra[k], full=False)
        for k in follow.curve_ks:
            self._evaluate(ctx, "random", k, out.curve[k], full=False)
        out.seconds = time.perf_counter() - t0
        return out


MapShards = Callable[[str, list[tuple], Progress], list]
"""How an executor runs shards: (name of a method of the shards' runner — `SweepShards`,
`backend.edges.pipeline.EdgeSweepPoints`, `backend.hagd.pipeline.HagdVerifier` — its arguments per
shard, the first a unit with a `label`, progress over all of them) -> the results in shard order."""


def local_map(shards: Any) -> MapShards:
    """Run shards one after the other in this process on `shards` (a runner as above: the
    in-process executor)."""
    def run(method: str, args: list[tuple], progress: Progress) -> list:
        out = []
        for i, a in enumerate(args):
            out.append(getattr(shards, method)(*a, progress=lambda f, m, i=i: progress((i + f) / len(args), m)))
        return out
    return run


def _merge(parts: list[_Point]) -> _Point:
    """One point from the same (method, K) on consecutive shards: per-prompt lists in shard order."""
    out = _Point()
    for p in parts:
        for name in ("kl", "kl_all", "pred", "faith", "completeness", "kept"):
            getattr(out, name).extend(getattr(p, name))
        out.seconds += p.seconds
        out.forwards += p.forwards
    return out


def run_sweep(adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, config: SweepConfig, *,
              model_name: str, transcoder_name: str, task_name: str,
              progress: Progress | None = None) -> SweepResult:
    """KL-vs-K for several methods on the same prompts, the random-from-active curve, and every
    method's effective budget against the base method (`base_method`), in this process."""
    shards = SweepShards(adapter, transcoder, batch, config)
    return merge_sweep(shards.plan, len(batch), local_map(shards), model_name=model_name,
                       transcoder_name=transcoder_name, task_name=task_name, progress=progress)


def merge_sweep(plan: SweepPlan, n_prompts: int, map_shards: MapShards, *, model_name: str,
                transcoder_name: str, task_name: str, progress: Progress | None = None) -> SweepResult:
    """The sweep of `plan` over its shards, run by `map_shards`, merged into one SweepResult.

    Two passes over the shards, each holding one batch's runs at a time, so memory does not grow
    with the number of prompts. The first evaluates every (method, K) and the base method at
    round(1.5 K). The second, when needed, prepares each batch again (the same deterministic runs)
    for what depends on the whole first pass: the base method at round(K'), K' read off its mean
    KL curve, and the random-from-active curve, whose grid reaches the largest active count of
    any prompt. Per-prompt values are concatenated in shard order and every statistic (CIs,
    TOSTs, compression) is computed here on the merged values, so the result does not depend on
    where the shards ran.
    """
    progress = progress or _no_progress
    config, ks, base = plan.config, plan.ks, plan.base
    start_time = time.perf_counter()
    shards = sweep_shards(n_prompts, config.batch_size)
    first_share = 0.95 if config.random_curve or plan.compared else 1.0
    firsts: list[FirstPass] = map_shards("first_pass", [(s,) for s in shards],
                                         lambda f, m: progress(first_share * f, m))
    points = {(name, k): _merge([f.points[(name, k)] for f in firsts]) for name in config.methods for k in ks}
    extra = {k: _merge([f.extra[k] for f in firsts]) for k in plan.claimed}
    n_active = [c for f in firsts for c in f.n_active]
    kl_none = [v for f in firsts for v in f.kl_none]
    prep_seconds = sum(f.prep_seconds for f in firsts)
    rows = [_row(name, k, points[(name, k)], config.seed, METHODS[name].selection_notes(k, plan.options[name]))
            for name in config.methods for k in ks]
    base_rows = [r for r in rows if r.method == base]
    plans = {(r.method, r.k): stats.effective_budget_plan(r.kl_mean, r.k, [b.k for b in base_rows],
                                                          [b.kl_mean for b in base_rows], CLAIMED_RATIO)
             for r in rows if r.method != base}
    at_k_equivalent = sorted({p["k_base"] for p in plans.values() if p["k_base"] is not None}
                             - set(ks) - set(plan.claimed))
    done = {k: points[("random", k)] for k in ks} if "random" in config.methods else {}
    grid = random_grid(ks, max(n_active)) if config.random_curve else []
    follow = SecondPlan(at_k_equivalent, [k for k in grid if k not in done])
    curve: dict[int, _Point] = dict(done)
    if follow.at_k_equivalent or follow.curve_ks:
        seconds: list[SecondPass] = map_shards("second_pass", [(s, follow, f.none) for s, f in zip(shards, firsts)],
                                               lambda f, m: progress(first_share + (1 - first_share) * f, m))
        extra |= {k: _merge([s.extra[k] for s in seconds]) for k in follow.at_k_equivalent}
        curve |= {k: _merge([s.curve[k] for s in seconds]) for k in follow.curve_ks}
        prep_seconds += sum(s.prep_seconds for s in seconds)
    random_curve = [_row("random", k, curve[k], config.seed) for k in grid]
    progress(1.0, "done")
    per_prompt = {name: {str(k): points[(name, k)].kl for k in ks} for name in config.methods}
    base_kl = {**{k: per_prompt[base][str(k)] for k in ks}, **{k: p.kl for k, p in extra.items()}}
    return SweepResult(
        model=model_name, transcoder=transcoder_name, task=task_name, n_prompts=n_prompts,
        corruption=config.corruption, methods=list(config.methods), ks=ks, rows=rows, random_curve=random_curve,
        effective_compression=_compression(rows, random_curve),
        effective_budget=[{"method": r.method, "k": r.k, "base": base, "kl_mean": r.kl_mean}
                          | stats.effective_budget_tests(per_prompt[r.method][str(r.k)], base_kl,
                                                         plans[(r.method, r.k)], config.tost_margin)
                          for r in rows if r.method != base],
        per_prompt_kl=per_prompt,
        n_active_mean=float(np.mean(n_active)),
        kl_none_mean=float(np.mean(kl_none)), seconds=time.perf_counter() - start_time,
        options={"budget": config.budget, "grad": config.grad, "seed": config.seed,
                 "random_seeds": config.random_seeds, "batch_size": config.batch_size,
                 "method_options": plan.options, "prep_seconds": prep_seconds, "tost_margin": config.tost_margin,
                 "effective_budget_base": base, "claimed_ratio": CLAIMED_RATIO},
        budget_runs=[_row(base, k, extra[k], config.seed) for k in sorted(extra)],
        budget_runs_kl={str(k): extra[k].kl for k in sorted(extra)})


def _kept_digests(runs: PromptRuns, masks: list[torch.Tensor]) -> list[str]:
    """Per prompt of the batch, a digest of the (layer, feature, pos) it kept under every mask
    (random's seeds in order): equal digests, identical kept sets."""
    occ = runs.occ
    digests = [hashlib.sha256() for _ in range(len(runs.batch))]
    for mask in masks:
        ids = torch.nonzero(mask, as_tuple=True)[0]
        keys = torch.stack([occ.layer[ids], occ.feature[ids], occ.pos[ids]], 1).to(torch.int64)
        owner = occ.prompt[ids]
        for b, digest in enumerate(digests):
            digest.update(keys[owner == b].numpy().tobytes() + b"|")
    return [d.hexdigest()[:16] for d in digests]


def _claimed_budget(k: int) -> int:
    return max(1, int(round(CLAIMED_RATIO * k)))


def _kl_none(evaluator: Evaluator, runs: PromptRuns) -> list[float]:
    evaluator.m_none(runs)  # its forward also gives the KL with every occurrence removed
    return runs.none_kl.tolist()


def _accumulate(point: _Point, results: list[PromptMetrics]) -> None:
    """Per-prompt values, averaged over the results (random's seeds) first."""
    point.kl += torch.stack([r.kl_last for r in results]).mean(0).tolist()
    point.pred += torch.stack([r.pred_changed.float() for r in results]).mean(0).tolist()
    point.faith += torch.stack([r.faithfulness for r in results]).nanmean(0).tolist()
    if results[0].kl_all is not None:
        point.kl_all += torch.stack([r.kl_all for r in results]).mean(0).tolist()
    if results[0].completeness is not None:
        point.completeness += torch.stack([r.completeness for r in results]).nanmean(0).tolist()


def _nan_stat(values: list[float], fn) -> float | None:
    """fn (np.nanmean, np.nanmedian) of per-prompt ratios, None when none is defined."""
    x = np.array(values, dtype=float)
    return _nan_to_none(fn(x)) if np.isfinite(x).any() else None


def _row(name: str, k: int, p: _Point, seed: int, selection: dict[str, Any] | None = None) -> SweepRow:
    s = stats.summarize(p.kl, seed=seed)
    return SweepRow(method=name, k=k, kl_mean=s.mean, kl_std=s.std, kl_ci95=s.ci95,
                    pred_change_rate=float(np.mean(p.pred)),
                    faithfulness_mean=_nan_stat(p.faith, np.nanmean),
                    n_prompts=len(p.kl), seconds=p.seconds, patched_forwards=p.forwards,
                    kl_all_mean=float(np.mean(p.kl_all)) if p.kl_all else None,
                    completeness_mean=_nan_stat(p.completeness, np.nanmean),
                    faithfulness_median=_nan_stat(p.faith, np.nanmedian),
                    selection=selection or None)


def random_grid(ks: list[int], max_active: int, points: int = 8) -> list[int]:
    """The budgets ks plus a geometric grid from min(ks) up to every active occurrence."""
    top = max(max_active, max(ks))
    grid = np.unique(np.round(np.geomspace(min(ks), top, points)).astype(int)).tolist()
    return sorted(set(grid) | set(ks) | {top})


def _compression(rows: list[SweepRow], random_curve: list[SweepRow]) -> dict[str, dict[str, float | None]]:
    """Effective compression of every method at every K against the random-from-active curve."""
    if not random_curve:
        return {}
    rks = [r.k for r in random_curve]
    rkl = [r.kl_mean for r in random_curve]
    out: dict[str, dict[str, float | None]] = defaultdict(dict)
    for r in rows:
        out[r.method][str(r.k)] = stats.effective_compression(r.kl_mean, r.k, rks, rkl)
    return dict(out)
