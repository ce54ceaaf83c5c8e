"""Dashboard render time: navigation to a drawn 800-node circuit graph in headless Chromium.

The store is seeded with a SYNTHETIC but schema-valid circuit (one prompt of 24 tokens, 800 kept
occurrences over 16 layers) and its attribution graph (800 feature nodes, the tokens, the logit,
4,000 links) through `backend.store.queries` — no model runs. The real API (uvicorn) and the Dash
app run on loopback ports; Chromium loads /circuit?id=..&prompt=0 (and the aggregate view) and the
clock stops when every node marker is in the SVG. Target: below 2 s. Prints a Markdown table.

    python bench/dash_render.py [--runs 5] [--nodes 800] [--links 4000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=800)
    parser.add_argument("--links", type=int, default=4000)
    args = parser.parse_args()

    ensure_chromium()
    tmp = Path(tempfile.mkdtemp(prefix="piescope-dash-bench-"))
    settings = Settings(models_cache=tmp / "models_cache", data_dir=tmp / "data", db_url=None, api_token=None,
                        _env_file=None)
    circuit, graph = synthetic(random.Random(0), args.nodes, args.links)
    circuit_id = seed(settings, circuit, graph)
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
    finally:
        driver.quit()
        stop_dash()
        stop_api()
    print(f"Dashboard render: navigation -> drawn circuit graph, headless Chromium, {args.runs} runs after a "
          f"first load.\nData: SYNTHETIC but valid circuit + graph ({args.nodes} kept occurrences over {N_LAYERS} "
          f"layers x {N_TOKENS} tokens, {args.links} links), seeded through backend.store.queries; real API and "
          "Dash app on loopback.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
