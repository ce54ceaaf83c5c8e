"""Dashboard render time: navigation to a drawn 800-node circuit graph in headless Chromium, and a
6,000-edge edge circuit: its first paint and its redraw when the slider moves.

The store is seeded with a SYNTHETIC but schema-valid circuit (one prompt of 24 tokens, 800 kept
occurrences over 16 layers) and its attribution graph (800 feature nodes, the tokens, the logit,
4,000 links) through `backend.store.queries` — no model runs. The real API (uvicorn) and the Dash
app run on loopback ports; Chromium loads /circuit?id=..&prompt=0 (and the aggregate view) and the
clock stops when every node marker is in the SVG. Target: below 2 s. Prints a Markdown table.

The edge circuit is equally synthetic: GPT-2 small's edge graph (12 layers x 12 heads, 32,491
edges) with 6,000 kept edges (random scores) and attention summaries and patterns of every kept
head on 8 prompts of 16 tokens. First paint: navigation to /edge-circuit?id=.. until all 6,000
edges are drawn (the clientside threshold has run and every trace is in the SVG). Redraw: one
slider step by keyboard (the handle focused, ArrowLeft) until the figure draws one edge fewer,
re-thresholded in the browser with no server round trip.

Supernodes: a HAGD hierarchy of the same graph's features (its links summed by feature, coarsened
by the real `build_hierarchy`, ratio 4) is stored too; first paint is navigation to the prompt
view grouped by its coarsest level but one (?hierarchy=..&level=..) until every supernode is
drawn; redraws are expanding the largest supernode by a click and collapsing it again (unticking
it), each timed until the supernode count has changed.

    python bench/dash_render.py [--runs 5] [--nodes 800] [--links 4000] [--edges 6000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.circuits.graph import Graph  # noqa: E402
from backend.circuits.graph_attribution import aggregate_graphs  # noqa: E402
from backend.circuits.results import (AggregatedFeature, Circuit, FeatureOccurrence, PromptCircuit,  # noqa: E402
                                      Stat)
from backend.settings import Settings  # noqa: E402
from backend.store import queries  # noqa: E402
from backend.store.db import open_store, transaction  # noqa: E402
from bench._util import table  # noqa: E402
from tests.browser import ensure_chromium, new_driver, start_api, start_dash  # noqa: E402

TARGET_S = 2.0
N_LAYERS, N_TOKENS, N_FEATURES = 16, 24, 4096
MODEL, TRANSCODER = "bench-synthetic", "bench-synthetic/clt"


def synthetic(rng: random.Random, n_nodes: int, n_links: int) -> tuple[Circuit, dict]:
    """A circuit with one prompt of `n_nodes` kept occurrences, and its graph with `n_links` links."""
    tokens = [f"tok{i}" for i in range(N_TOKENS)]
    cells = rng.sample([(l, f, p) for l in range(N_LAYERS) for p in range(1, N_TOKENS) for f in range(64)], n_nodes)
    kept = [FeatureOccurrence(layer=l, feature=f * 61 % N_FEATURES, position=p, score=rng.gauss(0, 1),
                              activation=abs(rng.gauss(0, 2)), delta=rng.gauss(0, 1)) for l, f, p in cells]
    prompt = PromptCircuit(index=0, clean=" ".join(tokens), corrupted=" ".join(tokens), tokens=tokens,
                           n_active=4 * n_nodes, kept=kept, kl_last=0.5, kl_all=None, pred_changed=False,
                           faithfulness=0.8, completeness=None)
    features = sorted({(o.layer, o.feature) for o in kept})
    circuit = Circuit(model=MODEL, transcoder=TRANSCODER, task="ioi", method="fap", k=n_nodes, budget="global",
                      corruption="corrupted_prompt", options={}, prompts=[prompt],
                      features=[AggregatedFeature(l, f, 1, 1.0) for l, f in features], kl=Stat(0.5, 0.0, (0.5, 0.5)),
                      pred_change_rate=0.0, faithfulness_mean=0.8, completeness_mean=None, seconds=0.0)
    nodes = [{"node_id": f"{o.layer}_{o.feature}_{o.position}", "kind": "feature", "layer": o.layer,
              "position": o.position, "feature": o.feature, "activation": o.activation, "score": o.score,
              "token": tokens[o.position]} for o in kept]
    nodes += [{"node_id": f"E_{i}_{i}", "kind": "token", "layer": -1, "position": i, "feature": i, "activation": None,
               "score": None, "token": t} for i, t in enumerate(tokens)]
    logit = f"{N_LAYERS + 1}_7_{N_TOKENS - 1}"
    nodes.append({"node_id": logit, "kind": "logit", "layer": N_LAYERS + 1, "position": N_TOKENS - 1, "feature": 7,
                  "activation": None, "score": None, "token": "answer", "token_prob": 0.3})
    sources = [n for n in nodes if n["kind"] != "logit"]
    targets = [n for n in nodes if n["kind"] == "feature"] + [nodes[-1]]
    links = []
    for _ in range(n_links):
        t = rng.choice(targets)
        s = rng.choice([n for n in sources[:n_nodes] if n["layer"] < t["layer"]] or sources[n_nodes:])
        links.append({"source": s["node_id"], "target": t["node_id"], "weight": rng.gauss(0, 1)})
    graph = {"prompt": 0, "tokens": tokens, "answer_token": 7, "nodes": nodes, "links": links}
    return circuit, {"model": MODEL, "transcoder": TRANSCODER, "method": "fap", "k": n_nodes, "graphs": [graph],
                     "aggregate": aggregate_graphs([Graph.from_json(graph)])}


def seed(settings: Settings, circuit: Circuit, graph: dict) -> int:
    """Store the circuit and its graph ("all") with the store's query functions; returns its id."""
    _, sessions = open_store(settings)
    with transaction(sessions) as session:
        model = queries.get_or_create_model(session, MODEL, "synthetic")
        tc = queries.get_or_create_transcoder(session, TRANSCODER, model, {"kind": "clt", "layers": N_LAYERS,
                                                                            "features": N_FEATURES})
        row = queries.save_circuit(session, circuit, "bench-dash-render", model, tc, None)
        session.flush()
        queries.set_circuit_graph(session, row.id, None, graph)
        return row.id


def seed_hierarchy(settings: Settings, graph: dict) -> tuple[int, int]:
    """A HAGD hierarchy over the graph's features (real spectral coarsening of the feature links,
    synthetic everything else) -> (hierarchy id, the level to group by)."""
    import numpy as np

    from backend.hagd.hierarchy import build_hierarchy
    feats = sorted({(n["layer"], n["feature"]) for n in graph["nodes"] if n["kind"] == "feature"})
    where = {f: i for i, f in enumerate(feats)}
    of_node = {n["node_id"]: where[(n["layer"], n["feature"])] for n in graph["nodes"] if n["kind"] == "feature"}
    w = np.zeros((len(feats), len(feats)))
    for link in graph["links"]:
        s, t = of_node.get(link["source"]), of_node.get(link["target"])
        if s is not None and t is not None and s != t:
            w[s, t] += abs(link["weight"])
            w[t, s] += abs(link["weight"])
    tree = build_hierarchy(w, ratio=4.0, top=5, seed=0)
    level = max(1, len(tree.levels) - 2)
    nodes = [{"id": f"{l}_{f}", "kind": "feature", "layer": l, "feature": f, "position": -1, "target": 0.0,
              "fap": float(w[i].sum()), "abs_fap": float(w[i].sum()), "act_mean": 1.0, "n_prompts": 1}
             for i, (l, f) in enumerate(feats)]
    stat = {"sufficiency_mean": 0.5, "sufficiency_std": 0.0, "necessity_mean": 0.5, "necessity_std": 0.0}
    result = {"model": MODEL, "transcoder": TRANSCODER, "task": "ioi", "n_prompts": 1, "config": {"score": "mass"},
              "graph": {"n_nodes": len(nodes), "nodes": nodes, "links": []}, "hierarchy": tree.to_json(),
              "levels": tree.counts(), "search": {"evaluations": 0, "trace": []}, "circuit": [],
              "verification": {"hagd": stat}, "seconds": {"total": 0.0}, "scorer": {}}
    _, sessions = open_store(settings)
    with transaction(sessions) as session:
        model = queries.get_or_create_model(session, MODEL, "synthetic")
        tc = queries.get_or_create_transcoder(session, TRANSCODER, model)
        return queries.save_hierarchy(session, result, "bench-dash-render-hagd", model, tc, None).id, level


SUPERS = ("const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
          "const t = gd && gd.data && gd.data.find(t => t.name === 'supernode'); return t ? t.x.length : -1;")


def _wait_count(driver, want, start: float, timeout: float = 60.0) -> float:
    while driver.execute_script(SUPERS) != want:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the supernode count did not reach {want} in {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def time_supernodes(driver, url: str, n_super: int, runs: int) -> tuple[float, list[float], list[float]]:
    """(first paint s, expand redraws s, collapse redraws s) of the grouped view."""
    from selenium.webdriver.common.action_chains import ActionChains
    start = time.perf_counter()
    driver.get(url)
    first = _wait_count(driver, n_super, start)
    expand, collapse = [], []
    for _ in range(runs):
        index, biggest, cid = driver.execute_script(
            "const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
            "const i = gd.data.findIndex(t => t.name === 'supernode'); const c = gd.data[i].customdata;"
            "let b = 0; c.forEach((d, j) => { if (d[4].split(',').length > c[b][4].split(',').length) b = j; });"
            "return [i, b, c[b][3]];")
        trace = driver.find_elements("css selector", "#circuit-graph .scatterlayer .trace")[index]
        point = trace.find_elements("css selector", "path.point")[biggest]
        ActionChains(driver).move_to_element(point).pause(0.2).perform()
        start = time.perf_counter()
        ActionChains(driver).click().perform()
        expand.append(_wait_count(driver, n_super - 1, start))
        box = driver.find_element("css selector", f"#circuit-expanded input[value='{cid}']")
        start = time.perf_counter()
        box.click()
        collapse.append(_wait_count(driver, n_super, start))
    return first, expand, collapse


def time_render(driver, url: str, n_points: int, timeout: float = 60.0) -> float:
    """Seconds from driver.get(url) until the graph shows at least `n_points` markers."""
    script = "return document.querySelectorAll('#circuit-graph .scatterlayer path.point').length"
    start = time.perf_counter()
    driver.get(url)
    while driver.execute_script(script) < n_points:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{url}: the graph did not render {n_points} points in {timeout} s")
        time.sleep(0.01)
    return time.perf_counter() - start


EDGE_SHAPE = (12, 12, 12)      # GPT-2 small: layers, heads, kv heads
EDGE_PROMPTS, EDGE_TOKENS = 8, 16


def synthetic_edge_circuit(rng: random.Random, n_kept: int):
    """An EdgeCircuit keeping `n_kept` random edges of GPT-2 small's graph, with attention JSON."""
    from backend.edges.attention import circuit_heads
    from backend.edges.graph import EdgeGraph
    from backend.edges.pipeline import EdgeCircuit
    g = EdgeGraph.build(*EDGE_SHAPE)
    ids = g.edge_ids()
    chosen = rng.sample(range(len(ids)), n_kept)
    kept = [{"id": ids[e], "writer": ids[e].split("->")[0], "reader": ids[e].split("->")[1],
             "score": rng.gauss(0, 1)} for e in chosen]
    kept.sort(key=lambda e: -abs(e["score"]))
    tokens = [f"tok{i}" for i in range(EDGE_TOKENS)]

    def pattern() -> list[list[float]]:
        rows = []
        for q in range(EDGE_TOKENS):
            w = [rng.random() for _ in range(q + 1)]
            total = sum(w)
            rows.append([round(x / total, 5) for x in w] + [0.0] * (EDGE_TOKENS - q - 1))
        return rows
    heads = []
    for layer, h in circuit_heads(g, [e["id"] for e in kept]):
        pats = [pattern() for _ in range(EDGE_PROMPTS)]
        top = [{"prompt": i, "query": EDGE_TOKENS - 1, "key": max(range(EDGE_TOKENS), key=lambda k: p[-1][k]),
                "token": "", "weight": max(p[-1])} for i, p in enumerate(pats)]
        for t in top:
            t["token"] = tokens[t["key"]]
        heads.append({"head": f"a{layer}.h{h}", "layer": layer, "index": h, "patterns": pats, "top": top})
    attention = {"n_prompts": EDGE_PROMPTS, "decimals": 5, "heads": heads,
                 "prompts": [{"index": i, "offset": 0, "tokens": tokens} for i in range(EDGE_PROMPTS)]}
    metrics = {"kl": {"mean": 0.1, "std": 0.01, "ci95": [0.09, 0.11]},
               "recovered": {"mean": 0.9, "std": 0.1, "ci95": [0.8, 1.0]},
               "accuracy": {"mean": 1.0, "std": 0.0, "ci95": [1.0, 1.0]}, "recovered_of_means": 0.9}
    return EdgeCircuit(model=MODEL, task="ioi", method="eap", n_prompts=EDGE_PROMPTS, options={}, graph=g.counts(),
                       n_target=n_kept, kept=kept, kept_counts={}, metrics=metrics,
                       cost={"seconds": 0.0, "forwards": 1, "backwards": 1}, details={}, seconds=0.0,
                       attention=attention)


def seed_edge_circuit(settings: Settings, circuit) -> int:
    _, sessions = open_store(settings)
    with transaction(sessions) as session:
        model = queries.get_or_create_model(session, MODEL, "synthetic")
        return queries.save_edge_circuit(session, circuit, "bench-dash-render-edges", model, None).id


# Edges drawn: the move-tos of the edge path shapes, once every shape and trace is in the SVG.
EDGES_DRAWN = ("const gd = document.querySelector('#edge-graph .js-plotly-plot');"
               "if (!gd || !gd.data || !gd._fullLayout || !gd.layout.shapes) return -1;"
               "const shapes = gd.layout.shapes.filter(s => s.name === 'edges');"
               "if (document.querySelectorAll('#edge-graph .scatterlayer .trace').length !== gd.data.length) return -1;"
               "if (document.querySelectorAll('#edge-graph .shapelayer path').length < shapes.length) return -1;"
               "return shapes.reduce((n, s) => n + (s.path.match(/M/g) || []).length, 0);")


def wait_edges(driver, n: int, start: float, timeout: float = 60.0) -> float:
    while driver.execute_script(EDGES_DRAWN) != n:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the edge circuit did not draw {n} edges in {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def time_edge_circuit(driver, url: str, n: int, runs: int) -> dict:
    """First paint (cold, then `runs` warm loads) and `runs` slider steps of one edge each."""
    from selenium.webdriver.common.keys import Keys
    start = time.perf_counter()
    driver.get(url)
    cold = wait_edges(driver, n, start)
    warm = []
    for _ in range(runs):
        start = time.perf_counter()
        driver.get(url)
        warm.append(wait_edges(driver, n, start))
    handle = driver.find_element("css selector", "#edge-slider [role=slider]")
    handle.click()
    wait_edges(driver, n, time.perf_counter())  # a click on the handle leaves the value where it is
    redraws, shown = [], n
    for _ in range(runs):
        start = time.perf_counter()
        handle.send_keys(Keys.ARROW_LEFT)
        shown -= 1
        redraws.append(wait_edges(driver, shown, start))
    return {"cold": cold, "warm": warm, "redraws": redraws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=800)
    parser.add_argument("--links", type=int, default=4000)
    parser.add_argument("--edges", type=int, default=6000, help="kept edges of the synthetic edge circuit")
    args = parser.parse_args()

    ensure_chromium()
    tmp = Path(tempfile.mkdtemp(prefix="piescope-dash-bench-"))
    settings = Settings(models_cache=tmp / "models_cache", data_dir=tmp / "data", db_url=None, api_token=None,
                        _env_file=None)
    circuit, graph = synthetic(random.Random(0), args.nodes, args.links)
    circuit_id = seed(settings, circuit, graph)
    edge_circuit_id = seed_edge_circuit(settings, synthetic_edge_circuit(random.Random(0), args.edges))
    hierarchy_id, level = seed_hierarchy(settings, graph["graphs"][0])
    api_url, stop_api = start_api(settings)
    dash_url, stop_dash = start_dash(settings.model_copy(update={"api_url": api_url}))
    driver = new_driver(tmp / "chromium_profile")
    rows = []
    try:
        n_agg = len(graph["aggregate"]["nodes"])
        for view, query, points in (("prompt 0", "&prompt=0", args.nodes + N_TOKENS + 1),
                                    ("aggregate", "", n_agg)):
            url = f"{dash_url}/circuit?id={circuit_id}{query}"
            cold = time_render(driver, url, points)
            warm = [time_render(driver, url, points) for _ in range(args.runs)]
            rows.append({"view": view, "nodes drawn": points, "links": args.links, "first load s": cold,
                         "median s": statistics.median(warm), "max s": max(warm),
                         "target": f"< {TARGET_S:g} s", "ok": "yes" if statistics.median(warm) < TARGET_S else "NO"})
        edge = time_edge_circuit(driver, f"{dash_url}/edge-circuit?id={edge_circuit_id}", args.edges, args.runs)
        edge_rows = [
            {"view": "edge circuit: first paint", "edges drawn": args.edges, "first load s": edge["cold"],
             "median s": statistics.median(edge["warm"]), "max s": max(edge["warm"]), "target": f"< {TARGET_S:g} s",
             "ok": "yes" if statistics.median(edge["warm"]) < TARGET_S else "NO"},
            {"view": "edge circuit: slider redraw", "edges drawn": args.edges - 1, "first load s": None,
             "median s": statistics.median(edge["redraws"]), "max s": max(edge["redraws"]),
             "target": f"< {TARGET_S:g} s", "ok": "yes" if statistics.median(edge["redraws"]) < TARGET_S else "NO"}]
        from frontend_dash.components.supernodes import grouping
        detail = httpx.get(f"{api_url}/api/hierarchies/{hierarchy_id}", timeout=60).json()
        group = grouping(detail["result"], level)
        feats = {(n["layer"], n["feature"]) for n in graph["graphs"][0]["nodes"] if n["kind"] == "feature"}
        n_super = len({group.clusters[f] for f in feats if f in group.clusters})
        url = f"{dash_url}/circuit?id={circuit_id}&prompt=0&hierarchy={hierarchy_id}&level={level}"
        cold = time_supernodes(driver, url, n_super, 0)[0]
        firsts = [time_supernodes(driver, url, n_super, 0)[0] for _ in range(args.runs)]
        _, expand, collapse = time_supernodes(driver, url, n_super, args.runs)
        for view, paint, redraws in ((f"prompt 0 grouped: level {level}, {n_super} supernodes", cold, firsts),
                                     ("  redraw: expand a supernode (click)", None, expand),
                                     ("  redraw: collapse it (untick)", None, collapse)):
            median = statistics.median(redraws)
            rows.append({"view": view, "nodes drawn": n_super + N_TOKENS + 1, "links": args.links,
                         "first load s": paint, "median s": median, "max s": max(redraws),
                         "target": f"< {TARGET_S:g} s", "ok": "yes" if median < TARGET_S else "NO"})
    finally:
        driver.quit()
        stop_dash()
        stop_api()
    print(f"Dashboard render: navigation -> drawn circuit graph, headless Chromium, {args.runs} runs after a "
          f"first load.\nData: SYNTHETIC but valid circuit + graph ({args.nodes} kept occurrences over {N_LAYERS} "
          f"layers x {N_TOKENS} tokens, {args.links} links), seeded through backend.store.queries; real API and "
          "Dash app on loopback.\n")
    print(table(rows))
    print(f"\nEdge circuit: SYNTHETIC, GPT-2 small's graph ({'x'.join(map(str, EDGE_SHAPE))}: 32,491 edges), "
          f"{args.edges} kept with random scores, attention of every kept head on {EDGE_PROMPTS} prompts x "
          f"{EDGE_TOKENS} tokens. First paint: navigation until every edge is drawn ({args.runs} runs after a first "
          f"load); redraw: one slider step (keyboard), re-thresholded in the browser ({args.runs} steps).\n")
    print(table(edge_rows))


if __name__ == "__main__":
    main()
