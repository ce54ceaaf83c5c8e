"""Features, their explanations (edits keep history), scores and annotations."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy.orm import Session

from backend.api.deps import get_session, get_write_session
from backend.api.openapi import errors
from backend.api.schemas import (AnnotationCreate, AnnotationOut, AnnotationUpdate, ExampleOut,
                                 ExplanationCreate, ExplanationOut, ExplanationUpdate, FeatureDetail, FeatureOut,
                                 Offset, Page, RecordId, RevisionOut, ScoreCreate, ScoreOut)
from backend.store import queries
from backend.store.tables import MAX_DB_INT, Feature

router = APIRouter(prefix="/api", tags=["features"])


def _feature_out(row: Feature) -> FeatureOut:
    return FeatureOut(id=row.id, model=row.transcoder.model.name, transcoder=row.transcoder.name,
                      layer=row.layer, index=row.index, statistics=row.statistics)


def _feature_detail(session: Session, row: Feature) -> FeatureDetail:
    return FeatureDetail(**_feature_out(row).model_dump(),
                         examples=[ExampleOut.model_validate(e)
                                   for e in queries.list_examples(session, row.id, limit=200)],
                         explanations=[ExplanationOut.model_validate(e)
                                       for e in queries.list_explanations(session, row.id)])


@router.get("/features", response_model=Page[FeatureOut])
def list_features(transcoder: str | None = Query(None, max_length=200),
                  layer: int | None = Query(None, ge=0, le=MAX_DB_INT),
                  limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                  session: Session = Depends(get_session)) -> Page[FeatureOut]:
    rows, total = queries.list_features(session, transcoder=transcoder, layer=layer, limit=limit, offset=offset)
    return Page[FeatureOut](items=[_feature_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/features/lookup", response_model=FeatureDetail, responses=errors(404))
def lookup_feature(transcoder: str = Query(max_length=200), layer: int = Query(ge=0, le=MAX_DB_INT),
                   index: int = Query(ge=0, le=MAX_DB_INT),
                   session: Session = Depends(get_session)) -> FeatureDetail:
    """The feature (layer, index) of transcoder `<model>/<dir>`."""
    return _feature_detail(session, queries.find_feature(session, transcoder, layer, index))


@router.get("/features/{feature_id}", response_model=FeatureDetail)
def get_feature(feature_id: RecordId, session: Session = Depends(get_session)) -> FeatureDetail:
    return _feature_detail(session, queries.get_feature(session, feature_id))


@router.get("/features/{feature_id}/explanations", response_model=list[ExplanationOut])
def list_explanations(feature_id: RecordId, session: Session = Depends(get_session)) -> list[ExplanationOut]:
    return [ExplanationOut.model_validate(e) for e in queries.list_explanations(session, feature_id)]


@router.post("/features/{feature_id}/explanations", response_model=ExplanationOut,
             status_code=status.HTTP_201_CREATED)
def create_explanation(feature_id: RecordId, body: ExplanationCreate,
                       session: Session = Depends(get_write_session)) -> ExplanationOut:
    row = queries.create_explanation(session, feature_id, body.text, body.source, body.author, body.model)
    session.commit()
    return ExplanationOut.model_validate(row)


@router.get("/explanations/{explanation_id}", response_model=ExplanationOut)
def get_explanation(explanation_id: RecordId, session: Session = Depends(get_session)) -> ExplanationOut:
    return ExplanationOut.model_validate(queries.get_explanation(session, explanation_id))


@router.patch("/explanations/{explanation_id}", response_model=ExplanationOut)
def update_explanation(explanation_id: RecordId, body: ExplanationUpdate,
                       session: Session = Depends(get_write_session)) -> ExplanationOut:
    """Edit; the previous text stays in /revisions."""
    row = queries.update_explanation(session, explanation_id, **body.model_dump(exclude_unset=True))
    session.commit()
    return ExplanationOut.model_validate(row)


@router.get("/explanations/{explanation_id}/revisions", response_model=list[RevisionOut])
def list_revisions(explanation_id: RecordId, session: Session = Depends(get_session)) -> list[RevisionOut]:
    return [RevisionOut.model_validate(r) for r in queries.list_revisions(session, explanation_id)]


@router.get("/explanations/{explanation_id}/scores", response_model=list[ScoreOut])
def list_scores(explanation_id: RecordId, session: Session = Depends(get_session)) -> list[ScoreOut]:
    queries.get_explanation(session, explanation_id)
    return [ScoreOut.model_validate(s) for s in queries.list_scores(session, explanation_id)]


@router.post("/explanations/{explanation_id}/scores", response_model=ScoreOut, status_code=status.HTTP_201_CREATED)
def add_score(explanation_id: RecordId, body: ScoreCreate, session: Session = Depends(get_write_session)) -> ScoreOut:
    row = queries.add_score(session, explanation_id, body.metric, body.value, body.rater)
    session.commit()
    return ScoreOut.model_validate(row)


@router.get("/explanations/{explanation_id}/annotations", response_model=list[AnnotationOut])
def list_explanation_annotations(explanation_id: RecordId,
                                 session: Session = Depends(get_session)) -> list[AnnotationOut]:
    return [AnnotationOut.model_validate(a) for a in queries.list_annotations(session, explanation_id=explanation_id)]


@router.post("/explanations/{explanation_id}/annotations", response_model=AnnotationOut,
             status_code=status.HTTP_201_CREATED)
def annotate_explanation(explanation_id: RecordId, body: AnnotationCreate,
                         session: Session = Depends(get_write_session)) -> AnnotationOut:
    row = queries.create_annotation(session, explanation_id=explanation_id, **body.model_dump())
    session.commit()
    return AnnotationOut.model_validate(row)


@router.get("/features/{feature_id}/annotations", response_model=list[AnnotationOut])
def list_feature_annotations(feature_id: RecordId, session: Session = Depends(get_session)) -> list[AnnotationOut]:
    queries.get_feature(session, feature_id)
    return [AnnotationOut.model_validate(a) for a in queries.list_annotations(session, feature_id=feature_id)]


@router.post("/features/{feature_id}/annotations", response_model=AnnotationOut,
             status_code=status.HTTP_201_CREATED)
def annotate_feature(feature_id: RecordId, body: AnnotationCreate,
                     session: Session = Depends(get_write_session)) -> AnnotationOut:
    row = queries.create_annotation(session, feature_id=feature_id, **body.model_dump())
    session.commit()
    return AnnotationOut.model_validate(row)


@router.patch("/annotations/{annotation_id}", response_model=AnnotationOut)
def update_annotation(annotation_id: RecordId, body: AnnotationUpdate,
                      session: Session = Depends(get_write_session)) -> AnnotationOut:
    row = queries.update_annotation(session, annotation_id, **body.model_dump(exclude_unset=True))
    session.commit()
    return AnnotationOut.model_validate(row)
