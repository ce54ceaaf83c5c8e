"""Attribution graphs: complete (incoming edges sum to each target's value), every edge kind equal
to an exact intervention in the frozen linearised model, documented ids, and JSON round trips."""

from __future__ import annotations

import json

import pytest
import torch

from backend.circuits.graph import Graph, Node
from backend.circuits.graph_attribution import aggregate_graphs, build_graph, prompt_graph
from backend.circuits.pipeline import PruneConfig, run_prune
from backend.errors import InvalidParameterError
from backend.tasks import metric
from tests.frozen import FrozenModel
from tests.pie_fixtures import pie_setup
from tests.tiny_models import ARCHS


def _setup(arch: str):
    s = pie_setup(arch, n_prompts=2)
    # Random biases everywhere (GPT-2 initialises its attention biases at zero), so that a
    # missing constant would show in the sums.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in s.adapter.model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    circuit = run_prune(s.adapter, s.transcoder, s.batch, PruneConfig(method="fap", k=8, all_token_kl=False,
                        completeness=False), model_name="tiny", transcoder_name="tiny/clt", task_name="ioi")
    return s, circuit


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request):
    return (request.param, *_setup(request.param))


@pytest.fixture(scope="module")
def llama_setup():
    return _setup("llama")


@pytest.mark.parametrize("target", ["metric", "logit"])
def test_incoming_edges_sum_to_every_target_value(arch_setup, target):
    arch, s, circuit = arch_setup
    graph = prompt_graph(s.adapter, s.transcoder, s.batch, 0, circuit.prompts[0].kept, target=target, chunk=3)
    one = s.batch.subset([0])
    T = len(graph.tokens)
    with torch.no_grad():
        clean = s.adapter.run(one.clean_ids[:, :T], one.attention_mask[:, :T], capture=True)
    sums = graph.incoming_sums()
    kept = circuit.prompts[0].kept
    assert [n.kind for n in graph.nodes].count("feature") == len(kept)
    for i, n in enumerate(graph.nodes):
        if n.kind == "feature":   # value: the encoder pre-activation of the clean run
            expected = float(s.transcoder.pre_activations(n.layer, clean.resid_mid[n.layer, 0, n.position]).detach()[n.feature])
            assert n.value == pytest.approx(expected, abs=1e-5)
            assert float(sums[i]) == pytest.approx(n.value, abs=1e-4)
        elif n.is_target:         # value: M (or the answer logit) of the clean model
            logits = clean.logits
            expected = float(metric(logits, one)[0]) if target == "metric" else float(logits[0, n.feature])
            assert n.value == pytest.approx(expected, abs=1e-4)
            assert float(sums[i]) == pytest.approx(n.value, abs=1e-4)
        else:
            assert n.value is None and float(sums[i]) == 0.0
    assert sum(n.is_target for n in graph.nodes) == 1
    # Every kind of source carries weight into the target: none is there for show.
    t = graph.index(graph.target.node_id)
    for kind in ("feature", "error", "token", "pruned", "bias"):
        cols = [j for j, n in enumerate(graph.nodes) if n.kind == kind]
        assert graph.adjacency[t, cols].abs().sum() > 0, kind


def test_the_target_is_labelled_as_the_metric_it_is(llama_setup):
    s, circuit = llama_setup
    tok = s.adapter.tokenizer
    pair = s.batch.pairs[0]
    graph = prompt_graph(s.adapter, s.transcoder, s.batch, 0, circuit.prompts[0].kept)
    answer, distractor = int(s.batch.answer_ids[0, 0]), int(s.batch.distractor_ids[0, 0])
    target = graph.target
    assert target.kind == "metric" and (target.feature, target.distractor) == (answer, distractor)
    assert target.label == f"logit({json.dumps(tok.decode([answer]))}) - logit({json.dumps(tok.decode([distractor]))})"
    assert pair.answer.strip() in target.label and target.node_id == f"M_{answer}_{distractor}_{len(graph.tokens) - 1}"
    logit = prompt_graph(s.adapter, s.transcoder, s.batch, 0, circuit.prompts[0].kept, target="logit").target
    assert logit.kind == "logit" and logit.label == f"logit({json.dumps(tok.decode([answer]))})"
    assert logit.node_id == f"{s.adapter.n_layers + 1}_{answer}_{len(graph.tokens) - 1}"
    with pytest.raises(InvalidParameterError, match="target"):
        prompt_graph(s.adapter, s.transcoder, s.batch, 0, [], target="loss")
    # Keeping nothing: everything the CLT writes is the pruned node's, and the sum still holds.
    empty = prompt_graph(s.adapter, s.transcoder, s.batch, 0, [])
    assert "feature" not in {n.kind for n in empty.nodes}
    t = empty.index(empty.target.node_id)
    assert float(empty.incoming_sums()[t]) == pytest.approx(empty.target.value, abs=1e-4)
    assert empty.weight("P", empty.target.node_id) != 0.0


def test_a_nonlinear_metric_is_explained_by_its_first_order_term(llama_setup):
    """prob_diff is not linear in the logits: the target is w . logits with w = dM/dlogits at the
    clean logits, labelled so, and its incoming edges still sum to its value."""
    import dataclasses
    s, circuit = llama_setup
    batch = dataclasses.replace(s.batch, metric_kind="prob_diff")
    graph = prompt_graph(s.adapter, s.transcoder, batch, 0, circuit.prompts[0].kept)
    target = graph.target
    assert target.kind == "metric" and "first-order" in target.label and "prob_diff" in target.label
    assert target.node_id == f"M_{target.feature}_-1_{len(graph.tokens) - 1}"
    T = len(graph.tokens)
    one = batch.subset([0])
    logits = s.adapter.run(one.clean_ids[:, :T], one.attention_mask[:, :T]).logits.detach().requires_grad_(True)
    metric(logits, one).sum().backward()
    assert target.value == pytest.approx(float(logits.grad[0] @ logits[0].detach()), abs=1e-5)
    assert float(graph.incoming_sums()[graph.index(target.node_id)]) == pytest.approx(target.value, abs=1e-4)


# ---------------------------------------------------------------------- edges against interventions

def _frozen_logits(s, frozen, one, T, patch=None, layer0=None):
    """Last-position logits of the frozen model, the softcap frozen as a ratio, and resid_mid [L, T, d].

    layer0: [T, d] added to the residual stream entering layer 0.
    """
    adapter = s.adapter
    captured = {}
    handles = [adapter.resid_mid_module(l).register_forward_pre_hook(
        lambda m, a, l=l: captured.__setitem__(l, a[0][0])) for l in range(adapter.n_layers)]
    if layer0 is not None:
        handles.append(adapter.layers[0].register_forward_pre_hook(
            lambda m, a: (a[0] + layer0, *a[1:])))
    try:
        out = frozen.run(patch, logits_at="none")
    finally:
        for h in handles:
            h.remove()
    z = adapter.model.get_output_embeddings()(out.hidden[0, T - 1])
    return z, torch.stack([captured[l] for l in range(adapter.n_layers)])


def _write(tc, node, T):
    """The patch [L, 1, T, d] that is a feature node's write a * W_dec into every target layer."""
    patch = torch.zeros(tc.n_layers, 1, T, tc.d_model)
    rows = tc.decoder_rows(node.layer, torch.tensor([node.feature]))[0]
    for j, t in enumerate(tc.targets(node.layer)):
        patch[t, 0, node.position] = node.activation * rows[j]
    return patch


# The metric on every architecture; the logit where the softcap (Gemma-2) and biases (GPT-2) are.
@pytest.mark.parametrize("arch_setup, target", [(a, "metric") for a in ARCHS] + [("gemma2", "logit"), ("gpt2", "logit")],
                         indirect=["arch_setup"])
def test_every_edge_kind_equals_removing_that_source_in_the_frozen_model(arch_setup, target):
    arch, s, circuit = arch_setup
    adapter, tc = s.adapter, s.transcoder
    graph = prompt_graph(adapter, tc, s.batch, 0, circuit.prompts[0].kept, target=target, chunk=4)
    T, L = len(graph.tokens), adapter.n_layers
    one = s.batch.subset([0])
    ids, mask = one.clean_ids[:, :T], one.attention_mask[:, :T]
    frozen = FrozenModel(adapter, ids, mask)
    with torch.no_grad():
        clean = adapter.run(ids, mask, capture=True)
        acts = tc.encode(clean.resid_mid[:, 0])
        recon = tc.decode(acts)
        z0, resid0 = _frozen_logits(s, frozen, one, T)
        ratio = (torch.tanh(z0 / adapter.softcap) * adapter.softcap / z0) if adapter.softcap else torch.ones_like(z0)

        def value(z, resid, node):
            """The target node's value in the frozen model (the softcap's ratio frozen too)."""
            if node.kind == "feature":
                return float(tc.pre_activations(node.layer, resid[node.layer, node.position])[node.feature])
            logits = (ratio * z)[None]
            return float(metric(logits, one)[0]) if node.kind == "metric" else float(logits[0, node.feature])

        targets = [n for n in graph.nodes if n.kind == "feature"][:3] + [graph.target]
        # Sources: four kept features, the two error nodes and four tokens with the largest edges
        # into the target, and the pruned node.
        t_row = graph.index(graph.target.node_id)

        def largest(kind, n):
            return sorted((j for j, node in enumerate(graph.nodes) if node.kind == kind),
                          key=lambda j: -abs(float(graph.adjacency[t_row, j])))[:n]
        chosen = set(largest("feature", 4) + largest("error", 2) + largest("token", 4))
        embedding = frozen_embedding(adapter, ids)
        kept_patch = torch.zeros(L, 1, T, tc.d_model)
        for n in graph.nodes:
            if n.kind == "feature":
                kept_patch += _write(tc, n, T)
        checked = 0
        for j, src in enumerate(graph.nodes):
            if j not in chosen and src.kind != "pruned":
                continue
            if src.kind == "feature":
                z, resid = _frozen_logits(s, frozen, one, T, patch=-_write(tc, src, T))
            elif src.kind == "error":
                patch = torch.zeros(L, 1, T, tc.d_model)
                patch[src.layer, 0, src.position] = clean.mlp_out[src.layer, 0, src.position] - recon[src.layer, src.position]
                z, resid = _frozen_logits(s, frozen, one, T, patch=-patch)
            elif src.kind == "token":
                embed = torch.zeros(T, adapter.d_model)
                embed[src.position] = embedding[src.position]
                z, resid = _frozen_logits(s, frozen, one, T, layer0=-embed)
            elif src.kind == "pruned":   # every write but the kept ones' and b_dec
                everything = (recon - tc.b_dec[:, None]).unsqueeze(1) - kept_patch
                z, resid = _frozen_logits(s, frozen, one, T, patch=-everything)
            for tgt in targets:
                change = value(z0, resid0, tgt) - value(z, resid, tgt)
                assert graph.weight(src.node_id, tgt.node_id) == pytest.approx(change, rel=1e-3, abs=1e-6), \
                    (arch, src.node_id, tgt.node_id)
                checked += 1
    assert checked == len(targets) * (min(4, len(circuit.prompts[0].kept)) + 2 + 4 + 1)


def frozen_embedding(adapter, ids):
    """[T, d] the residual stream entering layer 0 of the clean run."""
    seen = {}
    handle = adapter.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0]))
    try:
        adapter.run(ids, torch.ones_like(ids))
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------------- ids, JSON, Neuronpedia

def test_node_ids_are_documented_and_unique(llama_setup):
    s, circuit = llama_setup
    graph = prompt_graph(s.adapter, s.transcoder, s.batch, 0, circuit.prompts[0].kept)
    ids = graph.ids
    assert len(ids) == len(set(ids))
    L, T = s.adapter.n_layers, len(graph.tokens)
    by_kind = {}
    for n in graph.nodes:
        by_kind.setdefault(n.kind, []).append(n)
    assert set(by_kind) == {"feature", "error", "token", "pruned", "bias", "metric"}
    assert len(by_kind["error"]) == L * T and len(by_kind["token"]) == T
    assert all(n.node_id == f"{n.layer}_{n.feature}_{n.position}" for n in by_kind["feature"])
    assert all(n.node_id == f"{n.layer}_-1_{n.position}" for n in by_kind["error"])
    assert all(n.node_id == f"E_{n.feature}_{n.position}" for n in by_kind["token"])
    assert [n.node_id for n in by_kind["pruned"] + by_kind["bias"]] == ["P", "B"]


def test_stored_and_neuronpedia_json_round_trip_identically(llama_setup):
    s, circuit = llama_setup
    graph = prompt_graph(s.adapter, s.transcoder, s.batch, 1, circuit.prompts[1].kept)
    stored = json.loads(json.dumps(graph.to_json()))
    assert Graph.from_json(stored) == graph
    exported = json.loads(json.dumps(graph.to_neuronpedia(slug="tiny", scan="tiny/clt", prompt=circuit.prompts[1].clean)))
    assert set(exported) == {"metadata", "qParams", "nodes", "links"}
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "is_target_logit"} <= set(exported["nodes"][0])
    target = next(n for n in exported["nodes"] if n["is_target_logit"])
    assert target["feature_type"] == "logit" and target["clerp"] == graph.target.label
    back = Graph.from_neuronpedia(exported)
    assert back == graph
    assert [n.value for n in back.nodes] == [n.value for n in graph.nodes]
    # Capped links keep the largest ones.
    top = graph.links(max_links=5)
    assert len(top) == 5 and abs(top[0]["weight"]) == float(graph.adjacency.abs().max())


# A graph file written by hand to the published schema (circuit-tracer's create_graph_files /
# Neuronpedia): two input tokens, a feature, an error node and the target logit.
HAND_WRITTEN = {
    "metadata": {"slug": "hand-written", "scan": "gemma-2-2b", "transcoder_list": [],
                 "prompt_tokens": ["<bos>", "The", " capital"], "prompt": "The capital",
                 "node_threshold": 0.8, "schema_version": 1},
    "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
    "nodes": [
        {"node_id": "E_651_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
         "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
         "jsNodeId": "E_651-1", "clerp": "", "influence": 0.5, "activation": None},
        {"node_id": "E_6037_2", "feature": 2, "layer": "E", "ctx_idx": 2, "feature_type": "embedding",
         "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
         "jsNodeId": "E_6037-2", "clerp": "", "influence": 0.6, "activation": None},
        {"node_id": "1_1234_2", "feature": 1237, "layer": "1", "ctx_idx": 2,
         "feature_type": "cross layer transcoder", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
         "reverse_ctx_idx": 0, "jsNodeId": "1_1234-0", "clerp": "capital cities", "influence": 0.7,
         "activation": 3.25},
        {"node_id": "0_-1_2", "feature": -1, "layer": "0", "ctx_idx": 2,
         "feature_type": "mlp reconstruction error", "token_prob": 0.0, "is_target_logit": False,
         "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "0_-1-2", "clerp": "", "influence": 0.2,
         "activation": None},
        {"node_id": "27_576_2", "feature": 576, "layer": "27", "ctx_idx": 2, "feature_type": "logit",
         "token_prob": 0.42, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
         "jsNodeId": "L_576-2", "clerp": "Output \" of\" (p=0.420)", "influence": None, "activation": None},
    ],
    "links": [
        {"source": "E_651_1", "target": "1_1234_2", "weight": 1.5},
        {"source": "E_6037_2", "target": "1_1234_2", "weight": 0.75},
        {"source": "0_-1_2", "target": "1_1234_2", "weight": -0.25},
        {"source": "1_1234_2", "target": "27_576_2", "weight": 2.0},
        {"source": "E_6037_2", "target": "27_576_2", "weight": 0.5},
    ],
}


def test_a_hand_written_neuronpedia_file_loads():
    graph = Graph.from_neuronpedia(HAND_WRITTEN)
    assert graph.n_layers == 26 and graph.tokens == ["<bos>", "The", " capital"]
    assert [n.kind for n in graph.nodes] == ["token", "token", "feature", "error", "logit"]
    feature = graph.nodes[2]
    assert (feature.layer, feature.feature, feature.position, feature.activation) == (1, 1234, 2, 3.25)
    assert feature.label == "capital cities" and feature.score == 0.7
    target = graph.target
    assert target.node_id == "27_576_2" and target.token == " of" and target.label == 'logit(" of")'
    assert target.token_prob == 0.42
    assert graph.weight("E_651_1", "1_1234_2") == 1.5 and graph.weight("1_1234_2", "27_576_2") == 2.0
    assert float(graph.adjacency.abs().sum()) == pytest.approx(5.0)
    assert Graph.from_neuronpedia(graph.to_neuronpedia(slug="again", scan="gemma-2-2b")) == graph


def _mutated(**change):
    doc = json.loads(json.dumps(HAND_WRITTEN))
    for path, value in change.items():
        *where, last = path.split("__")
        target = doc
        for key in where:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value
    return doc


@pytest.mark.parametrize("doc, message", [
    ({"nodes": []}, "metadata"),
    (_mutated(links__0__source="nowhere"), "nowhere"),
    (_mutated(nodes__1__node_id="E_651_1", nodes__1__ctx_idx=1), "repeated|does not match"),
    (_mutated(nodes__2__feature_type="lorsa"), "feature_type"),
    (_mutated(nodes__2__ctx_idx=9), "ctx_idx"),
    (_mutated(nodes__2__node_id="1_x_2"), "1_x_2"),
    (_mutated(nodes__2__layer="3"), "layer"),
    (_mutated(links__0__weight="heavy"), "weight"),
    (_mutated(metadata__prompt_tokens=[]), "prompt_tokens"),
])
def test_malformed_graph_files_are_rejected_with_a_reason(doc, message):
    with pytest.raises(InvalidParameterError, match=message):
        Graph.from_neuronpedia(doc)


def test_build_graph_and_aggregate(llama_setup):
    s, circuit = llama_setup
    stored = build_graph(s.adapter, s.transcoder, s.batch, circuit, target="logit")
    assert stored["target"] == "logit" and [g["prompt"] for g in stored["graphs"]] == [0, 1]
    graphs = [Graph.from_json(g) for g in stored["graphs"]]
    assert all(g.target.kind == "logit" for g in graphs)
    agg = aggregate_graphs(graphs)
    features = {(o.layer, o.feature) for p in circuit.prompts for o in p.kept}
    assert {(n["layer"], n["feature"]) for n in agg["nodes"] if n["kind"] == "feature"} == features
    assert max(n["n_prompts"] for n in agg["nodes"]) == 2   # the target is on both
    assert stored["aggregate"] == agg


def test_a_node_knows_its_id():
    assert Node("metric", 4, 7, 11, distractor=12).node_id == "M_11_12_7"
    assert Node("logit", 4, 7, 11).node_id == "4_11_7"
    with pytest.raises(ValueError):
        Node("attention", 0, 0, 0).node_id  # noqa: B018


def test_graphs_stored_before_the_typed_graph_still_load():
    """The earlier stored format: no n_layers, values or is_target; the logit was the target."""
    from tests.test_dashboard import _graph
    old = _graph()
    graph = Graph.from_json(old)
    assert graph.n_layers == 2 and graph.target.node_id == "3_9_2" and graph.target.kind == "logit"
    assert graph.weight("0_-1_2", "3_9_2") == 2.0 and graph.weight("E_1_1", "1_3_1") == pytest.approx(0.05)  # float32
    exported = graph.to_neuronpedia(slug="old", scan="tiny/clt")
    assert Graph.from_neuronpedia(exported) == graph
