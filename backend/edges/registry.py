"""The one registry of edge methods (name -> strategy): the CLI, the API and the sweep read it.

Every method takes the shared EdgeContext and a target edge count and returns an EdgeRun: the
kept edges (dangling edges removed), per-edge scores where the method has them, the cost, and
method-specific details. Targets come as an edge count or a sparsity of the full graph.

EAP / EAP-IG scores are computed once per context, keyed by a `ScoreKey`; a method names the keys
it reads (`score_keys`), so an edge sweep can compute them once before its points run (anywhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from backend.edges.acdc import acdc, acdc_for_count
from backend.edges.context import Cost, EdgeContext, Timer
from backend.edges.edge_pruning import PruningOptions, edge_pruning
from backend.edges.hap import hap
from backend.edges.scores import eap_ig_scores, eap_scores
from backend.errors import InvalidParameterError, NotFoundError


@dataclass
class EdgeRun:
    """One method's circuit: kept [E] bool (dangling removed), scores [E] (or None), cost, details."""

    method: str
    kept: Tensor
    scores: Tensor | None
    cost: Cost
    n_target: int
    details: dict[str, Any] = field(default_factory=dict)


class ScoreKey(NamedTuple):
    """Which attribution scores: EAP or EAP-IG, and EAP-IG's integration steps."""

    kind: str   # "eap" | "eap-ig"
    steps: int = 5

    @property
    def label(self) -> str:
        return "EAP scores" if self.kind == "eap" else f"EAP-IG scores ({self.steps} steps)"


def target_count(n_edges: int, edges: int | None = None, sparsity: float | None = None) -> int:
    """The number of edges to keep from an edge count or a sparsity (exactly one given)."""
    if (edges is None) == (sparsity is None):
        raise InvalidParameterError("give exactly one of an edge count or a sparsity")
    if edges is not None:
        if isinstance(edges, bool) or not isinstance(edges, int) or not 1 <= edges <= n_edges:
            raise InvalidParameterError(f"edge count must be an integer in [1, {n_edges}], got {edges!r}")
        return edges
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise InvalidParameterError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, round((1.0 - sparsity) * n_edges))


class EdgeMethod(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``given``; unknown names or wrongly typed values are errors."""
        given = dict(given or {})
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise InvalidParameterError(f"method '{self.name}' has no option(s) {', '.join(sorted(unknown))}; "
                                        f"its options: {', '.join(self.defaults) or 'none'}")
        for key, value in given.items():
            default = self.defaults[key]
            ok = (value is None or default is None or isinstance(value, type(default))
                  or (isinstance(default, float) and isinstance(value, int)))
            if not ok or isinstance(value, bool) != isinstance(default, bool):
                raise InvalidParameterError(f"method '{self.name}': option {key} must be like {default!r}, got {value!r}")
        return {**self.defaults, **given}

    def run(self, ctx: EdgeContext, n_keep: int, options: dict[str, Any] | None = None) -> EdgeRun:
        opts = self.options(options)
        ctx.cost = Cost()
        with Timer(ctx.cost):
            kept, scores, details = self.select(ctx, n_keep, opts)
            kept = ctx.graph.without_dangling(kept)
        return EdgeRun(self.name, kept, scores, ctx.cost, n_keep, {"options": opts, **details})

    def score_keys(self, opts: dict[str, Any]) -> tuple[ScoreKey, ...]:
        """The attribution scores `select` reads from the context's cache with these options."""
        return ()

    @abstractmethod
    def select(self, ctx: EdgeContext, n_keep: int, opts: dict[str, Any]) -> tuple[Tensor, Tensor | None, dict]:
        """(kept [E] bool before dangling removal, scores [E] or None, details)."""


def top_n(scores: Tensor, n: int) -> Tensor:
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[torch.topk(scores.abs(), n).indices] = True
    return kept


def compute_scores(ctx: EdgeContext, key: ScoreKey) -> Tensor:
    """EAP or EAP-IG scores [E] on the context's prompts (their cost counted in ctx.cost)."""
    kind, steps = key
    return eap_scores(ctx) if kind == "eap" else eap_ig_scores(ctx, steps)


def cached_scores(ctx: EdgeContext, key: ScoreKey) -> Tensor:
    """EAP / EAP-IG scores, computed once per context (their cost is charged on first use)."""
    if key not in ctx.cache:
        ctx.cache[key] = compute_scores(ctx, key)
    return ctx.cache[key]


class EAP(EdgeMethod):
    name = "eap"
    description = "Edge attribution patching: the top edges by |(x~_u - x_u) . dM/d in_v|"

    def score_keys(self, opts):
        return (ScoreKey("eap"),)

    def select(self, ctx, n_keep, opts):
        s = cached_scores(ctx, *self.score_keys(opts))
        return top_n(s, n_keep), s, {}


class EAPIG(EdgeMethod):
    name = "eap-ig"
    description = "EAP with integrated gradients over the inputs (m steps from corrupted to clean)"
    defaults = {"steps": 5}

    def score_keys(self, opts):
        if opts["steps"] < 1:
            raise InvalidParameterError("eap-ig: steps must be >= 1")
        return (ScoreKey("eap-ig", opts["steps"]),)

    def select(self, ctx, n_keep, opts):
        s = cached_scores(ctx, *self.score_keys(opts))
        return top_n(s, n_keep), s, {}


class ACDC(EdgeMethod):
    name = "acdc"
    description = "Greedy reverse-topological edge removal while KL rises by less than tau"
    defaults = {"tau": None, "n_tau": 6, "tau_lo": 1e-5, "tau_hi": 1.0, "max_batch": 16, "pool": None}

    def score_keys(self, opts):
        return (ScoreKey("eap"),) if opts["pool"] is not None else ()

    def select(self, ctx, n_keep, opts):
        pool = None
        if opts["pool"] is not None:
            if not isinstance(opts["pool"], int) or not n_keep <= opts["pool"] <= ctx.graph.n_edges:
                raise InvalidParameterError(f"acdc: pool must be an integer in [{n_keep}, {ctx.graph.n_edges}]")
            pool = top_n(cached_scores(ctx, *self.score_keys(opts)), opts["pool"])
        if opts["tau"] is not None:
            if not opts["tau"] >= 0:
                raise InvalidParameterError("acdc: tau must be >= 0")
            res = acdc(ctx, float(opts["tau"]), opts["max_batch"], pool)
            return res.kept, None, {"tau": opts["tau"], "kl": res.kl, "trials": res.trials, "batches": res.batches}
        res, tau, trace = acdc_for_count(ctx, n_keep, opts["n_tau"], opts["tau_lo"], opts["tau_hi"],
                                         opts["max_batch"], pool)
        return res.kept, None, {"tau": tau, "kl": res.kl, "trials": sum(t["trials"] for t in trace), "tau_search": trace}


_PRUNING = {k: v for k, v in PruningOptions().__dict__.items()}


class EdgePruning(EdgeMethod):
    name = "edge-pruning"
    description = "Hard-concrete edge masks under a Lagrangian sparsity constraint (Bhaskar et al.)"
    defaults = dict(_PRUNING)

    def select(self, ctx, n_keep, opts):
        res = edge_pruning(ctx, n_keep, PruningOptions(**opts))
        return res.kept, res.log_alpha, {"steps": res.steps, "stopped": res.stopped, "reached": res.reached,
                                         "prune_seconds": res.seconds, "history": res.history}


class HAP(EdgeMethod):
    name = "hap"
    description = "EAP / EAP-IG picks the top rho of edges, Edge Pruning finds the circuit inside"
    defaults = {"rho": 0.2, "scores": "eap", "ig_steps": 5, **_PRUNING}

    def score_keys(self, opts):
        if opts["scores"] not in ("eap", "eap-ig"):
            raise InvalidParameterError("hap: scores must be 'eap' or 'eap-ig'")
        # EAP has no integration steps: ig_steps must not make a second, identical set of scores.
        return (ScoreKey("eap-ig", opts["ig_steps"]) if opts["scores"] == "eap-ig" else ScoreKey("eap"),)

    def select(self, ctx, n_keep, opts):
        scores = cached_scores(ctx, *self.score_keys(opts))
        pruning = {k: v for k, v in opts.items() if k in _PRUNING}
        res, free = hap(ctx, scores, float(opts["rho"]), n_keep, PruningOptions(**pruning))
        return res.kept, res.log_alpha, {"steps": res.steps, "stopped": res.stopped, "reached": res.reached,
                                         "prune_seconds": res.seconds, "history": res.history, "candidates": int(free.sum())}


EDGE_METHODS: dict[str, EdgeMethod] = {m.name: m for m in (EAP(), EAPIG(), ACDC(), EdgePruning(), HAP())}


def get_edge_method(name: str) -> EdgeMethod:
    try:
        return EDGE_METHODS[name]
    except KeyError:
        raise NotFoundError(f"unknown edge method '{name}'; known: {', '.join(EDGE_METHODS)}") from None


def list_edge_methods() -> list[dict[str, Any]]:
    return [{"name": m.name, "description": m.description, "options": dict(m.defaults)} for m in EDGE_METHODS.values()]
