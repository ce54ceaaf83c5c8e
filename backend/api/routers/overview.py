"""The task overview: for one model and task, every stored method's curve (read-only).

Feature methods (PIE sweeps and single circuits, HAGD) are measured against features kept, edge
methods against edges kept: the two families never share an axis. A method's points come from
the newest sweep that ran it; a method that only has single circuits gets one point per budget
(the newest circuit at each). "Recovered" is the share of the task metric kept: PIE's
faithfulness (M_circuit - M_none) / (M_clean - M_none), the edge methods' logit difference
recovered, HAGD's sufficiency (mean over verification seeds); each a mean of per-prompt (per
seed) ratios.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from backend.api.deps import get_session
from backend.api.schemas import OverviewCurve, OverviewPoint, TaskOverview
from backend.jobs import NAME_PATTERN
from backend.store import queries

router = APIRouter(prefix="/api", tags=["overview"])

MAX_ROWS = 200   # newest results of each kind considered
PIE_X = "K (occurrences kept per prompt)"
CI = "bootstrap 95% CI over prompts"


def _total(points: list[OverviewPoint]) -> float:
    return float(sum(p.seconds or 0.0 for p in points))


def _curve(family: str, method: str, source: str, x_unit: str, metric: str, band: str,
           points: list[OverviewPoint]) -> OverviewCurve:
    points = sorted(points, key=lambda p: p.x)
    return OverviewCurve(family=family, method=method, source=source, x_unit=x_unit, metric=metric, band=band,
                         seconds=_total(points), points=points)


def _from_circuits(rows: list[Any], covered: set[str], point, family: str, x_unit: str, metric: str,
                   band: str, x_of) -> list[OverviewCurve]:
    """Curves of the methods with no sweep: the newest circuit at each budget (rows newest first)."""
    by_method: dict[str, dict[float, Any]] = defaultdict(dict)
    for row in rows:
        if row.method not in covered:
            by_method[row.method].setdefault(x_of(row), row)
    return [_curve(family, m, "circuits " + ", ".join(f"#{r.id}" for r in sorted(by_x.values(), key=lambda r: r.id)),
                   x_unit, metric, band, [point(r) for r in by_x.values()])
            for m, by_x in sorted(by_method.items())]


def feature_curves(session: Session, model: str, task: str) -> list[OverviewCurve]:
    curves: list[OverviewCurve] = []
    covered: set[str] = set()
    sweeps, _ = queries.list_sweeps(session, model=model, task=task, limit=MAX_ROWS)
    for sweep in sweeps:                      # newest first: a method's newest sweep wins
        for method in [m for m in sweep.methods if m not in covered]:
            covered.add(method)
            rows = [r for r in sweep.result["rows"] if r["method"] == method]
            curves.append(_curve("features", method, f"sweep #{sweep.id}", PIE_X, "faithfulness", CI, [
                OverviewPoint(x=r["k"], kl=r["kl_mean"], kl_ci95=r.get("kl_ci95"), recovered=r.get("faithfulness_mean"),
                              seconds=r.get("seconds")) for r in rows]))
    circuits, _ = queries.list_circuits(session, model=model, task=task, limit=MAX_ROWS)
    curves += _from_circuits(
        [c for c in circuits if c.kl_mean is not None], covered,
        lambda c: OverviewPoint(x=c.k, kl=c.kl_mean, kl_ci95=[c.kl_ci_low, c.kl_ci_high],
                                recovered=c.faithfulness_mean, seconds=c.seconds),
        "features", PIE_X, "faithfulness", CI, lambda c: c.k)
    hierarchies, _ = queries.list_hierarchies(session, model=model, task=task, limit=MAX_ROWS)
    if hierarchies:
        curves.append(_curve(
            "features", "hagd", "hierarchies " + ", ".join(f"#{h.id}" for h in sorted(hierarchies, key=lambda h: h.id)),
            "circuit features", "sufficiency", "± std over verification seeds",
            [OverviewPoint(x=h.circuit_size, recovered=h.sufficiency_mean,
                           recovered_band=[h.sufficiency_mean - h.sufficiency_std, h.sufficiency_mean + h.sufficiency_std],
                           seconds=h.seconds) for h in hierarchies]))
    return curves


def edge_curves(session: Session, model: str, task: str) -> list[OverviewCurve]:
    curves: list[OverviewCurve] = []
    covered: set[str] = set()
    sweeps, _ = queries.list_edge_sweeps(session, model=model, task=task, limit=MAX_ROWS)
    for sweep in sweeps:
        for method in [m for m in sweep.methods if m not in covered]:
            covered.add(method)
            rows = [r for r in sweep.result["rows"] if r["method"] == method]
            curves.append(_curve("edges", method, f"edge sweep #{sweep.id}", "edges kept",
                                 "logit difference recovered", CI, [
                OverviewPoint(x=max(r["n_kept"], 1), kl=r["kl"]["mean"], kl_ci95=r["kl"]["ci95"],
                              recovered=r["recovered"]["mean"], recovered_band=r["recovered"]["ci95"],
                              seconds=(r.get("cost") or {}).get("seconds")) for r in rows]))
    circuits, _ = queries.list_edge_circuits(session, model=model, task=task, limit=MAX_ROWS)
    curves += _from_circuits(
        circuits, covered,
        lambda c: OverviewPoint(x=max(c.n_kept, 1), kl=c.kl_mean, kl_ci95=[c.kl_ci_low, c.kl_ci_high],
                                recovered=c.result["metrics"]["recovered"]["mean"],
                                recovered_band=c.result["metrics"]["recovered"]["ci95"], seconds=c.seconds),
        "edges", "edges kept", "logit difference recovered", CI, lambda c: c.n_kept)
    return curves


@router.get("/task-overview", response_model=TaskOverview)
def task_overview(model: str = Query(max_length=100, pattern=NAME_PATTERN),
                  task: str = Query(max_length=50, pattern=NAME_PATTERN),
                  session: Session = Depends(get_session)) -> TaskOverview:
    """Every stored method's curve for one model and task: feature methods (PIE, HAGD) against
    features kept, edge methods against edges kept; cost in seconds per method. Empty lists when
    nothing is stored."""
    return TaskOverview(model=model, task=task,
                        curves=feature_curves(session, model, task) + edge_curves(session, model, task))
