"""What the Jobs form sends: budgets, targets and options parsed from text, and the job bodies of
every kind the worker runs (pure functions)."""

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


# ------------------------------------------------------------------------------ edge circuits and HAGD

EDGE_KINDS = ("edges", "edge-sweep")
TRANSCODER_KINDS = ("prune", "sweep", "hagd")


def parse_options(text: str | None) -> dict[str, Any]:
    """'{"rho": 0.2}' -> {"rho": 0.2}; empty -> {}; ValueError unless a JSON object."""
    import json
    if not (text or "").strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError("options: not valid JSON (give an object, e.g. {\"rho\": 0.2})") from None
    if not isinstance(value, dict):
        raise ValueError("options: give a JSON object, e.g. {\"rho\": 0.2}")
    return value


def parse_target(text: str | None) -> dict[str, Any]:
    """"300" -> {"edges": 300}; "0.95" -> {"sparsity": 0.95}; ValueError otherwise."""
    raw = (text or "").strip()
    try:
        if raw.isdigit() and int(raw) >= 1:
            return {"edges": int(raw)}
        value = float(raw)
    except ValueError:
        value = -1.0
    if 0.0 <= value < 1.0 and "." in raw:
        return {"sparsity": value}
    raise ValueError("target: an edge count (a whole number, e.g. 300) or a sparsity in [0, 1) (e.g. 0.95)")


def edge_request(base: dict[str, Any], method: str, target: str | None, options: str | None) -> dict[str, Any]:
    """The body of one `edges` job: base holds model, task, n."""
    params = {**base, "method": method, **parse_target(target)}
    extra = parse_options(options)
    return {"kind": "edges", "params": {**params, "options": extra} if extra else params}


def edge_sweep_request(base: dict[str, Any], methods: list[str], counts: str | None,
                       options: str | None) -> dict[str, Any]:
    """The body of an `edge-sweep` job; no counts -> the worker's log-spaced default.
    options: per method, e.g. {"eap-ig": {"steps": 2}}."""
    params: dict[str, Any] = {**base, "methods": list(methods)}
    if (counts or "").strip():
        try:
            params["edge_counts"] = parse_budgets(counts)
        except ValueError:
            raise ValueError("edge counts: give positive whole numbers, e.g. 10,100,1000 (or leave empty)") from None
    extra = parse_options(options)
    return {"kind": "edge-sweep", "params": {**params, "options": extra} if extra else params}


def hagd_request(base: dict[str, Any], options: str | None) -> dict[str, Any]:
    """The body of a `hagd` job: base holds model, transcoder, task, n."""
    extra = parse_options(options)
    return {"kind": "hagd", "params": {**base, "options": extra} if extra else dict(base)}
