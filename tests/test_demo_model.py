"""Slow integration tests on the real Gemma-3-270M demo model (converted once into models_cache)."""

from __future__ import annotations

import pytest

from backend.circuits.behaviour import behaviour
from backend.models.registry import DEMO_MODEL
from backend.tasks import get_task

pytestmark = pytest.mark.slow


def test_demo_model_does_ioi(demo_adapter):
    batch = get_task("ioi").build(demo_adapter.tokenizer, 20, seed=0)
    assert len(batch) == 20
    result = behaviour(demo_adapter, batch)
    assert result.clean.mean() > 2.0, result.clean
    assert result.corrupted.mean() < 0.5, result.corrupted


def test_demo_model_hook_points(demo_adapter):
    assert demo_adapter.family == "gemma3"
    assert (demo_adapter.n_layers, demo_adapter.d_model) == (18, 640)
    assert demo_adapter.name == DEMO_MODEL
