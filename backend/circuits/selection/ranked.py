"""Methods that rank occurrences by one score: FAP, FAP-Signal, magnitude, random, FActP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backend.circuits.selection.base import (RankedStrategy, SelectionContext, Strategy, fill_to_k,
                                             segment_rank)
from backend.errors import InvalidParameterError


class FAP(RankedStrategy):
    name = "fap"
    description = "Feature Attribution Patching: top-K by |S|, S = sum_t Delta-write . dM/d mlp_out"

    def ranking(self, ctx: SelectionContext, options: dict[str, Any]) -> Tensor:
        return ctx.runs.fap.abs()


class ActivationMagnitude(RankedStrategy):
    name = "activation-magnitude"
    description = "top-K by |a_f(p; x)| times the norm of the feature's decoder writes"

    def ranking(self, ctx: SelectionContext, options: dict[str, Any]) -> Tensor:
        return ctx.runs.magnitude


class Random(RankedStrategy):
    name = "random"
    description = "uniform over active occurrences (seeded per prompt)"
    defaults = {"seed": 0}

    def ranking(self, ctx: SelectionContext, options: dict[str, Any]) -> Tensor:
        occ = ctx.occ
        values = torch.empty(len(occ), device=occ.delta.device)
        counts = occ.counts().tolist()
        start = 0
        for b, n_b in enumerate(counts):  # occurrences are sorted by prompt: contiguous slices
            values[start:start + n_b] = torch.rand(n_b, generator=ctx.generator(b, "random", options["seed"]))
            start += n_b
        return values


class FActP(RankedStrategy):
    name = "factp"
    description = ("exact feature activation patching: effect = M(x) - M(x without the occurrence), "
                   "one patched forward per occurrence (batched); optionally on a top-|S| pool")
    defaults = {"pool": None}

    def ranking(self, ctx: SelectionContext, options: dict[str, Any]) -> Tensor:
        pool = options["pool"]
        occ = ctx.occ
        in_pool = torch.ones(len(occ), dtype=torch.bool, device=occ.delta.device)
        if pool is not None:
            if int(pool) <= 0:
                raise InvalidParameterError(f"factp pool must be positive, not {pool}")
            in_pool = segment_rank(ctx.runs.fap.abs(), occ.prompt) < int(pool)
        ids = torch.nonzero(in_pool, as_tuple=True)[0]
        values = torch.full((len(occ),), float("-inf"), device=occ.delta.device)
        values[ids] = ctx.single_effects(ids).abs()
        # Outside the pool: FAP's order, mapped into (-1, 0) so it stays below every exact |effect|.
        outside = ~in_pool
        values[outside] = -1.0 / (1.0 + ctx.runs.fap[outside].abs())
        return values


class FAPSignal(Strategy):
    name = "fap-signal"
    description = "top gamma*K positive S, top gamma*K negative S, the rest by |S|"
    defaults = {"gamma": 0.25}
    budgets = ("global",)

    def select(self, ctx: SelectionContext, k: int, options: dict[str, Any]) -> Tensor:
        gamma = float(options["gamma"])
        if not 0 <= gamma <= 0.5:
            raise InvalidParameterError(f"fap-signal gamma must be in [0, 0.5], not {gamma}")
        occ, s = ctx.occ, ctx.runs.fap
        quota = int(gamma * k)
        pos = segment_rank(s.masked_fill(s <= 0, float("-inf")), occ.prompt)
        neg = segment_rank((-s).masked_fill(s >= 0, float("-inf")), occ.prompt)
        kept = ((pos < quota) & (s > 0)) | ((neg < quota) & (s < 0))
        return fill_to_k(kept, s.abs(), occ.prompt, k, occ.n_prompts)
