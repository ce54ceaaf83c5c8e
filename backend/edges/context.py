"""What every edge method shares: the model, its edge graph, the prompts, corrupted states, cost.

The prompts are cut into parts of ``batch_size``; each part's corrupted writer states and clean
last-position logits are computed once and reused by every method (same prompts, same
corruption). ``Cost`` counts forward and backward passes in prompt rows, and wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backend.edges.graph import EdgeGraph
from backend.edges.patching import EdgePatch, writer_states
from backend.models.adapters import ModelAdapter
from backend.tasks import PromptBatch, metric

Progress = Callable[[float, str], None]


@dataclass
class Cost:
    """Forward / backward passes counted in prompt rows (a batched call of c variants over n
    prompts counts c * n), and seconds of wall time."""

    forward_rows: int = 0
    backward_rows: int = 0
    seconds: float = 0.0
    steps: int = 0

    def as_dict(self, n_prompts: int) -> dict:
        return {"forwards": self.forward_rows / max(n_prompts, 1), "backwards": self.backward_rows / max(n_prompts, 1),
                "forward_rows": self.forward_rows, "backward_rows": self.backward_rows,
                "seconds": round(self.seconds, 3), "steps": self.steps}


@dataclass
class Part:
    """One batch of prompts with its cached runs: corrupted writer states [W, B, T, d], clean and
    corrupted last-position logits [B, V] and metrics [B]."""

    batch: PromptBatch
    corrupted: Tensor
    clean_logits: Tensor
    corrupted_logits: Tensor
    m_clean: Tensor
    m_corrupted: Tensor


@dataclass
class EdgeContext:
    """The shared inputs of edge methods on one task batch."""

    adapter: ModelAdapter
    graph: EdgeGraph
    batch: PromptBatch
    batch_size: int = 16
    seed: int = 0
    progress: Progress | None = None
    cost: Cost = field(default_factory=Cost)
    cache: dict = field(default_factory=dict)
    _parts: list[Part] | None = None

    @classmethod
    def create(cls, adapter: ModelAdapter, batch: PromptBatch, **kw) -> EdgeContext:
        return cls(adapter, EdgeGraph.for_adapter(adapter), batch, **kw)

    @property
    def n_prompts(self) -> int:
        return len(self.batch)

    @property
    def parts(self) -> list[Part]:
        if self._parts is None:
            self._parts = []
            with torch.no_grad():
                for start in range(0, len(self.batch), self.batch_size):
                    b = self.batch.subset(slice(start, start + self.batch_size)).to(self.adapter.device)
                    rec = EdgePatch(self.graph)
                    hidden = self.adapter.run(b.corrupted_ids, b.attention_mask, last_pos=b.last_pos,
                                              interventions=[rec])
                    clean = self.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos).logits
                    self._parts.append(Part(b, rec.states, clean, hidden.logits,
                                            metric(clean, b), metric(hidden.logits, b)))
        return self._parts

    def count(self, forward_rows: int = 0, backward_rows: int = 0) -> None:
        self.cost.forward_rows += forward_rows
        self.cost.backward_rows += backward_rows

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)


class Timer:
    """Adds the wall time of a block to a Cost."""

    def __init__(self, cost: Cost) -> None:
        self.cost = cost

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cost.seconds += time.perf_counter() - self.t0


__all__ = ["Cost", "EdgeContext", "Part", "Timer", "writer_states"]
