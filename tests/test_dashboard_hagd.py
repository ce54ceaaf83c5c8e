"""The feature graph's readability (viewport, search, pin and export), HAGD supernodes and the
generalised Compare page: pure builders, then the real app in headless Chromium.

The browser tests run on the session's `dash_stack` (tiny Llama + random CLT) to which the
module adds, through the API's jobs: a FAP circuit at K=12 with its graphs, a HAGD hierarchy of
the same model, transcoder, task and prompts (the real pipeline), and an EAP edge circuit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

from frontend_dash.components.compare import difference_rows, metric_rows, normalise, parse_refs, shared_units
from frontend_dash.components.graph_figure import graph_figure, search_nodes
from frontend_dash.components.supernodes import SUPERNODE, Grouping, group_nodes
from tests.browser import DATASET, dash_stack, driver, run_job, severe_console_entries, tiny_cache  # noqa: F401
from tests.test_dashboard import _choose, _css, _graph, _open, _screenshot, _text_in, _wait

ALERT = "<script>alert(1)</script>"
HAGD_OPTIONS = {"pool": 12, "ratio": 2.0, "top": 2, "steps": 10, "lr": 0.3, "verify_seeds": 2, "verify_n": 3}


# ------------------------------------------------------------------------------ pure builders

def _placed() -> list[dict]:
    def feat(layer, f, pos, score, x, y):
        return {"node_id": f"{layer}_{f}_{pos}", "kind": "feature", "layer": layer, "feature": f, "position": pos,
                "score": score, "x": x, "y": y}
    return [feat(0, 1, 0, 1.0, 0.0, 1.0), feat(0, 1, 1, 3.0, 1.0, 1.0), feat(1, 2, 1, -2.0, 1.0, 2.0),
            feat(1, 5, 2, 0.5, 2.0, 2.0),
            {"node_id": "E_7_0", "kind": "token", "layer": -1, "feature": 7, "position": 0, "x": 0.0, "y": 0.0},
            {"node_id": "3_9_2", "kind": "logit", "layer": 3, "feature": 9, "position": 2, "x": 2.0, "y": 4.0}]


def _grouping(expanded=()) -> Grouping:
    members = {"L1C0": [(0, 1), (1, 2)], "L1C1": [(1, 5)]}
    return Grouping(1, {k: c for c, ks in members.items() for k in ks}, members,
                    {"L1C0": {"predicted": None, "measured": 0.4, "mass": 0.7},
                     "L1C1": {"predicted": None, "measured": 0.1, "mass": 0.3}},
                    {(0, 1): 0.6, (1, 2): 0.1, (1, 5): 0.3}, set(expanded))


def test_grouping_sums_attribution_and_links_and_drops_links_inside_a_cluster():
    links = [{"source": "E_7_0", "target": "0_1_0", "weight": 0.5}, {"source": "E_7_0", "target": "0_1_1", "weight": 0.25},
             {"source": "0_1_0", "target": "1_2_1", "weight": 9.0},           # inside L1C0: dropped
             {"source": "0_1_1", "target": "1_5_2", "weight": 1.5}, {"source": "1_2_1", "target": "1_5_2", "weight": -1.0},
             {"source": "1_5_2", "target": "3_9_2", "weight": 2.0}, {"source": "1_2_1", "target": "3_9_2", "weight": 0.125}]
    nodes, grouped = group_nodes(_placed(), links, _grouping())
    supers = {n["cluster"]: n for n in nodes if n["kind"] == SUPERNODE}
    assert set(supers) == {"L1C0", "L1C1"} and [n["kind"] for n in nodes].count("feature") == 0
    assert supers["L1C0"]["score"] == 1.0 + 3.0 - 2.0 and sorted(supers["L1C0"]["members"]) == ["0_1_0", "0_1_1",
                                                                                                   "1_2_1"]
    assert supers["L1C0"]["x"] == pytest.approx((1 * 0 + 3 * 1 + 2 * 1) / 6)   # |score|-weighted centre
    assert supers["L1C0"]["measured"] == 0.4 and supers["L1C0"]["task_fap"] == pytest.approx(0.7)
    weights = {(l["source"], l["target"]): l["weight"] for l in grouped}
    assert weights == {("E_7_0", "S:L1C0"): 0.75, ("S:L1C0", "S:L1C1"): 0.5, ("S:L1C1", "3_9_2"): 2.0,
                       ("S:L1C0", "3_9_2"): 0.125}
    nodes, _ = group_nodes(_placed(), links, _grouping(expanded={"L1C0"}))   # expanded: its members are back
    assert sorted(n["node_id"] for n in nodes if n["kind"] == "feature") == ["0_1_0", "0_1_1", "1_2_1"]
    assert [n["cluster"] for n in nodes if n["kind"] == SUPERNODE] == ["L1C1"]


def test_search_matches_ids_and_explanations_and_the_figure_fits_its_container():
    graph = _graph()
    explanations = {"0_5": "fires on the <b>name</b>", "1_3": "duplicate token"}
    from frontend_dash.components.graph_figure import layout_prompt_nodes
    placed = layout_prompt_nodes(graph)
    assert search_nodes(placed, explanations, "NAME") == {"0_5_2"}
    assert search_nodes(placed, explanations, "l0 #7") == {"0_7_2"}
    assert search_nodes(placed, explanations, "1_3_1") == {"1_3_1"} and search_nodes(placed, explanations, " ") == set()
    fig = graph_figure(graph, explanations=explanations, query="token", pinned={"0_7_2"})
    marks = {t.name: list(t.x) for t in fig.data if t.name in ("search matches", "pinned")}
    assert marks == {"search matches": [1], "pinned": [placed[[n["node_id"] for n in placed].index("0_7_2")]["x"]]}
    assert fig.layout.height is None and fig.layout.autosize       # sized by the page, not 90 px a layer


def _fc(cid, features, k=4) -> dict:
    return {"id": cid, "method": "fap", "k": k, "model": "m", "transcoder": "m/clt", "task": "ioi", "kl_mean": 0.5,
            "kl_ci95": [0.4, 0.6], "faithfulness_mean": 0.8, "seconds": 2.0, "graphs": {},
            "features": [{"layer": l, "feature": f, "n_prompts": 1} for l, f in features]}


def test_compare_normalises_every_family_into_the_same_terms():
    assert parse_refs("fc3, ec1,h2,3,zz9,fc3") == ["fc3", "ec1", "h2"]
    fc = normalise("fc1", _fc(1, [(0, 1), (1, 2)]))
    ec = normalise("ec2", {"model": "m", "task": "ioi", "method": "eap", "n_kept": 2, "n_edges": 190, "kl_mean": 0.3,
                           "kl_ci95": [0.2, 0.4], "recovered": 0.7, "seconds": 1.0,
                           "result": {"kept": [{"writer": "a0.h1", "reader": "a1.q0", "score": 0.5},
                                               {"writer": "a1.h0", "reader": "logits", "score": 0.2}]}})
    h = normalise("h3", {"model": "m", "transcoder": "m/clt", "task": "ioi", "sufficiency_mean": 0.9,
                         "sufficiency_std": 0.05, "seconds": 9.0,
                         "result": {"config": {"score": "ablation"}, "circuit": [{"layer": 1, "feature": 2}],
                                    "graph": {"links": [{"source": "1_2", "target": "1_2", "weight": 1.0}]}}})
    assert ec["units"] == ["a0.h1", "a1.h0", "logits"] and h["units"] == ["F:1_2"]
    rows = metric_rows([fc, ec, h])
    assert [r["KL (nats)"] for r in rows] == [0.5, 0.3, None]
    assert [r["recovered (share of M)"] for r in rows] == [0.8, 0.7, 0.9] and rows[2]["± std"] == 0.05
    where = shared_units([fc, ec, h])
    assert where["m/clt|F:1_2"] == ["fc1", "h3"] and where["m|a0.h1"] == ["ec2"]
    diffs = {r["unit"]: r for r in difference_rows([fc, h], {("m/clt", "F:0_1"): ALERT})}
    assert set(diffs) == {"L0 #1"} and diffs["L0 #1"]["explanation"] == ALERT and diffs["L0 #1"]["not in"] == "h3"


# ------------------------------------------------------------------------------ in Chromium

@dataclass
class HagdStack:
    circuit_id: int
    hierarchy_id: int
    edge_circuit_id: int


@pytest.fixture(scope="module")
def hagd_stack(dash_stack):  # noqa: F811
    """A K=12 FAP circuit (graphs of all prompts), a HAGD hierarchy on the same prompts, an EAP edge circuit."""
    api = dash_stack.api
    prune = run_job(api, "prune", {**DATASET, "method": "fap", "k": 12, "batch_size": 2})
    run_job(api, "graph", {"circuit_id": prune["circuit_id"]})
    hagd = run_job(api, "hagd", {**{k: v for k, v in DATASET.items() if k != "seed"}, "options": HAGD_OPTIONS})
    edges = run_job(api, "edges", {"model": DATASET["model"], "task": "ioi", "n": 3, "method": "eap",
                                   "sparsity": 0.9})
    return HagdStack(prune["circuit_id"], hagd["hierarchy_id"], edges["edge_circuit_id"])


def _plot(driver, selector: str, script: str):  # noqa: F811
    return driver.execute_script(f"const gd = document.querySelector('{selector} .js-plotly-plot'); {script}")


def _trace_points(driver, name: str) -> list:  # noqa: F811
    return _plot(driver, "#circuit-graph", f"const t = gd.data.find(t => t.name === '{name}');"
                                           "return t ? t.customdata : [];")


def _group_by_hierarchy(driver, stack, hagd_stack) -> None:  # noqa: F811
    _open(driver, stack, f"/circuit?id={hagd_stack.circuit_id}&prompt=0", "#circuit-graph .scatterlayer .trace")
    _choose(driver, "circuit-hierarchy", f"hierarchy #{hagd_stack.hierarchy_id}")
    _wait(driver, lambda d: len(_trace_points(d, "supernode")) > 0)
    _wait(driver, _css("#circuit-tree .main-svg"))


def test_grouping_by_a_hagd_level_reduces_the_nodes_to_its_clusters(dash_stack, hagd_stack, driver):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    result = dash_stack.api.get(f"/api/hierarchies/{hagd_stack.hierarchy_id}").json()["result"]
    graph = next(g for g in dash_stack.api.get(f"/api/circuits/{hagd_stack.circuit_id}").json()["graphs"]["all"]["graphs"]
                 if g["prompt"] == 0)
    features = [n for n in graph["nodes"] if n["kind"] == "feature"]
    level = len(result["hierarchy"]["counts"]) - 1          # the page preselects the coarsest level
    hagd_nodes = result["graph"]["nodes"]
    cluster_of = {(hagd_nodes[m]["layer"], hagd_nodes[m]["feature"]): c["id"] for c in result["hierarchy"]["levels"][level]
                  for m in c["members"] if hagd_nodes[m]["kind"] == "feature"}
    clusters_here = {cluster_of[(n["layer"], n["feature"])] for n in features if (n["layer"], n["feature"]) in cluster_of}
    ungrouped = [n for n in features if (n["layer"], n["feature"]) not in cluster_of]
    assert clusters_here and len(clusters_here) + len(ungrouped) < len(features)

    _group_by_hierarchy(driver, dash_stack, hagd_stack)
    supers = _trace_points(driver, SUPERNODE)
    assert sorted(c[3] for c in supers) == sorted(clusters_here)
    assert len(_trace_points(driver, "feature")) == len(ungrouped)
    assert sum(len(c[4].split(",")) for c in supers) == len(features) - len(ungrouped)
    rows = driver.find_elements("css selector", "#circuit-clusters tbody tr")
    assert len(rows) == result["hierarchy"]["counts"][level]
    _screenshot(driver, "circuit_supernodes")

    # Expand one supernode in place by clicking it, then collapse it again.
    biggest = max(supers, key=lambda c: len(c[4].split(",")))
    index = _plot(driver, "#circuit-graph", "return gd.data.findIndex(t => t.name === 'supernode');")
    points = driver.find_elements("css selector", "#circuit-graph .scatterlayer .trace")[index].find_elements(
        "css selector", "path.point")
    ActionChains(driver).move_to_element(points[supers.index(biggest)]).pause(0.3).click().perform()
    _wait(driver, lambda d: len(_trace_points(d, SUPERNODE)) == len(supers) - 1)
    assert len(_trace_points(driver, "feature")) == len(ungrouped) + len(biggest[4].split(","))
    _screenshot(driver, "circuit_supernode_expanded")
    driver.find_element("css selector", f"#circuit-expanded input[value='{biggest[3]}']").click()
    _wait(driver, lambda d: len(_trace_points(d, SUPERNODE)) == len(supers))
    assert severe_console_entries(driver) == []


def test_the_graph_fits_1280x800_with_the_target_and_token_labels_visible(dash_stack, hagd_stack, driver):  # noqa: F811
    driver.set_window_size(1280, 800)
    try:
        _open(driver, dash_stack, f"/circuit?id={hagd_stack.circuit_id}&prompt=0", "#circuit-graph .xtick")
        time.sleep(0.5)
        seen = driver.execute_script("""
            const gd = document.querySelector('#circuit-graph .js-plotly-plot');
            const i = gd.data.findIndex(t => t.name === 'metric' || t.name === 'logit');
            const target = document.querySelectorAll('#circuit-graph .scatterlayer .trace')[i].querySelector('path.point');
            const ticks = [...document.querySelectorAll('#circuit-graph .xtick text')];
            const inside = r => r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0 && r.right <= window.innerWidth;
            return {target: inside(target.getBoundingClientRect()), ticks: ticks.length,
                    ticksInside: ticks.every(t => inside(t.getBoundingClientRect())), scrollY: window.scrollY,
                    plotHeight: gd.getBoundingClientRect().height};""")
        _screenshot(driver, "circuit_1280x800")
        assert seen["scrollY"] == 0 and seen["target"] and seen["ticks"] > 0 and seen["ticksInside"], seen
        assert seen["plotHeight"] >= 300, seen
        assert severe_console_entries(driver) == []
    finally:
        driver.set_window_size(1400, 1000)


def test_pinned_nodes_export_as_json_that_the_import_accepts(dash_stack, hagd_stack, driver):  # noqa: F811
    from selenium.webdriver.common.keys import Keys
    _open(driver, dash_stack, f"/circuit?id={hagd_stack.circuit_id}&prompt=0", "#circuit-graph .scatterlayer .trace")
    box = driver.find_element("css selector", "#circuit-search")
    box.send_keys("L0 #", Keys.ENTER)
    _wait(driver, _text_in("#circuit-search-count", "match"))
    matches = _plot(driver, "#circuit-graph", "const t = gd.data.find(t => t.name === 'search matches');"
                                              "return t ? t.x.length : 0;")
    assert matches > 0
    driver.find_element("css selector", "#circuit-pin-matches").click()
    link = _wait(driver, _css("#circuit-subgraph"))
    _wait(driver, _text_in("#circuit-pin-count", "pinned"))
    _screenshot(driver, "circuit_pinned")
    exported = httpx.get(link.get_attribute("href"), timeout=30).json()
    pinned = exported["qParams"]["pinnedIds"]
    assert pinned and all(p.startswith("0_") for p in pinned)
    target = [n["node_id"] for n in exported["nodes"] if n["is_target_logit"]]
    assert sorted(n["node_id"] for n in exported["nodes"]) == sorted(pinned + target)
    imported = dash_stack.api.post("/api/graphs/import", json=exported)
    assert imported.status_code == 201, imported.text
    stored = dash_stack.api.get(f"/api/circuits/{imported.json()['circuit_id']}").json()
    assert stored["k"] == len(pinned) and stored["method"] == "imported"
    # The API refuses what is not a node of the graph, and empty or oversized lists.
    url = f"/api/circuits/{hagd_stack.circuit_id}/graphs/all/subgraph"
    assert dash_stack.api.post(url, json={"node_ids": ["nope"], "prompt": 0}).status_code == 422
    assert dash_stack.api.post(url, json={"node_ids": [], "prompt": 0}).status_code == 422
    assert dash_stack.api.post(url, json={"node_ids": ["x"] * 2001}).status_code == 422
    assert severe_console_entries(driver) == []


def _explain(stack, layer: int, feature: int, text: str) -> int:
    from backend.store import queries
    from backend.store.db import make_engine, session_factory, transaction
    found = stack.api.get("/api/features/lookup", params={"transcoder": DATASET["transcoder"], "layer": layer,
                                                          "index": feature})
    if found.status_code == 404:   # never harvested nor explained: register it, as an explain job would
        engine = make_engine(stack.settings)
        with transaction(session_factory(engine)) as session:
            tc = queries.get_or_create_transcoder(session, DATASET["transcoder"],
                                                  queries.get_or_create_model(session, DATASET["model"], "llama"))
            queries.register_features(session, tc, {(layer, feature)})
        engine.dispose()
        found = stack.api.get("/api/features/lookup", params={"transcoder": DATASET["transcoder"], "layer": layer,
                                                              "index": feature})
    feature_id = found.json()["id"]
    created = stack.api.post(f"/api/features/{feature_id}/explanations", json={"text": text, "author": "t"})
    assert created.status_code == 201, created.text
    return feature_id


def test_an_explanation_with_a_script_renders_as_text_on_circuit_compare_and_feature_pages(
        dash_stack, hagd_stack, driver):  # noqa: F811
    big = dash_stack.api.get(f"/api/circuits/{hagd_stack.circuit_id}").json()
    small = dash_stack.api.get(f"/api/circuits/{dash_stack.circuit_id}").json()
    only_big = [f for f in big["features"] if (f["layer"], f["feature"]) not in
                {(g["layer"], g["feature"]) for g in small["features"]}]
    graph0 = next(g for g in big["graphs"]["all"]["graphs"] if g["prompt"] == 0)
    in_graph = {(n["layer"], n["feature"]) for n in graph0["nodes"] if n["kind"] == "feature"}
    chosen = next(f for f in only_big if (f["layer"], f["feature"]) in in_graph)
    feature_id = _explain(dash_stack, chosen["layer"], chosen["feature"], ALERT)

    _open(driver, dash_stack, f"/circuit?id={hagd_stack.circuit_id}&prompt=0", "#circuit-graph .scatterlayer .trace")
    texts = _plot(driver, "#circuit-graph", "return gd.data.filter(t => t.text).flatMap(t => t.text);")
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in t for t in texts)
    assert not any("<script>" in t for t in texts)
    box = driver.find_element("css selector", "#circuit-search")
    box.send_keys("alert(1)", "\n")                        # searching by explanation text finds it
    _wait(driver, _text_in("#circuit-search-count", "1 match"))

    _open(driver, dash_stack, f"/compare?ids=fc{dash_stack.circuit_id},fc{hagd_stack.circuit_id}",
          "#compare-differences")
    assert _text_in("#compare-differences", ALERT)(driver)
    _open(driver, dash_stack, f"/feature?id={feature_id}", ".pie-explanation-text")
    assert ALERT in [e.text for e in driver.find_elements("css selector", ".pie-explanation-text")]
    for page in (f"/circuit?id={hagd_stack.circuit_id}&prompt=0", f"/feature?id={feature_id}"):
        driver.get(dash_stack.dash_url + page)
        time.sleep(0.5)
        assert not driver.find_elements("css selector", ".pie-page script")   # no alert (selenium would raise)
    assert severe_console_entries(driver) == []


def test_compare_puts_a_feature_circuit_an_edge_circuit_and_a_hagd_circuit_side_by_side(
        dash_stack, hagd_stack, driver):  # noqa: F811
    refs = f"fc{hagd_stack.circuit_id},ec{hagd_stack.edge_circuit_id},h{hagd_stack.hierarchy_id}"
    _open(driver, dash_stack, f"/compare?ids={refs}", "#compare-metrics")
    _wait(driver, lambda d: len(d.find_elements("css selector", "#compare-graphs .js-plotly-plot")) == 3)
    rows = [r.text for r in driver.find_elements("css selector", "#compare-metrics tbody tr")]
    assert [r.split()[0] for r in rows] == [f"fc{hagd_stack.circuit_id}", f"ec{hagd_stack.edge_circuit_id}",
                                            f"h{hagd_stack.hierarchy_id}"]
    assert "edge circuit" in rows[1] and "HAGD circuit" in rows[2]
    assert _text_in("#compare-summary", "held by two or more")(driver)
    _screenshot(driver, "compare_families")
    assert severe_console_entries(driver) == []
    assert not driver.find_elements("css selector", ".pie-note-error")
