"""The clean run's keys and values, so that a patched variant runs only from its first patch.

A variant that removes occurrences at positions >= p equals the clean run at every position < p
in every layer: attention is causal and the CLT's activations are fixed from the clean run, so
nothing before p can see the patch. The clean prompts therefore run once with a key/value cache;
a chunk of variants then runs only positions [p_chunk, width), attending to the clean keys and
values of positions < p_chunk gathered per row (row r takes its own prompt's cache).

The cache holds every position of every layer (a plain ``DynamicCache`` without a config, whose
layers keep all keys), and sliding-window layers get their window from the attention mask that
transformers builds from the absolute positions, exactly as in a full forward. Positions are
absolute: the suffix's position ids start at p_chunk (rotary models and GPT-2's learned position
embeddings alike), which transformers derives from the cache's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from backend.circuits.occurrences import Occurrences
from backend.models.adapters import ModelAdapter


@dataclass
class CleanPrefix:
    """Per layer, the clean run's keys and values: keys[l], values[l] [B, Hkv, T, dh]."""

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    @torch.no_grad()
    def of(cls, adapter: ModelAdapter, ids: Tensor, mask: Tensor) -> CleanPrefix:
        """One clean forward of ids [B, T] (right-padded, mask [B, T]) keeping its keys and values."""
        cache = DynamicCache()
        adapter.forward_with([], ids, mask, cache=cache)
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])

    def gather(self, prompts: Tensor, p: int) -> DynamicCache:
        """A cache holding positions [0, p) of each row's prompt (prompts [R] batch rows)."""
        return DynamicCache(ddp_cache_data=[(k[prompts, :, :p], v[prompts, :, :p])
                                            for k, v in zip(self.keys, self.values)])


def first_patched(occ: Occurrences, n_variants: int, variant: Tensor, members: Tensor, last_pos: Tensor) -> Tensor:
    """p_v: the earliest position any member of variant v patches, at most its last position: [V].

    variant, members: [m] memberships; last_pos: [V] each variant's prompt's last real position
    (a variant without members runs just its last token).
    """
    return last_pos.clone().scatter_reduce(0, variant, occ.pos[members].to(last_pos.dtype), reduce="amin")
