"""Slow: the edge engine on the real Gemma-3-270M edge graph (GQA, the frozen-scale head split).

Keeping every edge reproduces the clean model, removing every edge reproduces the corrupted run,
and EAP's circuit at 94% sparsity is more faithful than random circuits of the same size.
"""

from __future__ import annotations

import pytest
import torch

from backend.circuits.evaluation import kl_divergence
from backend.edges.context import EdgeContext
from backend.edges.evaluation import circuit_logits, evaluate
from backend.edges.registry import get_edge_method, target_count
from backend.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_ctx(demo_adapter):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    batch = get_task("ioi").build(demo_adapter.tokenizer, 8, seed=0)
    yield EdgeContext.create(demo_adapter, batch, batch_size=8)
    torch.set_num_threads(before)


def test_keep_all_is_clean_and_remove_all_is_corrupted_on_gemma3(demo_ctx):
    ctx = demo_ctx
    E = ctx.graph.n_edges
    assert E == 5644
    part = ctx.parts[0]
    keep = circuit_logits(ctx, torch.ones(E))[0]
    assert float(kl_divergence(part.clean_logits, keep).max()) < 1e-6
    none = circuit_logits(ctx, torch.zeros(E))[0]
    assert float(kl_divergence(part.corrupted_logits, none).max()) < 1e-6
    torch.testing.assert_close(none, part.corrupted_logits, rtol=1e-3, atol=2e-3)
    # the corruption matters: the clean and corrupted runs are far apart
    assert float(kl_divergence(part.clean_logits, part.corrupted_logits).mean()) > 0.5


def test_eap_at_94_percent_beats_random_edges(demo_ctx):
    ctx = demo_ctx
    E = ctx.graph.n_edges
    n = target_count(E, sparsity=0.94)
    run = get_edge_method("eap").run(ctx, n, {})
    eap_kl = evaluate(ctx, run.kept).kl_stat.mean
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        kept = torch.zeros(E, dtype=torch.bool)
        kept[torch.randperm(E, generator=g)[:n]] = True
        kept = ctx.graph.without_dangling(kept)
        assert eap_kl < evaluate(ctx, kept).kl_stat.mean
