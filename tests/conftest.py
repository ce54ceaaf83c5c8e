"""Shared fixtures: tiny random models and adapters of every architecture."""

from __future__ import annotations

import pytest
import torch

from backend.models.adapters import ModelAdapter
from tests.tiny_models import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def adapter(arch: str) -> ModelAdapter:
    return ModelAdapter(tiny_model(arch), name=f"tiny-{arch}")


@pytest.fixture
def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [3, 7] and mask: rows of length 7, 5 and 6."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="session")
def demo_adapter() -> ModelAdapter:
    """The real demo model, loaded once per session (converted on first use, ~80 s)."""
    from backend.models.loading import load_model
    from backend.models.registry import DEMO_MODEL
    from backend.settings import Settings
    return load_model(DEMO_MODEL, Settings())
