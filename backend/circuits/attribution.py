"""The runs every method shares, FAP scores, and exact patching effects.

For a batch of prompts, `Attributor.prepare` does one clean forward + backward (linearised,
capturing resid_mid and the gradient of M at every mlp_out) and one corrupted forward; from
them come the feature occurrences, their Delta-writes and FAP scores
S(f,p) = sum_{t>=l} d_{f,p,t} . dM/d mlp_out_t(p) (DESIGN section 5). The cost is two forwards
and one backward per batch, whatever the number of features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from transformers import DynamicCache

from backend.circuits.clean_prefix import PrefixStore, first_patched
from backend.circuits.occurrences import (Occurrences, collect_occurrences, decoder_norms,
                                          decoder_projection, variant_patch)
from backend.errors import InvalidParameterError
from backend.models.adapters import GradMode, ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch, metric, metric_columns, metric_from_columns

Corruption = Literal["corrupted_prompt", "zero"]
CORRUPTIONS: tuple[str, ...] = ("corrupted_prompt", "zero")
GRAD_MODES: tuple[str, ...] = ("replacement", "full")


@dataclass
class PromptRuns:
    """Everything about one batch of prompts that every selection method and budget reuses.

    offset: global index of the batch's first prompt (seeds depend on it, not on batching).
    occ: the occurrences; fap: S per occurrence [n]; magnitude: |a| * ||W_dec row|| [n].
    clean_logits: [B, V] last-position logits; clean_metric: [B]; clean_hidden: [B, T, d] final
    hidden states, filled by the evaluator on the first all-token KL.
    """

    batch: PromptBatch
    offset: int
    occ: Occurrences
    fap: Tensor
    magnitude: Tensor
    clean_logits: Tensor
    clean_metric: Tensor
    clean_hidden: Tensor | None
    m_none: Tensor | None = None  # M with every occurrence removed, once evaluated
    none_kl: Tensor | None = None  # KL(clean || every occurrence removed), from the same forward
    all_writes: Tensor | None = None  # [L, B, T, d] sum of every Delta-write, once needed
    prefixes: PrefixStore | None = None  # clean (and kept single-removal) keys and values, once needed
    counters: dict[str, int] = field(default_factory=lambda: {"patched_forwards": 0, "tokens_forwarded": 0})

    def __len__(self) -> int:
        return len(self.batch)


def batch_rows(batch: PromptBatch, rows: Tensor) -> PromptBatch:
    """The batch's rows ``rows`` (repeats allowed), keeping the padded width unchanged."""
    idx = rows.tolist()
    return dataclasses.replace(
        batch, pairs=[batch.pairs[i] for i in idx], clean_ids=batch.clean_ids[rows],
        corrupted_ids=batch.corrupted_ids[rows], attention_mask=batch.attention_mask[rows],
        last_pos=batch.last_pos[rows], answer_ids=batch.answer_ids[rows],
        distractor_ids=batch.distractor_ids[rows])


# A forward's fixed cost in token-rows: on CPU a forward streams every weight once, so one row of
# 12 tokens costs 175 ms and 64 rows of 12 tokens 1.7 s on the demo (~130 ms + 2.2 ms per token).
OVERHEAD_TOKENS = 64


def plan_chunks(length: list[int], start: list[int], max_rows: int, overhead: int) -> list[int]:
    """Cut variants (in this order) into contiguous chunks of at most max_rows, minimising the
    forwarded token-rows plus ``overhead`` per forward: chunk [i, j) costs
    (j - i) * (max length - min start) + overhead. Exact dynamic programme, O(n * max_rows).
    Returns the cut points [0, ..., n]."""
    n = len(length)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        lo_start, hi_len = start[j - 1], length[j - 1]
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):
            lo_start, hi_len = min(lo_start, start[i]), max(hi_len, length[i])
            cost = best[i] + (j - i) * (hi_len - lo_start) + overhead
            if cost < best[j]:
                best[j], back[j] = cost, i
    cuts, j = [n], n
    while j > 0:
        j = back[j]
        cuts.append(j)
    return cuts[::-1]


class Attributor:
    """FAP attribution of CLT feature occurrences for one model, transcoder and corruption."""

    def __init__(self, adapter: ModelAdapter, transcoder: Transcoder,
                 corruption: Corruption = "corrupted_prompt", grad: GradMode = "replacement",
                 max_rows: int = 64, prefix_cache: bool = True) -> None:
        transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
        if corruption not in CORRUPTIONS:
            raise InvalidParameterError(f"unknown corruption '{corruption}'; known: {', '.join(CORRUPTIONS)}")
        if grad not in GRAD_MODES:
            raise InvalidParameterError(f"unknown gradient '{grad}'; known: {', '.join(GRAD_MODES)}")
        self.adapter, self.tc = adapter, transcoder
        self.corruption, self.grad = corruption, grad
        self.max_rows = max_rows  # prompt rows per patched forward
        self.prefix_cache = prefix_cache  # removal variants run from their first patched position

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def prepare(self, batch: PromptBatch, offset: int = 0) -> PromptRuns:
        """Clean forward + backward and corrupted forward; occurrences, FAP and magnitude scores."""
        batch = batch.to(self.device)
        ids, mask, last = batch.clean_ids, batch.attention_mask, batch.last_pos
        clean, grads = self.adapter.mlp_out_gradients(
            ids, mask, lambda logits: metric(logits, batch), last_pos=last, mode=self.grad, linearise=True)
        with torch.no_grad():
            acts_clean = self.tc.encode(clean.resid_mid)                                  # [L, B, T, F]
            if self.corruption == "zero":
                acts_corr = torch.zeros_like(acts_clean)
            else:
                corr = self.adapter.run(batch.corrupted_ids, mask, last_pos=last, capture=True)
                acts_corr = self.tc.encode(corr.resid_mid)
            valid = mask.bool().clone()
            if batch.has_bos:
                valid[:, 0] = False  # the BOS attention sink is not part of any circuit
            occ = collect_occurrences(acts_clean, acts_corr, valid)
            del acts_clean, acts_corr
            fap = occ.delta * decoder_projection(self.tc, occ, grads)
            magnitude = torch.zeros_like(occ.act)
            for layer in torch.unique(occ.layer).tolist():
                sel = occ.layer == layer
                magnitude[sel] = occ.act[sel].abs() * decoder_norms(self.tc, layer, occ.feature[sel])
        return PromptRuns(batch=batch, offset=offset, occ=occ, fap=fap, magnitude=magnitude,
                          clean_logits=clean.logits, clean_metric=metric(clean.logits, batch).detach(),
                          clean_hidden=None)

    @torch.no_grad()
    def removal_metrics(self, runs: PromptRuns, variant_prompt: Tensor, variant: Tensor, members: Tensor, *,
                        sources: Tensor | None = None, start_pos: Tensor | None = None,
                        keep: Tensor | None = None) -> Tensor:
        """M of clean prompts with sets of occurrences removed, many sets per forward: [V].

        variant_prompt: [V] the prompt (batch row) of each variant; (variant, members): [m] pairs
        saying which occurrences each variant removes. Variants run at most max_rows at a time,
        sorted by (start position p_v, prompt length) and cut into chunks by ``plan_chunks``; each
        chunk is cut to its longest prompt (no forward over padding) and, with the prefix cache,
        starts at p_chunk = min p_v: positions before it come from each row's source in the prefix
        store (see clean_prefix), so only [p_chunk, width) is forwarded, and members before p_chunk
        (inside the source's prefix) are not patched again. By default a variant starts at its
        first patched position from its prompt's clean run; ``sources`` [V] and ``start_pos`` [V]
        name another source whose keys and values equal the variant's below start_pos. keep: [V]
        (single removals) store each variant's keys and values as the source of that occurrence.
        """
        out = torch.empty(len(variant_prompt), device=self.device)
        last = runs.batch.last_pos[variant_prompt]
        length = last + 1
        if not self.prefix_cache:
            start_pos, sources, keep = torch.zeros_like(last), None, None
        elif start_pos is None:
            start_pos = first_patched(runs.occ, len(variant_prompt), variant, members, last)
        if sources is None:
            sources = variant_prompt
        span = int(length.max()) + 1 if len(length) else 1
        order = torch.argsort(start_pos * span + length, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        member_rank = rank[variant]                                 # memberships by their variant's rank
        by_rank = torch.argsort(member_rank, stable=True)
        member_rank, members = member_rank[by_rank], members[by_rank]
        bounds = torch.searchsorted(member_rank, torch.arange(len(order) + 1, device=order.device))
        kept: list[tuple[DynamicCache, Tensor]] = []
        cuts = plan_chunks(length[order].tolist(), start_pos[order].tolist(), self.max_rows, OVERHEAD_TOKENS)
        for start, stop in zip(cuts[:-1], cuts[1:]):
            chunk = order[start:stop]
            width, p = int(length[chunk].max()), int(start_pos[chunk].min())
            lo, hi = int(bounds[start]), int(bounds[stop])
            rank_in, inside = member_rank[lo:hi] - start, members[lo:hi]
            if p > 0:
                after = runs.occ.pos[inside] >= p
                rank_in, inside = rank_in[after], inside[after]
            patch = variant_patch(self.tc, runs.occ, rank_in, inside, width, start=p)
            rows = batch_rows(runs.batch, variant_prompt[chunk])
            cache = self._prefixes(runs).gather(sources[chunk], p) if p > 0 else None
            if keep is not None and cache is None:
                cache = DynamicCache()
            columns = metric_columns(rows)  # a logit difference reads 2 of V logits: unembed only those
            logits = self.adapter.run(rows.clean_ids[:, p:width], rows.attention_mask[:, :width],
                                      last_pos=rows.last_pos - p, patch=patch, cache=cache, columns=columns).logits
            out[chunk] = metric(logits, rows) if columns is None else metric_from_columns(logits, rows)
            if keep is not None:
                kept.append((cache, keep[chunk]))
            runs.counters["patched_forwards"] += stop - start
            runs.counters["tokens_forwarded"] += (stop - start) * (width - p)
        if kept:
            self._prefixes(runs).add(kept)
        return out

    def _prefixes(self, runs: PromptRuns) -> PrefixStore:
        """The batch's prefix store, from one clean forward the first time it is needed."""
        if runs.prefixes is None:
            runs.prefixes = PrefixStore.of(self.adapter, runs.batch.clean_ids, runs.batch.attention_mask, len(runs.occ))
            runs.counters["tokens_forwarded"] += runs.batch.clean_ids.numel()
        return runs.prefixes

    def single_effects(self, runs: PromptRuns, members: Tensor, keep_prefixes: bool = False) -> Tensor:
        """effect({o}) = M(x) - M(x without o) for each occurrence id in ``members``: [m].
        keep_prefixes: store each removal's keys and values (pairs starting from them later)."""
        variant = torch.arange(len(members), device=members.device)
        prompts = runs.occ.prompt[members]
        return runs.clean_metric[prompts] - self.removal_metrics(runs, prompts, variant, members,
                                                                 keep=members if keep_prefixes else None)

    def pair_effects(self, runs: PromptRuns, first: Tensor, second: Tensor) -> Tensor:
        """effect({b, c}) for pairs of occurrences of the same prompt: [m].

        A pair whose earlier member's single removal is in the prefix store runs from its later
        position on that removal's keys and values; the others from the earlier position."""
        m = len(first)
        variant = torch.arange(m, device=first.device).repeat(2)
        prompts = runs.occ.prompt[first]
        sources = start = None
        if self.prefix_cache and runs.prefixes is not None:
            pos_a, pos_b = runs.occ.pos[first], runs.occ.pos[second]
            earlier = torch.where(pos_a <= pos_b, first, second)
            src = runs.prefixes.source_of[earlier]
            has = src >= 0
            sources = torch.where(has, src, prompts)
            start = torch.where(has, torch.maximum(pos_a, pos_b), torch.minimum(pos_a, pos_b)).to(prompts.dtype)
        return runs.clean_metric[prompts] - self.removal_metrics(runs, prompts, variant, torch.cat([first, second]),
                                                                 sources=sources, start_pos=start)
