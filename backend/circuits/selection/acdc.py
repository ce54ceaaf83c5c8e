"""ACDC-style pruning at the level of feature occurrences (a costly baseline), **on a pool**.

Pool: per prompt, the top ``pool`` occurrences by |FAP S| (default 2K); everything outside it
is removed from the start, so this is ACDC restricted to FAP's top 2K, not ACDC over every
active occurrence. Visit the pool in reverse layer order (later positions first, then lower
feature index) and drop an occurrence when KL(clean || current) rises by less than tau. Several
tau values (log-spaced from tau_min to tau_max) run side by side as separate trajectories in
the same forwards; per prompt the largest tau that still keeps at least K is chosen (when none
does, the one that keeps the most), and its kept set is trimmed to exactly K by dropping the
lowest |S| first (or refilled by the highest |S| not kept). Cost: one batched forward per pool
position, reported as patched forwards. The results say so: `selection_notes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backend.circuits.evaluation import kl_divergence
from backend.circuits.occurrences import delta_write_patch
from backend.circuits.selection.base import SelectionContext, Strategy, fill_to_k, segment_rank
from backend.errors import InvalidParameterError


class ACDC(Strategy):
    name = "acdc"
    description = ("ACDC-style on a pool: FAP's top `pool` (default 2K) occurrences per prompt, dropped in reverse "
                   "layer order while KL rises by < tau (tau searched); then trimmed to K by lowest |S| "
                   "(refilled by highest |S|)")
    defaults = {"pool": None, "n_tau": 6, "tau_min": 1e-4, "tau_max": 0.3}
    budgets = ("global",)

    def select(self, ctx: SelectionContext, k: int, options: dict[str, Any]) -> Tensor:
        pool = int(options["pool"]) if options["pool"] is not None else 2 * k
        n_tau = int(options["n_tau"])
        if pool < k or n_tau < 1:
            raise InvalidParameterError(f"acdc needs pool >= K ({pool} < {k}) and n_tau >= 1")
        occ, runs, attr = ctx.occ, ctx.runs, ctx.attributor
        score = runs.fap.abs()
        B, T, device = occ.n_prompts, occ.seq_len, score.device
        in_pool = segment_rank(score, occ.prompt) < pool
        taus = torch.logspace(torch.log10(torch.tensor(options["tau_min"])),
                              torch.log10(torch.tensor(options["tau_max"])), n_tau).to(device)
        # Visit order within each prompt's pool: layer descending, then position descending.
        key = torch.where(in_pool, -(occ.layer * T + occ.pos).float(), torch.tensor(float("inf"), device=device))
        visit_rank = segment_rank(-key, occ.prompt)                 # 0 = first to visit
        pool_size = torch.bincount(occ.prompt[in_pool], minlength=B)
        # Trajectory v = b * n_tau + j; its running patch starts with every non-pool write removed.
        base = delta_write_patch(attr.tc, occ, ~in_pool)                         # [L, B, T, d]
        patch = base.repeat_interleave(n_tau, dim=1)                             # [L, B*n_tau, T, d]
        kept = in_pool[None, :].repeat(n_tau, 1)                                 # [n_tau, n]
        kl_cur = self._kl(ctx, patch)
        for step in range(int(pool_size.max()) if B else 0):
            visiting = in_pool & (visit_rank == step)                            # one per prompt at most
            if not visiting.any():
                continue
            write = delta_write_patch(attr.tc, occ, visiting).repeat_interleave(n_tau, dim=1)
            active = (pool_size > step).repeat_interleave(n_tau)                 # [B*n_tau]
            kl_new = self._kl(ctx, patch + write, rows=active)
            drop = active & (kl_new - kl_cur < taus.repeat(B))
            patch[:, drop] += write[:, drop]
            kl_cur = torch.where(drop, kl_new, kl_cur)
            ids = torch.nonzero(visiting, as_tuple=True)[0]                       # [b'] occurrence per prompt
            drop_bt = drop.view(B, n_tau)[occ.prompt[ids]]                       # [b', n_tau]
            kept[:, ids] &= ~drop_bt.T
        counts = torch.stack([torch.bincount(occ.prompt[kept[j]], minlength=B) for j in range(n_tau)])  # [n_tau, B]
        # Largest tau keeping >= K; when none does, the one that keeps the most.
        enough = counts >= torch.clamp(torch.bincount(occ.prompt, minlength=B), max=k)[None]
        tau_idx = torch.where(enough.any(0), (enough * torch.arange(n_tau, device=device)[:, None]).amax(0),
                              counts.argmax(0))
        chosen = kept[tau_idx[occ.prompt], torch.arange(len(occ), device=device)]
        trimmed = chosen & (segment_rank(score.masked_fill(~chosen, float("-inf")), occ.prompt) < k)
        ctx.cache.setdefault("acdc_tau", {})[k] = taus[tau_idx].tolist()
        return fill_to_k(trimmed, score, occ.prompt, k, B)

    def selection_notes(self, k: int, options: dict[str, Any]) -> dict[str, Any]:
        pool = int(options["pool"]) if options["pool"] is not None else 2 * k
        return {"pool": pool, "pool_rule": f"the top {pool} occurrences per prompt by |FAP S|; all others removed "
                                           "from the start",
                "taus": [float(options["tau_min"]), float(options["tau_max"]), int(options["n_tau"])],
                "rule": f"ACDC on FAP's top {pool}, the largest tau keeping >= {k}, trimmed to {k} by lowest |S| "
                        "(refilled by highest |S|)"}

    @staticmethod
    def _kl(ctx: SelectionContext, patch: Tensor, rows: Tensor | None = None) -> Tensor:
        """KL(clean || patched) at the last token for each trajectory's patch: [B*n_tau]."""
        runs, attr = ctx.runs, ctx.attributor
        V = patch.shape[1]
        n_tau = V // len(runs)
        rep = lambda t: t.repeat_interleave(n_tau, dim=0)  # noqa: E731
        ids, mask, last = rep(runs.batch.clean_ids), rep(runs.batch.attention_mask), rep(runs.batch.last_pos)
        clean = rep(runs.clean_logits)
        out = torch.zeros(V, device=patch.device)
        todo = torch.arange(V, device=patch.device) if rows is None else torch.nonzero(rows, as_tuple=True)[0]
        for s in range(0, len(todo), attr.max_rows):
            r = todo[s:s + attr.max_rows]
            logits = attr.adapter.run(ids[r], mask[r], last_pos=last[r], patch=patch[:, r]).logits
            out[r] = kl_divergence(clean[r], logits)
            runs.counters["patched_forwards"] += len(r)
            runs.counters["tokens_forwarded"] += len(r) * ids.shape[1]
        return out
