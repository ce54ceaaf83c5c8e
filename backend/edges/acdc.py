"""ACDC over edges (Conmy et al.; DESIGN 8.2): greedy, reverse topological, KL threshold tau.

Readers are visited from the logits backwards; for each, its incoming edges from the latest
writer to the embedding. Removing an edge is kept when KL(full || current) rises by less than
tau, always against the *current* graph. KL is the mean over prompts at the answer position.

Batched trials, exactly the sequential result: a batch holds the next c candidate edges, trial j
removing edge j on top of the *predicted* decisions for the edges before it (prediction: the
previous decision repeats). Walking the trials in order, each decision is exact as long as
every earlier prediction held; at the first wrong prediction the remaining trials are stale and
the next batch starts there. Every evaluated trial is counted as a forward over the prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from backend.circuits.evaluation import kl_divergence
from backend.edges.context import EdgeContext
from backend.edges.patching import EdgePatch


def visit_order(ctx: EdgeContext) -> list[int]:
    """Edge indices in ACDC's order: readers in reverse topological order, then writers from
    the latest to the embedding."""
    order: list[int] = []
    for r in reversed(ctx.graph.readers):
        order += list(range(r.edge_offset + r.n_writers - 1, r.edge_offset - 1, -1))
    return order


def mean_kl(ctx: EdgeContext, masks: Tensor) -> Tensor:
    """Mean KL(full || circuit) over prompts for each of c masks [c, E] -> [c], one batched
    forward per prompt part (variants x prompts as rows)."""
    c = masks.shape[0]
    total = torch.zeros(c, dtype=torch.float64)
    with torch.no_grad():
        for part in ctx.parts:
            b = part.batch
            B = len(b)
            rep = lambda x: x.repeat(c, *([1] * (x.dim() - 1)))        # noqa: E731  (variant-major)
            m = masks.repeat_interleave(B, dim=0).to(ctx.adapter.device, torch.float32)
            patch = EdgePatch(ctx.graph, part.corrupted.repeat(1, c, 1, 1), m)
            logits = ctx.adapter.run(rep(b.clean_ids), rep(b.attention_mask), last_pos=rep(b.last_pos),
                                     interventions=[patch]).logits
            kl = kl_divergence(rep(part.clean_logits), logits).view(c, B)
            total += kl.sum(1).double().cpu()
            ctx.count(c * B)
    return total / ctx.n_prompts


@dataclass
class ACDCResult:
    kept: Tensor          # [E] bool
    kl: float             # final mean KL
    trials: int           # trials evaluated (each one forward over the prompts)
    batches: int


def acdc(ctx: EdgeContext, tau: float, max_batch: int = 16, candidates: Tensor | None = None) -> ACDCResult:
    """Greedy ACDC at threshold tau. candidates [E] bool: a pool to search in (every other edge
    is removed before the search starts, as HAP fixes its non-candidates); default: every edge."""
    kept = torch.ones(ctx.graph.n_edges, dtype=torch.bool) if candidates is None else candidates.clone().bool()
    order = [e for e in visit_order(ctx) if bool(kept[e])]
    current = float(mean_kl(ctx, kept[None].float())[0])
    trials = batches = 0
    i, predict, c = 0, True, 1
    while i < len(order):
        chunk = order[i:i + c]
        masks = kept.float().repeat(len(chunk), 1)
        state = kept.clone()
        for j, e in enumerate(chunk):      # trial j: the predicted graph so far, minus edge j
            masks[j] = state.float()
            masks[j, e] = 0.0
            if predict:
                state[e] = False
        kls = mean_kl(ctx, masks)
        trials += len(chunk)
        batches += 1
        done = 0
        for j, e in enumerate(chunk):
            accept = float(kls[j]) - current < tau
            done += 1
            if accept:
                kept[e] = False
                current = float(kls[j])
            if accept != predict:      # later trials assumed the other outcome
                predict = accept
                break
        i += done
        c = min(max_batch, c * 2) if done == len(chunk) else max(1, done)
        ctx.report(i / max(len(order), 1), f"ACDC tau={tau:.3g}: {i}/{len(order)} edges visited")
    return ACDCResult(kept, current, trials, batches)


def acdc_sequential(ctx: EdgeContext, tau: float) -> Tensor:
    """The plain loop, one trial at a time (the reference the batched version must equal)."""
    kept = torch.ones(ctx.graph.n_edges, dtype=torch.bool)
    current = float(mean_kl(ctx, kept[None].float())[0])
    for e in visit_order(ctx):
        trial = kept.clone()
        trial[e] = False
        kl = float(mean_kl(ctx, trial[None].float())[0])
        if kl - current < tau:
            kept, current = trial, kl
    return kept


def acdc_for_count(ctx: EdgeContext, n_edges: int, n_tau: int = 6, tau_lo: float = 1e-5,
                   tau_hi: float = 1.0, max_batch: int = 16,
                   candidates: Tensor | None = None) -> tuple[ACDCResult, float, list[dict]]:
    """Search tau by bisection on log scale so that about ``n_edges`` edges remain (after
    dangling edges are removed); returns the run closest to the target, its tau and the trace."""
    lo, hi = math.log(tau_lo), math.log(tau_hi)
    best: tuple[int, ACDCResult, float] | None = None
    trace = []
    for _ in range(n_tau):
        tau = math.exp((lo + hi) / 2)
        res = acdc(ctx, tau, max_batch, candidates)
        n = int(ctx.graph.without_dangling(res.kept).sum())
        trace.append({"tau": tau, "edges": n, "kl": res.kl, "trials": res.trials})
        gap = abs(n - n_edges)
        if best is None or gap < best[0]:
            best = (gap, res, tau)
        if n == n_edges:
            break
        if n > n_edges:   # too many edges kept: a larger tau removes more
            lo = math.log(tau)
        else:
            hi = math.log(tau)
    assert best is not None
    return best[1], best[2], trace
