"""What the Jobs form sends: budgets parsed from text, and the job bodies (pure functions)."""

from __future__ import annotations

from typing import Any


def parse_budgets(text: str | None) -> list[int]:
    """"50, 100 200" -> [50, 100, 200]; ValueError on anything but positive integers."""
    parts = [p for p in (text or "").replace(",", " ").split() if p]
    try:
        budgets = [int(p) for p in parts]
    except ValueError:
        budgets = []
    if not budgets or any(k < 1 for k in budgets):
        raise ValueError("budgets: give one or more positive integers, e.g. 50,100,200")
    return budgets


def job_requests(kind: str, base: dict[str, Any], methods: list[str], budgets: list[int]) -> list[dict[str, Any]]:
    """The job bodies the form launches: one sweep, or one prune per (method, K)."""
    if kind == "sweep":
        return [{"kind": "sweep", "params": {**base, "methods": list(methods), "ks": list(budgets)}}]
    return [{"kind": "prune", "params": {**base, "method": m, "k": k}} for m in methods for k in budgets]
