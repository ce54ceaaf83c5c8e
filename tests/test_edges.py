"""The edge engine on tiny random models: graph, exact patching, EAP / EAP-IG against ground
truth, ACDC against a plain loop, and a planted circuit recovered by Edge Pruning, HAP and ACDC."""

from __future__ import annotations

import pytest
import torch

from backend.circuits.evaluation import kl_divergence
from backend.edges.acdc import acdc, acdc_sequential, mean_kl
from backend.edges.context import Part
from backend.edges.edge_pruning import PruningOptions, edge_pruning, plateaued
from backend.edges.evaluation import circuit_logits, curve_area, evaluate, log_spaced_counts
from backend.edges.graph import EdgeGraph
from backend.edges.patching import EdgePatch
from backend.edges.registry import EDGE_METHODS, get_edge_method, target_count
from backend.edges.scores import eap_ig_scores, eap_scores
from backend.errors import UserError
from backend.tasks import metric
from tests.edge_fixtures import PLANTED, edge_context, planted_context


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting the machine's other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the graph --------------------------------------------------------------------------------

def test_edge_counts_match_the_field_and_design():
    gpt2 = EdgeGraph.build(12, 12, 12).counts()
    assert (gpt2["edges"], gpt2["writers"], gpt2["readers"]) == (32491, 157, 445)
    demo = EdgeGraph.build(18, 4, 1).counts()
    assert demo == {"edges": 5644, "writers": 91, "readers": 127, "q": 3132, "k": 783, "v": 783,
                    "mlp": 855, "logits": 91}


def test_grouped_query_readers_are_per_kv_head_and_ids_round_trip():
    g = EdgeGraph.build(2, 4, 2)
    names = [r.name for r in g.readers]
    assert names[:8] == ["a0.q0", "a0.q1", "a0.q2", "a0.q3", "a0.k0", "a0.k1", "a0.v0", "a0.v1"]
    assert len(names) == len(set(names))                     # no shared reader duplicated
    assert g.reader_feeds[4] == [1, 2]                       # a0.k0 feeds heads 0 and 1
    ids = g.edge_ids()
    assert len(set(ids)) == g.n_edges
    assert all(g.edge_index(i) == e for e, i in enumerate(ids))
    assert "a0.h1->m0" in ids and "a1.h0->m0" not in ids     # an MLP reads its own layer's heads
    with pytest.raises(UserError):
        g.edge_index("m1->a0.q0")


# -- exact patching ---------------------------------------------------------------------------

def test_keep_all_is_clean_and_remove_all_is_corrupted(arch):
    ctx = edge_context(arch, n_prompts=3)
    E = ctx.graph.n_edges
    part = ctx.parts[0]
    keep = circuit_logits(ctx, torch.ones(E))[0]
    assert float(kl_divergence(part.clean_logits, keep).max()) < 1e-6
    none = circuit_logits(ctx, torch.zeros(E))[0]
    torch.testing.assert_close(none, part.corrupted_logits, rtol=1e-4, atol=1e-4)


def test_per_row_masks_equal_separate_runs(arch):
    ctx = edge_context(arch, n_prompts=3)
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, ctx.graph.n_edges, generator=g) < 0.5).float()
    together = circuit_logits(ctx, masks)[0]
    for i in range(3):
        alone = circuit_logits(ctx, masks[i])[0][i]
        torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)


def test_writer_states_sum_to_the_final_residual(arch):
    ctx = edge_context(arch, n_prompts=2)
    b = ctx.parts[0].batch
    rec = EdgePatch(ctx.graph)
    captured = {}
    h = ctx.adapter.final_norm().register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            ctx.adapter.forward_with([rec], b.clean_ids, b.attention_mask)
    finally:
        h.remove()
    torch.testing.assert_close(rec.states.sum(0), captured["x"], rtol=1e-4, atol=1e-4)


# -- EAP and EAP-IG ---------------------------------------------------------------------------

def test_eap_is_minus_the_mask_gradient_at_the_clean_point(arch):
    ctx = edge_context(arch, n_prompts=3)
    part = ctx.parts[0]
    b = part.batch
    mask = torch.ones(ctx.graph.n_edges, requires_grad=True)
    out = ctx.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos,
                          interventions=[EdgePatch(ctx.graph, part.corrupted, mask)])
    metric(out.logits, b).sum().backward()
    s = eap_scores(ctx)
    assert s.abs().max() > 0
    torch.testing.assert_close(s.float(), -mask.grad, rtol=1e-3, atol=1e-5)


EPS = 1e-3   # O(eps) relative error from second order; below ~1e-4 the norms' float32 noise dominates


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "gpt2"])
def test_eap_equals_single_edge_patching_to_first_order(arch_name):
    """With a small corruption (x~ = x + eps |x| r, float64 weights) first order is exact up to
    O(eps^2) (and the float32 arithmetic inside the library's norms)."""
    ctx = edge_context(arch_name, n_prompts=2, dtype=torch.float64)
    part = ctx.parts[0]
    b = part.batch
    rec = EdgePatch(ctx.graph)
    with torch.no_grad():
        ctx.adapter.forward_with([rec], b.clean_ids, b.attention_mask)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(rec.states.shape, generator=g, dtype=torch.float64)
    corrupted = rec.states + EPS * rec.states.abs().mean((1, 2, 3), keepdim=True) * noise
    ctx._parts = [Part(b, corrupted, part.clean_logits, part.clean_logits, part.m_clean, part.m_clean)]
    s = eap_scores(ctx)
    E = ctx.graph.n_edges
    masks = torch.ones(E, E, dtype=torch.float64) - torch.eye(E, dtype=torch.float64)  # row e: all but e
    rows = []
    for start in range(0, E, 64):
        m = masks[start:start + 64]
        c = len(m)
        rep = lambda x: x.repeat(c, *([1] * (x.dim() - 1)))  # noqa: E731
        patch = EdgePatch(ctx.graph, corrupted.repeat(1, c, 1, 1), m.repeat_interleave(len(b), 0))
        with torch.no_grad():
            logits = ctx.adapter.run(rep(b.clean_ids), rep(b.attention_mask), last_pos=rep(b.last_pos),
                                     interventions=[patch]).logits
        bb = b.subset(list(range(len(b))) * c)
        rows.append((metric(logits, bb).view(c, len(b)) - part.m_clean.double()).sum(1))
    exact = torch.cat(rows)
    assert s.abs().max() > 1e-9
    torch.testing.assert_close(s, exact, rtol=1e-2, atol=1e-3 * float(s.abs().max()))


def test_eap_ig_with_one_step_is_eap_at_the_corrupted_end():
    ctx = edge_context("gemma3", n_prompts=3)
    ig = eap_ig_scores(ctx, steps=1)
    at_corrupted = eap_scores(ctx, grad_at="corrupted")
    torch.testing.assert_close(ig, at_corrupted, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ig, eap_scores(ctx), rtol=1e-2)


def test_scores_do_not_depend_on_the_batch_size():
    a = eap_scores(edge_context("llama", n_prompts=4, batch_size=4))
    b = eap_scores(edge_context("llama", n_prompts=4, batch_size=3))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- dangling edges ---------------------------------------------------------------------------

def test_dangling_edges_are_removed_without_changing_the_circuit():
    ctx = edge_context("llama", n_prompts=3)
    g = ctx.graph
    kept = torch.rand(g.n_edges, generator=torch.Generator().manual_seed(3)) < 0.15
    pruned = g.without_dangling(kept)
    assert int(pruned.sum()) < int(kept.sum()) and not bool((pruned & ~kept).any())
    assert bool((g.without_dangling(pruned) == pruned).all())
    # every kept edge's writer is the embedding or has a kept input, and its reader's node is used
    a = circuit_logits(ctx, kept.float())[0]
    b_ = circuit_logits(ctx, pruned.float())[0]
    torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    only_logits = torch.zeros(g.n_edges, dtype=torch.bool)
    only_logits[g.edge_index("m1->logits")] = True
    assert not bool(g.without_dangling(only_logits).any())   # m1 reads nothing kept
    only_logits[g.edge_index("embed->m1")] = True
    assert int(g.without_dangling(only_logits).sum()) == 2


# -- ACDC ---------------------------------------------------------------------------------------

def test_batched_acdc_equals_the_sequential_greedy_loop():
    # float64: a tiny random model's KL changes are ~1e-6, so in float32 the rounding of an 8-row
    # forward against a 1-row one flipped a near-tau decision on one CPU (AVX2) and not another.
    ctx = edge_context("llama", n_prompts=3, dtype=torch.float64)
    full = torch.ones(1, ctx.graph.n_edges)
    base = float(mean_kl(ctx, full)[0])
    single = mean_kl(ctx, full.repeat(ctx.graph.n_edges, 1) - torch.eye(ctx.graph.n_edges))
    tau = float(torch.quantile(single - base, 0.7))   # both outcomes occur
    seq = acdc_sequential(ctx, tau)
    res = acdc(ctx, tau, max_batch=8)
    assert 0 < int(seq.sum()) < ctx.graph.n_edges
    assert torch.equal(res.kept, seq)
    assert res.trials >= ctx.graph.n_edges


# -- the planted circuit ----------------------------------------------------------------------

def _planted_mask(ctx) -> torch.Tensor:
    m = torch.zeros(ctx.graph.n_edges, dtype=torch.bool)
    for e in PLANTED:
        m[ctx.graph.edge_index(e)] = True
    return m


@pytest.mark.parametrize("method,options", [
    ("edge-pruning", {"max_steps": 100, "warmup": 60, "batch_size": 6}),
    ("hap", {"rho": 0.2, "max_steps": 100, "warmup": 60, "batch_size": 6}),
    ("acdc", {"tau": 1e-4}),
    ("acdc", {"n_tau": 8}),
    ("eap", {}),
])
def test_planted_circuit_is_recovered(method, options):
    ctx = planted_context()
    run = get_edge_method(method).run(ctx, len(PLANTED), options)
    assert torch.equal(run.kept, _planted_mask(ctx)), [ctx.graph.edge_id(int(e)) for e in torch.nonzero(run.kept)]
    assert evaluate(ctx, run.kept).kl_stat.mean < 1e-6
    assert run.cost.forward_rows > 0


def test_edge_pruning_is_faithful_at_its_target_and_counts_its_cost():
    ctx = planted_context()
    run = get_edge_method("edge-pruning").run(ctx, 10, {"max_steps": 80, "warmup": 40, "batch_size": 6})
    assert int(run.kept.sum()) <= 10
    assert run.cost.backward_rows == run.cost.forward_rows and run.cost.steps == run.details["steps"]
    assert evaluate(ctx, run.kept).recovered_of_means == pytest.approx(1.0, abs=1e-3)


def test_the_stopping_rule_needs_two_windows_and_no_improvement():
    assert not plateaued([1.0] * 5, window=3, epsilon=1e-3)             # fewer than two windows
    assert plateaued([1.0] * 6, 3, 1e-3)                                # flat
    assert not plateaued([2.0, 2.0, 2.0, 1.0, 1.0, 1.0], 3, 1e-3)       # still improving
    assert plateaued([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], 3, 1e-3)           # worse, no improvement
    assert plateaued([1.0, 1.0, 1.0, 0.9995, 0.9995, 0.9995], 3, 1e-3)  # better by less than epsilon


def test_edge_pruning_stops_only_after_two_windows_at_the_target():
    """The ramp's rising KL never counts as a plateau: the windows start where the target is reached."""
    ctx = planted_context()
    E, W = ctx.graph.n_edges, 5
    res = edge_pruning(ctx, 10, PruningOptions(max_steps=200, warmup=30, batch_size=6, window=W, epsilon=1e-3))
    target = 1.0 - 10 / E
    assert res.stopped == "converged" and res.reached is not None
    assert res.steps >= res.reached + 2 * W - 1 and res.steps == len(res.history)
    at = res.history[res.reached - 1]
    assert at["target"] == pytest.approx(target) and at["sparsity"] >= target - 0.01
    assert all(h["target"] < target or h["sparsity"] < target - 0.01 for h in res.history[:res.reached - 1])
    assert int(res.kept.sum()) == 10


def test_with_everything_kept_the_loss_pushes_toward_keep_all():
    """Target keep-all from half-open masks: the KL and the Lagrangian both raise every log alpha
    on average, the expected sparsity falls and every edge is kept."""
    ctx = edge_context("gemma3", n_prompts=4, batch_size=4)
    E = ctx.graph.n_edges
    res = edge_pruning(ctx, E, PruningOptions(max_steps=15, warmup=5, batch_size=4, init=0.0))
    assert float(res.log_alpha.mean()) > 0.0
    assert res.history[-1]["sparsity"] < res.history[0]["sparsity"]
    first = sum(h["kl"] for h in res.history[:3]) / 3
    last = sum(h["kl"] for h in res.history[-3:]) / 3
    assert last < first
    assert bool(res.kept.all())


# -- evaluation and errors ----------------------------------------------------------------------

def test_evaluation_of_all_and_no_edges():
    ctx = edge_context("gpt2", n_prompts=4)
    E = ctx.graph.n_edges
    full = evaluate(ctx, torch.ones(E, dtype=torch.bool))
    none = evaluate(ctx, torch.zeros(E, dtype=torch.bool))
    assert full.kl_stat.mean < 1e-6 and full.recovered_of_means == pytest.approx(1.0, abs=1e-4)
    assert none.recovered_of_means == pytest.approx(0.0, abs=1e-4)
    assert none.kl_stat.ci95[0] <= none.kl_stat.mean <= none.kl_stat.ci95[1]
    counts = log_spaced_counts(E, 5)
    assert counts[0] == 10 and counts[-1] == E and counts == sorted(set(counts))
    assert curve_area([10, 100], [1.0, 1.0], 100) == pytest.approx(1.0)


def test_bad_input_is_one_clear_error():
    ctx = edge_context("llama", n_prompts=2)
    E = ctx.graph.n_edges
    with pytest.raises(UserError, match="unknown edge method"):
        get_edge_method("magic")
    with pytest.raises(UserError, match="no option"):
        EDGE_METHODS["eap-ig"].options({"stepz": 3})
    with pytest.raises(UserError, match="must be like"):
        EDGE_METHODS["hap"].options({"rho": "much"})
    for bad in (dict(edges=0), dict(edges=E + 1), dict(sparsity=1.0), dict(sparsity=-0.1), dict(edges=3.5), {}):
        with pytest.raises(UserError):
            target_count(E, **bad)
    with pytest.raises(UserError, match="rho"):
        EDGE_METHODS["hap"].run(ctx, E // 2, {"rho": 0.1})
    with pytest.raises(UserError, match="lambda_optimizer"):
        EDGE_METHODS["edge-pruning"].run(ctx, E // 2, {"lambda_optimizer": "rmsprop"})
    assert target_count(E, sparsity=0.5) == round(E / 2)


def test_qwen_keep_all_and_remove_all():
    """Qwen-2 (biases on q/k/v, grouped-query attention) patches exactly too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from backend.edges.context import EdgeContext
    from backend.models.adapters import ModelAdapter
    from backend.tasks import get_task
    from tests.tokenizers import tiny_tokenizer
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    ctx = EdgeContext.create(ModelAdapter(model, tok), get_task("ioi").build(tok, 3, seed=0))
    part, E = ctx.parts[0], ctx.graph.n_edges
    assert float(kl_divergence(part.clean_logits, circuit_logits(ctx, torch.ones(E))[0]).max()) < 1e-6
    torch.testing.assert_close(circuit_logits(ctx, torch.zeros(E))[0], part.corrupted_logits, rtol=1e-4, atol=1e-4)


def test_hap_on_eap_scores_shares_the_eap_method_scores_whatever_ig_steps_says():
    hap, eap = get_edge_method("hap"), get_edge_method("eap")
    assert hap.score_keys(hap.options({"ig_steps": 9})) == eap.score_keys(eap.options({}))
    ig = hap.score_keys(hap.options({"scores": "eap-ig", "ig_steps": 9}))
    assert ig == get_edge_method("eap-ig").score_keys(get_edge_method("eap-ig").options({"steps": 9}))
