"""Keys and values to start patched variants from, so that a variant runs only from its first patch.

A variant that removes occurrences at positions >= p equals the clean run at every position < p
in every layer: attention is causal and the CLT's activations are fixed from the clean run, so
nothing before p can see the patch. The clean prompts therefore run once with a key/value cache;
a chunk of variants then runs only positions [p_chunk, width), attending to the clean keys and
values of positions < p_chunk gathered per row (row r takes its own prompt's cache).

The same holds one level up: a pair {e, l} with pos(e) <= pos(l) equals the single removal of e
at every position < pos(l). So the keys and values of single-removal runs can be kept too, and a
pair then runs only from its *later* position on its earlier member's single-removal cache
(FAP-Synergy's pairs: the suffix after max(pos) instead of min(pos)). Sources 0..B-1 of the
store are the clean prompts; a kept single removal of occurrence o is source ``source_of[o]``.

The cache holds every position of every layer (a plain ``DynamicCache`` without a config, whose
layers keep all keys), and sliding-window layers get their window from the attention mask that
transformers builds from the absolute positions, exactly as in a full forward. Positions are
absolute: the suffix's position ids start at p_chunk (rotary models and GPT-2's learned position
embeddings alike), which transformers derives from the cache's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from backend.circuits.occurrences import Occurrences
from backend.models.adapters import ModelAdapter

MAX_BYTES = 2 << 30  # the kept single removals' keys and values at most (per batch)


class PrefixStore:
    """Blocks of per-layer keys and values [n, Hkv, T, dh] (T the batch's width), addressed by
    source: sources 0..B-1 the clean prompts, later ones single-removal variants."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], n_occ: int, max_bytes: int = MAX_BYTES) -> None:
        B, device = keys[0].shape[0], keys[0].device
        self.max_bytes = max_bytes  # kept single removals beyond this are not stored (pairs then start earlier)
        self.width = keys[0].shape[2]
        self.blocks: list[tuple[list[Tensor], list[Tensor]]] = [(keys, values)]
        self.block_of = torch.zeros(B, dtype=torch.long, device=device)   # [S] each source's block
        self.local = torch.arange(B, device=device)                        # [S] its row in the block
        self.source_of = torch.full((n_occ,), -1, dtype=torch.long, device=device)  # [n] -1: none kept

    @classmethod
    @torch.no_grad()
    def of(cls, adapter: ModelAdapter, ids: Tensor, mask: Tensor, n_occ: int, max_bytes: int = MAX_BYTES) -> PrefixStore:
        """One clean forward of ids [B, T] (right-padded, mask [B, T]) keeping its keys and values."""
        cache = DynamicCache()
        adapter.forward_with([], ids, mask, cache=cache)
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], n_occ, max_bytes)

    def row_bytes(self) -> int:
        """Bytes one source takes (keys and values of every layer)."""
        return sum(2 * k[0].numel() * k.element_size() for k in self.blocks[0][0])

    def n_kept(self) -> int:
        return len(self.block_of) - int((self.block_of == 0).sum())

    def gather(self, sources: Tensor, p: int) -> DynamicCache:
        """A cache holding positions [0, p) of each row's source (sources [R])."""
        blocks = self.block_of[sources]
        present = torch.unique(blocks).tolist()
        data = []
        for layer in range(len(self.blocks[0][0])):
            kv = []
            for which in (0, 1):
                if len(present) == 1:
                    kv.append(self.blocks[present[0]][which][layer][self.local[sources], :, :p])
                    continue
                ref = self.blocks[0][which][layer]
                out = ref.new_empty((len(sources), ref.shape[1], p, ref.shape[3]))
                for b in present:
                    sel = blocks == b
                    out[sel] = self.blocks[b][which][layer][self.local[sources[sel]], :, :p]
                kv.append(out)
            data.append(tuple(kv))
        return DynamicCache(ddp_cache_data=data)

    def add(self, given: list[tuple[DynamicCache, Tensor]]) -> None:
        """Keep the keys and values of single-removal runs: ``given`` lists (cache after a chunk's
        forward [R, Hkv, width, dh] per layer, the occurrence removed in each row [R]); rows
        beyond ``max_bytes`` are not kept."""
        room = self.max_bytes // self.row_bytes() - self.n_kept()
        caches, left = [], room
        for cache, occ in given:
            if left <= 0:
                break
            caches.append((cache, occ[:left]))
            left -= len(occ)
        if not caches:
            return
        n_layers = len(caches[0][0].layers)

        def stack(which: str, layer: int) -> Tensor:  # [R, Hkv, T, dh], padded to the batch's width
            parts = [getattr(c.layers[layer], which)[:len(o)] for c, o in caches]
            return torch.cat([F.pad(t, (0, 0, 0, self.width - t.shape[2])) for t in parts])
        keys = [stack("keys", layer) for layer in range(n_layers)]
        values = [stack("values", layer) for layer in range(n_layers)]
        occ = torch.cat([o for _, o in caches])
        self._append(occ, keys, values)

    def retain(self, occurrences: Tensor) -> None:
        """Drop every kept single removal but those of ``occurrences`` (ids [m]), freeing memory."""
        keep = occurrences[self.source_of[occurrences] >= 0]
        src = self.source_of[keep]
        kv = self.gather(src, self.width) if len(keep) else None
        B = int((self.block_of == 0).sum())
        self.blocks = self.blocks[:1]
        self.block_of, self.local = self.block_of[:B], self.local[:B]
        self.source_of.fill_(-1)
        if kv is not None:
            self._append(keep, [layer.keys for layer in kv.layers], [layer.values for layer in kv.layers])

    def _append(self, occ: Tensor, keys: list[Tensor], values: list[Tensor]) -> None:
        start = len(self.block_of)
        self.blocks.append((keys, values))
        n = len(occ)
        self.block_of = torch.cat([self.block_of, self.block_of.new_full((n,), len(self.blocks) - 1)])
        self.local = torch.cat([self.local, torch.arange(n, device=self.local.device)])
        self.source_of[occ] = torch.arange(start, start + n, device=self.source_of.device)


def first_patched(occ: Occurrences, n_variants: int, variant: Tensor, members: Tensor, last_pos: Tensor) -> Tensor:
    """p_v: the earliest position any member of variant v patches, at most its last position: [V].

    variant, members: [m] memberships; last_pos: [V] each variant's prompt's last real position
    (a variant without members runs just its last token).
    """
    return last_pos.clone().scatter_reduce(0, variant, occ.pos[members].to(last_pos.dtype), reduce="amin")
