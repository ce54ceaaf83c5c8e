"""Small typed results of pruning and sweeps; JSON is made from them here and only here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FeatureOccurrence:
    """One kept occurrence: feature ``feature`` of source layer ``layer`` at token ``position``."""

    layer: int
    feature: int
    position: int
    score: float          # the method's score (FAP: S(f,p); others: their ranking value)
    activation: float     # a_f(p; x) on the clean prompt
    delta: float          # a_f(p; x) - a_f(p; x~)


@dataclass
class PromptCircuit:
    """The circuit of one prompt and how well it keeps the behaviour."""

    index: int
    clean: str
    corrupted: str
    tokens: list[str]
    n_active: int
    kept: list[FeatureOccurrence]
    kl_last: float
    kl_all: float | None
    pred_changed: bool
    faithfulness: float
    completeness: float | None


@dataclass
class AggregatedFeature:
    """A feature kept on at least one prompt, ranked by how many prompts kept it."""

    layer: int
    feature: int
    n_prompts: int
    mean_abs_score: float


@dataclass
class Stat:
    """Mean, standard deviation and bootstrap 95% CI of a per-prompt quantity."""

    mean: float
    std: float
    ci95: tuple[float, float]


@dataclass
class Circuit:
    """A pruned circuit: per-prompt kept occurrences, the aggregated features, and metrics."""

    model: str
    transcoder: str
    task: str
    method: str
    k: int
    budget: str
    corruption: str
    options: dict[str, Any]
    prompts: list[PromptCircuit]
    features: list[AggregatedFeature]
    kl: Stat
    pred_change_rate: float
    faithfulness_mean: float | None  # None when M_clean = M_none on every prompt (undefined ratios)
    completeness_mean: float | None
    seconds: float
    cost: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        data = dict(data)
        # The store writes an undefined (NaN) faithfulness as null: it reads back as NaN.
        data["prompts"] = [PromptCircuit(**{**p, "kept": [FeatureOccurrence(**o) for o in p["kept"]],
                                            "faithfulness": _nan_if_none(p["faithfulness"])})
                           for p in data["prompts"]]
        data["features"] = [AggregatedFeature(**f) for f in data["features"]]
        data["kl"] = Stat(data["kl"]["mean"], data["kl"]["std"], tuple(data["kl"]["ci95"]))
        return cls(**data)


@dataclass
class SweepRow:
    """One (method, K) point of a sweep (the JSON schema of issue 4)."""

    method: str
    k: int
    kl_mean: float
    kl_std: float
    kl_ci95: tuple[float, float]
    pred_change_rate: float
    faithfulness_mean: float | None
    n_prompts: int
    seconds: float
    patched_forwards: int = 0
    kl_all_mean: float | None = None
    completeness_mean: float | None = None
    # A mean of per-prompt ratios is dominated by prompts whose M_clean - M_none is small.
    faithfulness_median: float | None = None
    # How the method filled K when that is more than "top K by one score" (Strategy.selection_notes).
    selection: dict[str, Any] | None = None


@dataclass
class SweepResult:
    """KL-vs-K for several methods on the same prompts, with the headline numbers.

    per_prompt_kl[method][str(k)]: last-token KL per prompt (for paired tests and comparisons).
    random_curve: SweepRows of random selection on a K grid up to all active occurrences.
    effective_compression[method][str(k)]: K_random needed to match the method's KL at K, / K.
    effective_budget: one row per (method A != base, K), `stats.effective_budget_tests`: A's
      kl_mean; k_equivalent K' where the base method's mean KL curve reaches it (k_equivalent_bound:
      "interpolated", "at_most" when the base's smallest K already does, "beyond_grid" when none
      does); the base method *run* at k_base = round(K') and at k_claimed = round(1.5 K) on the
      same prompts, base_kl_at_k_base / base_kl_at_k_claimed its mean KL there; a paired TOST of
      A's per-prompt KL against each (margin; p_lower, p_upper, p_value, equivalent, mean_diff;
      claimed_* for the 1.5 K test).
    budget_runs: SweepRows of the base method at those budgets when off the grid ks;
    budget_runs_kl[str(k)]: their per-prompt KL.
    """

    model: str
    transcoder: str
    task: str
    n_prompts: int
    corruption: str
    methods: list[str]
    ks: list[int]
    rows: list[SweepRow]
    random_curve: list[SweepRow]
    effective_compression: dict[str, dict[str, float | None]]
    effective_budget: list[dict[str, Any]]
    per_prompt_kl: dict[str, dict[str, list[float]]]
    n_active_mean: float
    kl_none_mean: float
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    budget_runs: list[SweepRow] = field(default_factory=list)
    budget_runs_kl: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepResult:
        data = dict(data)
        for key in ("rows", "random_curve", "budget_runs"):
            data[key] = [SweepRow(**{**r, "kl_ci95": tuple(r["kl_ci95"])}) for r in data.get(key, [])]
        return cls(**data)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value
