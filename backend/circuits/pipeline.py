"""Prune and sweep: the job functions the CLI, the API and the benchmarks all call.

A sweep prepares each batch of prompts once (clean/corrupted runs, gradients, occurrences, FAP
scores) and reuses it for every method and budget; single effects computed for FActP or
FAP-Synergy are shared across budgets; every method's kept sets for all budgets are evaluated
in batched patched forwards.
"""

from __future__ import annotations

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
from backend.circuits.evaluation import Evaluator, PromptMetrics
from backend.circuits.results import (AggregatedFeature, Circuit, FeatureOccurrence, PromptCircuit,
                                      SweepResult, SweepRow)
from backend.circuits.selection import BUDGETS, METHODS, SelectionContext, get_method
from backend.errors import InvalidParameterError
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch

Progress = Callable[[float, str], None]
MAX_K = 1_000_000


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
    tost_margin: float = 0.05


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
    attr = Attributor(adapter, transcoder, config.corruption, config.grad)
    evaluator = Evaluator(attr)
    start_time = time.perf_counter()
    prompts: list[PromptCircuit] = []
    forwards = 0
    for start, part in _batches(batch, config.batch_size):
        progress(start / len(batch), f"attributing prompts {start + 1}-{start + len(part)} of {len(batch)}")
        runs = attr.prepare(part, offset=start)
        ctx = SelectionContext(runs, attr, evaluator, config.budget, config.seed)
        kept = method.select(ctx, config.k, options)
        metrics = evaluator.evaluate(runs, [kept], all_token=config.all_token_kl,
                                     completeness=config.completeness)[0]
        prompts += _prompt_circuits(adapter, runs, kept, metrics, start)
        forwards += runs.counters["patched_forwards"]
    progress(1.0, "done")
    kl = np.array([p.kl_last for p in prompts])
    faith = np.array([p.faithfulness for p in prompts], dtype=float)
    completeness = [p.completeness for p in prompts if p.completeness is not None]
    return Circuit(
        model=model_name, transcoder=transcoder_name, task=task_name, method=config.method, k=config.k,
        budget=config.budget, corruption=config.corruption, options={**options, "grad": config.grad},
        prompts=prompts, features=_aggregate(prompts), kl=stats.summarize(kl, seed=config.seed),
        pred_change_rate=float(np.mean([p.pred_changed for p in prompts])),
        faithfulness_mean=_nan_to_none(np.nanmean(faith)) if np.isfinite(faith).any() else None,
        completeness_mean=_nan_to_none(np.nanmean(np.array(completeness, dtype=float))) if completeness else None,
        seconds=time.perf_counter() - start_time,
        cost={"patched_forwards": forwards, "n_prompts": len(prompts)})


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


@dataclass
class _Point:
    """Per-prompt results of one (method, K) accumulated over batches."""

    kl: list[float] = field(default_factory=list)
    kl_all: list[float] = field(default_factory=list)
    pred: list[float] = field(default_factory=list)
    faith: list[float] = field(default_factory=list)
    seconds: float = 0.0
    forwards: int = 0


def run_sweep(adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, config: SweepConfig, *,
              model_name: str, transcoder_name: str, task_name: str,
              progress: Progress | None = None) -> SweepResult:
    """KL-vs-K for several methods on the same prompts, plus the random-from-active curve."""
    progress = progress or _no_progress
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
    attr = Attributor(adapter, transcoder, config.corruption, config.grad)
    evaluator = Evaluator(attr)
    start_time = time.perf_counter()
    points: dict[tuple[str, int], _Point] = defaultdict(_Point)
    kept_runs: list[PromptRuns] = []
    n_active: list[int] = []
    kl_none: list[float] = []
    prep_seconds = 0.0
    n_steps = len(range(0, len(batch), config.batch_size)) * (len(config.methods) + 1)
    step = 0
    for start, part in _batches(batch, config.batch_size):
        t0 = time.perf_counter()
        progress(step / n_steps, f"attributing prompts {start + 1}-{start + len(part)} of {len(batch)}")
        runs = attr.prepare(part, offset=start)
        n_active += runs.occ.counts().tolist()
        kl_none += _kl_none(evaluator, runs)
        prep_seconds += time.perf_counter() - t0
        step += 1
        ctx = SelectionContext(runs, attr, evaluator, config.budget, config.seed)
        for name in config.methods:
            progress(step / n_steps, f"{name} on prompts {start + 1}-{start + len(part)}")
            seeds = range(config.random_seeds) if name == "random" else [None]
            for k in ks:
                t1 = time.perf_counter()
                before = runs.counters["patched_forwards"]
                masks = [METHODS[name].select(ctx, k, {**options[name], **({"seed": s} if s is not None else {})})
                         for s in seeds]
                results = evaluator.evaluate(runs, masks, all_token=config.all_token_kl)
                _accumulate(points[(name, k)], results)
                points[(name, k)].seconds += time.perf_counter() - t1
                points[(name, k)].forwards += runs.counters["patched_forwards"] - before
            step += 1
        if config.random_curve:
            kept_runs.append(runs)
    rows = [_row(name, k, points[(name, k)], config.seed) for name in config.methods for k in ks]
    # The curve reuses the random method's budgets when the sweep has them (same seeds, same prompts).
    done = {k: points[("random", k)] for k in ks} if "random" in config.methods else {}
    random_curve = _random_curve(attr, evaluator, kept_runs, ks, config, progress, done) if config.random_curve else []
    progress(1.0, "done")
    per_prompt = {name: {str(k): points[(name, k)].kl for k in ks} for name in config.methods}
    return SweepResult(
        model=model_name, transcoder=transcoder_name, task=task_name, n_prompts=len(batch),
        corruption=config.corruption, methods=list(config.methods), ks=ks, rows=rows, random_curve=random_curve,
        effective_compression=_compression(rows, random_curve),
        effective_budget=_effective_budgets(rows, per_prompt, config),
        per_prompt_kl=per_prompt,
        n_active_mean=float(np.mean(n_active)),
        kl_none_mean=float(np.mean(kl_none)), seconds=time.perf_counter() - start_time,
        options={"budget": config.budget, "grad": config.grad, "seed": config.seed,
                 "random_seeds": config.random_seeds, "batch_size": config.batch_size,
                 "method_options": options, "prep_seconds": prep_seconds})


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


def _row(name: str, k: int, p: _Point, seed: int) -> SweepRow:
    s = stats.summarize(p.kl, seed=seed)
    faith = np.array(p.faith, dtype=float)
    return SweepRow(method=name, k=k, kl_mean=s.mean, kl_std=s.std, kl_ci95=s.ci95,
                    pred_change_rate=float(np.mean(p.pred)),
                    faithfulness_mean=_nan_to_none(np.nanmean(faith)) if np.isfinite(faith).any() else None,
                    n_prompts=len(p.kl), seconds=p.seconds, patched_forwards=p.forwards,
                    kl_all_mean=float(np.mean(p.kl_all)) if p.kl_all else None,
                    faithfulness_median=_nan_to_none(np.nanmedian(faith)) if np.isfinite(faith).any() else None)


def random_grid(ks: list[int], max_active: int, points: int = 8) -> list[int]:
    """The budgets ks plus a geometric grid from min(ks) up to every active occurrence."""
    top = max(max_active, max(ks))
    grid = np.unique(np.round(np.geomspace(min(ks), top, points)).astype(int)).tolist()
    return sorted(set(grid) | set(ks) | {top})


def _random_curve(attr: Attributor, evaluator: Evaluator, all_runs: list[PromptRuns], ks: list[int],
                  config: SweepConfig, progress: Progress, done: dict[int, _Point]) -> list[SweepRow]:
    max_active = max(int(r.occ.counts().max()) for r in all_runs)
    grid = random_grid(ks, max_active)
    method = METHODS["random"]
    points: dict[int, _Point] = defaultdict(_Point, done)
    for i, runs in enumerate(all_runs):
        progress(0.95 + 0.05 * i / len(all_runs), "random-from-active curve")
        ctx = SelectionContext(runs, attr, evaluator, config.budget, config.seed)
        for k in (k for k in grid if k not in done):
            t0 = time.perf_counter()
            before = runs.counters["patched_forwards"]
            masks = [method.select(ctx, k, {"seed": s}) for s in range(config.random_seeds)]
            _accumulate(points[k], evaluator.evaluate(runs, masks))
            points[k].seconds += time.perf_counter() - t0
            points[k].forwards += runs.counters["patched_forwards"] - before
    return [_row("random", k, points[k], config.seed) for k in grid]


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


def _effective_budgets(rows: list[SweepRow], per_prompt: dict[str, dict[str, list[float]]],
                       config: SweepConfig) -> list[dict[str, Any]]:
    """For each method against FAP (the base), the K' where FAP matches it, with a paired TOST."""
    base = "fap" if "fap" in config.methods else config.methods[0]
    base_rows = sorted((r for r in rows if r.method == base), key=lambda r: r.k)
    base_ks, base_kl = [r.k for r in base_rows], [r.kl_mean for r in base_rows]
    base_by_k = {r.k: per_prompt[base][str(r.k)] for r in base_rows}
    out = []
    for r in rows:
        if r.method == base:
            continue
        k_eq = stats.effective_budget(r.kl_mean, base_ks, base_kl)
        entry: dict[str, Any] = {"method": r.method, "k": r.k, "base": base, "k_equivalent": k_eq}
        if k_eq is not None and len(per_prompt[r.method][str(r.k)]) >= 2:
            entry.update(stats.equivalent_budget_test(per_prompt[r.method][str(r.k)], base_by_k, k_eq,
                                                      config.tost_margin))
        out.append(entry)
    return out
