"""Computing a circuit's attribution graph in the linearised replacement model (DESIGN 6).

The linearised model: attention patterns, normalisation scales and (Gemma-2) the final logit
softcap's ratio softcap(z)/z are frozen at their clean values, and every MLP output is replaced
by a constant leaf (the CLT's writes plus the error). What remains is linear, so every target
(a kept feature's encoder pre-activation, or the metric or logit) is *exactly* the sum over the
linear model's inputs of gradient . value (Euler's theorem for a linear map). Those inputs are:

- the residual stream entering layer 0 at each position (``token`` nodes: the token embedding,
  plus GPT-2's positional embedding and Gemma's embedding scale);
- each layer's MLP output, split into the kept features' writes a * W_dec (``feature`` nodes),
  the writes of every other active occurrence (one ``pruned`` node), the CLT decoder bias b_dec
  and the error mlp_out - reconstruction (``error`` nodes, one per (layer, position));
- the constants (one ``bias`` node): b_dec, attention-projection and LayerNorm biases (found as
  the `bias` parameter of every module the gradient passes through), the unembedding bias, and
  for a feature target its encoder bias b_enc.
MLP-internal biases (GPT-2's c_fc, c_proj) need no node: the replacement leaves cut them off.

Edge s -> t = gradient of t at s's input . s's value, one backward per target; targets are
batched as copies of the prompt, so a chunk of targets costs one forward and one backward.
The metric target is w . logits with w = dM/dlogits at the clean logits: for logit-difference
metrics that is M itself; for others (prob_diff, logsumexp) it is M's first-order term, and the
node's label says so.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from backend.circuits.graph import TARGET_KINDS, TARGETS, Graph, Node
from backend.circuits.results import Circuit, FeatureOccurrence
from backend.errors import InvalidParameterError
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder
from backend.tasks import PromptBatch, metric

LINEAR_METRICS = ("logit_diff", "logit_diff_max")
MAX_LINKS = 20_000   # per prompt in the stored JSON (largest |weight| first)


@dataclass
class _Probes:
    """What one gradient pass exposes: the layer-0 input leaf and every biased module's output."""

    embed: Tensor | None = None
    biased: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (output, bias)

    def constants(self, c: int) -> Tensor:
        """[c] sum over biased modules and positions of d target / d output . bias, per copy."""
        total = torch.zeros(c, dtype=torch.float64)
        for output, bias in self.biased:
            if output.grad is not None:
                g = output.grad.reshape(c, -1, bias.shape[-1]).double().sum(1)
                total += (g @ bias.detach().double().to(g.device)).cpu()
        return total


def _biased_modules(adapter: ModelAdapter) -> list[nn.Module]:
    head = adapter.model.get_output_embeddings()
    return [m for m in adapter.model.modules()
            if m is not head and isinstance(getattr(m, "bias", None), nn.Parameter)]


@contextlib.contextmanager
def _probes(adapter: ModelAdapter) -> Iterator[_Probes]:
    """Make the layer-0 input a gradient leaf and record the outputs of biased modules.

    The recording hooks are registered when the model body starts, i.e. after the adapter's own
    (linearising) hooks, so they see the outputs that the gradient actually flows through.
    """
    probes = _Probes()
    modules = _biased_modules(adapter)
    late: list[Any] = []

    def embed_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        leaf = x.detach().requires_grad_(True)
        probes.embed = leaf
        return ((leaf, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": leaf})

    def record(module, args, output):
        if isinstance(output, Tensor) and output.requires_grad:
            output.retain_grad()
            probes.biased.append((output, module.bias))

    def start(module, args):
        late.extend(m.register_forward_hook(record) for m in modules)

    def stop(module, args, output):
        while late:
            late.pop().remove()

    handles = [adapter.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True),
               adapter.body.register_forward_pre_hook(start), adapter.body.register_forward_hook(stop)]
    try:
        yield probes
    finally:
        for h in handles + late:
            h.remove()


def _token_text(adapter: ModelAdapter, token_id: int) -> str:
    return adapter.tokenizer.decode([token_id]) if adapter.tokenizer else str(token_id)


def _target(adapter: ModelAdapter, one: PromptBatch, h_last: Tensor, target: str, T: int,
            L: int) -> tuple[Node, Tensor, float]:
    """(target node, u [d], unembedding-bias term) with target value = u . h_last + term.

    h_last: the final-normed hidden state at the last position [d]. With W_U the unembedding
    and r = softcap(z)/z frozen at the clean logits z (r = 1 without a softcap), the target is
    w . (r * (W_U h + b_U)); w = dM/dlogits (metric) or the answer's one-hot (logit).
    """
    head = adapter.model.get_output_embeddings()
    with torch.no_grad():
        z = head(h_last).float()                                                           # [V]
        capped = torch.tanh(z / adapter.softcap) * adapter.softcap if adapter.softcap else z
        ratio = torch.where(z != 0, capped / torch.where(z != 0, z, torch.ones_like(z)), torch.ones_like(z))
    has_answer = one.answer_ids.numel() > 0 and int(one.answer_ids[0, 0]) >= 0
    answer = int(one.answer_ids[0, 0]) if has_answer else int(capped.argmax())
    prob = float(torch.softmax(capped, -1)[answer])
    quote = lambda i: json.dumps(_token_text(adapter, i))  # noqa: E731
    if target == "logit":
        w = torch.zeros_like(capped)
        w[answer] = 1.0
        node = Node("logit", L + 1, T - 1, answer, token=_token_text(adapter, answer),
                    label=f"logit({quote(answer)})", token_prob=prob, is_target=True)
    else:
        leaf = capped.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            metric(leaf[None], one).sum().backward()
        w = leaf.grad
        kind = one.metric_kind
        distractor = int(w.argmin()) if kind in LINEAR_METRICS else -1
        if kind in LINEAR_METRICS:
            label = f"logit({quote(answer)}) - logit({quote(distractor)})"
        else:
            label = f"dM/dlogits . logits: the first-order term of M ({kind}) at the clean logits"
        node = Node("metric", L + 1, T - 1, answer, token=_token_text(adapter, answer), label=label,
                    token_prob=prob, distractor=distractor, is_target=True)
    scaled = (w * ratio).to(head.weight.dtype)
    u = scaled @ head.weight                                                                # [d]
    term = float(scaled.double() @ head.bias.double()) if getattr(head, "bias", None) is not None else 0.0
    value = float((w.double() * capped.double()).sum())
    return replace(node, value=value), u, term


def prompt_graph(adapter: ModelAdapter, tc: Transcoder, batch: PromptBatch, index: int,
                 kept: list[FeatureOccurrence], *, target: str = "metric", chunk: int = 32) -> Graph:
    """The complete attribution graph of prompt ``index`` of ``batch``, kept occurrences as features.

    target: "metric" (the task's M, e.g. logit(IO) - logit(S)) or "logit" (the answer's logit).
    """
    if target not in TARGETS:
        raise InvalidParameterError(f"graph target must be one of {', '.join(TARGETS)}, got {target!r}")
    from backend.circuits.attribution import batch_rows
    one = batch_rows(batch, torch.tensor([index])).to(adapter.device)
    T = int(one.last_pos[0]) + 1
    ids, mask = one.clean_ids[:, :T], one.attention_mask[:, :T]
    L = adapter.n_layers
    kept = list({(o.layer, o.feature, o.position): o for o in kept}.values())
    n_feat = len(kept)
    f_layer = torch.tensor([o.layer for o in kept], dtype=torch.long)
    f_pos = torch.tensor([o.position for o in kept], dtype=torch.long)
    f_idx = torch.tensor([o.feature for o in kept], dtype=torch.long)

    with torch.no_grad():
        clean = adapter.run(ids, mask, capture=True, logits_at="none")
        resid = clean.resid_mid[:, 0].float()                                               # [L, T, d]
        pre = torch.stack([tc.pre_activations(l, resid[l].to(tc.dtype)) for l in range(L)]).float()  # [L, T, F]
        acts = torch.stack([tc.activate(l, pre[l].to(tc.dtype)) for l in range(L)]).float()
        recon = tc.decode(acts.to(tc.dtype)).float()                                        # [L, T, d]
        kept_acts = torch.zeros_like(acts)
        kept_acts[f_layer, f_pos, f_idx] = acts[f_layer, f_pos, f_idx]
        b_dec = tc.b_dec.detach().float()                                                   # [L, d]
        pruned = tc.decode((acts - kept_acts).to(tc.dtype)).float() - b_dec[:, None]       # [L, T, d]
        errors = clean.mlp_out[:, 0].float() - recon                                        # [L, T, d]
        n_pruned = int(torch.count_nonzero(acts)) - int(torch.count_nonzero(kept_acts))
    target_node, u, head_term = _target(adapter, one, clean.hidden[0, T - 1], target, T, L)
    token_ids = ids[0].tolist()
    tokens = (adapter.tokenizer.convert_ids_to_tokens(token_ids) if adapter.tokenizer
              else [str(i) for i in token_ids])

    f_act = acts[f_layer, f_pos, f_idx]
    nodes = [Node("feature", o.layer, o.position, o.feature, activation=float(a), value=float(v), score=o.score,
                  token=tokens[o.position], is_target=False)
             for o, a, v in zip(kept, f_act.tolist(), pre[f_layer, f_pos, f_idx].tolist())]
    nodes += [Node("error", l, p, -1, token=tokens[p]) for l in range(L) for p in range(T)]
    nodes += [Node("token", -1, p, token_ids[p], token=tokens[p]) for p in range(T)]
    nodes += [Node("pruned", -1, -1, -1, label=f"the writes of the {n_pruned} active occurrences not kept"),
              Node("bias", -1, -1, -1, label="constants: CLT b_dec and b_enc, attention, norm and unembedding biases"),
              target_node]
    N = len(nodes)
    e0, t0, col_pruned, col_bias = n_feat, n_feat + L * T, n_feat + L * T + T, n_feat + L * T + T + 1
    rows = list(range(n_feat)) + [N - 1]

    # Decoder rows of the kept features, by source layer: [s, n_targets(l), d].
    by_layer = {l: torch.nonzero(f_layer == l, as_tuple=True)[0] for l in torch.unique(f_layer).tolist()}
    dec = {l: tc.decoder_rows(l, f_idx[sel]).float() for l, sel in by_layer.items()}
    b_enc = tc.b_enc.detach().float()
    u = u.detach()
    adjacency = torch.zeros(N, N, dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        c = len(part)
        is_feat = torch.tensor([r < n_feat for r in part])
        fi = torch.tensor([r if r < n_feat else 0 for r in part], dtype=torch.long)
        with _probes(adapter) as probes, torch.enable_grad():
            out = adapter.run(ids.repeat(c, 1), mask.repeat(c, 1), capture=True, linearise=True,
                              grad="replacement", logits_at="none")
            copies = torch.arange(c, device=out.hidden.device)
            if n_feat:
                x = out.resid_mid[f_layer[fi], copies, f_pos[fi]]                            # [c, d]
                w_enc = tc.W_enc[f_layer[fi], f_idx[fi]].to(x.dtype)                         # [c, d]
                feat_obj = (x * w_enc).sum(-1)
            else:
                feat_obj = torch.zeros(c, device=out.hidden.device)
            metric_obj = out.hidden[:, T - 1] @ u.to(out.hidden.dtype)                       # [c]
            torch.where(is_feat.to(feat_obj.device), feat_obj, metric_obj).sum().backward()
        with torch.no_grad():
            g = out.mlp_out_grads().float()                                                  # [L, c, T, d]
            block = torch.zeros(c, N, dtype=torch.float64)
            for l, sel in by_layer.items():
                n_t = dec[l].shape[1]
                gs = g[l:l + n_t][:, :, f_pos[sel]]                                          # [n_t, c, s, d]
                block[:, sel] = (f_act[sel] * torch.einsum("tcsd,std->cs", gs, dec[l])).double().cpu()
            block[:, e0:t0] = torch.einsum("lctd,ltd->clt", g, errors).reshape(c, L * T).double().cpu()
            embed = probes.embed.detach()[0].float()                                         # [T, d]
            block[:, t0:col_pruned] = torch.einsum("ctd,td->ct", probes.embed.grad.float(), embed).double().cpu()
            block[:, col_pruned] = torch.einsum("lctd,ltd->c", g, pruned).double().cpu()
            constant = probes.constants(c) + torch.einsum("lctd,ld->c", g, b_dec).double().cpu()
            enc_bias = b_enc[f_layer[fi], f_idx[fi]].double().cpu() if n_feat else torch.zeros(c, dtype=torch.float64)
            constant += torch.where(is_feat, enc_bias, torch.full((c,), head_term, dtype=torch.float64))
            block[:, col_bias] = constant
        adjacency[torch.tensor(part)] = block
    return Graph(index, tokens, L, nodes, adjacency.float())


def build_graph(adapter: ModelAdapter, transcoder: Transcoder, batch: PromptBatch, circuit: Circuit,
                prompts: list[int] | None = None, progress=None, *, target: str = "metric",
                max_links: int = MAX_LINKS, **kwargs: Any) -> dict[str, Any]:
    """Per-prompt graphs of a stored circuit (all its prompts unless ``prompts`` is given), as stored JSON.

    ``batch`` must be the circuit's prompt pairs (same task, n and seed) so that prompt i of the
    circuit is row i of the batch. ``progress(fraction, message)`` is called once per prompt.
    """
    by_index = {p.index: p for p in circuit.prompts}
    chosen = prompts if prompts is not None else sorted(by_index)
    graphs = []
    for n, i in enumerate(chosen):
        if progress:
            progress(n / len(chosen), f"graph of prompt {i}")
        graphs.append(prompt_graph(adapter, transcoder, batch, i, by_index[i].kept, target=target, **kwargs))
    return {"model": circuit.model, "transcoder": circuit.transcoder, "method": circuit.method, "k": circuit.k,
            "target": target, "graphs": [g.to_json(max_links) for g in graphs], "aggregate": aggregate_graphs(graphs)}


def aggregate_graphs(graphs: list[Graph]) -> dict[str, Any]:
    """Features across prompts: nodes are (layer, feature) and the target, edge weights averaged over
    prompts (tokens, errors, pruned and bias are prompt-specific and left out)."""
    counts: dict[str, int] = defaultdict(int)
    info: dict[str, dict[str, Any]] = {}
    links: dict[tuple[str, str], float] = defaultdict(float)
    for g in graphs:
        keys = []
        for n in g.nodes:
            if n.kind == "feature":
                key = f"{n.layer}_{n.feature}"
            elif n.kind in TARGET_KINDS and n.is_target:
                key = "target"
            else:
                keys.append(None)
                continue
            keys.append(key)
            if key not in info:
                info[key] = {"node_id": key, "kind": n.kind, "layer": n.layer, "feature": n.feature,
                             "label": n.label, "token": n.token}
        for key in set(k for k in keys if k is not None):
            counts[key] += 1
        t_idx, s_idx = torch.nonzero(g.adjacency, as_tuple=True)
        for t, s, w in zip(t_idx.tolist(), s_idx.tolist(), g.adjacency[t_idx, s_idx].tolist()):
            if keys[s] is not None and keys[t] is not None and keys[s] != keys[t]:
                links[(keys[s], keys[t])] += w / len(graphs)
    nodes = [{**info[k], "n_prompts": counts[k]} for k in info]
    return {"nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()]}
