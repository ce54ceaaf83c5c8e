"""The one registry of selection methods: CLI choices, API validation and the dashboard read it."""

from __future__ import annotations

from typing import Any

from backend.circuits.selection.acdc import ACDC
from backend.circuits.selection.base import BUDGETS, SelectionContext, Strategy, top_k
from backend.circuits.selection.ranked import FAP, ActivationMagnitude, FActP, FAPSignal, Random
from backend.circuits.selection.synergy import FAPSynergy
from backend.errors import NotFoundError

METHODS: dict[str, Strategy] = {s.name: s for s in (
    FAP(), FAPSynergy(), FAPSignal(), ActivationMagnitude(), Random(), FActP(), ACDC())}


def get_method(name: str) -> Strategy:
    try:
        return METHODS[name]
    except KeyError:
        raise NotFoundError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}") from None


def list_methods() -> list[dict[str, Any]]:
    return [{"name": s.name, "description": s.description, "options": dict(s.defaults),
             "budgets": list(s.budgets)} for s in METHODS.values()]


__all__ = ["METHODS", "BUDGETS", "SelectionContext", "Strategy", "get_method", "list_methods", "top_k"]
