"""What the interpretation flow reads and writes, and the storage it needs (a Protocol).

The flow in `backend.interp.pipeline` works against `FeatureStore`; `backend.store.interp.
InterpStore` implements it over the database, so the science code never imports the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.interp.explainers import ExplainResult
from backend.interp.harvest import FeatureHarvest, FeatureKey


@dataclass
class CircuitInfo:
    """What the flow needs of a stored circuit."""

    id: int
    model: str
    transcoder: str
    features: list[FeatureKey]            # aggregated features, most prompts first
    dataset: dict[str, Any] | None         # DatasetParams fields, None without a stored dataset
    cost: dict[str, Any]
    prompts: list[str] = field(default_factory=list)   # the clean prompt texts
    prompt_features: list[list[FeatureKey]] = field(default_factory=list)  # per prompt, the features it kept

    def features_of(self, prompt: int | None = None, top_n: int | None = None) -> list[FeatureKey]:
        """The features to interpret: those kept on `prompt` (what its graph shows) or all of
        them, most prompts first; the first `top_n` when given."""
        if prompt is None:
            keys = self.features
        else:
            on_prompt = set(self.prompt_features[prompt])
            keys = [k for k in self.features if k in on_prompt]
        return keys if top_n is None else keys[:top_n]


@dataclass
class FeatureState:
    """A stored feature: its row id, statistics, examples and explanations."""

    id: int
    layer: int
    feature: int
    statistics: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    explanations: list[dict[str, Any]] = field(default_factory=list)


class FeatureStore(Protocol):
    """The reads and writes the explain and score flows make (each its own short transaction)."""

    def features(self, transcoder: str, keys: Sequence[FeatureKey]) -> dict[FeatureKey, FeatureState]: ...

    def save_harvest(self, transcoder: str, results: Sequence[FeatureHarvest]) -> None: ...

    def save_explanations(self, feature_ids: dict[FeatureKey, int], results: Sequence[ExplainResult]) -> list[int]: ...

    def human_ratings(self, explanation_id: int) -> dict[int, int]: ...

    def save_scores(self, explanation_id: int, scores: dict[str, float], rater: str) -> None: ...
