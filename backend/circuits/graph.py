"""The typed attribution graph of one prompt (DESIGN 6), and its JSON: stored and Neuronpedia.

A `Graph` is a list of `Node`s and a dense adjacency tensor [N, N] where ``adjacency[t, s]`` is
the weight of the edge s -> t (circuit-tracer's convention): the direct effect of source s on
target t in the linearised replacement model (see `graph_attribution`). Every node's incoming
weights sum to its `value` when the graph is complete (computed graphs are; imported ones need
not be).

Node kinds and ids (documented, and unable to collide: features and errors have a layer in
[0, n_layers), logits n_layers + 1, errors feature -1, and the other kinds a letter prefix):

=========  =====================================  ============================================
kind       id                                     what it is
=========  =====================================  ============================================
feature    ``{layer}_{feature}_{pos}``            a kept CLT feature occurrence (its writes)
error      ``{layer}_-1_{pos}``                   mlp_out minus the CLT reconstruction there
token      ``E_{token_id}_{pos}``                 the residual stream entering layer 0 (token
                                                  embedding, plus positional embedding and
                                                  embedding scale where the model has them)
pruned     ``P``                                  the writes of every active occurrence not kept
bias       ``B``                                  every constant of the linearised model: CLT
                                                  b_dec and b_enc, attention and LayerNorm
                                                  biases, the unembedding bias
metric     ``M_{answer}_{distractor}_{pos}``      target: the task metric, e.g.
                                                  logit(" Mary") - logit(" John")
logit      ``{n_layers + 1}_{token_id}_{pos}``    target: one logit (circuit-tracer's id)
=========  =====================================  ============================================

Sources are features, errors, tokens, pruned and bias; targets are features (value: encoder
pre-activation) and the metric or logit node. JSON is made here and only here:
`Graph.to_json`/`from_json` (the stored format the dashboard draws) and
`to_neuronpedia`/`from_neuronpedia` (circuit-tracer / Neuronpedia graph files: `metadata`,
`qParams`, `nodes`, `links`; PIEscope's extra per-node fields go under a `piescope` key that
other readers ignore).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from backend.errors import InvalidParameterError

SOURCE_KINDS = ("feature", "error", "token", "pruned", "bias")
TARGET_KINDS = ("metric", "logit")
KINDS = SOURCE_KINDS + TARGET_KINDS
TARGETS = ("metric", "logit")   # the `target` option of a graph computation

# Limits for graphs read from files or requests (the adjacency is dense: N^2 floats).
MAX_IMPORT_NODES = 4096
MAX_IMPORT_LINKS = 1_000_000
MAX_ID_CHARS = 64

# circuit-tracer / Neuronpedia feature_type of each kind; pruned and bias are PIEscope's own.
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit", "metric": "logit", "pruned": "pruned features", "bias": "bias"}
KIND_OF_TYPE = {"cross layer transcoder": "feature", "per layer transcoder": "feature", "transcoder": "feature",
                "mlp reconstruction error": "error", "embedding": "token", "logit": "logit",
                "pruned features": "pruned", "bias": "bias"}


def node_id(kind: str, layer: int, feature: int, position: int, distractor: int = -1) -> str:
    """The documented id of a node (see the module docstring)."""
    if kind == "feature" or kind == "logit":
        return f"{layer}_{feature}_{position}"
    if kind == "error":
        return f"{layer}_-1_{position}"
    if kind == "token":
        return f"E_{feature}_{position}"
    if kind == "metric":
        return f"M_{feature}_{distractor}_{position}"
    if kind == "pruned":
        return "P"
    if kind == "bias":
        return "B"
    raise ValueError(f"unknown node kind {kind!r}")


@dataclass(frozen=True)
class Node:
    """One node. layer: source layer (features, errors), -1 (tokens, pruned, bias) or n_layers + 1
    (targets); position: token index, -1 for pruned and bias; feature: feature index, -1 for
    errors, pruned and bias, the token id for tokens and logits, the answer id for the metric.

    value: what the node's incoming edges sum to (targets only): a feature's encoder
    pre-activation, the metric's or logit's value in the linearised model.
    """

    kind: str
    layer: int
    position: int
    feature: int
    activation: float | None = None
    value: float | None = None
    score: float | None = None
    token: str = ""
    label: str = ""
    token_prob: float | None = None
    distractor: int = -1
    is_target: bool = False

    @property
    def node_id(self) -> str:
        return node_id(self.kind, self.layer, self.feature, self.position, self.distractor)


@dataclass(eq=False)
class Graph:
    """The attribution graph of one prompt.

    tokens: the T input tokens; nodes: N nodes (computed graphs order them features, errors
    (layer-major), tokens, pruned, bias, target); adjacency: [N, N] float32, row = target,
    column = source.
    """

    prompt: int
    tokens: list[str]
    n_layers: int
    nodes: list[Node]
    adjacency: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if tuple(self.adjacency.shape) != (n, n):
            raise ValueError(f"adjacency has shape {tuple(self.adjacency.shape)}, expected ({n}, {n})")
        ids = self.ids
        if len(set(ids)) != n:
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise InvalidParameterError(f"graph node ids must be unique; repeated: {', '.join(dupes)}")

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def index(self, node: str) -> int:
        return self.ids.index(node)

    @property
    def target(self) -> Node | None:
        """The node the graph explains (the metric or the logit), if it has one."""
        return next((n for n in self.nodes if n.is_target), None)

    def weight(self, source: str, target: str) -> float:
        return float(self.adjacency[self.index(target), self.index(source)])

    def feature_table(self) -> Tensor:
        """[F, 3] int64 (layer, pos, feature) of the feature nodes, in node order."""
        rows = [(n.layer, n.position, n.feature) for n in self.nodes if n.kind == "feature"]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    def incoming_sums(self) -> Tensor:
        """[N] the sum of each node's incoming edge weights (float64)."""
        return self.adjacency.double().sum(1)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Graph) and self.prompt == other.prompt and self.tokens == other.tokens
                and self.n_layers == other.n_layers and self.nodes == other.nodes
                and torch.equal(self.adjacency, other.adjacency))

    # ------------------------------------------------------------------ links

    def links(self, max_links: int | None = None) -> list[dict[str, Any]]:
        """Nonzero edges {source, target, weight}, largest |weight| first (at most max_links)."""
        flat = self.adjacency.flatten()
        nz = torch.nonzero(flat, as_tuple=True)[0]
        nz = nz[torch.argsort(flat[nz].abs(), descending=True, stable=True)]
        if max_links is not None:
            nz = nz[:max_links]
        ids, n = self.ids, len(self.nodes)
        return [{"source": ids[j % n], "target": ids[j // n], "weight": float(flat[j])} for j in nz.tolist()]

    @staticmethod
    def _adjacency(ids: list[str], links: list[dict[str, Any]]) -> Tensor:
        where = {node: i for i, node in enumerate(ids)}
        adjacency = torch.zeros(len(ids), len(ids))
        for link in links:
            s, t = where.get(link["source"]), where.get(link["target"])
            if s is None or t is None:
                missing = link["source"] if s is None else link["target"]
                raise InvalidParameterError(f"a link names node {missing!r}, which is not among the nodes")
            adjacency[t, s] = float(link["weight"])
        return adjacency

    # ------------------------------------------------------------------ stored JSON (the dashboard's)

    def to_json(self, max_links: int | None = None) -> dict[str, Any]:
        """The stored format: {prompt, tokens, n_layers, target, nodes: [...], links: [...], n_links}."""
        links = self.links(max_links)
        target = self.target
        return {"prompt": self.prompt, "tokens": list(self.tokens), "n_layers": self.n_layers,
                "target": None if target is None else {"node_id": target.node_id, "kind": target.kind,
                                                       "label": target.label, "value": target.value},
                "answer_token": target.feature if target is not None else None,
                "nodes": [{"node_id": n.node_id, **asdict(n)} for n in self.nodes],
                "links": links, "n_links": int(torch.count_nonzero(self.adjacency)), **self.info}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Graph:
        """A stored graph back (older stored graphs, without `n_layers` or values, too)."""
        names = {f.name for f in fields(Node)}
        nodes = [Node(**{k: v for k, v in n.items() if k in names}) for n in data["nodes"]]
        if "n_layers" in data:
            n_layers = int(data["n_layers"])
        else:  # graphs stored before n_layers was: the logit sat at layer n_layers + 1
            n_layers = next((n.layer - 1 for n in nodes if n.kind in TARGET_KINDS), 0)
            nodes = [replace(n, is_target=True) if n.kind == "logit" else n for n in nodes]
        stored_ids = [n["node_id"] for n in data["nodes"]]
        graph = cls(int(data.get("prompt", 0)), list(data["tokens"]), n_layers, nodes,
                    torch.zeros(len(nodes), len(nodes)))
        if stored_ids != graph.ids:
            raise InvalidParameterError("stored graph node ids do not match their fields")
        graph.adjacency = cls._adjacency(graph.ids, data["links"])
        return graph

    def subgraph(self, keep: list[str]) -> Graph:
        """The graph induced by the nodes `keep` (ids; unknown ones raise InvalidParameterError)
        plus the target, in this graph's node order, with the edges among them unchanged."""
        ids = self.ids
        where = {node: i for i, node in enumerate(ids)}
        missing = [k for k in keep if k not in where]
        if missing:
            raise InvalidParameterError(f"the graph has no node {missing[0]!r}"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        chosen = set(keep) | ({self.target.node_id} if self.target is not None else set())
        index = torch.tensor([i for i, node in enumerate(ids) if node in chosen], dtype=torch.long)
        return Graph(self.prompt, list(self.tokens), self.n_layers, [self.nodes[i] for i in index.tolist()],
                     self.adjacency[index][:, index].clone(), dict(self.info))

    # ------------------------------------------------------------------ Neuronpedia / circuit-tracer JSON

    def to_neuronpedia(self, *, slug: str, scan: str, prompt: str = "", max_links: int | None = None,
                       pinned: list[str] | None = None) -> dict[str, Any]:
        """circuit-tracer / Neuronpedia graph JSON (`create_graph_files`' schema); `pinned` node ids
        go into qParams.pinnedIds (Neuronpedia's subgraph)."""
        return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": list(self.tokens),
                             "prompt": prompt, "node_threshold": None, "schema_version": 1,
                             "piescope": {"prompt": self.prompt, "n_layers": self.n_layers}},
                "qParams": {"pinnedIds": list(pinned or []), "supernodes": [], "linkType": "both", "clickedId": "",
                            "sg_pos": ""},
                "nodes": [_neuronpedia_node(n) for n in self.nodes],
                "links": self.links(max_links)}

    @classmethod
    def from_neuronpedia(cls, data: Any) -> Graph:
        """A circuit-tracer / Neuronpedia graph JSON as a Graph. Malformed -> InvalidParameterError."""
        try:
            doc = NeuronpediaGraph.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise InvalidParameterError(f"not a circuit-tracer graph JSON: {where}: {first['msg']}") from None
        tokens = doc.metadata.prompt_tokens
        extra = doc.metadata.piescope or {}
        nodes = [_node_from_neuronpedia(n, i, tokens) for i, n in enumerate(doc.nodes)]
        if "n_layers" in extra:
            n_layers = int(extra["n_layers"])
        else:
            n_layers = next((n.layer - 1 for n in nodes if n.kind in TARGET_KINDS),
                            max((n.layer + 1 for n in nodes if n.kind in ("feature", "error")), default=0))
        graph = cls(int(extra.get("prompt", 0)), list(tokens), n_layers, nodes, torch.zeros(len(nodes), len(nodes)))
        for n, raw in zip(nodes, doc.nodes):
            if n.node_id != raw.node_id:
                raise InvalidParameterError(f"node {raw.node_id!r}: its id does not match its fields "
                                            f"({n.kind} at layer {n.layer}, position {n.position}: {n.node_id!r})")
        graph.adjacency = cls._adjacency(graph.ids, [link.model_dump() for link in doc.links])
        return graph


# ---------------------------------------------------------------------- Neuronpedia nodes

def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _neuronpedia_node(n: Node) -> dict[str, Any]:
    base = {"node_id": n.node_id, "feature": n.feature, "layer": str(n.layer), "ctx_idx": max(n.position, 0),
            "feature_type": FEATURE_TYPES[n.kind], "token_prob": n.token_prob or 0.0,
            "is_target_logit": n.is_target, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": n.node_id,
            "clerp": n.label, "influence": None, "activation": n.activation}
    if n.kind == "feature":
        base.update(feature=_cantor(n.layer, n.feature), jsNodeId=f"{n.layer}_{n.feature}-0")
    elif n.kind == "error":
        base.update(jsNodeId=f"{n.layer}_-1-{n.position}")
    elif n.kind == "token":
        base.update(feature=n.position, layer="E", jsNodeId=f"E_{n.feature}-{n.position}")
    elif n.kind == "logit":
        base.update(jsNodeId=f"L_{n.feature}-{n.position}",
                    clerp=f'Output "{n.token}" (p={n.token_prob or 0.0:.3f})')
    elif n.kind == "metric":
        base.update(jsNodeId=f"L_M{n.feature}_{n.distractor}-{n.position}")
    else:  # pruned, bias: no position; drawn beside the embeddings by viewers that know them
        base.update(layer="E", jsNodeId=n.node_id)
    base["piescope"] = {"kind": n.kind, "layer": n.layer, "position": n.position, "feature": n.feature,
                        "value": n.value, "score": n.score, "token": n.token, "label": n.label,
                        "distractor": n.distractor, "token_prob": n.token_prob}
    return base


_OUTPUT = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)


def _node_from_neuronpedia(raw: NeuronpediaNode, i: int, tokens: list[str]) -> Node:
    if raw.ctx_idx >= len(tokens):
        raise InvalidParameterError(f"node {raw.node_id!r}: ctx_idx {raw.ctx_idx} is past the "
                                    f"{len(tokens)} prompt tokens")
    extra = raw.piescope
    if extra is not None:  # written by PIEscope: every field is there
        try:
            return Node(kind=extra.kind, layer=extra.layer, position=extra.position, feature=extra.feature,
                        activation=raw.activation, value=extra.value, score=extra.score, token=extra.token,
                        label=extra.label, token_prob=extra.token_prob, distractor=extra.distractor,
                        is_target=raw.is_target_logit)
        except (TypeError, ValueError) as err:
            raise InvalidParameterError(f"node {raw.node_id!r}: {err}") from None
    kind = KIND_OF_TYPE.get(raw.feature_type)
    if kind is None or kind in ("pruned", "bias"):
        raise InvalidParameterError(f"node {raw.node_id!r}: unknown feature_type {raw.feature_type!r}; known: "
                                    + ", ".join(sorted(t for t, k in KIND_OF_TYPE.items() if k not in ("pruned", "bias"))))
    parts = raw.node_id.split("_")
    try:
        if kind == "token":
            if len(parts) != 3 or parts[0] != "E":
                raise ValueError("an embedding id is E_{token}_{pos}")
            layer, feature = -1, int(parts[1])
        else:
            if len(parts) != 3:
                raise ValueError("a feature, error or logit id is {layer}_{index}_{pos}")
            layer, feature = int(raw.layer), int(parts[1])
            if int(parts[0]) != layer:
                raise ValueError(f"its layer field says {raw.layer}")
        if int(parts[2]) != raw.ctx_idx:
            raise ValueError(f"its ctx_idx field says {raw.ctx_idx}")
    except ValueError as err:
        raise InvalidParameterError(f"node {raw.node_id!r}: {err}") from None
    if kind == "error" and feature != -1:
        raise InvalidParameterError(f"node {raw.node_id!r}: an error node's id is {{layer}}_-1_{{pos}}")
    token, label = tokens[raw.ctx_idx], raw.clerp
    if kind == "logit":
        match = _OUTPUT.match(raw.clerp)
        token = match.group(1) if match else raw.clerp
        label = f"logit({json.dumps(token)})"
    return Node(kind=kind, layer=layer, position=raw.ctx_idx, feature=feature, activation=raw.activation,
                score=raw.influence, token=token, label=label, token_prob=raw.token_prob,
                is_target=raw.is_target_logit)


# ---------------------------------------------------------------------- the published schema, validated

def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _PiescopeNode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(" + "|".join(KINDS) + ")$")
    layer: int = Field(ge=-1, le=10_000)
    position: int = Field(ge=-1, le=1_000_000)
    feature: int = Field(ge=-1, le=2**40)
    value: float | None = None
    score: float | None = None
    token: str = Field("", max_length=1000)
    label: str = Field("", max_length=1000)
    distractor: int = Field(-1, ge=-1, le=2**40)
    token_prob: float | None = None

    _finite_floats = field_validator("value", "score", "token_prob")(_finite)


class NeuronpediaNode(BaseModel):
    model_config = ConfigDict(extra="allow")
    node_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    feature: int
    layer: str | int
    ctx_idx: int = Field(ge=0)
    feature_type: str = Field(max_length=100)
    token_prob: float | None = 0.0
    is_target_logit: bool = False
    clerp: str = Field("", max_length=10_000)
    influence: float | None = None
    activation: float | None = None
    piescope: _PiescopeNode | None = None

    _finite_floats = field_validator("token_prob", "influence", "activation")(_finite)


class NeuronpediaLink(BaseModel):
    model_config = ConfigDict(extra="allow")
    source: str = Field(max_length=MAX_ID_CHARS)
    target: str = Field(max_length=MAX_ID_CHARS)
    weight: float

    _finite_weight = field_validator("weight")(_finite)


class NeuronpediaMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: list[str] = Field(min_length=1, max_length=100_000)
    prompt: str = ""
    slug: str = ""
    scan: str | None = ""
    piescope: dict[str, int] | None = None


class NeuronpediaGraph(BaseModel):
    """The published graph-file schema: metadata, qParams, nodes, links (extra fields allowed)."""

    model_config = ConfigDict(extra="allow")
    metadata: NeuronpediaMetadata
    qParams: dict[str, Any] = Field(default_factory=dict)
    nodes: list[NeuronpediaNode] = Field(min_length=1, max_length=MAX_IMPORT_NODES)
    links: list[NeuronpediaLink] = Field(max_length=MAX_IMPORT_LINKS)
