"""Attribution-graph edges against exact interventions in the frozen replacement model."""

from __future__ import annotations

import pytest
import torch

from backend.circuits.graph import aggregate_graphs, from_neuronpedia, prompt_graph, to_neuronpedia
from backend.circuits.pipeline import PruneConfig, run_prune
from backend.tasks import metric
from tests.frozen import FrozenModel
from tests.pie_fixtures import pie_setup


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def graph_setup(request):
    s = pie_setup(request.param, n_prompts=2)
    s.adapter.softcap = None
    circuit = run_prune(s.adapter, s.transcoder, s.batch, PruneConfig(method="fap", k=8, all_token_kl=False,
                        completeness=False), model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")
    graph = prompt_graph(s.adapter, s.transcoder, s.batch, 0, circuit.prompts[0].kept, chunk=3)
    return s, circuit, graph


def _write(tc, o, T):
    """The patch [L, 1, T, d] that is occurrence o's write a * W_dec into every target layer."""
    patch = torch.zeros(tc.n_layers, 1, T, tc.d_model)
    rows = tc.decoder_rows(o.layer, torch.tensor([o.feature]))[0]
    for j, t in enumerate(tc.targets(o.layer)):
        patch[t, 0, o.position] = o.activation * rows[j]
    return patch


def test_feature_edges_equal_exact_interventions(graph_setup):
    s, circuit, graph = graph_setup
    tc, kept = s.transcoder, circuit.prompts[0].kept
    T = len(graph["tokens"])
    one = s.batch.subset([0])
    ids, mask = one.clean_ids[:, :T], one.attention_mask[:, :T]
    frozen = FrozenModel(s.adapter, ids, mask)
    weights = {(l["source"], l["target"]): l["weight"] for l in graph["links"]}
    logit_id = next(n["node_id"] for n in graph["nodes"] if n["kind"] == "logit")
    with torch.no_grad():
        base = frozen.run()
        base_capture = s.adapter.run(ids, mask, capture=True)  # resid_mid of the clean run
        checked = 0
        for src in kept:
            out = frozen.run(-_write(tc, src, T))
            # Metric edge: removing the source's write changes M by exactly the edge weight.
            dm = float(metric(base.logits, one) - metric(out.logits, one))
            assert weights.get((f"{src.layer}_{src.feature}_{src.position}", logit_id), 0.0) == \
                pytest.approx(dm, rel=1e-3, abs=1e-5)
            checked += 1
        # Feature -> feature edges: the change of the target's encoder pre-activation.
        for tgt in kept:
            for src in kept:
                if src is tgt:
                    continue
                captured = _frozen_resid_mid(s.adapter, frozen, -_write(tc, src, T))
                d_pre = float((base_capture.resid_mid[tgt.layer, 0, tgt.position]
                               - captured[tgt.layer, 0, tgt.position]) @ tc.W_enc[tgt.layer, tgt.feature])
                got = weights.get((f"{src.layer}_{src.feature}_{src.position}",
                                   f"{tgt.layer}_{tgt.feature}_{tgt.position}"), 0.0)
                assert got == pytest.approx(d_pre, rel=1e-3, abs=1e-5)
    assert checked == len(kept)


def _frozen_resid_mid(adapter, frozen, patch):
    """resid_mid [L, 1, T, d] of the frozen model under ``patch``."""
    captured = {}
    handles = [adapter.resid_mid_module(l).register_forward_pre_hook(
        lambda m, a, l=l: captured.__setitem__(l, a[0])) for l in range(adapter.n_layers)]
    try:
        frozen.run(patch)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([captured[l] for l in range(adapter.n_layers)])


def test_node_ids_follow_circuit_tracer_and_are_unique(graph_setup):
    s, circuit, graph = graph_setup
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids))
    kinds = {n["kind"] for n in graph["nodes"]}
    assert kinds == {"feature", "error", "token", "logit"}
    L = s.adapter.n_layers
    logit = [n for n in graph["nodes"] if n["kind"] == "logit"][0]
    assert logit["node_id"].startswith(f"{L + 1}_")
    assert all(n["node_id"].startswith("E_") for n in graph["nodes"] if n["kind"] == "token")
    assert all("_-1_" in n["node_id"] for n in graph["nodes"] if n["kind"] == "error")


def test_neuronpedia_export_round_trips(graph_setup):
    s, circuit, graph = graph_setup
    exported = to_neuronpedia(graph, slug="tiny", scan="tiny-clt", prompt=circuit.prompts[0].clean,
                              n_layers=s.adapter.n_layers)
    assert set(exported) == {"metadata", "qParams", "nodes", "links"}
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"} <= set(exported["nodes"][0])
    back = from_neuronpedia(exported)
    assert [n["node_id"] for n in back["nodes"]] == [n["node_id"] for n in graph["nodes"]]
    assert back["links"] == graph["links"]


def test_aggregate_counts_prompts(graph_setup):
    s, circuit, graph = graph_setup
    second = prompt_graph(s.adapter, s.transcoder, s.batch, 1, circuit.prompts[1].kept)
    agg = aggregate_graphs([graph, second])
    features = {(o.layer, o.feature) for p in circuit.prompts for o in p.kept}
    assert {(n["layer"], n["feature"]) for n in agg["nodes"] if n["kind"] == "feature"} == features
    assert max(n["n_prompts"] for n in agg["nodes"]) <= 2
