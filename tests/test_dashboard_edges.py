"""The edge-circuit pages, the edge sweep curves, the task overview and the jobs form for every
kind: pure figure builders, then the real app in headless Chromium (fixtures in tests/browser.py).

The browser tests add to the session's `dash_stack` (tiny Llama, an API token) an edge circuit
and an edge sweep computed through the API, a HAGD run, and one edge circuit seeded straight
into the store whose method name and prompt tokens are markup (the API never accepts such a
method name, a CLI run on a JSONL task could store such tokens).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import pytest

from frontend_dash.components.curves_figure import curve_count, edge_sweep_figure, overview_figure, sweep_rows
from frontend_dash.components.edge_figure import (base_figure, clicked_head, edge_payload, edges_drawn, endpoints,
                                                  graph_shape, node_positions, threshold_figure)
from frontend_dash.components.job_form import edge_request, edge_sweep_request, hagd_request, parse_options
from tests.browser import DATASET, dash_stack, driver, run_job, severe_console_entries, tiny_cache  # noqa: F401

XSS = '<img src=x onerror="window.__xss=1">'


# ------------------------------------------------------------------------------ pure builders

def _circuit(n_layers=2, n_heads=4, n_kv=2) -> dict:
    from backend.edges.graph import EdgeGraph
    g = EdgeGraph.build(n_layers, n_heads, n_kv)
    ids = g.edge_ids()
    kept = [{"id": ids[e], "score": s} for e, s in ((0, 0.5), (7, -2.0), (30, 0.01), (len(ids) - 1, 1.0))]
    return {"graph": g.counts(), "kept": kept}


@pytest.mark.parametrize("shape", [(2, 4, 2), (3, 4, 4), (18, 4, 1), (12, 12, 12), (1, 1, 1)])
def test_graph_shape_is_recovered_from_the_counts(shape):
    from backend.edges.graph import EdgeGraph
    assert graph_shape(EdgeGraph.build(*shape).counts()) == shape


def test_layout_by_layer_and_edge_end_points():
    pos = node_positions(2, 4, 2)
    assert pos["embed"][1] == 0 and pos["logits"][1] == 3
    heads = [pos[f"a1.h{h}"] for h in range(4)]
    assert {x for x, _ in heads} == {0.0, 1.0} and all(1.6 <= y <= 2.4 for _, y in heads)   # a 2x2 grid in layer 1
    assert pos["m1"][0] > max(x for x, _ in heads) and pos["m1"][1] == 2                        # the MLP beside it
    assert [pos[f"a1.kv{g}"][0] for g in (0, 1)] == [0.0, 1.0]                                 # kv heads: a row
    assert pos["a1.kv0"][1] < min(y for _, y in heads)                                           # under the grid
    assert node_positions(1, 4, 1)["a0.kv0"][0] == 0.5
    x0, y0, x1, y1 = endpoints("a0.h1->a1.k1", pos, per_kv=2)
    assert (x1, y1) == pytest.approx((pos["a1.kv1"][0] - 0.05, pos["a1.kv1"][1]))
    assert endpoints("m0->logits", pos, 2)[2:] == pos["logits"]
    assert "a1.kv0" not in node_positions(2, 4, 4)                                               # no GQA: no kv nodes


def test_threshold_keeps_the_strongest_edges_binned_by_sign_and_size():
    circuit = _circuit()
    payload = edge_payload(circuit)
    assert payload["score"] == [-2.0, 1.0, 0.5, 0.01] and payload["max"] == 2.0
    base = base_figure(circuit).to_dict()
    for n in (0, 1, 3, 4, 99):
        assert edges_drawn(threshold_figure(payload, base, n)) == min(n, 4)
    shapes = threshold_figure(payload, base, 4)["layout"]["shapes"]
    assert {sh["line"]["color"] for sh in shapes} == {"#1f77b4", "#d62728"}
    widest = max(shapes, key=lambda sh: sh["line"]["width"])
    assert widest["line"]["color"] == "#d62728" and widest["path"].count("M") == 1     # the -2.0 edge alone
    assert len(threshold_figure(payload, base, 4)["data"]) == len(base["data"])           # nodes unchanged
    heads = next(t for t in base["data"] if t["name"] == "head")
    assert clicked_head({"points": [{"customdata": heads["customdata"][0]}]}) == "a0.h0"
    assert clicked_head({"points": [{"customdata": ["mlp", "m0"]}]}) is None


def test_head_hover_shows_the_attention_summary_escaped():
    circuit = _circuit()
    attention = {"prompts": [{"index": 0, "offset": 1, "tokens": ["a", "b", "c", "d", "<q>"]}],
                 "heads": [{"head": "a0.h0", "top": [{"prompt": 0, "query": 5, "key": 2, "token": XSS, "weight": 0.75}]}]}
    heads = next(t for t in base_figure(circuit, attention).data if t.name == "head")
    text = dict(zip([c[1] for c in heads.customdata], heads.text))["a0.h0"]
    assert "pos 5 &#x27;&lt;q&gt;&#x27; → pos 2" in text and "0.75" in text and "&lt;img" in text and "<img" not in text


def _edge_sweep() -> dict:
    def row(method, n, kl, rec, seconds):
        return {"method": method, "n_target": n, "n_kept": n, "kl": {"mean": kl, "std": 0.1, "ci95": [kl - 0.1, kl + 0.1]},
                "recovered": {"mean": rec, "std": 0.1, "ci95": [rec - 0.05, rec + 0.05]}, "recovered_of_means": rec,
                "accuracy": {"mean": 1.0, "std": 0.0, "ci95": [1.0, 1.0]}, "cost": {"seconds": seconds, "forwards": 2}}
    return {"model": "m", "task": "ioi", "n_prompts": 4, "methods": ["eap", "hap"], "counts": [10, 100],
            "graph": {"edges": 190}, "rows": [row("eap", 10, 1.0, 0.2, 0.5), row("eap", 100, 0.1, 0.9, 0.5),
                                              row("hap", 10, 0.8, 0.3, 3.0), row("hap", 100, 0.05, 0.95, 4.0)]}


def test_edge_sweep_figure_log_axes_bands_and_time_in_the_legend():
    fig = edge_sweep_figure(_edge_sweep())
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    lines = [t for t in fig.data if not t.fill]
    assert [t.name for t in lines if t.showlegend] == ["eap (1 s)", "hap (7 s)"]
    assert len([t for t in fig.data if t.fill == "toself"]) == 4                     # KL and recovered, per method
    assert curve_count(fig.to_dict()) == 2
    assert sweep_rows(_edge_sweep())[0]["kl_ci95"] == [0.9, 1.1]


def test_overview_figure_puts_the_families_on_separate_axes():
    def curve(family, method, pts, kl=True):
        return {"family": family, "method": method, "source": "sweep #1", "x_unit": "edges", "metric": "m", "band": "b",
                "seconds": 2.0, "points": [{"x": x, "kl": y if kl else None, "kl_ci95": [y, y] if kl else None,
                                            "recovered": 1 - y, "recovered_band": None, "seconds": 1.0} for x, y in pts]}
    overview = {"model": "m", "task": XSS, "curves": [curve("features", "fap", [(50, 0.5), (100, 0.3)]),
                                                      curve("features", "hagd", [(12, 0.2)], kl=False),
                                                      curve("edges", XSS, [(10, 0.9), (100, 0.2)])]}
    fig = overview_figure(overview)
    lines = [t for t in fig.data if not t.fill]
    assert [(t.xaxis, t.name) for t in lines] == [("x", "fap (2 s)"), ("x", "hagd (2 s)"),
                                                  ("x2", "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt; (2 s)")]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log" and "<img" not in fig.layout.title.text
    assert curve_count(fig.to_dict()) == 3
    kl = overview_figure(overview, "kl")
    assert "no kl" in next(t.name for t in kl.data if t.legendgroup == "hagd")


def test_job_form_bodies_for_the_edge_and_hagd_kinds():
    base = {"model": "m", "task": "ioi", "n": 8}
    assert edge_request(base, "eap", "300", "") == {"kind": "edges", "params": {**base, "method": "eap", "edges": 300}}
    assert edge_request(base, "hap", "0.95", '{"rho": 0.2}')["params"] == {**base, "method": "hap", "sparsity": 0.95,
                                                                          "options": {"rho": 0.2}}
    assert edge_sweep_request(base, ["eap", "hap"], "10, 100", "") == {
        "kind": "edge-sweep", "params": {**base, "methods": ["eap", "hap"], "edge_counts": [10, 100]}}
    assert "edge_counts" not in edge_sweep_request(base, ["eap"], "", "")["params"]
    assert hagd_request({**base, "transcoder": "m/clt"}, '{"pool": 10}') == {
        "kind": "hagd", "params": {**base, "transcoder": "m/clt", "options": {"pool": 10}}}
    for bad in ("", "-3", "1.5", "x"):
        with pytest.raises(ValueError):
            edge_request(base, "eap", bad, "")
    for bad in ("[1]", "{", '"a"'):
        with pytest.raises(ValueError):
            parse_options(bad)
    with pytest.raises(ValueError):
        edge_sweep_request(base, ["eap"], "10, x", "")


# ------------------------------------------------------------------------------ the app in Chromium

@dataclass
class EdgeStack:
    edge_circuit_id: int
    edge_sweep_id: int
    xss_circuit_id: int


def _seed_markup_circuit(stack, template_id: int) -> int:
    """A copy of a real edge circuit whose method name and prompt tokens are markup."""
    from backend.edges.pipeline import EdgeCircuit
    from backend.store import queries
    from backend.store.db import make_engine, session_factory, transaction
    detail = stack.api.get(f"/api/edge-circuits/{template_id}").json()
    attention = stack.api.get(f"/api/edge-circuits/{template_id}/attention").json()
    for prompt in attention["prompts"]:
        prompt["tokens"] = [XSS] * len(prompt["tokens"])
    for head in attention["heads"]:
        head["top"] = [{**t, "token": XSS} for t in head["top"]]
    fields = {k: v for k, v in detail["result"].items() if k in EdgeCircuit.__dataclass_fields__}
    circuit = EdgeCircuit(**{**fields, "method": XSS, "attention": {k: attention[k] for k in
                                                                     ("n_prompts", "decimals", "prompts", "heads")}})
    engine = make_engine(stack.settings.database_url)
    try:
        with transaction(session_factory(engine)) as s:
            model = queries.get_or_create_model(s, detail["model"], "llama")
            return queries.save_edge_circuit(s, circuit, "test-markup-circuit", model, None).id
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def edge_stack(dash_stack) -> EdgeStack:  # noqa: F811
    edge_data = {"model": DATASET["model"], "task": "ioi", "n": 4, "batch_size": 2}
    circuit = run_job(dash_stack.api, "edges", {**edge_data, "method": "eap", "edges": 40})
    sweep = run_job(dash_stack.api, "edge-sweep", {**edge_data, "methods": ["eap", "eap-ig"], "edge_counts": [10, 60],
                                                   "options": {"eap-ig": {"steps": 2}}})
    run_job(dash_stack.api, "hagd", {**DATASET, "options": {"pool": 10, "ratio": 3.0, "top": 3, "steps": 10,
                                                             "lr": 0.3, "verify_seeds": 2, "verify_n": 3}})
    return EdgeStack(circuit["edge_circuit_id"], sweep["edge_sweep_id"],
                     _seed_markup_circuit(dash_stack, circuit["edge_circuit_id"]))


def _wait(driver, condition, timeout: float = 30.0):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def _css(selector: str):
    def find(driver):  # noqa: F811
        found = driver.find_elements("css selector", selector)
        return found[0] if found and found[0].is_displayed() else False
    return find


def _open(driver, stack, path: str, ready: str) -> None:  # noqa: F811
    severe_console_entries(driver)
    driver.get(stack.dash_url + path)
    _wait(driver, _css(ready))


def _screenshot(driver, name: str) -> None:  # noqa: F811
    from tests.browser import SCREENSHOTS
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


DRAWN_JS = ("const gd = document.querySelector('#edge-graph .js-plotly-plot');"
            "return gd && gd.layout ? (gd.layout.shapes || []).filter(s => s.name === 'edges')"
            ".reduce((n, s) => n + (s.path.match(/M/g) || []).length, 0) : -1;")


def test_every_edge_page_loads_without_console_errors(dash_stack, edge_stack, driver):  # noqa: F811
    pages = [("edge_circuits", "/edge-circuits", "#edge-circuits-list"),
             ("edge_circuit", f"/edge-circuit?id={edge_stack.edge_circuit_id}", "#edge-graph .scatterlayer .trace"),
             ("edge_sweep", f"/edge-sweep?id={edge_stack.edge_sweep_id}", "#edge-sweep-figure .scatterlayer .trace"),
             ("task_overview", "/task-overview?model=tiny-llama&task=ioi", "#overview-figure .scatterlayer .trace"),
             ("jobs_all_kinds", "/jobs", "#jobs-recent")]
    for name, path, ready in pages:
        _open(driver, dash_stack, path, ready)
        time.sleep(0.5)
        _screenshot(driver, name)
        assert severe_console_entries(driver) == [], name
        assert not driver.find_elements("css selector", ".pie-note-error"), name


def test_the_slider_rethresholds_the_drawn_edges_in_the_browser(dash_stack, edge_stack, driver):  # noqa: F811
    from selenium.webdriver.common.keys import Keys
    kept = dash_stack.api.get(f"/api/edge-circuits/{edge_stack.edge_circuit_id}").json()["result"]["kept"]
    _open(driver, dash_stack, f"/edge-circuit?id={edge_stack.edge_circuit_id}", "#edge-graph .scatterlayer .trace")
    _wait(driver, lambda d: d.execute_script(DRAWN_JS) == len(kept))
    handle = driver.find_element("css selector", "#edge-slider [role=slider]")
    handle.click()
    handle.send_keys(Keys.HOME)
    _wait(driver, lambda d: d.execute_script(DRAWN_JS) == 0)
    for _ in range(7):
        handle.send_keys(Keys.ARROW_RIGHT)
    _wait(driver, lambda d: d.execute_script(DRAWN_JS) == 7)
    assert "showing 7 of" in driver.find_element("css selector", "#edge-caption").text
    # The 7 drawn are the 7 strongest by |score|: their midpoints' hover labels name them.
    labels = driver.execute_script(
        "const gd = document.querySelector('#edge-graph .js-plotly-plot');"
        "return gd.data.filter(t => t.legendgroup === 'edge-hover').flatMap(t => t.text);")
    strongest = sorted(kept, key=lambda e: -abs(e["score"]))[:7]
    assert sorted(html.unescape(label.split("<br>")[0]) for label in labels) == sorted(e["id"] for e in strongest)
    assert severe_console_entries(driver) == []


def test_clicking_a_head_shows_its_attention_on_each_prompt(dash_stack, edge_stack, driver):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    attention = dash_stack.api.get(f"/api/edge-circuits/{edge_stack.edge_circuit_id}/attention").json()
    head = attention["heads"][0]["head"]
    _open(driver, dash_stack, f"/edge-circuit?id={edge_stack.edge_circuit_id}", "#edge-graph .scatterlayer .trace")
    index, point = driver.execute_script(
        "const gd = document.querySelector('#edge-graph .js-plotly-plot');"
        "const i = gd.data.findIndex(t => t.name === 'head');"
        f"return [i, gd.data[i].customdata.findIndex(c => c[1] === '{head}')];")
    trace = driver.find_elements("css selector", "#edge-graph .scatterlayer .trace")[index]
    ActionChains(driver).move_to_element(trace.find_elements("css selector", "path.point")[point]).pause(0.3) \
        .click().perform()
    _wait(driver, _css("#edge-attention-title"))
    assert head in driver.find_element("css selector", "#edge-attention-title").text
    heatmaps = driver.find_elements("css selector", "#edge-attention .js-plotly-plot")
    assert len(heatmaps) == attention["n_prompts"]
    ticks = [t.text for t in driver.find_elements("css selector", "#edge-attention-0 .xtick text")]
    first = attention["prompts"][0]
    assert ticks == [f"{i} {tok!r}" for i, tok in enumerate(first["tokens"])]
    _screenshot(driver, "edge_circuit_attention")
    assert severe_console_entries(driver) == []


def attention_tokens(stack, circuit_id: int) -> list[str]:
    return stack.api.get(f"/api/edge-circuits/{circuit_id}/attention").json()["prompts"][0]["tokens"]


def test_markup_in_method_names_and_tokens_renders_as_text(dash_stack, edge_stack, driver):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    cid = edge_stack.xss_circuit_id
    _open(driver, dash_stack, f"/edge-circuit?id={cid}", "#edge-graph .scatterlayer .trace")
    assert XSS in driver.find_element("css selector", "h2").text
    head = dash_stack.api.get(f"/api/edge-circuits/{cid}/attention").json()["heads"][0]["head"]
    index, point = driver.execute_script(
        "const gd = document.querySelector('#edge-graph .js-plotly-plot');"
        "const i = gd.data.findIndex(t => t.name === 'head');"
        f"return [i, gd.data[i].customdata.findIndex(c => c[1] === '{head}')];")
    trace = driver.find_elements("css selector", "#edge-graph .scatterlayer .trace")[index]
    ActionChains(driver).move_to_element(trace.find_elements("css selector", "path.point")[point]).pause(0.5).perform()
    _wait(driver, lambda d: "'<img src=x" in d.find_element("css selector", "#edge-graph .hoverlayer").text)
    ActionChains(driver).click().perform()
    _wait(driver, _css("#edge-attention-0 .xtick text"))
    ticks = [t.text for t in driver.find_elements("css selector", "#edge-attention-0 .xtick text")]
    assert ticks[0].startswith("0 '<img src=x onerror=") and len(ticks) == len(attention_tokens(dash_stack, cid))
    _open(driver, dash_stack, "/edge-circuits", "#edge-circuits-list")
    assert XSS in driver.find_element("css selector", "#edge-circuits-list").text
    _open(driver, dash_stack, "/task-overview?model=tiny-llama&task=ioi", "#overview-figure .scatterlayer .trace")
    assert XSS in driver.find_element("css selector", "#overview-cost").text
    assert not driver.find_elements("css selector", ".pie-page img")
    assert driver.execute_script("return window.__xss") is None
    _screenshot(driver, "edge_markup_as_text")
    assert severe_console_entries(driver) == []


def test_the_task_overview_draws_one_curve_per_stored_method(dash_stack, edge_stack, driver):  # noqa: F811
    api = dash_stack.api
    query = {"model": "tiny-llama", "task": "ioi", "limit": 500}
    methods = {("features", m) for s in api.get("/api/sweeps", params=query).json()["items"] for m in s["methods"]}
    methods |= {("features", c["method"]) for c in api.get("/api/circuits", params=query).json()["items"]
                if c["kl_mean"] is not None}
    methods |= {("features", "hagd")} if api.get("/api/hierarchies", params=query).json()["items"] else set()
    methods |= {("edges", m) for s in api.get("/api/edge-sweeps", params=query).json()["items"] for m in s["methods"]}
    methods |= {("edges", c["method"]) for c in api.get("/api/edge-circuits", params=query).json()["items"]}
    assert {"hagd", "eap", "eap-ig", "fap", "random"} <= {m for _, m in methods}
    _open(driver, dash_stack, "/task-overview?model=tiny-llama&task=ioi", "#overview-figure .scatterlayer .trace")
    drawn = driver.execute_script(
        "const gd = document.querySelector('#overview-figure .js-plotly-plot');"
        "return gd.data.filter(t => t.showlegend !== false && !t.fill).map(t => [t.xaxis || 'x', t.legendgroup]);")
    assert sorted((("features" if axis == "x" else "edges"), group) for axis, group in drawn) == sorted(methods)
    assert len(drawn) == len(methods)
    assert severe_console_entries(driver) == []


def test_the_jobs_form_launches_an_edges_job_with_live_progress(dash_stack, edge_stack, driver):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    _open(driver, dash_stack, "/jobs", "#jobs-recent")
    driver.find_element(By.CSS_SELECTOR, "#jobs-kind input[value='edges']").click()
    _wait(driver, _css("#jobs-edge-target"))
    assert not driver.find_element(By.CSS_SELECTOR, "#jobs-transcoder-field").is_displayed()
    assert not driver.find_element(By.CSS_SELECTOR, "#jobs-ks").is_displayed()
    for field, value in (("#jobs-n", "2"), ("#jobs-edge-target", "12"), ("#jobs-options", "{}")):
        box = driver.find_element(By.CSS_SELECTOR, field)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(value)
        _wait(driver, lambda d, box=box, value=value: box.get_attribute("value") == value)
    driver.find_element(By.CSS_SELECTOR, "#jobs-submit").click()
    _wait(driver, _css("#jobs-launched-list"))
    _wait(driver, lambda d: "100%" in d.find_element(By.CSS_SELECTOR, "#jobs-launched-list").text, timeout=240)
    _wait(driver, lambda d: "edge circuit #" in d.find_element(By.CSS_SELECTOR, "#jobs-launched-list").text)
    jobs = dash_stack.api.get("/api/jobs", params={"kind": "edges"}).json()["items"]
    launched = next(j for j in jobs if j["params"]["n"] == 2 and j["params"]["edges"] == 12)
    assert launched["status"] == "done" and launched["params"]["method"] == "eap"
    link = driver.find_element(By.CSS_SELECTOR, "#jobs-launched-list a").get_attribute("href")
    assert link.endswith(f"/edge-circuit?id={launched['edge_circuit_id']}")
    driver.find_element(By.CSS_SELECTOR, "#jobs-kind input[value='hagd']").click()
    _wait(driver, _css("#jobs-transcoder-field"))
    assert driver.find_element(By.CSS_SELECTOR, "#jobs-options").is_displayed()
    _screenshot(driver, "jobs_edges_done")
    assert severe_console_entries(driver) == []
