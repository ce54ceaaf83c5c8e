"""The edge graph over attention heads and MLPs (DESIGN 8.1): writers, readers, stable edge ids.

Writers (index order): ``embed``; then per layer l its heads ``a{l}.h{h}`` and its MLP ``m{l}``.
Readers (topological order): per layer l the query inputs ``a{l}.q{h}`` of every query head, the
key and value inputs ``a{l}.k{g}`` / ``a{l}.v{g}`` of every *kv* head g (grouped-query attention
shares one k/v projection between query heads: it reads the residual once, so it is one reader),
the MLP input ``m{l}``; and last ``logits`` (the final residual).

An edge runs from every writer to every reader that comes later in the stream: a layer's
attention reads the embedding and every head and MLP of earlier layers; its MLP also reads the
heads of its own layer; the logits read everything. Edge id: ``"{writer}->{reader}"``, e.g.
``a3.h2->a5.k0`` or ``m1->logits``. Edges are ordered by reader, then writer, so the edges of one
reader are contiguous and those of a layer's attention readers form one [R, n_writers] block.

Counts: writers 1 + L(H+1); edges sum over readers of the writers before them. GPT-2 small
(L=12, H=12, G=12): 32,491; Gemma-3-270M (L=18, H=4, G=1): 5,644 (q 3,132, k 783, v 783,
MLP 855, logits 91).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from backend.errors import InvalidParameterError


@dataclass(frozen=True)
class Writer:
    """A node whose output is added to the residual stream. head is None for embed and MLPs."""

    index: int
    kind: str          # "embed" | "head" | "mlp"
    layer: int         # -1 for embed
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "embed":
            return "embed"
        return f"a{self.layer}.h{self.head}" if self.kind == "head" else f"m{self.layer}"


@dataclass(frozen=True)
class Reader:
    """An input that reads the residual stream: q (query head), k / v (kv head), mlp, logits."""

    index: int
    kind: str          # "q" | "k" | "v" | "mlp" | "logits"
    layer: int         # n_layers for logits
    head: int | None = None
    n_writers: int = 0  # it reads writers 0 .. n_writers-1
    edge_offset: int = 0

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return f"a{self.layer}.{self.kind}{self.head}"


@dataclass(frozen=True)
class ReaderBlock:
    """Readers [start, stop) that read the same writers 0 .. n_writers-1; their edges are the
    contiguous slice [edge_start, edge_start + (stop-start) * n_writers), row-major."""

    start: int
    stop: int
    n_writers: int
    edge_start: int

    @property
    def n_readers(self) -> int:
        return self.stop - self.start

    @property
    def edges(self) -> slice:
        return slice(self.edge_start, self.edge_start + self.n_readers * self.n_writers)


@dataclass
class EdgeGraph:
    """The writers, readers and edges of one architecture's shape.

    edge_writer, edge_reader: [E] writer and reader index of each edge.
    attn_blocks[l], mlp_blocks[l]: layer l's attention readers (q heads, k kv heads, v kv heads)
    and its MLP reader; logits_block: the logits reader.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    writers: list[Writer] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    attn_blocks: list[ReaderBlock] = field(default_factory=list)
    mlp_blocks: list[ReaderBlock] = field(default_factory=list)
    logits_block: ReaderBlock | None = None

    @classmethod
    def build(cls, n_layers: int, n_heads: int, n_kv_heads: int) -> EdgeGraph:
        if n_heads % n_kv_heads:
            raise InvalidParameterError(f"{n_heads} query heads cannot share {n_kv_heads} kv heads")
        g = cls(n_layers, n_heads, n_kv_heads)
        g.writers.append(Writer(0, "embed", -1))
        offset = 0

        def add_block(specs: list[tuple[str, int | None]], layer: int) -> ReaderBlock:
            nonlocal offset
            n_w = len(g.writers)
            block = ReaderBlock(len(g.readers), len(g.readers) + len(specs), n_w, offset)
            for kind, head in specs:
                g.readers.append(Reader(len(g.readers), kind, layer, head, n_w, offset))
                offset += n_w
            return block

        for layer in range(n_layers):
            specs = ([("q", h) for h in range(n_heads)] + [("k", k) for k in range(n_kv_heads)]
                     + [("v", k) for k in range(n_kv_heads)])
            g.attn_blocks.append(add_block(specs, layer))
            g.writers += [Writer(len(g.writers) + h, "head", layer, h) for h in range(n_heads)]
            g.mlp_blocks.append(add_block([("mlp", None)], layer))
            g.writers.append(Writer(len(g.writers), "mlp", layer))
        g.logits_block = add_block([("logits", None)], n_layers)
        return g

    @classmethod
    def for_adapter(cls, adapter) -> EdgeGraph:
        return cls.build(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)

    # -- edges ----------------------------------------------------------------------------------
    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @cached_property
    def edge_reader(self) -> Tensor:
        return torch.cat([torch.full((r.n_writers,), r.index, dtype=torch.long) for r in self.readers])

    @cached_property
    def edge_writer(self) -> Tensor:
        return torch.cat([torch.arange(r.n_writers) for r in self.readers])

    @property
    def n_edges(self) -> int:
        return int(self.edge_reader.numel())

    def edge_id(self, e: int) -> str:
        return f"{self.writers[int(self.edge_writer[e])].name}->{self.readers[int(self.edge_reader[e])].name}"

    def edge_ids(self) -> list[str]:
        return [self.edge_id(e) for e in range(self.n_edges)]

    def edge_index(self, edge_id: str) -> int:
        """The index of ``"writer->reader"`` (the inverse of edge_id)."""
        try:
            w_name, r_name = edge_id.split("->")
            w = next(x.index for x in self.writers if x.name == w_name)
            r = self.readers[next(x.index for x in self.readers if x.name == r_name)]
        except (ValueError, StopIteration):
            raise InvalidParameterError(f"no edge {edge_id!r} in this graph") from None
        if w >= r.n_writers:
            raise InvalidParameterError(f"no edge {edge_id!r}: {w_name} does not come before {r_name}")
        return r.edge_offset + w

    def counts(self) -> dict[str, int]:
        """Edges by reader kind, writers, readers and the total."""
        by_kind = torch.bincount(torch.tensor([["q", "k", "v", "mlp", "logits"].index(r.kind)
                                               for r in self.readers]).repeat_interleave(
            torch.tensor([r.n_writers for r in self.readers])), minlength=5).tolist()
        return {"edges": self.n_edges, "writers": self.n_writers, "readers": self.n_readers,
                "q": by_kind[0], "k": by_kind[1], "v": by_kind[2], "mlp": by_kind[3], "logits": by_kind[4]}

    # -- components (for dangling edges) -------------------------------------------------------
    @cached_property
    def reader_feeds(self) -> list[list[int]]:
        """For each reader, the writers its node produces: a q reader feeds its head, a k/v
        reader every head sharing that kv head, an MLP reader its MLP; logits feed nothing."""
        per_kv = self.n_heads // self.n_kv_heads
        out: list[list[int]] = []
        for r in self.readers:
            if r.kind == "logits":
                out.append([])
                continue
            first_head = 1 + r.layer * (self.n_heads + 1)
            if r.kind == "mlp":
                out.append([first_head + self.n_heads])
            elif r.kind == "q":
                out.append([first_head + r.head])
            else:
                out.append([first_head + r.head * per_kv + j for j in range(per_kv)])
        return out

    def without_dangling(self, kept: Tensor) -> Tensor:
        """kept [E] bool minus dangling edges: an edge stays only if its writer is reachable from
        the embedding through kept edges and its reader's node reaches the logits.

        Dropping them never changes the patched run on architectures without Gemma's shared
        post-attention norm: an unreachable writer computes from corrupted inputs only, so its
        state is its corrupted state, and a node that reaches no logits changes nothing.
        """
        kept = kept.to(torch.bool).cpu()
        W = self.n_writers
        # Reachability forward: readers in topological order; a writer is reached when any
        # reader of its node has a kept edge from a reached writer.
        reached = torch.zeros(W, dtype=torch.bool)
        reached[0] = True
        for r in self.readers:
            if r.kind == "logits":
                continue
            sl = slice(r.edge_offset, r.edge_offset + r.n_writers)
            if bool((kept[sl] & reached[: r.n_writers]).any()):
                reached[self.reader_feeds[r.index]] = True
        # Usefulness backward: a writer is useful when it has a kept edge into a reader whose
        # node is useful (the logits always are).
        useful = torch.zeros(W, dtype=torch.bool)
        reader_useful = torch.zeros(self.n_readers, dtype=torch.bool)
        for r in reversed(self.readers):
            feeds = self.reader_feeds[r.index]
            is_useful = r.kind == "logits" or bool(useful[feeds].any())
            reader_useful[r.index] = is_useful
            if is_useful:
                sl = slice(r.edge_offset, r.edge_offset + r.n_writers)
                useful[: r.n_writers] |= kept[sl]
        return kept & reached[self.edge_writer] & reader_useful[self.edge_reader]
