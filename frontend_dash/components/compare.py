"""Comparing two circuits (two methods, or two budgets), pure functions of CircuitDetail JSON.

Features are (layer, feature) pairs of each circuit's aggregated `features` list; per-prompt KL
is each prompt's `kl_last`, matched by prompt index (prompts the two circuits do not share are
left out).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def label(circuit: dict[str, Any]) -> str:
    """"#3 fap K=100 (ioi)"."""
    return f"#{circuit['id']} {circuit['method']} K={circuit['k']} ({circuit['task']})"


def feature_sets(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{"shared", "only_a", "only_b"}: rows {layer, feature, n_prompts_a, n_prompts_b}, by layer."""
    fa = {(f["layer"], f["feature"]): f for f in a["features"]}
    fb = {(f["layer"], f["feature"]): f for f in b["features"]}

    def rows(keys: set[tuple[int, int]]) -> list[dict[str, Any]]:
        return [{"layer": l, "feature": f, "n_prompts_a": fa[(l, f)]["n_prompts"] if (l, f) in fa else 0,
                 "n_prompts_b": fb[(l, f)]["n_prompts"] if (l, f) in fb else 0} for l, f in sorted(keys)]
    return {"shared": rows(fa.keys() & fb.keys()), "only_a": rows(fa.keys() - fb.keys()),
            "only_b": rows(fb.keys() - fa.keys())}


def jaccard(sets: dict[str, list[dict[str, Any]]]) -> float:
    """|shared| / |union| of the two feature sets (0 when both are empty)."""
    union = len(sets["shared"]) + len(sets["only_a"]) + len(sets["only_b"])
    return len(sets["shared"]) / union if union else 0.0


def kl_pairs(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {prompt, kl_a, kl_b, diff = kl_b - kl_a} over the prompts both circuits have (and measured:
    an imported graph's circuit has no KL)."""
    kb = {p["index"]: p["kl_last"] for p in b["prompts"] if p.get("kl_last") is not None}
    return [{"prompt": p["index"], "kl_a": p["kl_last"], "kl_b": kb[p["index"]], "diff": kb[p["index"]] - p["kl_last"]}
            for p in sorted(a["prompts"], key=lambda p: p["index"]) if p["index"] in kb and p.get("kl_last") is not None]


def kl_difference_figure(a: dict[str, Any], b: dict[str, Any]) -> go.Figure:
    """Per-prompt KL(B) - KL(A): below zero, B keeps the behaviour better on that prompt."""
    rows = kl_pairs(a, b)
    fig = go.Figure(go.Bar(x=[r["prompt"] for r in rows], y=[r["diff"] for r in rows],
                           marker={"color": ["#2ca02c" if r["diff"] < 0 else "#d62728" for r in rows]},
                           customdata=[[r["kl_a"], r["kl_b"]] for r in rows],
                           hovertemplate="prompt %{x}<br>KL A %{customdata[0]:.4g}<br>KL B %{customdata[1]:.4g}"
                                         "<br>B - A %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"per-prompt KL: B ({label(b)}) minus A ({label(a)})", height=320,
                      xaxis={"title": "prompt", "type": "category"}, yaxis={"title": "KL B - KL A"},
                      plot_bgcolor="white", margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


# ------------------------------------------------------------------------------ any results, any family

FAMILIES = {"fc": "feature circuit", "ec": "edge circuit", "h": "HAGD circuit"}
RECOVERED = {  # what "behaviour recovered" is for each family (share of the metric M, 1 = all of it)
    "fc": "faithfulness (M_circuit − M_none) / (M_clean − M_none), features outside the circuit removed",
    "ec": "logit difference recovered (M_circuit − M_corrupted) / (M_clean − M_corrupted), of the means",
    "h": "sufficiency: share of M kept with only the circuit (mean ± std over the verification prompt sets)",
}
KL_UNIT = "KL(full ‖ circuit) at the answer position, nats"


def parse_refs(text: str | None) -> list[str]:
    """"fc3,ec1,h2" -> ["fc3", "ec1", "h2"] (a bare number is a feature circuit); bad parts dropped."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if part.isdigit():
            part = f"fc{part}"
        family = part.rstrip("0123456789")
        if family in FAMILIES and part[len(family):].isdigit() and part not in out:
            out.append(part)
    return out


def split_ref(ref: str) -> tuple[str, int]:
    family = ref.rstrip("0123456789")
    return family, int(ref[len(family):])


def _edge_unit(name: str) -> str:
    """The node an edge endpoint belongs to: a query reader is its head, k/v readers their kv head."""
    if "." not in name:
        return name
    layer, part = name.split(".", 1)
    if part[0] == "q":
        return f"{layer}.h{part[1:]}"
    if part[0] in "kv" and part[1:].isdigit():
        return f"{layer}.kv{part[1:]}"
    return name


def unit_label(unit: str) -> str:
    """"F:3_17" -> "L3 #17"; "a2.h5" -> "head L2.H5"; "m1" -> "MLP L1"; others as they are."""
    if unit.startswith("F:"):
        layer, feature = unit[2:].split("_")
        return f"L{layer} #{feature}"
    if unit.startswith("a") and ".h" in unit:
        layer, head = unit[1:].split(".h")
        return f"head L{layer}.H{head}"
    if unit.startswith("a") and ".kv" in unit:
        layer, head = unit[1:].split(".kv")
        return f"kv head L{layer}.KV{head}"
    if unit.startswith("m") and unit[1:].isdigit():
        return f"MLP L{unit[1:]}"
    return unit


def unit_layer(unit: str, n_layers: int = 0) -> float:
    if unit.startswith("F:"):
        return float(unit[2:].split("_")[0])
    if unit == "embed":
        return -1.0
    if unit == "logits":
        return float(n_layers)
    digits = "".join(ch for ch in unit[1:].split(".")[0] if ch.isdigit())
    return float(digits) if digits else 0.0


def normalise(ref: str, detail: dict[str, Any]) -> dict[str, Any]:
    """One stored result of any family in the same terms: identity, units kept, KL (nats), behaviour
    recovered (share of M, see RECOVERED), seconds, the set of units and links among them."""
    family, _ = split_ref(ref)
    if family == "fc":
        units = [f"F:{f['layer']}_{f['feature']}" for f in detail["features"]]
        _, aggregate = _aggregate(detail)
        links = [] if aggregate is None else [
            (f"F:{l['source']}", f"F:{l['target']}", l["weight"]) for l in aggregate["links"]
            if l["source"] != "target" and l["target"] != "target"]
        return {"ref": ref, "family": family, "label": f"{ref} {detail['method']} K={detail['k']}",
                "model": detail["model"], "space": detail["transcoder"], "task": detail["task"],
                "method": detail["method"], "kept": f"{detail['k']} occurrences / prompt ({len(units)} features)",
                "n_units": len(units), "kl": detail["kl_mean"], "kl_ci": tuple(detail["kl_ci95"]),
                "recovered": detail["faithfulness_mean"], "recovered_std": None, "seconds": detail["seconds"],
                "units": units, "links": links}
    if family == "ec":
        kept = detail["result"]["kept"]
        units = sorted({_edge_unit(e["writer"]) for e in kept} | {_edge_unit(e["reader"]) for e in kept})
        return {"ref": ref, "family": family, "label": f"{ref} {detail['method']} {detail['n_kept']} edges",
                "model": detail["model"], "space": detail["model"], "task": detail["task"], "method": detail["method"],
                "kept": f"{detail['n_kept']} of {detail['n_edges']} edges ({len(units)} nodes)",
                "n_units": len(units), "kl": detail["kl_mean"], "kl_ci": tuple(detail["kl_ci95"]),
                "recovered": detail["recovered"], "recovered_std": None, "seconds": detail["seconds"],
                "units": units, "links": [(_edge_unit(e["writer"]), _edge_unit(e["reader"]), e["score"] or 1.0)
                                          for e in kept]}
    result = detail["result"]
    units = [f"F:{c['layer']}_{c['feature']}" for c in result["circuit"]]
    chosen = {u[2:] for u in units}
    links = [(f"F:{l['source']}", f"F:{l['target']}", l["weight"]) for l in result["graph"]["links"]
             if l["source"] in chosen and l["target"] in chosen]
    return {"ref": ref, "family": family, "label": f"{ref} HAGD {len(units)} features", "model": detail["model"],
            "space": detail["transcoder"], "task": detail["task"], "method": f"hagd ({result['config']['score']})",
            "kept": f"{len(units)} features", "n_units": len(units), "kl": None, "kl_ci": None,
            "recovered": detail["sufficiency_mean"], "recovered_std": detail["sufficiency_std"],
            "seconds": detail["seconds"], "units": units, "links": links}


def _aggregate(detail: dict[str, Any]):
    from frontend_dash.components.graph_figure import stored_graphs
    return stored_graphs(detail)


def metric_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table: one row per result, the same metrics in the same units."""
    return [{"result": r["label"], "family": FAMILIES[r["family"]], "model": r["model"], "task": r["task"],
             "kept": r["kept"], "KL (nats)": r["kl"],
             "KL 95% CI": None if r["kl_ci"] is None or r["kl_ci"][0] is None else list(r["kl_ci"]),
             "recovered (share of M)": r["recovered"], "± std": r["recovered_std"], "seconds": r["seconds"]}
            for r in results]


def shared_units(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """unit key "<space>|<unit>" -> refs of the results holding it (units of one transcoder, or of
    one model's heads, are comparable; others never match)."""
    where: dict[str, list[str]] = {}
    for r in results:
        for u in r["units"]:
            where.setdefault(f"{r['space']}|{u}", []).append(r["ref"])
    return where


def difference_rows(results: list[dict[str, Any]], explanations: dict[tuple[str, str], str] | None = None,
                    limit: int = 200) -> list[dict[str, Any]]:
    """Units that not every result holds: the unit, which results hold it, and its explanation
    (features: the current one; heads: their layer.head, no role stored)."""
    explanations = explanations or {}
    where = shared_units(results)
    refs = [r["ref"] for r in results]
    rows = []
    for key, holders in sorted(where.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(holders) == len(refs):
            continue
        space, unit = key.split("|", 1)
        rows.append({"unit": unit_label(unit), "in": ", ".join(holders),
                     "not in": ", ".join(r for r in refs if r not in holders),
                     "explanation": explanations.get((space, unit), "" if unit.startswith("F:") else "role unknown")})
    return rows[:limit]


def units_figure(result: dict[str, Any], shared: set[str], title: str = "", height: int = 380) -> go.Figure:
    """A result's units by layer (rows) with its links; units other results also hold are gold."""
    n_layers = int(max((unit_layer(u) for u in result["units"] if u != "logits"), default=-1.0)) + 1
    by_layer: dict[float, list[str]] = {}
    for u in sorted(result["units"]):
        by_layer.setdefault(unit_layer(u, n_layers), []).append(u)
    widest = max((len(v) for v in by_layer.values()), default=1)
    xy = {}
    for layer, units in by_layer.items():
        start = (widest - len(units)) / 2
        for i, u in enumerate(units):
            xy[u] = (start + i, layer)
    xs, ys = [], []
    for s, t, _w in result["links"]:
        if s in xy and t in xy:
            xs += [xy[s][0], xy[t][0], None]
            ys += [xy[s][1], xy[t][1], None]
    space = result["space"]
    units = list(xy)
    is_shared = [f"{space}|{u}" in shared for u in units]
    fig = go.Figure([
        go.Scatter(x=xs, y=ys, mode="lines", line={"width": 0.8, "color": "#9aa"}, hoverinfo="skip", showlegend=False),
        go.Scatter(x=[xy[u][0] for u in units], y=[xy[u][1] for u in units], mode="markers", name="units",
                   marker={"size": [13 if s else 9 for s in is_shared],
                           "color": ["#e6ab02" if s else "#1f77b4" for s in is_shared],
                           "line": {"width": [2 if s else 0.5 for s in is_shared], "color": "#333"}},
                   customdata=[[u, s] for u, s in zip(units, is_shared)],
                   text=[f"{unit_label(u)}{' (shared)' if s else ''}" for u, s in zip(units, is_shared)],
                   hovertemplate="%{text}<extra></extra>")])
    fig.update_layout(title=title or None, height=height, margin={"l": 40, "r": 10, "t": 40 if title else 10, "b": 20},
                      plot_bgcolor="white", showlegend=False, dragmode="pan",
                      xaxis={"showticklabels": False, "zeroline": False, "showgrid": False},
                      yaxis={"title": "layer (embed -1, logits last)" if result["family"] == "ec" else "layer",
                             "zeroline": False, "dtick": 1})
    return fig
