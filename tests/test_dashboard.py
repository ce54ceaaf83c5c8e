"""The Dash dashboard: figure builders as pure functions, then the real app in headless Chromium.

Browser tests run the real API (tiny Llama + random CLT, temp SQLite, a write token) and the
Dash app on loopback ports (fixtures in tests/browser.py). Screenshots go to
artifacts/screenshots/.
"""

from __future__ import annotations

import time

import pytest

from frontend_dash.components.compare import feature_sets, jaccard, kl_difference_figure, kl_pairs
from frontend_dash.components.feature_views import (EXAMPLE_RATING, example_label, example_rank, example_ratings,
                                                    examples_view, histogram_figure, logit_lens_view, score_groups,
                                                    score_summary, scores_view)
from frontend_dash.components.graph_figure import (aggregate_figure, clicked_feature, edge_traces, graph_figure,
                                                   graph_key_label, layout_prompt_nodes, stored_graphs)
from frontend_dash.components.job_form import interp_request, job_requests, parse_budgets
from frontend_dash.components.kl_figure import budget_rows, compression_rows, kl_vs_k_figure, point_rows
from tests.browser import SCREENSHOTS, dash_stack, driver, severe_console_entries, tiny_cache  # noqa: F401

XSS = '<script>window.__xss=1</script><img src="x" onerror="window.__xss=1">'


# ------------------------------------------------------------------------------ pure figure builders

def _graph() -> dict:
    """A 2-layer prompt graph: 3 tokens, 3 features (two share layer 0 / position 2), the logit."""
    def feat(layer, f, pos, score):
        return {"node_id": f"{layer}_{f}_{pos}", "kind": "feature", "layer": layer, "position": pos, "feature": f,
                "activation": 1.0, "score": score, "token": "c"}
    nodes = [feat(0, 5, 2, 0.5), feat(0, 7, 2, -0.1), feat(1, 3, 1, 0.2),
             {"node_id": "0_-1_2", "kind": "error", "layer": 0, "position": 2, "feature": -1, "activation": None,
              "score": None, "token": "c"}]
    nodes += [{"node_id": f"E_{i}_{i}", "kind": "token", "layer": -1, "position": i, "feature": i,
               "activation": None, "score": None, "token": t} for i, t in enumerate(["a", "<b>", "c"])]
    nodes.append({"node_id": "3_9_2", "kind": "logit", "layer": 3, "position": 2, "feature": 9, "activation": None,
                  "score": None, "token": "d", "token_prob": 0.4})
    links = [{"source": "0_5_2", "target": "3_9_2", "weight": 1.0}, {"source": "0_7_2", "target": "1_3_1", "weight": -0.5},
             {"source": "E_1_1", "target": "1_3_1", "weight": 0.05}, {"source": "0_-1_2", "target": "3_9_2", "weight": 2.0}]
    return {"prompt": 0, "tokens": ["a", "<b>", "c"], "answer_token": 9, "nodes": nodes, "links": links}


def _segments(fig) -> int:
    return sum(sum(1 for v in t.x if v is None) for t in fig.data if t.mode == "lines")


def test_prompt_graph_layout_rows_columns_sizes_and_escaped_hover():
    graph = _graph()
    placed = {n["node_id"]: n for n in layout_prompt_nodes(graph)}
    assert "0_-1_2" not in placed                                   # error nodes hidden by default
    assert placed["E_0_0"]["y"] == 0 and placed["3_9_2"]["y"] == 4  # tokens at the bottom, the logit on top
    assert placed["1_3_1"]["y"] == 2 and placed["1_3_1"]["x"] == 1
    shared = [placed["0_5_2"]["x"], placed["0_7_2"]["x"]]            # one (layer, position): side by side
    assert shared[0] != shared[1] and all(1.5 <= x <= 2.5 for x in shared)

    fig = graph_figure(graph, explanations={"0_5": "<b>name</b> mover"})
    feature = next(t for t in fig.data if t.name == "feature")
    sizes = dict(zip([c[0] for c in feature.customdata], feature.marker.size))
    assert sizes["0_5_2"] > sizes["1_3_1"] > sizes["0_7_2"]          # size grows with |score|
    hover = dict(zip([c[0] for c in feature.customdata], feature.text))
    assert "&lt;b&gt;name&lt;/b&gt; mover" in hover["0_5_2"] and "<b>name</b>" not in hover["0_5_2"]
    assert "no explanation yet" in hover["1_3_1"]
    assert list(fig.layout.xaxis.ticktext) == ["a", "&lt;b&gt;", "c"]
    assert _segments(fig) == 3                                       # the error's link is not drawn
    assert _segments(graph_figure(graph, show_errors=True)) == 4
    assert _segments(graph_figure(graph, threshold=0.4)) == 2        # |w| >= 0.4 of the largest
    assert clicked_feature({"points": [{"customdata": feature.customdata[0]}]}) == (0, 5)
    token = next(t for t in fig.data if t.name == "token")
    assert clicked_feature({"points": [{"customdata": token.customdata[0]}]}) is None


def test_edges_are_binned_by_weight_and_sign_with_none_separators():
    coords = {"a": (0, 0), "b": (1, 1), "c": (2, 2)}
    links = [{"source": "a", "target": "b", "weight": 1.0}, {"source": "b", "target": "c", "weight": 0.1},
             {"source": "a", "target": "c", "weight": -0.9}, {"source": "a", "target": "zzz", "weight": 5.0}]
    traces = edge_traces(links, coords)
    assert len(traces) == 3
    strongest = [t for t in traces if t["line"]["color"] == "#1f77b4" and t["opacity"] == max(x["opacity"] for x in traces)]
    assert strongest[0]["x"] == [0, 1, None]
    assert edge_traces(links, coords, threshold=0.95)[0]["x"] == [0, 1, None]


def test_complete_graph_nodes_metric_target_and_graph_keys():
    """A stored graph from the graph engine: pruned and bias nodes drawn with the error toggle, left
    of the first token; the metric target labelled as what it is; metric graphs over logit ones."""
    from backend.circuits.graph import Graph, Node
    import torch
    nodes = [Node("feature", 0, 1, 5, activation=1.0, value=0.5, score=0.3, token="b"),
             Node("error", 0, 1, -1, token="b"), Node("token", -1, 0, 11, token="a"), Node("token", -1, 1, 12, token="b"),
             Node("pruned", -1, -1, -1, label="the writes of the 3 active occurrences not kept"),
             Node("bias", -1, -1, -1, label="constants"),
             Node("metric", 2, 1, 7, value=1.25, token=" Mary", label='logit(" Mary") - logit(" John")',
                  token_prob=0.5, distractor=8, is_target=True)]
    adjacency = torch.zeros(7, 7)
    adjacency[6, :6] = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.125, 0.125])
    graph = Graph(0, ["a", "b"], 1, nodes, adjacency).to_json()
    shown = {n["node_id"]: n for n in layout_prompt_nodes(graph, show_errors=True)}
    assert {"P", "B", "0_-1_1"} <= set(shown) and shown["P"]["y"] == 0 and shown["P"]["x"] < 0
    assert not {"P", "B", "0_-1_1"} & {n["node_id"] for n in layout_prompt_nodes(graph)}
    fig = graph_figure(graph, show_errors=True)
    target = next(t for t in fig.data if t.name == "metric")
    assert "logit(&quot; Mary&quot;) - logit(&quot; John&quot;)" in target.text[0] and "1.25" in target.text[0]
    assert list(fig.layout.yaxis.ticktext) == ["tokens", "L0", "target"] and fig.layout.xaxis.range[0] < -1
    logit = {**graph, "links": []}
    per_prompt, _ = stored_graphs({"graphs": {"0@logit": {"graphs": [logit]}, "0": {"graphs": [graph]}}})
    assert per_prompt[0][0] == "0"
    per_prompt, _ = stored_graphs({"graphs": {"0@logit": {"graphs": [logit]}}})
    assert per_prompt[0][0] == "0@logit"
    assert [graph_key_label(k) for k in ("all", "3", "all@logit")] == ["all prompts", "prompt 3", "all prompts (logit)"]


def test_aggregate_figure_and_stored_graphs():
    graph = _graph()
    aggregate = {"nodes": [{"node_id": "0_5", "kind": "feature", "layer": 0, "feature": 5, "n_prompts": 3},
                           {"node_id": "0_7", "kind": "feature", "layer": 0, "feature": 7, "n_prompts": 1},
                           {"node_id": "logit", "kind": "logit", "layer": 3, "feature": 9, "n_prompts": 3}],
                 "links": [{"source": "0_5", "target": "logit", "weight": 0.3}]}
    fig = aggregate_figure(aggregate)
    feature = next(t for t in fig.data if t.name == "feature")
    assert feature.marker.size[0] > feature.marker.size[1]          # kept on more prompts: bigger
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1", "target"]
    circuit = {"graphs": {"all": {"graphs": [graph, {**graph, "prompt": 1}], "aggregate": aggregate},
                          "1": {"graphs": [{**graph, "prompt": 1, "links": []}], "aggregate": None}}}
    per_prompt, agg = stored_graphs(circuit)
    assert sorted(per_prompt) == [0, 1] and per_prompt[1][0] == "1" and per_prompt[0][0] == "all"
    assert agg is aggregate


def _sweep() -> dict:
    def row(method, k, kl):
        return {"method": method, "k": k, "kl_mean": kl, "kl_std": 0.1, "kl_ci95": [kl - 0.1, kl + 0.1],
                "pred_change_rate": 0.5, "faithfulness_mean": 0.2, "n_prompts": 4, "seconds": 0.1}
    return {"model": "m", "task": "ioi", "n_prompts": 4, "methods": ["fap", "random"], "ks": [50, 100],
            "rows": [row("fap", 50, 1.3), row("fap", 100, 1.1), row("random", 50, 2.0), row("random", 100, 1.9)],
            "random_curve": [row("random", 50, 2.0), row("random", 4000, 1.1)],
            "effective_compression": {"fap": {"50": 20.0, "100": 40.0}, "random": {"50": 1.0, "100": None}},
            "kl_none_mean": 2.5}


def test_kl_vs_k_figure_has_bands_log_axis_random_curve_and_compression_labels():
    fig = kl_vs_k_figure(_sweep())
    assert fig.layout.xaxis.type == "log"
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 3                                           # fap, random, random-from-active
    fap_band = next(t for t in bands if t.legendgroup == "fap")
    assert list(fap_band.x) == [50, 100, 100, 50]                  # upper edge out, lower edge back
    assert list(fap_band.y) == pytest.approx([1.4, 1.2, 1.0, 1.2])
    fap = next(t for t in fig.data if t.name == "fap")
    assert list(fap.text) == ["20.0×", "40.0×"]
    curve = next(t for t in fig.data if t.name == "random-from-active")
    assert curve.line.dash == "dash" and list(curve.x) == [50, 4000]
    assert not any(t.name == "random-from-active" for t in kl_vs_k_figure(_sweep(), show_random_curve=False).data)
    rows = compression_rows(_sweep())
    assert rows[1] == {"method": "fap", "k": 100, "kl_mean": 1.1, "effective_compression": 40.0}
    assert rows[3]["effective_compression"] is None


def test_sweep_tables_show_completeness_and_the_effective_budget_tests():
    sweep = _sweep()
    sweep["rows"][0] = {**sweep["rows"][0], "completeness_mean": 0.3, "selection": {"rule": "top 44 + best 6"}}
    sweep["effective_budget"] = [
        {"method": "random", "k": 50, "base": "fap", "kl_mean": 2.0, "k_equivalent": 50.0,
         "k_equivalent_bound": "at_most", "k_base": 50, "k_claimed": 75, "margin": 0.05, "base_kl_at_k_base": 1.3,
         "p_lower": 0.9, "p_upper": 0.001, "p_value": 0.9, "equivalent": False, "base_kl_at_k_claimed": 1.2,
         "claimed_p_lower": 0.01, "claimed_p_upper": 0.02, "claimed_p_value": 0.02, "claimed_equivalent": True}]
    points = point_rows(sweep)
    assert points[0]["completeness_mean"] == 0.3 and points[0]["selection"] == "top 44 + best 6"
    assert points[1]["completeness_mean"] is None and points[1]["effective_compression"] == 40.0
    (row,) = budget_rows(sweep)
    assert row["k_equivalent"] == "≤ 50" and row["equivalent"] == "no" and row["claimed_equivalent"] == "yes"
    assert (row["k_claimed"], row["base_kl_at_k_claimed"], row["claimed_p_value"]) == (75, 1.2, 0.02)


def test_compare_shared_unique_features_and_per_prompt_kl():
    a = {"id": 1, "method": "fap", "k": 2, "task": "ioi",
         "features": [{"layer": 0, "feature": 1, "n_prompts": 2}, {"layer": 1, "feature": 2, "n_prompts": 1}],
         "prompts": [{"index": 0, "kl_last": 1.0}, {"index": 1, "kl_last": 2.0}]}
    b = {"id": 2, "method": "random", "k": 2, "task": "ioi",
         "features": [{"layer": 0, "feature": 1, "n_prompts": 1}, {"layer": 2, "feature": 0, "n_prompts": 2}],
         "prompts": [{"index": 1, "kl_last": 1.5}, {"index": 2, "kl_last": 0.1}]}
    sets = feature_sets(a, b)
    assert sets["shared"] == [{"layer": 0, "feature": 1, "n_prompts_a": 2, "n_prompts_b": 1}]
    assert [(r["layer"], r["feature"]) for r in sets["only_a"]] == [(1, 2)]
    assert [(r["layer"], r["feature"]) for r in sets["only_b"]] == [(2, 0)]
    assert jaccard(sets) == pytest.approx(1 / 3)
    assert kl_pairs(a, b) == [{"prompt": 1, "kl_a": 2.0, "kl_b": 1.5, "diff": -0.5}]
    assert list(kl_difference_figure(a, b).data[0].y) == [-0.5]


def test_feature_views_render_statistics_as_text_or_say_not_harvested():
    assert histogram_figure({}) is None
    stats = {"histogram": {"edges": [0.0, 1.0, 2.0], "counts": [10, 3]}, "density": 0.01,
             "logit_lens": {"top": [["<b>x", 2.0]], "bottom": [["y", -1.0]]}}
    bars = histogram_figure(stats).data[0]
    assert list(bars.x) == [0.5, 1.5] and list(bars.y) == [10, 3]
    view = examples_view([{"tokens": [XSS, "b"], "activations": [2.0, 0.0], "max_activation": 2.0, "quantile": 0.9}])
    spans = view.children[0].children[1].children
    assert spans[0].children == XSS and "1.00" in spans[0].style["backgroundColor"]
    assert "0.00" in spans[1].style["backgroundColor"]
    assert "not harvested yet" in examples_view([]).children
    assert "not harvested yet" in logit_lens_view({}).children
    scores = [{"id": 1, "metric": "clarity", "value": 0.5, "rater": "offline", "created_at": "2024-01-01"},
              {"id": 2, "metric": "clarity", "value": 0.7, "rater": "offline", "created_at": "2024-01-02"}]
    assert score_summary(scores) == "clarity 0.7 (offline)"


def test_scores_are_shown_by_rater_with_the_proxy_apart():
    def score(i, metric, value, rater, proxy):
        return {"id": i, "metric": metric, "value": value, "rater": rater, "proxy": proxy, "created_at": "2024"}
    scores = [score(1, "purity", 0.9, "offline-proxy", True), score(2, "purity", 0.4, "human", False),
              score(3, "clarity", 0.5, "llm:m", False), score(4, "purity", 0.6, "llm:m", False)]
    assert score_groups(scores) == [("human", False, "purity 0.4"), ("llm:m", False, "clarity 0.5 · purity 0.6"),
                                    ("offline-proxy", True, "purity 0.9")]
    lines = scores_view(scores).children
    assert [line.children.split(":")[0] for line in lines[:2]] == ["FADE by human", "FADE by llm"]
    assert lines[2].children.startswith("FADE by offline-proxy, proxy") and "pie-score-proxy" in lines[2].className
    assert "no scores yet" in scores_view([]).children


def test_examples_say_which_split_they_are_and_only_held_out_ones_are_rateable():
    examples = [{"rank": 0, "tokens": ["a"], "activations": [1.0], "max_activation": 1.0, "split": "explain"},
                {"rank": 1, "tokens": ["b"], "activations": [0.5], "max_activation": 0.5, "split": "holdout"}]
    lines = examples_view(examples, rateable=True).children
    assert "seen by the explainer" in lines[0].children[0].children and "held out" in lines[1].children[1].children
    assert getattr(lines[0].children[0], "id", None) is None
    assert lines[1].children[0].id == {"type": EXAMPLE_RATING, "rank": 1}


def test_interp_requests():
    from frontend_dash.components.interp_launch import requests_for
    explain, score = requests_for({"circuit_id": 3, "prompt": 0}, "offline", "offline", "stories")
    assert explain == {"circuit_id": 3, "prompt": 0, "explainer": "offline", "corpus": "stories"}
    assert score == {**explain, "rater": "offline"}
    assert interp_request("score", 4, "llm", "offline") == {
        "kind": "score", "params": {"circuit_id": 4, "explainer": "llm", "corpus": "default", "rater": "offline"}}
    with pytest.raises(ValueError):
        interp_request("explain", None, "offline", "offline")


def test_example_rating_views_key_controls_by_rank_and_pick_the_newest_rating():
    assert example_label(3) == "example:3"
    assert example_rank({"label": "example:3", "rating": 0}) == 3
    assert example_rank({"label": "example:3", "rating": None}) is None       # a note, not a rating
    assert example_rank({"label": "example:x", "rating": 1}) is None
    assert example_rank({"label": None, "rating": 2}) is None
    annotations = [{"id": 7, "label": "example:0", "rating": 1}, {"id": 3, "label": "example:0", "rating": 2},
                   {"id": 5, "label": "io-name", "rating": 2}, {"id": 9, "label": "example:4", "rating": 0}]
    ratings = example_ratings(annotations)
    assert {rank: a["id"] for rank, a in ratings.items()} == {0: 7, 4: 9}     # newest per rank
    examples = [{"rank": 4, "tokens": [XSS], "activations": [1.0], "max_activation": 1.0},
                {"rank": 9, "tokens": ["b"], "activations": [0.5], "max_activation": 0.5}]
    lines = examples_view(examples, rateable=True).children
    controls = [line.children[0] for line in lines]
    assert [c.id for c in controls] == [{"type": EXAMPLE_RATING, "rank": 4}, {"type": EXAMPLE_RATING, "rank": 9}]
    assert [o["value"] for o in controls[0].options] == [0, 1, 2] and controls[0].value is None
    assert lines[0].children[2].children[0].children == XSS                   # tokens stay text
    assert not any(getattr(c, "id", None) for c in examples_view(examples).children[0].children)


def test_job_form_requests():
    assert parse_budgets("50, 100 200") == [50, 100, 200]
    for bad in ("", "0", "ten"):
        with pytest.raises(ValueError):
            parse_budgets(bad)
    base = {"model": "m", "transcoder": "m/clt", "task": "ioi", "n": 8}
    prunes = job_requests("prune", base, ["fap", "random"], [2, 4])
    assert [(j["params"]["method"], j["params"]["k"]) for j in prunes] == [("fap", 2), ("fap", 4), ("random", 2),
                                                                          ("random", 4)]
    assert job_requests("sweep", base, ["fap"], [2, 4]) == [
        {"kind": "sweep", "params": {**base, "methods": ["fap"], "ks": [2, 4]}}]


# ------------------------------------------------------------------------------ the app in Chromium

def _wait(driver, condition, timeout: float = 30.0):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def _css(selector: str):
    from selenium.webdriver.common.by import By

    def find(driver):  # noqa: F811
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else False
    return find


def _text_in(selector: str, text: str):
    from selenium.webdriver.common.by import By

    def find(driver):  # noqa: F811
        return any(text in e.text for e in driver.find_elements(By.CSS_SELECTOR, selector))
    return find


def _screenshot(driver, name: str) -> None:  # noqa: F811
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _open(driver, stack, path: str, ready: str) -> None:  # noqa: F811
    severe_console_entries(driver)  # drain what earlier pages left
    driver.get(stack.dash_url + path)
    _wait(driver, _css(ready))


def _a_feature_id(stack) -> int:
    return stack.api.get("/api/features").json()["items"][0]["id"]


def test_every_page_loads_without_console_errors(dash_stack, driver):  # noqa: F811
    feature_id = _a_feature_id(dash_stack)
    pages = [("circuits", "/", "#circuits-list"),
             ("circuit", f"/circuit?id={dash_stack.circuit_id}", "#circuit-graph .scatterlayer .trace"),
             ("circuit_prompt", f"/circuit?id={dash_stack.circuit_id}&prompt=0", "#circuit-graph .xtick"),
             ("kl_vs_k", f"/sweep?id={dash_stack.sweep_id}", "#sweep-figure .scatterlayer .trace"),
             ("compare", f"/compare?a={dash_stack.circuit_id}", "#compare-metrics"),
             ("feature", f"/feature?id={feature_id}", "#feature-explanations .pie-note"),
             ("jobs", "/jobs", "#jobs-recent")]
    for name, path, ready in pages:
        _open(driver, dash_stack, path, ready)
        time.sleep(0.5)  # let the remaining callbacks of the page settle before reading the console
        _screenshot(driver, name)
        assert severe_console_entries(driver) == [], name
        assert not driver.find_elements("css selector", ".pie-note-error"), name


def test_clicking_a_graph_node_shows_its_feature(dash_stack, driver):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    _open(driver, dash_stack, f"/circuit?id={dash_stack.circuit_id}&prompt=0", "#circuit-graph .scatterlayer .trace")
    index = driver.execute_script(
        "const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
        "return gd.data.findIndex(t => t.name === 'feature');")
    assert index >= 0
    traces = driver.find_elements("css selector", "#circuit-graph .scatterlayer .trace")
    point = traces[index].find_elements("css selector", "path.point")[0]
    expected = driver.execute_script(
        "const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
        f"return gd.data[{index}].customdata[0];")
    ActionChains(driver).move_to_element(point).pause(0.3).click().perform()
    title = f"Feature L{expected[2]} #{expected[3]}"
    _wait(driver, _text_in("#circuit-feature-title", title))
    _screenshot(driver, "circuit_feature_panel")
    href = driver.find_element("css selector", "#circuit-feature-link").get_attribute("href")
    found = dash_stack.api.get("/api/features/lookup", params={"transcoder": "tiny-llama/clt", "layer": expected[2],
                                                               "index": expected[3]}).json()
    assert href.endswith(f"/feature?id={found['id']}")
    assert severe_console_entries(driver) == []


def _choose(driver, dropdown_id: str, option_text: str) -> None:  # noqa: F811
    """Pick an option of a dcc.Dropdown by the start of its label."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, f"#{dropdown_id}").click()
    option = _wait(driver, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]")
                                           if o.text.startswith(option_text) and o.is_displayed()), False))
    option.click()


def test_annotation_form_saves_through_the_api(dash_stack, driver):  # noqa: F811
    feature_id = dash_stack.api.get("/api/features").json()["items"][1]["id"]
    _open(driver, dash_stack, f"/feature?id={feature_id}", "#feature-explanations .pie-note")
    driver.find_element("css selector", "#feature-expl-text").send_keys("fires on the indirect object's name")
    driver.find_element("css selector", "#feature-author").send_keys("tester")
    driver.find_element("css selector", "#feature-expl-save").click()
    _wait(driver, _text_in("#feature-explanations", "fires on the indirect object's name"))
    explanation = dash_stack.api.get(f"/api/features/{feature_id}/explanations").json()[0]
    assert (explanation["text"], explanation["source"], explanation["author"]) == (
        "fires on the indirect object's name", "human", "tester")

    _choose(driver, "feature-ann-target", f"#{explanation['id']}")
    driver.find_element("css selector", "#feature-ann-rating input[value='2']").click()
    driver.find_element("css selector", "#feature-ann-label").send_keys("io-name")
    driver.find_element("css selector", "#feature-ann-comment").send_keys("clear on every example")
    driver.find_element("css selector", "#feature-ann-save").click()
    _wait(driver, _text_in("#feature-explanations", "label: io-name"))
    _screenshot(driver, "feature_annotated")
    saved = dash_stack.api.get(f"/api/explanations/{explanation['id']}/annotations").json()
    assert [(a["rating"], a["label"], a["comment"], a["author"]) for a in saved] == [
        (2, "io-name", "clear on every example", "tester")]
    assert severe_console_entries(driver) == []


def test_launching_a_job_shows_progress_reaching_100(dash_stack, driver):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    _open(driver, dash_stack, "/jobs", "#jobs-recent")
    _wait(driver, lambda d: "tiny-llama/clt" in d.find_element(By.CSS_SELECTOR, "#jobs-transcoder").text)
    for field, value in (("#jobs-n", "2"), ("#jobs-ks", "3")):
        box = driver.find_element(By.CSS_SELECTOR, field)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(value)
        _wait(driver, lambda d, box=box, value=value: box.get_attribute("value") == value)
    driver.find_element(By.CSS_SELECTOR, "#jobs-submit").click()
    _wait(driver, _css("#jobs-launched-list"))
    _wait(driver, _text_in("#jobs-launched-list", "100%"), timeout=240)
    _wait(driver, _text_in("#jobs-launched-list", "circuit #"))
    _screenshot(driver, "jobs_done")
    jobs = dash_stack.api.get("/api/jobs", params={"kind": "prune"}).json()["items"]
    launched = next(j for j in jobs if j["params"]["n"] == 2 and j["params"]["k"] == 3)
    assert launched["status"] == "done" and launched["progress"] == 1.0 and launched["params"]["task"] == "ioi"
    link = driver.find_element(By.CSS_SELECTOR, "#jobs-launched-list a").get_attribute("href")
    assert link.endswith(f"/circuit?id={launched['circuit_id']}")
    assert severe_console_entries(driver) == []


def test_user_text_is_rendered_as_text_and_never_executed(dash_stack, driver):  # noqa: F811
    from selenium.webdriver.common.by import By
    feature_id = dash_stack.api.get("/api/features").json()["items"][2]["id"]
    created = dash_stack.api.post(f"/api/features/{feature_id}/explanations", json={"text": XSS, "author": XSS})
    assert created.status_code == 201, created.text
    dash_stack.api.post(f"/api/explanations/{created.json()['id']}/annotations", json={"label": XSS, "comment": XSS})
    _open(driver, dash_stack, f"/feature?id={feature_id}", ".pie-explanation-text")
    texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".pie-explanation-text")]
    assert XSS in texts
    assert _text_in("#feature-explanations", f"label: {XSS}")(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#feature-explanations img, #feature-explanations script")
    assert driver.execute_script("return window.__xss") is None
    _screenshot(driver, "feature_xss_as_text")


def test_compute_graph_button_runs_a_graph_job_and_draws_it(dash_stack, driver):  # noqa: F811
    import httpx
    from selenium.webdriver.common.by import By

    from tests.browser import DATASET, run_job
    job = run_job(dash_stack.api, "prune", {**DATASET, "n": 2, "method": "fap", "k": 2, "batch_size": 2})
    _open(driver, dash_stack, f"/circuit?id={job['circuit_id']}", "#circuit-compute")
    assert _text_in("#circuit-graph-note", "no graph computed yet")(driver)
    driver.find_element(By.CSS_SELECTOR, "#circuit-compute").click()
    _wait(driver, _css("#circuit-graph .scatterlayer .trace"), timeout=240)
    assert _text_in("#circuit-job-status", "100%")(driver)
    assert dash_stack.api.get(f"/api/circuits/{job['circuit_id']}").json()["graph_keys"] == ["all"]
    href = driver.find_element(By.CSS_SELECTOR, "#circuit-export").get_attribute("href")
    exported = httpx.get(href, timeout=30).json()
    assert {"metadata", "qParams", "nodes", "links"} <= set(exported)
    assert severe_console_entries(driver) == []


def _seed_rateable_feature(stack) -> int:
    """A feature of its own (sorted after the others) with two examples, straight into the API's store."""
    from backend.store import queries
    from backend.store.db import make_engine, session_factory, transaction
    from tests.browser import TINY_CLT
    layer = max(f["layer"] for f in stack.api.get("/api/features").json()["items"])
    engine = make_engine(stack.settings.database_url)
    try:
        with transaction(session_factory(engine)) as s:
            feature = queries.get_or_create_feature(s, queries.find_transcoder(s, TINY_CLT), layer, 999_999)
            queries.replace_examples(s, feature, [{"tokens": ["Mary", " went"], "activations": [0.1, 2.0]},
                                                  {"tokens": [XSS, " home"], "activations": [1.0, 0.0]}])
            return feature.id
    finally:
        engine.dispose()


def test_rating_an_example_saves_one_example_annotation_and_rerating_edits_it(dash_stack, driver):  # noqa: F811
    from selenium.webdriver.common.by import By
    feature_id = _seed_rateable_feature(dash_stack)
    created = dash_stack.api.post(f"/api/features/{feature_id}/explanations", json={"text": "names of people"})
    assert created.status_code == 201, created.text
    explanation_id = created.json()["id"]
    _open(driver, dash_stack, f"/feature?id={feature_id}", ".pie-example[data-rank='0'] input[value='2']")
    assert _text_in("#feature-rate-caption", "FADE")(driver)
    _wait(driver, _text_in("#feature-rate-status", "0 of 2 examples rated"))   # rated against the explanation

    def example_annotations():
        saved = dash_stack.api.get(f"/api/explanations/{explanation_id}/annotations").json()
        return [(a["label"], a["rating"], a["comment"]) for a in saved if a["label"] == "example:0"]

    for rating in (2, 1):
        driver.find_element(By.CSS_SELECTOR, f".pie-example[data-rank='0'] input[value='{rating}']").click()
        _wait(driver, _text_in("#feature-rate-status", f"example 0 rated {rating}"))
        assert example_annotations() == [("example:0", rating, "")]
    _screenshot(driver, "feature_example_rated")
    assert "example:0" not in driver.find_element(By.CSS_SELECTOR, "#feature-explanations").text
    assert len(dash_stack.api.get(f"/api/explanations/{explanation_id}/annotations").json()) == 1
    assert driver.execute_script("return window.__xss") is None
    assert severe_console_entries(driver) == []


# ------------------------------------------------------------------------------ interpret and evaluate from the pages

def test_explain_and_score_from_a_circuit_page_fills_the_feature_pages(dash_stack, driver):  # noqa: F811
    """The circuit page's "Explain and score this circuit" runs an explain then a score job with live
    progress; afterwards the graph's feature nodes open panels and pages with examples, an
    explanation and FADE scores labelled by rater (the offline one marked proxy)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from tests.browser import DATASET, TINY_CLT, run_job
    job = run_job(dash_stack.api, "prune", {**DATASET, "n": 2, "seed": 7, "method": "fap", "k": 3, "batch_size": 2})
    circuit_id = job["circuit_id"]
    run_job(dash_stack.api, "graph", {"circuit_id": circuit_id, "prompt": 1})
    graph = dash_stack.api.get(f"/api/circuits/{circuit_id}").json()["graphs"]["1"]["graphs"][0]
    nodes = sorted({(n["layer"], n["feature"]) for n in graph["nodes"] if n["kind"] == "feature"})
    # A person's explanation with markup, on one of the features: it must stay text.
    first = dash_stack.api.get("/api/features/lookup", params={"transcoder": TINY_CLT, "layer": nodes[0][0],
                                                              "index": nodes[0][1]}).json()
    assert dash_stack.api.post(f"/api/features/{first['id']}/explanations", json={"text": XSS}).status_code == 201

    _open(driver, dash_stack, f"/circuit?id={circuit_id}&prompt=1", "#circuit-interp-launch")
    assert "llm" not in driver.find_element(By.CSS_SELECTOR, "#circuit-interp-explainer").text  # not configured
    _choose(driver, "circuit-interp-corpus", "IOI-like stories")
    driver.find_element(By.CSS_SELECTOR, "#circuit-interp-launch").click()
    _wait(driver, _text_in("#circuit-interp-status", "explain job #"))
    _wait(driver, _text_in("#circuit-interp-status", "explained and scored"), timeout=240)
    status = driver.find_element(By.CSS_SELECTOR, "#circuit-interp-status").text
    assert "score job #" in status and status.count("100%") == 2 and "failed" not in status
    _screenshot(driver, "circuit_explained_and_scored")

    # Every feature node of the prompt's graph now has examples, an offline explanation and proxy scores.
    for layer, index in nodes:
        feature = dash_stack.api.get("/api/features/lookup", params={"transcoder": TINY_CLT, "layer": layer,
                                                                    "index": index}).json()
        offline = [e for e in feature["explanations"] if e["source"] == "offline"]
        assert offline and feature["examples"], (layer, index)
        scores = dash_stack.api.get(f"/api/explanations/{offline[-1]['id']}/scores").json()
        assert scores and all(s["rater"] == "offline-proxy" and s["proxy"] for s in scores)

    # Clicking a node shows its explanation and scores by rater in the panel.
    index = driver.execute_script(
        "const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
        "return gd.data.findIndex(t => t.name === 'feature');")
    point = driver.find_elements(By.CSS_SELECTOR, "#circuit-graph .scatterlayer .trace")[index] \
        .find_elements(By.CSS_SELECTOR, "path.point")[0]
    ActionChains(driver).move_to_element(point).pause(0.3).click().perform()
    _wait(driver, _text_in("#circuit-feature-panel", "FADE by offline-proxy, proxy"))
    assert "examples" in driver.find_element(By.CSS_SELECTOR, "#circuit-feature-panel").text

    # The feature page: examples (seen by the explainer / held out), the explanation, scores by rater.
    _open(driver, dash_stack, f"/feature?id={first['id']}", ".pie-example")
    _wait(driver, _text_in("#feature-explanations", "FADE by offline-proxy, proxy"))
    page = driver.find_element(By.CSS_SELECTOR, "body").text
    assert "seen by the explainer" in page and "held out" in page and "Offline heuristic" in page
    assert XSS in [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".pie-explanation-text")]
    assert not driver.find_elements(By.CSS_SELECTOR, "#feature-explanations img, #feature-explanations script")
    assert not driver.find_elements(By.CSS_SELECTOR, ".pie-example[data-split='explain'] input")  # not rateable
    assert driver.execute_script("return window.__xss") is None
    _screenshot(driver, "feature_explained_and_scored")
    assert severe_console_entries(driver) == []


def test_harvest_explain_and_score_one_feature_from_its_page(dash_stack, driver):  # noqa: F811
    from selenium.webdriver.common.by import By

    from backend.store import queries
    from backend.store.db import make_engine, session_factory, transaction
    from tests.browser import TINY_CLT
    engine = make_engine(dash_stack.settings.database_url)
    try:
        with transaction(session_factory(engine)) as s:  # a feature that is stored but was never harvested
            feature_id = queries.get_or_create_feature(s, queries.find_transcoder(s, TINY_CLT), 1, 5).id
    finally:
        engine.dispose()
    if dash_stack.api.get(f"/api/features/{feature_id}").json()["examples"]:
        pytest.skip("feature 1/5 was harvested by an earlier test")  # pragma: no cover
    _open(driver, dash_stack, f"/feature?id={feature_id}", "#feature-interp-launch")
    assert _text_in("#feature-evidence", "not harvested yet")(driver)
    _choose(driver, "feature-interp-corpus", "IOI-like stories")
    driver.find_element(By.CSS_SELECTOR, "#feature-interp-launch").click()
    _wait(driver, _text_in("#feature-interp-status", "explained and scored"), timeout=240)
    _wait(driver, _css("#feature-evidence .pie-example"))
    _wait(driver, _text_in("#feature-explanations", "Offline heuristic"))
    _wait(driver, _text_in("#feature-explanations", "FADE by offline-proxy"))
    assert driver.find_elements(By.CSS_SELECTOR, ".pie-example[data-split='holdout'] input[value='2']")
    _screenshot(driver, "feature_harvested_from_its_page")
    assert severe_console_entries(driver) == []


def test_the_circuits_list_says_which_graphs_a_circuit_has():
    """The demo stores the graph of prompt 0 (key "0"): the list used to show "graphs 0"."""
    from frontend_dash.components.views import graphs_label
    assert graphs_label(["0"]) == "1: prompt 0"
    assert graphs_label(["0", "3", "all"]) == "3: all prompts; prompts 0, 3"
    assert graphs_label([]) == "none"
