"""The attribution graph of a task over its active features (DESIGN 8.3 step 1).

Per prompt, the top-N occurrences by |FAP| are pooled and their attribution graph is computed
(DESIGN 6, `backend.circuits.graph_attribution.prompt_graph`: direct effects in the linearised model between
features, from input tokens to features, and from features to the metric). The prompt graphs
are then aggregated across prompts by feature: a node is (layer, feature) whatever its
position; an input token is (position, token id); an edge weight is the sum over positions
within a prompt, averaged over all prompts. The metric ("logit") is kept apart as the target:
`target[i]` is node i's mean direct effect on M, and `fap[i]` its mean total FAP score.

Input tokens stay in the graph: in a one-layer model features never feed other features (a
feature writes to the MLP output of its own layer and later ones only), so it is through the
tokens they read that such features connect at all. Tokens are never ablated and never part
of a circuit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backend.circuits.attribution import Attributor, PromptRuns
from backend.circuits.graph_attribution import prompt_graph
from backend.circuits.results import FeatureOccurrence
from backend.errors import InvalidParameterError

FEATURE, TOKEN = "feature", "token"


@dataclass
class FeatureGraph:
    """An aggregated attribution graph: n nodes (features first, then input tokens).

    ids: "{layer}_{feature}" for features, "E_{token}_{pos}" for tokens; kinds: feature | token;
    layer: source layer (-1 for tokens); feature: feature index (token id for tokens);
    position: -1 for features (aggregated over positions), the token's position otherwise.
    adjacency: [n, n] mean direct effect of source (row) on target (column).
    target: [n] mean direct effect on the metric; fap: [n] mean FAP score summed over positions
    (0 for tokens); abs_fap: [n] mean over prompts of the sum of |S|; act_mean / act_max: [n]
    over the node's pooled occurrences; n_prompts: [n] prompts on which it was pooled;
    prompt_fap: [P, n] each prompt's sum of S over the node's occurrences (0 for tokens), from
    which a cluster's first-order effect prompt by prompt, |sum_{i in C} S_pi|, follows (None
    in graphs stored before it was kept).
    """

    ids: list[str]
    kinds: list[str]
    layer: np.ndarray
    feature: np.ndarray
    position: np.ndarray
    adjacency: np.ndarray
    target: np.ndarray
    fap: np.ndarray
    abs_fap: np.ndarray
    act_mean: np.ndarray
    act_max: np.ndarray
    n_prompts: np.ndarray
    n_prompt_total: int
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_fap: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_feature(self) -> np.ndarray:
        return np.array([k == FEATURE for k in self.kinds])

    @property
    def feature_nodes(self) -> np.ndarray:
        """Indices of the feature nodes."""
        return np.nonzero(self.is_feature)[0]

    def symmetric_weights(self) -> np.ndarray:
        """|A| + |A|^T with a zero diagonal: what spectral clustering partitions ([n, n])."""
        w = np.abs(self.adjacency)
        w = w + w.T
        np.fill_diagonal(w, 0.0)
        return w

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "kinds": self.kinds, "layer": self.layer.tolist(), "feature": self.feature.tolist(),
                "position": self.position.tolist(), "adjacency": self.adjacency.tolist(),
                "target": self.target.tolist(), "fap": self.fap.tolist(), "abs_fap": self.abs_fap.tolist(),
                "act_mean": self.act_mean.tolist(), "act_max": self.act_max.tolist(),
                "n_prompts": self.n_prompts.tolist(), "n_prompt_total": self.n_prompt_total, "meta": self.meta,
                "prompt_fap": None if self.prompt_fap is None else self.prompt_fap.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureGraph:
        arr = lambda k, dt=float: np.asarray(data[k], dtype=dt)  # noqa: E731
        return cls(ids=list(data["ids"]), kinds=list(data["kinds"]), layer=arr("layer", int),
                   feature=arr("feature", int), position=arr("position", int),
                   adjacency=arr("adjacency").reshape(len(data["ids"]), len(data["ids"])),
                   target=arr("target"), fap=arr("fap"), abs_fap=arr("abs_fap"), act_mean=arr("act_mean"),
                   act_max=arr("act_max"), n_prompts=arr("n_prompts", int),
                   n_prompt_total=int(data["n_prompt_total"]), meta=dict(data.get("meta", {})),
                   prompt_fap=None if data.get("prompt_fap") is None
                   else np.asarray(data["prompt_fap"], dtype=float).reshape(-1, len(data["ids"])))


def pooled_occurrences(runs: PromptRuns, pool: int) -> list[list[FeatureOccurrence]]:
    """Per prompt of the batch, its top-`pool` occurrences by |FAP| (largest first)."""
    if pool <= 0:
        raise InvalidParameterError(f"the pool size must be positive, not {pool}")
    occ, score = runs.occ, runs.fap.abs()
    # Sort by (prompt, -|S|) in one pass, then cut each prompt's run at `pool`.
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(occ.prompt[order], stable=True)]
    counts = occ.counts()
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[occ.prompt[order]]
    chosen = order[rank < pool]
    cols = [getattr(occ, c)[chosen].tolist() for c in ("prompt", "layer", "feature", "pos", "act", "delta")]
    fap = runs.fap[chosen].tolist()
    out: list[list[FeatureOccurrence]] = [[] for _ in range(len(runs))]
    for b, layer, feat, pos, act, delta, s in zip(*cols, fap):
        out[b].append(FeatureOccurrence(layer, feat, pos, s, act, delta))
    return out


def feature_fap(runs_list: list[PromptRuns]) -> dict[tuple[int, int], tuple[float, float]]:
    """(layer, feature) -> (sum of S, sum of |S|) over every active occurrence of every prompt."""
    totals: dict[tuple[int, int], list[float]] = {}
    for runs in runs_list:
        occ = runs.occ
        F = int(occ.feature.max()) + 1 if len(occ) else 1
        code = occ.layer * F + occ.feature
        uniq, inv = torch.unique(code, return_inverse=True)
        s = torch.zeros(len(uniq), dtype=runs.fap.dtype).index_add_(0, inv, runs.fap)
        a = torch.zeros(len(uniq), dtype=runs.fap.dtype).index_add_(0, inv, runs.fap.abs())
        for c, si, ai in zip(uniq.tolist(), s.tolist(), a.tolist()):
            key = (c // F, c % F)
            acc = totals.setdefault(key, [0.0, 0.0])
            acc[0] += si
            acc[1] += ai
    return {k: (v[0], v[1]) for k, v in totals.items()}


def prompt_feature_fap(runs_list: list[PromptRuns], layer: np.ndarray,
                       feature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([P, n], [P, n]): each prompt's sum of S and sum of |S| over every active occurrence of
    node (layer[i], feature[i]); columns of nodes that are not features (layer < 0) or never
    active stay 0. One scatter per batch of prompts, no loop over occurrences."""
    F = int(max([int(feature[layer >= 0].max(initial=0))] + [int(r.occ.feature.max()) for r in runs_list if len(r.occ)])) + 1
    node_code = torch.as_tensor(np.where(layer >= 0, layer * F + feature, -1), dtype=torch.long)
    order = torch.argsort(node_code)
    sorted_code = node_code[order]
    signed, absolute = [], []
    for runs in runs_list:
        occ = runs.occ
        out = torch.zeros(2, len(runs), len(node_code), dtype=torch.float64)
        if len(occ):
            code = occ.layer.cpu() * F + occ.feature.cpu()
            at = torch.searchsorted(sorted_code, code).clamp(max=len(sorted_code) - 1)
            hit = sorted_code[at] == code
            s = runs.fap.detach().cpu().double()[hit]
            prompt, column = occ.prompt.cpu()[hit], order[at[hit]]
            out[0].index_put_((prompt, column), s, accumulate=True)
            out[1].index_put_((prompt, column), s.abs(), accumulate=True)
        signed.append(out[0])
        absolute.append(out[1])
    if not signed:
        return np.zeros((0, len(node_code))), np.zeros((0, len(node_code)))
    return torch.cat(signed).numpy(), torch.cat(absolute).numpy()


def build_feature_graph(attr: Attributor, runs_list: list[PromptRuns], pool: int = 50,
                        chunk: int = 32, progress=None) -> FeatureGraph:
    """The aggregated attribution graph of the prepared prompt batches (see module docstring).

    runs_list: `Attributor.prepare` of each batch of prompts. One `prompt_graph` per prompt:
    ceil((pooled + 1) / chunk) forward + backward passes each.
    """
    node_of: dict[str, int] = {}
    info: list[dict[str, Any]] = []
    edges: dict[tuple[int, int], float] = {}
    target: dict[int, float] = {}
    acts: dict[int, list[float]] = {}
    prompts_of: dict[int, int] = {}
    n_total = sum(len(r) for r in runs_list)
    done = 0

    def node(kind: str, layer: int, feature: int, pos: int) -> int:
        key = f"{layer}_{feature}" if kind == FEATURE else f"E_{feature}_{pos}"
        if key not in node_of:
            node_of[key] = len(info)
            info.append({"id": key, "kind": kind, "layer": layer, "feature": feature, "position": pos})
        return node_of[key]

    for runs in runs_list:
        pooled = pooled_occurrences(runs, pool)
        for b, kept in enumerate(pooled):
            if progress:
                progress(done / max(n_total, 1), f"attribution graph of prompt {done + 1} of {n_total}")
            done += 1
            graph = prompt_graph(attr.adapter, attr.tc, runs.batch, b, kept, chunk=chunk)
            # Features and tokens become nodes; error, pruned and bias sources are left out (they
            # are not features to cluster or ablate), and the metric target is kept apart.
            local: dict[int, int] = {}
            for j, n in enumerate(graph.nodes):
                if n.kind == FEATURE:
                    i = node(FEATURE, n.layer, n.feature, -1)
                    acts.setdefault(i, []).append(float(n.activation))
                elif n.kind == TOKEN:
                    i = node(TOKEN, -1, n.feature, n.position)
                else:
                    continue
                if i not in local.values():
                    prompts_of[i] = prompts_of.get(i, 0) + 1
                local[j] = i
            t_index = graph.index(graph.target.node_id)
            adjacency = graph.adjacency                       # [t, s]: the edge s -> t
            for t, s_ in torch.nonzero(adjacency).tolist():
                if s_ not in local:
                    continue
                w = float(adjacency[t, s_])
                if t == t_index:
                    target[local[s_]] = target.get(local[s_], 0.0) + w
                elif t in local and local[t] != local[s_]:
                    edges[(local[s_], local[t])] = edges.get((local[s_], local[t]), 0.0) + w

    # Features first, then tokens (a stable order that does not depend on the prompts' order).
    order = sorted(range(len(info)), key=lambda i: (info[i]["kind"] != FEATURE, info[i]["layer"],
                                                    info[i]["feature"], info[i]["position"]))
    new = {old: k for k, old in enumerate(order)}
    n = len(order)
    adj = np.zeros((n, n))
    for (s, t), w in edges.items():
        adj[new[s], new[t]] = w / n_total
    col = lambda f: np.array([f(info[i], i) for i in order])  # noqa: E731
    layers, features = col(lambda r, i: r["layer"]).astype(int), col(lambda r, i: r["feature"]).astype(int)
    signed, absolute = prompt_feature_fap(runs_list, layers, features)
    return FeatureGraph(
        ids=[info[i]["id"] for i in order], kinds=[info[i]["kind"] for i in order],
        layer=layers, feature=features,
        position=col(lambda r, i: r["position"]).astype(int), adjacency=adj,
        target=col(lambda r, i: target.get(i, 0.0) / n_total),
        fap=signed.sum(0) / max(n_total, 1), abs_fap=absolute.sum(0) / max(n_total, 1),
        act_mean=col(lambda r, i: float(np.mean(acts[i])) if i in acts else 0.0),
        act_max=col(lambda r, i: float(np.max(acts[i])) if i in acts else 0.0),
        n_prompts=col(lambda r, i: prompts_of.get(i, 0)).astype(int), n_prompt_total=n_total,
        meta={"pool": pool}, prompt_fap=signed)
