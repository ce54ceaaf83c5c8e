"""What the Jobs form sends: budgets parsed from text, and the job bodies (pure functions)."""

from __future__ import annotations

from typing import Any

INTERP_KINDS = ("explain", "score")


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


def interp_request(kind: str, circuit_id: int | None, explainer: str, rater: str,
                   corpus: str = "default") -> dict[str, Any]:
    """The body of an explain or score job on a stored circuit; ValueError without a circuit id."""
    if not circuit_id or int(circuit_id) < 1:
        raise ValueError("explain and score work on a stored circuit: give its id (see the Circuits page)")
    params: dict[str, Any] = {"circuit_id": int(circuit_id), "explainer": explainer, "corpus": corpus}
    if kind == "score":
        params["rater"] = rater
    return {"kind": kind, "params": params}
