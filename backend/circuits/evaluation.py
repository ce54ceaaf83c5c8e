"""PIE evaluation: run the clean prompt with every removed occurrence's Delta-writes subtracted.

Keeping every occurrence gives exactly the clean model (the patch is zero). Per prompt we report
KL(clean || patched) of the last-token distribution (and over all tokens), whether the argmax
changed, faithfulness (M_circuit - M_none) / (M_clean - M_none) and completeness (the same with
the complement kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backend.circuits.attribution import Attributor, PromptRuns
from backend.circuits.occurrences import delta_write_patch
from backend.tasks import metric


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) over the last axis, from logits: [..., V] -> [...]."""
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


@dataclass
class PromptMetrics:
    """Per-prompt results of one kept set ([B] each)."""

    kl_last: Tensor
    kl_all: Tensor | None
    pred_changed: Tensor
    m_circuit: Tensor
    faithfulness: Tensor
    completeness: Tensor | None


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where the denominator vanishes (an undefined faithfulness)."""
    return torch.where(den.abs() > 1e-6, num / den.where(den.abs() > 1e-6, torch.ones_like(den)),
                       torch.full_like(num, float("nan")))


class Evaluator:
    """Patched forwards for kept sets, several kept sets per forward."""

    def __init__(self, attributor: Attributor, unembed_rows: int = 8) -> None:
        self.attr = attributor
        self.unembed_rows = unembed_rows  # prompts per chunk for the all-token KL ([rows, T, V])

    def removal_patch(self, runs: PromptRuns, kept: Tensor, complement: bool = False) -> Tensor:
        """The patch [L, B, T, d] that subtracts the Delta-writes of every occurrence not kept.

        sum over removed = D_all - D_kept, with D_all computed once per batch; so a patch costs
        in proportion to the kept set (K per prompt), not to the ~10^4 removed occurrences.
        ``complement`` keeps the complement instead (the patch is then -D_kept). Keeping every
        occurrence gives an exactly zero patch.
        """
        tc, occ = self.attr.tc, runs.occ
        if bool(kept.all()):
            return torch.zeros(tc.n_layers, occ.n_prompts, occ.seq_len, tc.d_model, dtype=tc.dtype,
                               device=kept.device) if not complement else -self._all_writes(runs)
        d_kept = delta_write_patch(tc, occ, kept, scale=1.0)
        return -d_kept if complement else d_kept - self._all_writes(runs)

    def _all_writes(self, runs: PromptRuns) -> Tensor:
        if runs.all_writes is None:
            everything = torch.ones(len(runs.occ), dtype=torch.bool, device=runs.fap.device)
            runs.all_writes = delta_write_patch(self.attr.tc, runs.occ, everything, scale=1.0)
        return runs.all_writes

    def _forward(self, runs: PromptRuns, patches: list[Tensor], all_token: bool) -> list[tuple[Tensor, Tensor | None]]:
        """(last logits [B, V], all-token KL [B] or None) for each patch, several per forward."""
        B = len(runs)
        per_forward = max(1, self.attr.max_rows // B)
        results: list[tuple[Tensor, Tensor | None]] = []
        adapter, batch = self.attr.adapter, runs.batch
        for start in range(0, len(patches), per_forward):
            chunk = patches[start:start + per_forward]
            V = len(chunk)
            patch = torch.cat(chunk, dim=1)
            rep = lambda t: t.repeat(V, *([1] * (t.dim() - 1)))  # noqa: E731
            out = adapter.run(rep(batch.clean_ids), rep(batch.attention_mask), last_pos=rep(batch.last_pos),
                              patch=patch, logits_at="none" if all_token else "last")
            runs.counters["patched_forwards"] += V * B
            runs.counters["tokens_forwarded"] += V * batch.clean_ids.numel()
            for v in range(V):
                kl_all = None
                if all_token:
                    kl_all = self._all_token_kl(runs, out.hidden[v * B:(v + 1) * B])
                results.append((out.logits[v * B:(v + 1) * B], kl_all))
        return results

    def _all_token_kl(self, runs: PromptRuns, hidden: Tensor) -> Tensor:
        """Mean over real positions of KL(clean || patched) at every token: [B]."""
        mask = runs.batch.attention_mask.bool()
        if runs.clean_hidden is None:  # first all-token evaluation of this batch: one clean forward
            b = runs.batch
            runs.clean_hidden = self.attr.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos,
                                                      logits_at="none").hidden
        out = torch.empty(len(runs), device=hidden.device)
        unembed = self.attr.adapter.unembed
        for s in range(0, len(runs), self.unembed_rows):
            e = s + self.unembed_rows
            kl = kl_divergence(unembed(runs.clean_hidden[s:e]), unembed(hidden[s:e]))   # [rows, T]
            m = mask[s:e]
            out[s:e] = (kl * m).sum(-1) / m.sum(-1)
        return out

    @torch.no_grad()
    def m_none(self, runs: PromptRuns) -> Tensor:
        """M with every occurrence removed (all Delta-writes subtracted): [B]."""
        if runs.m_none is None:
            none = torch.zeros(len(runs.occ), dtype=torch.bool, device=runs.fap.device)
            logits, _ = self._forward(runs, [self.removal_patch(runs, none)], all_token=False)[0]
            runs.m_none = metric(logits, runs.batch)
            runs.none_kl = kl_divergence(runs.clean_logits, logits)
        return runs.m_none

    @torch.no_grad()
    def evaluate(self, runs: PromptRuns, kept: list[Tensor], all_token: bool = False,
                 completeness: bool = False) -> list[PromptMetrics]:
        """PIE metrics for each kept mask ([n] bool over runs.occ)."""
        m_none = self.m_none(runs)
        m_clean = runs.clean_metric
        # Keeping everything is the clean run by construction (the patch is exactly zero): no forward.
        partial = [k for k in kept if not bool(k.all())]
        ran = iter(self._forward(runs, [self.removal_patch(runs, k) for k in partial], all_token))
        zero_kl = torch.zeros(len(runs), device=m_clean.device)
        outs = [(runs.clean_logits, zero_kl if all_token else None) if bool(k.all()) else next(ran) for k in kept]
        compl = self._forward(runs, [self.removal_patch(runs, k, complement=True) for k in kept],
                              False) if completeness else None
        results = []
        for i, (logits, kl_all) in enumerate(outs):
            m_circuit = metric(logits, runs.batch)
            comp = None
            if compl is not None:
                comp = _ratio(metric(compl[i][0], runs.batch) - m_none, m_clean - m_none)
            results.append(PromptMetrics(
                kl_last=kl_divergence(runs.clean_logits, logits),
                kl_all=kl_all,
                pred_changed=runs.clean_logits.argmax(-1) != logits.argmax(-1),
                m_circuit=m_circuit,
                faithfulness=_ratio(m_circuit - m_none, m_clean - m_none),
                completeness=comp))
        return results
