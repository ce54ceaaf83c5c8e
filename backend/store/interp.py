"""The interpretation flow's reads and writes of the store, each in its own short transaction.

Explanations, statistics and scores are written as they are produced (one transaction per
chunk), so a failure later in a job never loses what was already stored. Writes go through
`backend.store.queries` where it has a function; the few ORM queries it lacks (scores of one
(explanation, metric, rater), feature rows by key, human example ratings) live here.

Human example ratings: an annotation of an explanation with `rating` 0/1/2 and `label`
"example:<rank>" rates the feature's example of that rank for that explanation (the dashboard
writes them); FADE responsiveness and purity use them with rater "human" when present.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from backend.interp.explainers import ExplainResult
from backend.interp.harvest import FeatureHarvest, FeatureKey
from backend.interp.records import CircuitInfo, FeatureState
from backend.store import queries
from backend.store.db import transaction
from backend.store.tables import Annotation, Example, ExplanationScore, Feature

EXAMPLE_LABEL = "example:"


def example_json(row: Example) -> dict[str, Any]:
    """An example row as the dashboard reads it: tokens, activations, max_activation, quantile, split."""
    return {"rank": row.rank, "tokens": list(row.tokens), "activations": list(row.activations),
            "max_activation": row.max_activation, "quantile": row.quantile, "split": row.split,
            "source": row.source}


def example_rating_label(rank: int) -> str:
    """The annotation label that ties a human rating to the example of `rank`."""
    return f"{EXAMPLE_LABEL}{rank}"


class InterpStore:
    """Reads and writes of the interpretation flow over a sessionmaker."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def circuit(self, circuit_id: int) -> CircuitInfo:
        with self.sessions() as session:
            row = queries.get_circuit(session, circuit_id)
            dataset = None
            if row.dataset_id is not None:
                ds = queries.get_dataset(session, row.dataset_id)
                dataset = {"model": row.model.name, "transcoder": row.transcoder.name, "task": ds.task,
                           "task_options": dict(ds.task_options), "n": ds.n, "seed": ds.seed}
            feats = [(int(f["layer"]), int(f["feature"])) for f in row.features]
            kept = [list(dict.fromkeys((int(o["layer"]), int(o["feature"])) for o in p.get("kept", [])))
                    for p in row.prompts]
            return CircuitInfo(row.id, row.model.name, row.transcoder.name, feats, dataset, dict(row.cost or {}),
                               [p["clean"] for p in row.prompts], kept)

    def feature(self, feature_id: int) -> tuple[str, str, FeatureKey]:
        """(model, transcoder, (layer, index)) of a stored feature; NotFoundError when there is none."""
        with self.sessions() as session:
            row = queries.get_feature(session, feature_id)
            return row.transcoder.model.name, row.transcoder.name, (row.layer, row.index)

    def _feature_rows(self, session: Session, transcoder: str, keys: Iterable[FeatureKey]) -> dict[FeatureKey, Feature]:
        tc = queries.find_transcoder(session, transcoder)
        queries.register_features(session, tc, set(keys))
        session.flush()
        rows = session.scalars(select(Feature).where(Feature.transcoder_id == tc.id))
        wanted = set(keys)
        return {(r.layer, r.index): r for r in rows if (r.layer, r.index) in wanted}

    def features(self, transcoder: str, keys: Sequence[FeatureKey]) -> dict[FeatureKey, FeatureState]:
        """States of `keys` (rows created when missing)."""
        with transaction(self.sessions) as session:
            rows = self._feature_rows(session, transcoder, keys)
            out = {}
            for key, row in rows.items():
                examples = [example_json(e) for e in queries.list_examples(session, row.id, limit=1000)]
                expl = [{"id": e.id, "text": e.text, "source": e.source, "model": e.model}
                        for e in queries.list_explanations(session, row.id)]
                out[key] = FeatureState(row.id, row.layer, row.index, dict(row.statistics or {}), examples, expl)
            return out

    def save_harvest(self, transcoder: str, results: Sequence[FeatureHarvest]) -> None:
        with transaction(self.sessions) as session:
            rows = self._feature_rows(session, transcoder, [(r.layer, r.feature) for r in results])
            for r in results:
                row = rows[(r.layer, r.feature)]
                row.statistics = dict(r.statistics)
                queries.replace_examples(session, row, r.examples)

    def save_explanations(self, feature_ids: dict[FeatureKey, int], results: Sequence[ExplainResult]) -> list[int]:
        """Store the successful results; returns the new explanation ids."""
        ids = []
        with transaction(self.sessions) as session:
            for r in results:
                if r.text is not None:
                    row = queries.create_explanation(session, feature_ids[(r.layer, r.feature)], r.text, r.source,
                                                     author="piescope", model=r.model)
                    ids.append(row.id)
        return ids

    def human_ratings(self, explanation_id: int) -> dict[int, int]:
        """example rank -> the latest human rating of it for this explanation."""
        with self.sessions() as session:
            rows = session.scalars(select(Annotation).where(Annotation.explanation_id == explanation_id,
                                                            Annotation.rating.is_not(None),
                                                            Annotation.label.like(f"{EXAMPLE_LABEL}%"))
                                   .order_by(Annotation.id))
            out: dict[int, int] = {}
            for a in rows:
                rank = a.label[len(EXAMPLE_LABEL):]
                if rank.isdigit():
                    out[int(rank)] = int(a.rating)
            return out

    def save_scores(self, explanation_id: int, scores: dict[str, float], rater: str) -> None:
        """Scores of one explanation by one rater; earlier values of the same metrics are replaced."""
        with transaction(self.sessions) as session:
            session.execute(delete(ExplanationScore).where(ExplanationScore.explanation_id == explanation_id,
                                                           ExplanationScore.rater == rater,
                                                           ExplanationScore.metric.in_(list(scores))))
            for metric, value in scores.items():
                queries.add_score(session, explanation_id, metric, value, rater)


def add_circuit_cost(session: Session, circuit_id: int, cost: dict[str, Any]) -> None:
    """Merge `cost` into the circuit's cost JSON (inside the caller's transaction)."""
    row = queries.get_circuit(session, circuit_id)
    row.cost = {**(row.cost or {}), **cost}  # a new dict, so the JSON change is detected
