"""The demo's flow (`backend.demo.run_pipeline`: prune, graph, explain, score) through the real
API on the tiny model: afterwards every feature node of the stored graph has examples, an
explanation and FADE scores labelled by rater (the `make demo` acceptance, on a tiny model)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.demo import interp_jobs, run_pipeline, server_env
from backend.settings import Settings
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401

PRUNE = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 3, "seed": 0, "method": "fap", "k": 4,
         "batch_size": 3}


def test_the_demo_flow_leaves_every_graph_node_explained_and_scored(api_settings, monkeypatch):
    import backend.demo as demo
    monkeypatch.setattr(demo, "GRAPH_PROMPT", 1)   # any prompt: the graph's and the interpretation's agree
    # The tiny model's corpus: the stories (the default corpus is larger than a test needs).
    monkeypatch.setattr(demo, "interp_jobs", lambda settings, cid, prompt=1: [
        (kind, {**params, "corpus": "stories", "corpus_tokens": 600,
                **({"n_natural": 4, "n_generated": 2, "n_steer_prompts": 2, "n_new_tokens": 2} if kind == "score"
                   else {})})
        for kind, params in interp_jobs(settings, cid, prompt)])
    with TestClient(create_app(api_settings)) as client:
        circuit_id = run_pipeline(client, api_settings, [("prune", PRUNE)])
        circuit = client.get(f"/api/circuits/{circuit_id}").json()
        [graph] = circuit["graphs"]["1"]["graphs"]
        nodes = {(n["layer"], n["feature"]) for n in graph["nodes"] if n["kind"] == "feature"}
        assert nodes
        for layer, index in nodes:
            feature = client.get("/api/features/lookup", params={"transcoder": TINY_CLT, "layer": layer,
                                                                "index": index}).json()
            assert feature["explanations"], (layer, index)
            assert {e["split"] for e in feature["examples"]} <= {"explain", "holdout"}
            if feature["statistics"]["density"] > 0:
                assert feature["examples"]
            scores = client.get(f"/api/explanations/{feature['explanations'][-1]['id']}/scores").json()
            assert scores and all(s["rater"] == "offline-proxy" and s["proxy"] for s in scores)
        # A second run reuses every stored result: the same jobs, served from the store.
        before = client.get("/api/jobs", params={"limit": 100}).json()["total"]
        assert run_pipeline(client, api_settings, [("prune", PRUNE)]) == circuit_id
        assert client.get("/api/jobs", params={"limit": 100}).json()["total"] == before


def test_the_demo_uses_the_llm_only_when_configured_and_passes_its_ports_on(tmp_path):
    offline = Settings(_env_file=None, data_dir=tmp_path, api_port=8137, dash_port=8138)
    assert [(k, p.get("explainer"), p.get("rater")) for k, p in interp_jobs(offline, 3)] == [
        ("explain", "offline", None), ("score", "offline", "offline")]
    llm = offline.model_copy(update={"llm_base_url": "http://127.0.0.1:9/v1", "llm_model": "m"})
    assert [p.get("rater", p["explainer"]) for _, p in interp_jobs(llm, 3)] == ["llm", "llm"]
    env = server_env(offline)
    assert (env["PIESCOPE_API_PORT"], env["PIESCOPE_API_URL"], env["PIESCOPE_DASH_PORT"]) == (
        "8137", "http://127.0.0.1:8137", "8138")
    assert env["PIESCOPE_DATA_DIR"] == str(tmp_path)
