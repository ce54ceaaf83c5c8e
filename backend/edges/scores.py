"""Edge attribution patching: EAP and EAP-IG (inputs variant) scores (DESIGN 8.2).

EAP (Syed et al.): s(u->v) = sum over prompts and positions of (x_u(x~) - x_u(x)) . dM/d in_v,
the gradient from one clean forward + backward (reader inputs retained) and the corrupted
writer states from the shared corrupted run. It is minus the gradient of M with respect to the
edge's mask at m = 1 (keep all), since in_v = sum_w x~_w + m_{w,v} (x_w - x~_w).

EAP-IG (Hanna et al.), inputs variant: the gradient is averaged over m points on the straight
line between the corrupted and the clean embeddings, alpha = k/m for k = 0..m-1 (k = 0 is the
corrupted end, so m = 1 is EAP with its gradient taken on the corrupted run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.edges.context import EdgeContext, Part
from backend.edges.graph import EdgeGraph
from backend.edges.patching import EdgePatch
from backend.tasks import metric


def scores_from_gradients(graph: EdgeGraph, delta: Tensor, grads: Tensor) -> Tensor:
    """Per-edge scores [E] from writer deltas x~ - x [W, B, T, d] and reader-input gradients
    [R, B, T, d]: s(u->v) = sum_{b,t} delta_u . grad_v, block by block."""
    out = torch.empty(graph.n_edges, dtype=torch.float64)
    blocks = [*graph.attn_blocks, *graph.mlp_blocks, graph.logits_block]
    for block in blocks:
        s = torch.einsum("wbtd,rbtd->rw", delta[: block.n_writers].double(),
                         grads[block.start:block.stop].double())
        out[block.edges] = s.reshape(-1)
    return out


def _gradient_run(ctx: EdgeContext, part: Part, embed: Tensor | None) -> tuple[Tensor, Tensor]:
    """One forward + backward keeping every edge: (reader-input gradients [R, B, T, d], this
    run's writer states [W, B, T, d]). ``embed`` replaces the embedding state."""
    b = part.batch
    ones = torch.ones(ctx.graph.n_edges, device=ctx.adapter.device, requires_grad=True)
    patch = EdgePatch(ctx.graph, part.corrupted, ones, embed=embed, retain_grad=True)
    with torch.enable_grad():
        out = ctx.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos, interventions=[patch])
        metric(out.logits, b).sum().backward()
    ctx.count(len(b), len(b))
    return patch.reader_grads().detach(), patch.states.detach()


def eap_scores(ctx: EdgeContext, grad_at: str = "clean") -> Tensor:
    """EAP scores [E] summed over every prompt. grad_at: "clean" (EAP) or "corrupted"."""
    total = torch.zeros(ctx.graph.n_edges, dtype=torch.float64)
    for i, part in enumerate(ctx.parts):
        embed = part.corrupted[0] if grad_at == "corrupted" else None
        grads, states = _gradient_run(ctx, part, embed)
        if grad_at == "corrupted":  # that run's states are corrupted; the clean ones need a forward
            states = _clean_states(ctx, part)
        total += scores_from_gradients(ctx.graph, part.corrupted - states, grads)
        ctx.report((i + 1) / len(ctx.parts), "EAP")
    return total


def _clean_states(ctx: EdgeContext, part: Part) -> Tensor:
    rec = EdgePatch(ctx.graph)
    b = part.batch
    with torch.no_grad():
        ctx.adapter.forward_with([rec], b.clean_ids, b.attention_mask)
    ctx.count(len(b))
    return rec.states


def eap_ig_scores(ctx: EdgeContext, steps: int = 5) -> Tensor:
    """EAP-IG (inputs) scores [E]: (x~ - x) . mean over alpha = k/steps of dM/d in_v."""
    total = torch.zeros(ctx.graph.n_edges, dtype=torch.float64)
    for i, part in enumerate(ctx.parts):
        clean = _clean_states(ctx, part)
        e_clean, e_corr = clean[0], part.corrupted[0]
        grads = None
        for k in range(steps):
            alpha = k / steps
            g, _ = _gradient_run(ctx, part, e_corr + alpha * (e_clean - e_corr))
            grads = g if grads is None else grads + g
        total += scores_from_gradients(ctx.graph, part.corrupted - clean, grads / steps)
        ctx.report((i + 1) / len(ctx.parts), "EAP-IG")
    return total
