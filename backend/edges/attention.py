"""Attention patterns of an edge circuit's heads on its first prompts (what the dashboard shows).

A head belongs to the circuit when a kept edge touches it: it writes (``a{l}.h{h}->...``), its
query reads (``...->a{l}.q{h}``), or its kv head's key or value reads (``...->a{l}.k{g}``,
``a{l}.v{g}``, shared by the query heads h with h // (H / G) == g). Patterns come from one clean
forward of the first ``n_prompts`` prompts (bounded) with the adapter's eager attention recorded:
``pattern[q, k]`` is the softmax probability that query position q puts on key position k, the
rows of real tokens only (right padding cut off). Long prompts keep their last ``max_tokens``
positions (``offset`` says where they start), and prompts are dropped from the end while the
entries stored (heads x sum of T_i^2) would pass ``max_values``: what is stored stays bounded.

JSON (made here only, by ``HeadAttention.to_json``):
  {"n_prompts", "decimals", "prompts": [{"index", "offset", "tokens"}],
   "heads": [{"head": "a1.h0", "layer", "index",
              "patterns": [[[p_qk]]] per prompt,
              "top": [{"prompt", "query", "key", "token", "weight"}] per prompt}]}
``top`` summarises each prompt: where the last (answer-predicting) position attends most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from backend.edges.graph import EdgeGraph
from backend.models.adapters import ModelAdapter
from backend.tasks import PromptBatch

MAX_PROMPTS = 8
MAX_TOKENS = 64
MAX_VALUES = 400_000   # pattern entries stored per circuit (a few MB of JSON): fewer prompts beyond
DECIMALS = 5
_HEAD = re.compile(r"^a(\d+)\.(h|q|k|v)(\d+)$")


def circuit_heads(graph: EdgeGraph, edge_ids: list[str]) -> list[tuple[int, int]]:
    """(layer, head) of every query head a kept edge touches, sorted."""
    per_kv = graph.n_heads // graph.n_kv_heads
    heads: set[tuple[int, int]] = set()
    for edge in edge_ids:
        for end in edge.split("->"):
            m = _HEAD.match(end)
            if m is None:
                continue
            layer, kind, i = int(m.group(1)), m.group(2), int(m.group(3))
            if kind in ("h", "q"):
                heads.add((layer, i))
            else:  # a kv head: every query head that shares it
                heads.update((layer, i * per_kv + j) for j in range(per_kv))
    return sorted(heads)


@dataclass
class HeadAttention:
    """Patterns of some heads on some prompts.

    patterns[(layer, head)]: one [T_i, T_i] tensor per prompt i (its last T_i <= max_tokens real
    positions); tokens[i]: those positions' token strings; offsets[i]: the first kept position.
    top[(layer, head)]: per prompt, where the last position attends most over *all* its positions
    ({"prompt", "query", "key", "token", "weight"}).
    """

    prompt_indices: list[int]
    offsets: list[int]
    tokens: list[list[str]]
    patterns: dict[tuple[int, int], list[Tensor]]
    top: dict[tuple[int, int], list[dict]]
    decimals: int = DECIMALS

    def to_json(self) -> dict:
        def rounded(t: Tensor) -> list[list[float]]:
            return [[round(float(v), self.decimals) for v in row] for row in t.tolist()]
        return {"n_prompts": len(self.prompt_indices), "decimals": self.decimals,
                "prompts": [{"index": i, "offset": o, "tokens": t}
                            for i, o, t in zip(self.prompt_indices, self.offsets, self.tokens)],
                "heads": [{"head": f"a{layer}.h{head}", "layer": layer, "index": head,
                           "patterns": [rounded(p) for p in pats], "top": self.top[(layer, head)]}
                          for (layer, head), pats in sorted(self.patterns.items())]}


def token_strings(adapter: ModelAdapter, ids: list[int]) -> list[str]:
    tok = adapter.tokenizer
    return [tok.decode([i]) if tok is not None else str(i) for i in ids]


def head_attention(adapter: ModelAdapter, batch: PromptBatch, heads: list[tuple[int, int]],
                   n_prompts: int = MAX_PROMPTS, max_tokens: int = MAX_TOKENS,
                   max_values: int = MAX_VALUES) -> HeadAttention:
    """The clean-run attention patterns of `heads` on the first `n_prompts` prompts of `batch`
    (fewer when more would store over `max_values` entries; at least one).

    One forward of those prompts with the patterns recorded ([B, H, Tq, Tk] per layer).
    """
    n = max(0, min(n_prompts, len(batch)))
    sizes = (torch.clamp(batch.last_pos[:n] + 1, max=max_tokens) ** 2 * len(heads)).cumsum(0)
    n = min(n, max(1, int((sizes <= max_values).sum()))) if n else 0
    part = batch.subset(slice(0, n)).to(adapter.device)
    record: dict[int, Tensor] = {}
    if n and heads:
        with torch.no_grad(), adapter.recording_patterns() as record:
            adapter.run(part.clean_ids, part.attention_mask, last_pos=part.last_pos)
    lengths = (part.last_pos + 1).tolist() if n else []
    offsets = [max(0, length - max_tokens) for length in lengths]
    ids = [part.clean_ids[b, :length].tolist() for b, length in enumerate(lengths)]
    patterns: dict[tuple[int, int], list[Tensor]] = {}
    top: dict[tuple[int, int], list[dict]] = {}
    for layer, h in heads:
        patterns[(layer, h)], top[(layer, h)] = [], []
        for b, (start, length) in enumerate(zip(offsets, lengths)):
            pattern = record[layer][b, h, :length, :length].float().cpu()
            patterns[(layer, h)].append(pattern[start:, start:])
            last = pattern[length - 1]
            key = int(torch.argmax(last))
            top[(layer, h)].append({"prompt": b, "query": length - 1, "key": key,
                                    "token": token_strings(adapter, [ids[b][key]])[0], "weight": float(last[key])})
    tokens = [token_strings(adapter, row[start:]) for row, start in zip(ids, offsets)]
    return HeadAttention(list(range(n)), offsets, tokens, patterns, top)
