"""FAP-Synergy: rerank the boundary of FAP's top-K by exact pairwise synergy (DESIGN section 5).

effect(S) = M(x) - M(x with the Delta-writes of S subtracted);
Syn(b, c) = effect({b, c}) - effect({b}) - effect({c}), counted only when both single effects
are > 0. With h = round(bp/100 * K / 2) the uncapped boundary is ranks [K-h, K+h): the core
(top K-h by |S|) is kept and the best h of the 2h candidates fill K. Partners are the first 32
core occurrences and each candidate samples 8 of them. syn_z(c) = max(0, median_b Syn(b, c)) /
median_partners |effect(b)|; boosted(c) = |S(c)| / median(|S| in the top K) + lambda * syn_z(c).

**The cap.** At most ``cap`` candidates are reranked (their exact effects are what costs). When
2h > cap the reranked window is the ``cap`` ranks nearest the boundary K, centred on it:
ranks [K - s, K - s + cap) with s = cap // 2 of them kept; the h - s slots between the core and
that window go by FAP rank (ranks [K-h, K-s) are kept as they are). So in every case, with
s = min(h, cap // 2) and c = min(2h, cap):

    kept = top K-s by |S|  +  the best s of the c candidates at ranks [K-s, K-s+c) by boosted,

exactly min(K, n) occurrences per prompt. With the paper's defaults (bp 25, cap 32) the window
is uncapped while h <= 16 (K <= 132); beyond, it is 32 ranks of which 16 are kept (K = 200: the
top 184 plus 16 of ranks 184..215; K = 400: the top 384 plus 16 of ranks 384..415). A window cut
at its lower end instead (ranks [K-h, K-h+cap), the earlier rule) lies inside FAP's own top K
once h >= cap, so it can rerank nothing, and it kept only K-h+cap < K when h > cap.

Single effects are cached across budgets; pairs are only run where both singles are positive;
all single and pair variants of a batch go through the model together. A pair runs from its later
member's position on the keys and values of its earlier member's single removal (kept for this
budget's candidates and for every occurrence that can be a partner, see clean_prefix).

**Float resolution.** An effect is a difference of two float32 forwards, so it carries noise of
about 1e-7 of |M| whichever way the forwards are batched or cached. Where two occurrences do not
interact, Syn(b, c) is that noise alone, and lambda * syn_z would then reorder candidates whose
|S| are close by chance (how the variants were chunked decided the kept set). So a single effect
counts as positive only above, and a synergy as non-zero only beyond, RESOLUTION times the
magnitudes it is computed from (|M(x)|; |effect({b,c})| + |effect({b})| + |effect({c})|): below
that the measurement cannot tell the sign, and the rule reads it as 0. Candidates whose boosted
scores, real synergy included, differ by less than the noise can still swap (on the demo, one
kept occurrence in 16 prompts x 5 budgets between the full-prompt and the prefix-cached path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backend.circuits.selection.base import SelectionContext, Strategy, segment_rank
from backend.errors import InvalidParameterError

RESOLUTION = 1e-5  # relative: effects and synergies within this of their inputs' size count as 0


class FAPSynergy(Strategy):
    name = "fap-synergy"
    description = ("FAP with the top-K boundary reranked by exact pairwise synergy (lambda, bp, cap); a boundary "
                   "wider than cap is the cap ranks centred on K, the slots left by the cap go by FAP rank")
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
        _, s, n_cand = self.boundary(k, options)
        kept = rank < k - s
        if s == 0:
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
            cands = order[k - s:min(k - s + n_cand, len(order))]                      # [C], C > s
            partners = order[:min(n_partners, k - s)]
            pick = torch.rand(len(cands), len(partners), generator=ctx.generator(b, "synergy", k))
            sampled = partners[pick.argsort(dim=1)[:, :n_samples].to(device)]           # [C, S]
            top_median = score[order[:k]].median()
            plans.append((order, cands, partners, sampled, top_median))
        if not plans:
            return kept
        singles_needed = torch.cat([torch.cat([p[1], p[2]]) for p in plans])
        ctx.single_effects(singles_needed, keep_prefixes=True)
        single = ctx.cache["single"]
        floor = RESOLUTION * ctx.runs.clean_metric.abs()[occ.prompt]   # [n]: "> 0" beyond float noise
        positive = single > floor
        # Pairs only where both single effects are positive: the others cannot count.
        firsts, seconds = [], []
        for _, cands, _, sampled, _ in plans:
            c = cands[:, None].expand_as(sampled)
            ok = positive[sampled] & positive[c]
            firsts.append(sampled[ok])
            seconds.append(c[ok])
        firsts_t, seconds_t = torch.cat(firsts), torch.cat(seconds)
        pair = self._pair_effects(ctx, firsts_t, seconds_t)
        for order, cands, partners, sampled, top_median in plans:
            c = cands[:, None].expand_as(sampled)
            ok = positive[sampled] & positive[c]
            syn = torch.full(sampled.shape, float("nan"), device=device)
            if ok.any():
                keys = _pair_keys(sampled[ok], c[ok], len(occ))
                syn[ok] = synergy(pair[keys], single[sampled[ok]], single[c[ok]])
            med = torch.nanmedian(syn, dim=1).values.nan_to_num(0.0).clamp_min(0.0)
            scale = single[partners].abs().median()
            syn_z = med / scale if scale > 0 else torch.zeros_like(med)
            boosted = score[cands] / top_median.clamp_min(1e-12) + lam * syn_z
            best = cands[torch.argsort(boosted, descending=True, stable=True)[:s]]
            kept[best] = True
        if ctx.runs.prefixes is not None:
            # Only occurrences that can be a later budget's partners keep their removal's cache.
            ctx.runs.prefixes.retain(torch.nonzero(rank < n_partners, as_tuple=True)[0])
        return kept

    @staticmethod
    def boundary(k: int, options: dict[str, Any]) -> tuple[int, int, int]:
        """(h, s, c): the boundary half-width h = round(bp/100 * K / 2), the s = min(h, cap // 2)
        slots filled by reranking, and the c = min(2h, cap) candidates (ranks [K-s, K-s+c))."""
        h = int(round(float(options["bp"]) / 100 * k / 2))
        cap = int(options["cap"])
        return h, min(h, cap // 2), min(2 * h, cap)

    def selection_notes(self, k: int, options: dict[str, Any]) -> dict[str, Any]:
        h, s, c = self.boundary(k, options)
        return {"boundary_half_width": h, "reranked_slots": s, "candidates": c,
                "candidate_ranks": [k - s, k - s + c], "fap_rank_slots": h - s, "capped": c < 2 * h,
                "rule": f"top {k - s} by |S| (core top {k - h} + {h - s} by FAP rank) + best {s} of "
                        f"ranks [{k - s}, {k - s + c}) by boosted score"}

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


def synergy(pair: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Syn = effect({b,c}) - effect({b}) - effect({c}), 0 within float resolution: [m] each -> [m]."""
    raw = pair - first - second
    noise = RESOLUTION * (pair.abs() + first.abs() + second.abs())
    return torch.where(raw.abs() > noise, raw, torch.zeros_like(raw))


def _pair_keys(first: Tensor, second: Tensor, n: int) -> Tensor:
    lo, hi = torch.minimum(first, second), torch.maximum(first, second)
    return lo * n + hi


class _PairLookup:
    """Index a pair cache with a tensor of keys."""

    def __init__(self, cache: dict[int, float]) -> None:
        self.cache = cache

    def __getitem__(self, keys: Tensor) -> Tensor:
        return torch.tensor([self.cache[k] for k in keys.tolist()], dtype=torch.float32, device=keys.device)
