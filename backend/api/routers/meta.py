"""Listings the dashboard builds its forms from: models, tasks, methods, transcoders."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from backend.api.deps import get_settings
from backend.api.redact import redact_json
from backend.settings import Settings

router = APIRouter(prefix="/api", tags=["meta"])


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: answers without touching models or the database."""
    return {"status": "ok"}


@router.get("/models")
def models(settings: Settings = Depends(get_settings)) -> list[dict[str, Any]]:
    """Registry models and models placed in models_cache (`model_listing`), without server paths."""
    from backend.models.loading import model_listing
    return redact_json(model_listing(settings), settings)


@router.get("/tasks")
def tasks() -> list[dict[str, str]]:
    from backend.tasks import list_tasks
    return list_tasks()


@router.get("/methods")
def methods() -> list[dict[str, Any]]:
    """The selection-method registry: name, description, options."""
    from backend.jobs import list_methods
    return list_methods()


@router.get("/transcoders")
def transcoders(settings: Settings = Depends(get_settings)) -> list[dict[str, Any]]:
    """Transcoders named `<model>/<dir>` under models_cache, with their summaries (or, for a broken
    directory, its problem), without server paths."""
    from backend.models.transcoder_registry import list_transcoders
    return redact_json(list_transcoders(settings), settings)


@router.get("/interpreters")
def interpreters(settings: Settings = Depends(get_settings)) -> dict[str, list[dict[str, Any]]]:
    """Explainers and raters this worker offers for explain/score jobs: offline always (its
    rater is a proxy), llm only when PIESCOPE_LLM_BASE_URL and PIESCOPE_LLM_MODEL are set."""
    from backend.jobs import interpreters as listing
    return listing(settings)
