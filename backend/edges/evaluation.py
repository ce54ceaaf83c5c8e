"""Evaluation shared by every edge method (DESIGN 8.2, "Evaluation").

A circuit is a kept mask [E]; the model runs on the clean prompts with every other edge reading
its writer's corrupted state. Per prompt: KL(full || circuit) at the answer position, the
logit difference recovered (M_circuit - M_corrupted) / (M_clean - M_corrupted), and accuracy
(the answer beats the distractor: M_circuit > 0). Aggregates: mean, std and bootstrap 95% CI
(backend.circuits.stats); curves over log-spaced edge counts with their area.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from backend.circuits.evaluation import kl_divergence
from backend.circuits.results import Stat
from backend.circuits.stats import summarize
from backend.edges.context import EdgeContext
from backend.edges.patching import EdgePatch
from backend.tasks import metric


@dataclass
class EdgeMetrics:
    """Per-prompt values ([N] lists) and their summaries."""

    kl: list[float]
    m_circuit: list[float]
    m_clean: list[float]
    m_corrupted: list[float]
    recovered: list[float]
    accuracy: list[float]
    kl_stat: Stat
    recovered_stat: Stat
    accuracy_stat: Stat
    recovered_of_means: float  # (mean M_circuit - mean M_corr) / (mean M_clean - mean M_corr)

    def summary(self) -> dict:
        return {"kl": asdict(self.kl_stat), "recovered": asdict(self.recovered_stat),
                "accuracy": asdict(self.accuracy_stat), "recovered_of_means": self.recovered_of_means}

    def as_dict(self) -> dict:
        return {**self.summary(), "per_prompt": {"kl": self.kl, "m_circuit": self.m_circuit,
                                                 "m_clean": self.m_clean, "m_corrupted": self.m_corrupted,
                                                 "recovered": self.recovered, "accuracy": self.accuracy}}


def circuit_logits(ctx: EdgeContext, masks: Tensor) -> list[Tensor]:
    """Last-position logits per part ([B, V] each) for one mask [E] or one per prompt [N, E]."""
    out, row = [], 0
    with torch.no_grad():
        for part in ctx.parts:
            b = part.batch
            m = masks if masks.dim() == 1 else masks[row:row + len(b)]
            patch = EdgePatch(ctx.graph, part.corrupted, m.to(ctx.adapter.device, torch.float32))
            out.append(ctx.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos,
                                       interventions=[patch]).logits)
            row += len(b)
    return out


def evaluate(ctx: EdgeContext, kept: Tensor, seed: int = 0) -> EdgeMetrics:
    """Metrics of the circuit ``kept`` ([E] bool) over every prompt."""
    kl, mc, m0, m1 = [], [], [], []
    for part, logits in zip(ctx.parts, circuit_logits(ctx, kept.float())):
        kl.append(kl_divergence(part.clean_logits, logits))
        mc.append(metric(logits, part.batch))
        m0.append(part.m_clean)
        m1.append(part.m_corrupted)
    kl_t, mc_t, m0_t, m1_t = (torch.cat(x).double().cpu() for x in (kl, mc, m0, m1))
    den = m0_t - m1_t
    safe = torch.where(den.abs() > 1e-6, den, torch.full_like(den, float("nan")))
    rec = ((mc_t - m1_t) / safe)
    acc = (mc_t > 0).double()
    rec_valid = rec[~torch.isnan(rec)]
    mean_den = float(m0_t.mean() - m1_t.mean())
    return EdgeMetrics(
        kl=kl_t.tolist(), m_circuit=mc_t.tolist(), m_clean=m0_t.tolist(), m_corrupted=m1_t.tolist(),
        recovered=rec.tolist(), accuracy=acc.tolist(),
        kl_stat=summarize(kl_t.numpy(), seed=seed),
        recovered_stat=summarize(rec_valid.numpy() if len(rec_valid) else np.zeros(1), seed=seed),
        accuracy_stat=summarize(acc.numpy(), seed=seed),
        recovered_of_means=float(mc_t.mean() - m1_t.mean()) / mean_den if abs(mean_den) > 1e-9 else float("nan"),
    )


def log_spaced_counts(n_edges: int, n_points: int = 8, smallest: int = 10) -> list[int]:
    """Edge counts log-spaced from ``smallest`` to every edge, distinct and increasing."""
    smallest = max(1, min(smallest, n_edges))
    grid = np.unique(np.round(np.geomspace(smallest, n_edges, n_points)).astype(int))
    return [int(x) for x in grid]


def curve_area(counts: list[int], values: list[float], n_edges: int) -> float:
    """Area under a faithfulness curve over log10(edge count), normalised by the log range
    from the smallest count to the whole graph (trapezoids; the mean value on that axis)."""
    if len(counts) < 2:
        return float(values[0]) if values else float("nan")
    x = np.log10(np.asarray(counts, dtype=float))
    y = np.asarray(values, dtype=float)
    span = math.log10(n_edges) - x[0]
    return float(np.trapezoid(y, x) / span) if span > 0 else float(y.mean())
