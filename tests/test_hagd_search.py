"""HAGD's search and verification on tiny models: a planted circuit is found; the ablation
runs are exact (full set = clean, empty set = all removed, m in {0,1} = the evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.circuits.attribution import Attributor
from backend.circuits.evaluation import Evaluator, kl_divergence
from backend.errors import InvalidParameterError
from backend.hagd.feature_graph import build_feature_graph, pooled_occurrences
from backend.hagd.hierarchy import build_hierarchy
from backend.hagd.search import (_masked_logits, _MaskedRuns, ablation_score, coarse_to_fine, mask_search,
                                 mass_score)
from backend.hagd.verify import FeatureAblation, feature_codes, verify
from tests.pie_fixtures import pie_setup


def planted_setup(planted_scale: float = 40.0, other_scale: float = 1e-3):
    """A tiny model whose CLT writes almost nothing except through three planted features."""
    s = pie_setup("llama", n_prompts=6, n_features=24, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    occ = runs.occ
    # Plant the three layer-0 features with the most occurrences (active on every prompt; a
    # last-layer feature would matter only at the last position).
    first = occ.layer == 0
    codes = feature_codes(occ.layer[first], occ.feature[first], s.transcoder.n_features)
    uniq, counts = torch.unique(codes, return_counts=True)
    planted = uniq[torch.argsort(counts, descending=True)[:3]].sort().values
    with torch.no_grad():
        for layer, w in enumerate(s.transcoder.W_dec):
            scale = torch.full((w.shape[0],), other_scale)
            for c in planted.tolist():
                if c // s.transcoder.n_features == layer:
                    scale[c % s.transcoder.n_features] = planted_scale
            w.mul_(scale[:, None, None])
    runs = attr.prepare(s.batch)
    return s, attr, [runs], planted


def test_full_set_is_clean_and_empty_set_is_all_removed():
    s = pie_setup("gpt2", n_prompts=3, n_features=6, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    ablation = FeatureAblation(attr, [runs])
    every = torch.unique(feature_codes(runs.occ.layer, runs.occ.feature, 6))
    empty = torch.zeros(0, dtype=torch.long)
    keep = ablation.metric([every, empty], keep=True)
    assert torch.equal(keep[0], runs.clean_metric.float())
    assert torch.allclose(keep[1], ablation.m_none, atol=1e-5)
    np.testing.assert_allclose(ablation.sufficiency([every, empty]), [1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(ablation.necessity([every, empty]), [1.0, 0.0], atol=1e-5)
    # Graph built on a pool that covers every occurrence: its feature set is the full set.
    graph = build_feature_graph(attr, [runs], pool=10 ** 6)
    nodes = graph.feature_nodes
    full = feature_codes(graph.layer[nodes], graph.feature[nodes], 6)
    assert torch.equal(torch.sort(full).values, every)
    result = verify({"full": full, "empty": empty}, {0: ablation})
    assert result["full"].sufficiency == pytest.approx([1.0], abs=1e-5)
    assert result["empty"].sufficiency == pytest.approx([0.0], abs=1e-5)


def test_hard_masks_are_exactly_the_evaluation():
    s = pie_setup("llama", n_prompts=4, n_features=16, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    ablation = FeatureAblation(attr, [runs])
    codes = ablation.codes[0]
    survivors = torch.unique(codes)[::2]
    mr = _MaskedRuns(ablation, runs, codes, survivors)
    m = (torch.arange(len(survivors)) % 3 == 0).float()
    with torch.no_grad():
        logits = _masked_logits(s.adapter, mr, m)
    kept = torch.isin(codes, survivors[m > 0])
    expected = Evaluator(attr).evaluate(runs, [kept])[0]
    assert torch.allclose(kl_divergence(runs.clean_logits, logits), expected.kl_last, atol=1e-5)


def test_mask_search_finds_a_planted_circuit():
    s, attr, runs_list, planted = planted_setup()
    ablation = FeatureAblation(attr, runs_list)
    every = torch.unique(ablation.codes[0])
    found = mask_search(ablation, every, lam=0.2, steps=60, lr=0.3, seed=0)
    assert torch.equal(found.codes, planted)
    assert ablation.sufficiency([found.codes])[0] > 0.99


def test_coarse_to_fine_keeps_the_planted_features_with_few_evaluations():
    s, attr, runs_list, planted = planted_setup()
    graph = build_feature_graph(attr, runs_list, pool=40)
    hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=3, top=3, seed=0)
    hierarchy.check()
    ablation = FeatureAblation(attr, runs_list)
    for score in (ablation_score(graph, ablation), mass_score(graph)):
        result = coarse_to_fine(hierarchy, graph, score, threshold=0.02)
        kept = feature_codes(graph.layer[result.survivors], graph.feature[result.survivors], 24)
        assert set(planted.tolist()) <= set(kept.tolist())
        assert result.evaluations == sum(t["scored"] for t in result.trace)
        assert result.evaluations < sum(hierarchy.counts()[1:])  # not every cluster was scored


def test_pooled_occurrences_are_each_prompts_top_by_abs_fap():
    s = pie_setup("gemma3", n_prompts=3, n_features=16, n_layers=2)
    runs = Attributor(s.adapter, s.transcoder).prepare(s.batch)
    pooled = pooled_occurrences(runs, 5)
    for b, kept in enumerate(pooled):
        scores = runs.fap[runs.occ.prompt == b].abs().sort(descending=True).values
        assert [abs(o.score) for o in kept] == pytest.approx(scores[:5].tolist())


def test_abs_effect_is_the_per_prompt_change_and_does_not_cancel():
    """abs_effect(S) = mean_n |M_clean - M_remove(S)| / span, computed here from the evaluator
    directly; it bounds |necessity| from above, and two sets pulling M opposite ways keep their
    magnitude together where necessity (signed) cancels."""
    s = pie_setup("llama", n_prompts=5, n_features=16, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    ablation = FeatureAblation(attr, [runs])
    singles = [c.view(1) for c in torch.unique(ablation.codes[0])]
    effect, signed = ablation.abs_effect(singles), ablation.necessity(singles)
    removed = [Evaluator(attr).evaluate(runs, [~torch.isin(ablation.codes[0], c)])[0].m_circuit for c in singles]
    direct = [float((runs.clean_metric - m).abs().mean()) / ablation.span for m in removed]
    np.testing.assert_allclose(effect, direct, rtol=1e-4, atol=1e-6)
    assert np.all(effect >= np.abs(signed) - 1e-6)
    every = torch.unique(ablation.codes[0])
    full = float((runs.clean_metric - ablation.m_none).abs().mean()) / ablation.span
    assert ablation.abs_effect([every])[0] == pytest.approx(full, rel=1e-4)
    up, down = singles[int(np.argmax(signed))], singles[int(np.argmin(signed))]
    assert signed.max() > 0 > signed.min()
    pair = torch.cat([up, down])
    assert ablation.abs_effect([pair])[0] > abs(ablation.necessity([pair])[0])


def test_mask_search_metric_term_is_optional_and_both_find_the_planted_circuit():
    s, attr, runs_list, planted = planted_setup()
    ablation = FeatureAblation(attr, runs_list)
    every = torch.unique(ablation.codes[0])
    for weight in (0.0, 1.0):
        found = mask_search(ablation, every, lam=0.2, steps=60, lr=0.3, seed=0, metric_weight=weight)
        assert torch.equal(found.codes, planted)
    with pytest.raises(InvalidParameterError, match="metric_weight"):
        mask_search(ablation, every, metric_weight=-1.0)


def test_scorer_labels_are_the_exact_search_scores_and_its_baseline_the_mass_score():
    """The learned scorer stands in for `ablation_score`, so it learns exactly what that ranks by
    (the unsigned effect), and is compared against `mass_score` (the unsigned mass)."""
    from backend.hagd.scorer import level_samples
    s = pie_setup("llama", n_prompts=4, n_features=16, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    ablation = FeatureAblation(attr, [runs])
    graph = build_feature_graph(attr, [runs], pool=10 ** 6)
    hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=3.0, top=2, seed=0)
    samples = level_samples("t", graph, hierarchy, ablation, n_layers=2)
    assert samples and [x.level for x in samples] == list(range(1, len(hierarchy.levels)))
    exact, mass = ablation_score(graph, ablation), mass_score(graph)
    for x in samples:
        clusters = hierarchy.levels[x.level]
        np.testing.assert_allclose(x.y.numpy(), exact(clusters), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(x.mass.numpy(), mass(clusters), rtol=1e-5, atol=1e-7)
        assert (x.y >= 0).all() and (x.mass >= 0).all()


def test_prompt_fap_is_each_prompts_sum_of_s_and_survives_json():
    """prompt_fap[p, i] = sum of S over node i's occurrences on prompt p (counted here one
    occurrence at a time); averaged over prompts it is the graph's `fap`, and the same count of
    |S| gives `abs_fap`; tokens hold 0."""
    from backend.hagd.feature_graph import FeatureGraph
    from backend.hagd.scorer import first_order_effect
    s = pie_setup("llama", n_prompts=5, n_features=16, n_layers=2)
    attr = Attributor(s.adapter, s.transcoder)
    runs_list = [attr.prepare(s.batch)]
    graph = build_feature_graph(attr, runs_list, pool=8)
    occ, fap = runs_list[0].occ, runs_list[0].fap
    expected = np.zeros((len(s.batch), len(graph)))
    expected_abs = np.zeros(len(graph))
    index = {(int(graph.layer[i]), int(graph.feature[i])): i for i in graph.feature_nodes}
    for p, layer, feature, score in zip(occ.prompt.tolist(), occ.layer.tolist(), occ.feature.tolist(), fap.tolist()):
        if (layer, feature) in index:
            expected[p, index[(layer, feature)]] += score
            expected_abs[index[(layer, feature)]] += abs(score) / len(s.batch)
    np.testing.assert_allclose(graph.prompt_fap, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(graph.prompt_fap.mean(0), graph.fap, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(graph.abs_fap, expected_abs, rtol=1e-6, atol=1e-9)
    assert not graph.prompt_fap[:, ~graph.is_feature].any()
    back = FeatureGraph.from_json(graph.to_json())
    np.testing.assert_array_equal(back.prompt_fap, graph.prompt_fap)
    # The first-order effect of a set is per prompt, so opposite members cancel within a prompt only.
    members = graph.feature_nodes[:3]
    assert first_order_effect(graph, members) == pytest.approx(np.abs(expected[:, members].sum(1)).mean())
    assert first_order_effect(graph, members) <= np.abs(expected[:, members]).sum(1).mean() + 1e-12
    old = graph.to_json()
    old.pop("prompt_fap")
    assert FeatureGraph.from_json(old).prompt_fap is None  # graphs stored before it still load
