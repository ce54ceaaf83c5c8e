"""FAP-Synergy: rerank the boundary of FAP's top-K by exact pairwise synergy (DESIGN section 5).

effect(S) = M(x) - M(x with the Delta-writes of S subtracted);
Syn(b, c) = effect({b, c}) - effect({b}) - effect({c}), counted only when both single effects
are > 0. With h = round(bp/100 * K / 2): the core is the top K-h by |S|; boundary candidates
are ranks [K-h, K+h) (at most ``cap``); partners are the first 32 core occurrences and each
candidate samples 8 of them. syn_z(c) = max(0, median_b Syn(b, c)) / median_partners |effect(b)|;
boosted(c) = |S(c)| / median(|S| in the top K) + lambda * syn_z(c). The core plus the best h
candidates by boosted fill K.

Single effects are cached across budgets; pairs are only run where both singles are positive;
all single and pair variants of a batch go through the model together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backend.circuits.selection.base import SelectionContext, Strategy, segment_rank
from backend.errors import InvalidParameterError


class FAPSynergy(Strategy):
    name = "fap-synergy"
    description = "FAP with the top-K boundary reranked by exact pairwise synergy (lambda, bp, cap)"
    defaults = {"lam": 3.0, "bp": 25.0, "cap": 32, "partners": 32, "samples": 8}
    budgets = ("global",)

    def select(self, ctx: SelectionContext, k: int, options: dict[str, Any]) -> Tensor:
        lam, bp = float(options["lam"]), float(options["bp"])
        cap, n_partners, n_samples = int(options["cap"]), int(options["partners"]), int(options["samples"])
        if not 0 <= bp <= 100 or cap < 0 or n_partners <= 0 or n_samples <= 0:
            raise InvalidParameterError("fap-synergy needs 0 <= bp <= 100, cap >= 0, partners > 0, samples > 0")
        occ = ctx.occ
        score = ctx.runs.fap.abs()
        rank = segment_rank(score, occ.prompt)
        h = int(round(bp / 100 * k / 2))
        kept = rank < k - h
        if h == 0:
            return kept
        device = score.device
        # Per prompt: candidate ids [C], partner ids [P] and sampled partner pairs.
        plans = []
        for b in range(occ.n_prompts):
            ids = torch.nonzero(occ.prompt == b, as_tuple=True)[0]
            if len(ids) <= k:
                kept[ids] = True  # fewer than K occurrences: keep them all, nothing to rerank
                continue
            order = ids[torch.argsort(rank[ids])]
            cands = order[k - h:min(k + h, k - h + cap, len(order))]
            partners = order[:min(n_partners, k - h)]
            pick = torch.rand(len(cands), len(partners), generator=ctx.generator(b, "synergy", k))
            sampled = partners[pick.argsort(dim=1)[:, :n_samples].to(device)]           # [C, S]
            top_median = score[order[:k]].median()
            plans.append((order, cands, partners, sampled, top_median))
        if not plans:
            return kept
        singles_needed = torch.cat([torch.cat([p[1], p[2]]) for p in plans])
        ctx.single_effects(singles_needed)
        single = ctx.cache["single"]
        # Pairs only where both single effects are positive: the others cannot count.
        firsts, seconds = [], []
        for _, cands, _, sampled, _ in plans:
            c = cands[:, None].expand_as(sampled)
            ok = (single[sampled] > 0) & (single[c] > 0)
            firsts.append(sampled[ok])
            seconds.append(c[ok])
        firsts_t, seconds_t = torch.cat(firsts), torch.cat(seconds)
        pair = self._pair_effects(ctx, firsts_t, seconds_t)
        for order, cands, partners, sampled, top_median in plans:
            c = cands[:, None].expand_as(sampled)
            ok = (single[sampled] > 0) & (single[c] > 0)
            syn = torch.full(sampled.shape, float("nan"), device=device)
            if ok.any():
                keys = _pair_keys(sampled[ok], c[ok], len(occ))
                syn[ok] = pair[keys] - single[sampled[ok]] - single[c[ok]]
            med = torch.nanmedian(syn, dim=1).values.nan_to_num(0.0).clamp_min(0.0)
            scale = single[partners].abs().median()
            syn_z = med / scale if scale > 0 else torch.zeros_like(med)
            boosted = score[cands] / top_median.clamp_min(1e-12) + lam * syn_z
            best = cands[torch.argsort(boosted, descending=True, stable=True)[:h]]
            kept[order[:k - h]] = True
            kept[best] = True
        return kept

    @staticmethod
    def _pair_effects(ctx: SelectionContext, first: Tensor, second: Tensor) -> dict[int, float] | Tensor:
        """effect({b, c}) for each pair, cached across budgets in a dict keyed by the pair."""
        cache: dict[int, float] = ctx.cache.setdefault("pairs", {})
        n = len(ctx.occ)
        keys = _pair_keys(first, second, n).tolist()
        todo = [i for i, key in enumerate(keys) if key not in cache]
        if todo:
            idx = torch.tensor(todo, dtype=torch.long, device=first.device)
            values = ctx.attributor.pair_effects(ctx.runs, first[idx], second[idx]).tolist()
            for i, v in zip(todo, values):
                cache[keys[i]] = v
        return _PairLookup(cache)


def _pair_keys(first: Tensor, second: Tensor, n: int) -> Tensor:
    lo, hi = torch.minimum(first, second), torch.maximum(first, second)
    return lo * n + hi


class _PairLookup:
    """Index a pair cache with a tensor of keys."""

    def __init__(self, cache: dict[int, float]) -> None:
        self.cache = cache

    def __getitem__(self, keys: Tensor) -> Tensor:
        return torch.tensor([self.cache[k] for k in keys.tolist()], dtype=torch.float32, device=keys.device)
