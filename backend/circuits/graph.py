"""The attribution graph of a circuit (DESIGN section 6), and its circuit-tracer/Neuronpedia JSON.

Nodes: the kept occurrences of one prompt, the input tokens, the metric's answer logit, and an
error term per (layer, position) (the part of mlp_out the CLT does not reconstruct).
Edge s -> t: the direct effect of s on t's encoder pre-activation (or on the metric) in the
linearised replacement model (attention patterns, norm scales and MLP outputs frozen):
a_s * W_dec_s . J . W_enc_t. Each target needs one backward; targets are batched as copies of
the prompt, one copy per target, so a chunk of targets costs one forward and one backward.

Node ids follow circuit-tracer and cannot collide: feature ``{layer}_{feature}_{pos}``, error
``{layer}_-1_{pos}``, token ``E_{token_id}_{pos}``, logit ``{n_layers + 1}_{token_id}_{pos}``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backend.circuits.results import Circuit, FeatureOccurrence
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch, metric


@dataclass
class GraphNodes:
    """The nodes of one prompt's graph, as parallel lists."""

    ids: list[str]
    kinds: list[str]        # feature | error | token | logit
    layers: list[int]       # token: -1, logit: n_layers
    positions: list[int]
    features: list[int]     # feature index, -1 for errors, token id for tokens and the logit
    activations: list[float | None]


def _embedding_leaf(adapter: ModelAdapter):
    """A forward hook that turns the token embeddings into a gradient leaf; returns (hook, store)."""
    store: dict[str, Tensor] = {}

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        store["embed"] = leaf
        return leaf
    return hook, store


def _target_objective(adapter: ModelAdapter, tc: Transcoder, out, targets: list[FeatureOccurrence | None],
                      rows: PromptBatch) -> Tensor:
    """Sum over copies i of target i's value on copy i: a pre-activation, or the metric (None)."""
    total = out.logits.new_zeros(())
    for i, t in enumerate(targets):
        if t is None:
            total = total + metric(out.logits[i:i + 1], _row(rows, i)).sum()
        else:
            w = tc.W_enc[t.layer, t.feature]
            total = total + out.resid_mid[t.layer, i, t.position] @ w
    return total


def _row(rows: PromptBatch, i: int) -> PromptBatch:
    from backend.circuits.attribution import batch_rows
    return batch_rows(rows, torch.tensor([i]))


def prompt_graph(adapter: ModelAdapter, tc: Transcoder, batch: PromptBatch, index: int,
                 kept: list[FeatureOccurrence], *, chunk: int = 32, include_errors: bool = True,
                 max_links: int = 20000) -> dict[str, Any]:
    """The attribution graph of prompt ``index`` of ``batch`` with the kept occurrences as features.

    Returns {"prompt", "tokens", "nodes": [...], "links": [{"source","target","weight"}]}; links are
    the ``max_links`` largest by |weight|.
    """
    from backend.circuits.attribution import batch_rows
    one = batch_rows(batch, torch.tensor([index])).to(adapter.device)
    T = int(one.last_pos[0]) + 1
    ids, mask = one.clean_ids[:, :T], one.attention_mask[:, :T]
    L = adapter.n_layers
    with torch.no_grad():
        clean = adapter.run(ids, mask, capture=True)
        errors = clean.mlp_out[:, 0] - tc.decode(tc.encode(clean.resid_mid[:, 0]))           # [L, T, d]
        embed = adapter.model.get_input_embeddings()(ids)[0]                                  # [T, d]
    tokens = adapter.tokenizer.convert_ids_to_tokens(ids[0].tolist()) if adapter.tokenizer else [str(i) for i in ids[0].tolist()]
    answer = int(one.answer_ids[0, 0]) if one.answer_ids.numel() and one.answer_ids[0, 0] >= 0 else int(clean.logits[0].argmax())
    valid = list(range(1 if one.has_bos else 0, T))

    # Sources: kept features, errors, tokens. Targets: kept features and the logit.
    src = GraphNodes([], [], [], [], [], [])
    for o in kept:
        _add(src, f"{o.layer}_{o.feature}_{o.position}", "feature", o.layer, o.position, o.feature, o.activation)
    if include_errors:
        for layer in range(L):
            for p in valid:
                _add(src, f"{layer}_-1_{p}", "error", layer, p, -1, None)
    for p in range(T):
        _add(src, f"E_{int(ids[0, p])}_{p}", "token", -1, p, int(ids[0, p]), None)
    logit_id = f"{L + 1}_{answer}_{T - 1}"
    targets: list[FeatureOccurrence | None] = list(kept) + [None]
    target_ids = [f"{o.layer}_{o.feature}_{o.position}" for o in kept] + [logit_id]

    weights = torch.zeros(len(targets), len(src.ids))
    feat_n = len(kept)
    feat_layer = torch.tensor([o.layer for o in kept], dtype=torch.long)
    feat_pos = torch.tensor([o.position for o in kept], dtype=torch.long)
    feat_act = torch.tensor([o.activation for o in kept])
    feat_idx = torch.tensor([o.feature for o in kept], dtype=torch.long)
    err_layer = torch.tensor([l for l, k in zip(src.layers, src.kinds) if k == "error"], dtype=torch.long)
    err_pos = torch.tensor([p for p, k in zip(src.positions, src.kinds) if k == "error"], dtype=torch.long)
    n_err = len(err_layer)

    hook, store = _embedding_leaf(adapter)
    for start in range(0, len(targets), chunk):
        part = targets[start:start + chunk]
        c = len(part)
        rows = batch_rows(one, torch.zeros(c, dtype=torch.long))
        handle = adapter.model.get_input_embeddings().register_forward_hook(hook)
        try:
            with torch.enable_grad():
                out = adapter.run(ids.repeat(c, 1), mask.repeat(c, 1), capture=True, linearise=True,
                                  grad="replacement")
                _target_objective(adapter, tc, out, part, rows).backward()
        finally:
            handle.remove()
        grads = out.mlp_out_grads()                                                          # [L, c, T, d]
        e_grad = store["embed"].grad                                                         # [c, T, d]
        with torch.no_grad():
            block = torch.zeros(c, len(src.ids))
            for layer in torch.unique(feat_layer).tolist() if feat_n else []:
                sel = torch.nonzero(feat_layer == layer, as_tuple=True)[0]
                dec = tc.decoder_rows(layer, feat_idx[sel])                                 # [s, n_t, d]
                n_t = dec.shape[1]
                g = grads[layer:layer + n_t][:, :, feat_pos[sel]]                          # [n_t, c, s, d]
                block[:, sel] = feat_act[sel] * torch.einsum("tcsd,std->cs", g, dec)
            if n_err:
                g = grads[err_layer, :, err_pos]                                            # [e, c, d]
                block[:, feat_n:feat_n + n_err] = torch.einsum("ecd,ed->ce", g, errors[err_layer, err_pos])
            block[:, feat_n + n_err:] = torch.einsum("ctd,td->ct", e_grad, embed)
        weights[start:start + c] = block

    # Features come first among both sources and targets: a feature's edge to itself is not an edge.
    idx = torch.arange(feat_n)
    weights[idx, idx] = 0.0
    nodes = _node_json(src, kept, tokens, answer, logit_id, T, L, adapter, clean.logits[0])
    flat = weights.flatten()
    keep = torch.nonzero(flat != 0, as_tuple=True)[0]
    keep = keep[torch.argsort(flat[keep].abs(), descending=True)[:max_links]]
    n_src = len(src.ids)
    links = [{"source": src.ids[j % n_src], "target": target_ids[j // n_src], "weight": float(flat[j])}
             for j in keep.tolist()]
    return {"prompt": index, "tokens": tokens, "answer_token": answer, "nodes": nodes, "links": links}


def _add(nodes: GraphNodes, node_id: str, kind: str, layer: int, pos: int, feature: int,
         activation: float | None) -> None:
    nodes.ids.append(node_id)
    nodes.kinds.append(kind)
    nodes.layers.append(layer)
    nodes.positions.append(pos)
    nodes.features.append(feature)
    nodes.activations.append(activation)


def _node_json(src: GraphNodes, kept: list[FeatureOccurrence], tokens: list[str], answer: int, logit_id: str,
               T: int, L: int, adapter: ModelAdapter, logits: Tensor) -> list[dict[str, Any]]:
    score = {f"{o.layer}_{o.feature}_{o.position}": o.score for o in kept}
    nodes = []
    for node_id, kind, layer, pos, feature, act in zip(src.ids, src.kinds, src.layers, src.positions,
                                                      src.features, src.activations):
        nodes.append({"node_id": node_id, "kind": kind, "layer": layer, "position": pos, "feature": feature,
                      "activation": act, "score": score.get(node_id), "token": tokens[pos]})
    prob = float(torch.softmax(logits.float(), -1)[answer])
    answer_token = adapter.tokenizer.convert_ids_to_tokens([answer])[0] if adapter.tokenizer else str(answer)
    nodes.append({"node_id": logit_id, "kind": "logit", "layer": L + 1, "position": T - 1, "feature": answer,
                  "activation": None, "score": None, "token": answer_token, "token_prob": prob})
    return nodes


def build_graph(adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, circuit: Circuit,
                prompts: list[int] | None = None, progress=None, **kwargs: Any) -> dict[str, Any]:
    """Per-prompt graphs of a stored circuit (all its prompts unless ``prompts`` is given).

    ``batch`` must be the circuit's prompt pairs (same task, n and seed) so that prompt i of the
    circuit is row i of the batch. ``progress(fraction, message)`` is called once per prompt.
    """
    by_index = {p.index: p for p in circuit.prompts}
    chosen = prompts if prompts is not None else sorted(by_index)
    graphs = []
    for n, i in enumerate(chosen):
        if progress:
            progress(n / len(chosen), f"graph of prompt {i}")
        graphs.append(prompt_graph(adapter, transcoder, batch, i, by_index[i].kept, **kwargs))
    return {"model": circuit.model, "transcoder": circuit.transcoder, "method": circuit.method, "k": circuit.k,
            "graphs": graphs, "aggregate": aggregate_graphs(graphs)}


def aggregate_graphs(graphs: list[dict[str, Any]]) -> dict[str, Any]:
    """Features across prompts: nodes are (layer, feature), edge weights averaged over prompts."""
    counts: dict[str, int] = defaultdict(int)
    info: dict[str, dict[str, Any]] = {}
    links: dict[tuple[str, str], float] = defaultdict(float)
    for g in graphs:
        key_of = {}
        for n in g["nodes"]:
            if n["kind"] == "feature":
                key = f"{n['layer']}_{n['feature']}"
            elif n["kind"] == "logit":
                key = "logit"
            else:
                continue  # tokens and errors are prompt-specific
            key_of[n["node_id"]] = key
            if key not in info:
                info[key] = {"node_id": key, "kind": n["kind"], "layer": n["layer"], "feature": n["feature"]}
        for key in set(key_of.values()):
            counts[key] += 1
        for link in g["links"]:
            s, t = key_of.get(link["source"]), key_of.get(link["target"])
            if s is not None and t is not None and s != t:
                links[(s, t)] += link["weight"] / len(graphs)
    nodes = [{**info[k], "n_prompts": counts[k]} for k in info]
    return {"nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()]}


def to_neuronpedia(graph: dict[str, Any], *, slug: str, scan: str, prompt: str,
                   n_layers: int) -> dict[str, Any]:
    """One prompt graph as circuit-tracer / Neuronpedia graph JSON (metadata, qParams, nodes, links)."""
    nodes = []
    for n in graph["nodes"]:
        kind = n["kind"]
        base = {"node_id": n["node_id"], "ctx_idx": n["position"], "run_idx": 0, "reverse_ctx_idx": 0,
                "clerp": "", "influence": None, "activation": n.get("activation"), "token_prob": 0.0,
                "is_target_logit": False}
        if kind == "feature":
            layer, feat = n["layer"], n["feature"]
            base.update(feature=(layer + feat) * (layer + feat + 1) // 2 + feat, layer=str(layer),
                        feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feat}-0")
        elif kind == "error":
            base.update(feature=-1, layer=str(n["layer"]), feature_type="mlp reconstruction error",
                        jsNodeId=f"{n['layer']}_-1-{n['position']}")
        elif kind == "token":
            base.update(feature=n["position"], layer="E", feature_type="embedding",
                        jsNodeId=f"E_{n['feature']}-{n['position']}")
        else:
            base.update(feature=n["feature"], layer=str(n_layers + 1), feature_type="logit",
                        jsNodeId=f"L_{n['feature']}-{n['position']}", is_target_logit=True,
                        token_prob=n.get("token_prob", 0.0),
                        clerp=f'Output "{n["token"]}" (p={n.get("token_prob", 0.0):.3f})')
        nodes.append(base)
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph["tokens"],
                         "prompt": prompt, "node_threshold": None, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": [dict(link) for link in graph["links"]]}


def from_neuronpedia(data: dict[str, Any]) -> dict[str, Any]:
    """A circuit-tracer / Neuronpedia graph JSON as PIEscope's graph dict (nodes, links, tokens)."""
    try:
        kinds = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
                 "embedding": "token", "logit": "logit"}
        nodes = []
        for n in data["nodes"]:
            kind = kinds.get(n["feature_type"], "feature")
            parts = n["node_id"].split("_")
            layer = -1 if kind == "token" else int(n["layer"])
            feature = int(parts[1]) if kind in ("feature", "token", "logit") else -1
            nodes.append({"node_id": n["node_id"], "kind": kind, "layer": layer, "position": int(n["ctx_idx"]),
                          "feature": feature, "activation": n.get("activation"), "score": n.get("influence"),
                          "token": data["metadata"]["prompt_tokens"][int(n["ctx_idx"])]
                          if kind != "logit" else n.get("clerp", ""), "token_prob": n.get("token_prob")})
        links = [{"source": l["source"], "target": l["target"], "weight": float(l["weight"])} for l in data["links"]]
    except (KeyError, ValueError, IndexError, TypeError) as err:
        from backend.errors import UserError
        raise UserError(f"not a circuit-tracer graph JSON: {type(err).__name__}: {err}") from None
    return {"prompt": 0, "tokens": list(data["metadata"]["prompt_tokens"]), "nodes": nodes, "links": links}
