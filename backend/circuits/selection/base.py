"""What every selection method shares: its context, options, and per-prompt top-K budgets."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from backend.circuits.attribution import Attributor, PromptRuns
from backend.circuits.evaluation import Evaluator
from backend.errors import InvalidParameterError

Budget = Literal["global", "per_layer"]
BUDGETS: tuple[str, ...] = ("global", "per_layer")


@dataclass
class SelectionContext:
    """One batch's shared runs plus a cache that lives across methods and budgets.

    cache["single"]: [n] exact single-removal effects, NaN where not yet computed (FActP and
    FAP-Synergy share it, so no single effect is ever computed twice).
    """

    runs: PromptRuns
    attributor: Attributor
    evaluator: Evaluator
    budget: Budget = "global"
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def occ(self):
        return self.runs.occ

    def generator(self, prompt: int, *salt: object) -> torch.Generator:
        """A generator seeded by (seed, global prompt index, salt): independent of batching."""
        key = repr((self.seed, self.runs.offset + prompt, salt)).encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def single_effects(self, ids: Tensor, keep_prefixes: bool = False) -> Tensor:
        """Exact effect({o}) for occurrence ids, computing only the ones not cached: [m].
        keep_prefixes: keep the computed removals' keys and values for pairs (FAP-Synergy)."""
        cache = self.cache.get("single")
        if cache is None:
            cache = self.cache["single"] = torch.full((len(self.occ),), float("nan"), device=self.occ.delta.device)
        missing = torch.unique(ids[torch.isnan(cache[ids])])
        if len(missing):
            cache[missing] = self.attributor.single_effects(self.runs, missing, keep_prefixes)
        return cache[ids]


def segment_rank(values: Tensor, segment: Tensor) -> Tensor:
    """Rank of each element within its segment by descending value (0 = best), ties stable: [n]."""
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    seg_sorted = segment[order]
    n_seg = int(segment.max()) + 1 if len(segment) else 0
    starts = torch.cumsum(torch.bincount(seg_sorted, minlength=n_seg), 0) - torch.bincount(seg_sorted, minlength=n_seg)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=values.device) - starts[seg_sorted]
    return rank


def fill_to_k(kept: Tensor, values: Tensor, prompt: Tensor, k: int, n_prompts: int) -> Tensor:
    """Add the best not-yet-kept occurrences (by value) until each prompt keeps min(k, n_p)."""
    free = torch.clamp(k - torch.bincount(prompt[kept], minlength=n_prompts), min=0)
    masked = values.masked_fill(kept, float("-inf"))
    rank = segment_rank(masked, prompt)
    return kept | ((rank < free[prompt]) & ~kept)


def top_k(values: Tensor, ctx: SelectionContext, k: int) -> Tensor:
    """Keep the top-k occurrences per prompt by ``values`` ([n] -> [n] bool).

    global: the k best across layers. per_layer: k split evenly over the layers (earlier layers
    take the remainder); slots a layer cannot fill go to the best remaining occurrences, so a
    prompt always keeps exactly min(k, its occurrences).
    """
    occ = ctx.occ
    if ctx.budget == "global":
        return segment_rank(values, occ.prompt) < k
    L = ctx.attributor.tc.n_layers
    quota = torch.full((L,), k // L, device=values.device) + (torch.arange(L, device=values.device) < k % L)
    kept = segment_rank(values, occ.prompt * L + occ.layer) < quota[occ.layer]
    return fill_to_k(kept, values, occ.prompt, k, occ.n_prompts)


class Strategy(ABC):
    """A named selection method: given the shared context and a budget K, the kept mask."""

    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    budgets: ClassVar[tuple[str, ...]] = BUDGETS

    def options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``given``; unknown names are an error."""
        given = dict(given or {})
        unknown = set(given) - set(self.defaults)
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise InvalidParameterError(f"method '{self.name}' has no option(s) {', '.join(sorted(unknown))}; "
                                        f"its options: {known}")
        return {**self.defaults, **given}

    @abstractmethod
    def select(self, ctx: SelectionContext, k: int, options: dict[str, Any]) -> Tensor:
        """[n] bool: the occurrences kept, exactly min(k, n_p) per prompt."""

    def selection_notes(self, k: int, options: dict[str, Any]) -> dict[str, Any]:
        """How the budget K is filled, where that is more than "the top K by one score" (stored
        with the results: a circuit's options["selection"], a sweep row's ``selection``)."""
        return {}


class RankedStrategy(Strategy):
    """A method that is a per-occurrence ranking score plus the shared top-K budget."""

    @abstractmethod
    def ranking(self, ctx: SelectionContext, options: dict[str, Any]) -> Tensor:
        """[n] values, higher = keep first."""

    def select(self, ctx: SelectionContext, k: int, options: dict[str, Any]) -> Tensor:
        return top_k(self.ranking(ctx, options), ctx, k)
