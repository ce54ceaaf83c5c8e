"""The explain-and-score flow through the HTTP API on a tiny Llama + random CLT, offline
explainer and rater: prune job -> explain job -> score job -> explanations, scores and cost."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401

PRUNE = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 3, "seed": 0, "method": "fap", "k": 4,
         "batch_size": 3}


@pytest.fixture
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


def run_job(client: TestClient, url: str, body: dict, timeout: float = 180.0) -> dict:
    response = client.post(url, json=body)
    assert response.status_code in (200, 202), response.text
    job = response.json()
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job["error"]
    return job


def test_prune_explain_score_through_the_api(client):
    circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
    features = client.get(f"/api/circuits/{circuit_id}").json()["features"]
    assert features

    explain = {"circuit_id": circuit_id, "explainer": "offline", "corpus": "stories", "corpus_tokens": 600}
    job = run_job(client, "/api/jobs", {"kind": "explain", "params": explain})
    assert job["circuit_id"] == circuit_id

    view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    assert len(view["features"]) == len(features)
    for feat in view["features"]:
        stats = feat["statistics"]
        assert set(stats) >= {"histogram", "density", "max_activation", "logit_lens", "n_tokens"}
        assert len(stats["histogram"]["edges"]) == len(stats["histogram"]["counts"]) + 1
        assert 0.0 <= stats["density"] <= 1.0 and stats["n_tokens"] >= 600
        assert len(stats["logit_lens"]["top"]) == 10 and len(stats["logit_lens"]["bottom"]) == 10
        if stats["density"] > 0:
            assert feat["examples"] and feat["examples"][0]["quantile"] == 0
            top = feat["examples"][0]
            assert len(top["tokens"]) == len(top["activations"])
            assert top["max_activation"] == pytest.approx(max(top["activations"]), abs=1e-4)
        [expl] = feat["explanations"]
        assert expl["source"] == "offline" and expl["model"] == "offline-heuristic-v1"
        assert "heuristic" in expl["text"]
        # The same explanations through the features router.
        listed = client.get(f"/api/features/{feat['id']}/explanations").json()
        assert [e["id"] for e in listed] == [expl["id"]]

    cost = client.get(f"/api/circuits/{circuit_id}").json()["cost"]
    assert cost["explain_calls"] == len(features) and cost["explain_tokens"] == 0
    assert cost["active_features"] >= len(features)
    assert cost["calls_if_all_active"] == cost["active_features"]

    score = {"circuit_id": circuit_id, "rater": "offline", "corpus": "stories", "n_natural": 6, "n_generated": 4,
             "n_steer_prompts": 1, "n_new_tokens": 3, "factors": [-10, 0, 10]}
    run_job(client, "/api/jobs", {"kind": "score", "params": score})
    view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    metrics = set()
    for feat in view["features"]:
        expl = feat["explanations"][0]
        scores = client.get(f"/api/explanations/{expl['id']}/scores").json()
        assert scores == expl["scores"]
        for s in scores:
            assert s["rater"] == "offline-proxy" and 0.0 <= s["value"] <= 1.0
            metrics.add(s["metric"])
    assert metrics and metrics <= {"clarity", "responsiveness", "purity", "faithfulness"}
    cost = client.get(f"/api/circuits/{circuit_id}").json()["cost"]
    assert cost["score_calls"] > 0 and cost["score_tokens"] == 0 and cost["explain_calls"] == len(features)
    assert cost["rater"] == "offline-proxy"


def test_human_example_ratings_give_human_scores(client):
    circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
    # No LLM endpoint is configured: asking for the LLM explainer is refused before queueing.
    refused = client.post("/api/jobs", json={"kind": "explain", "params": {
        "circuit_id": circuit_id, "explainer": "llm"}})
    assert refused.status_code == 422 and "PIESCOPE_LLM_BASE_URL" in refused.json()["detail"]
    assert client.post("/api/jobs", json={"kind": "score", "params": {"circuit_id": 999}}).status_code == 404
    run_job(client, "/api/jobs", {"kind": "explain", "params": {
        "circuit_id": circuit_id, "corpus": "stories", "corpus_tokens": 600}})
    view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    feat = max(view["features"], key=lambda f: len(f["examples"]))
    assert len(feat["examples"]) >= 2
    expl = feat["explanations"][0]
    # A person rates the top example 2 and the lowest one 0 in the dashboard.
    for example, rating in ((feat["examples"][0], 2), (feat["examples"][-1], 0)):
        r = client.post(f"/api/explanations/{expl['id']}/annotations",
                        json={"rating": rating, "label": f"example:{example['rank']}"})
        assert r.status_code == 201
    run_job(client, "/api/jobs", {"kind": "score", "params": {
        "circuit_id": circuit_id, "corpus": "stories", "n_natural": 4, "n_generated": 2, "faithfulness": False}})
    human = {s["metric"]: s["value"] for s in client.get(f"/api/explanations/{expl['id']}/scores").json()
             if s["rater"] == "human"}
    top, low = feat["examples"][0]["max_activation"], feat["examples"][-1]["max_activation"]
    expected = 1.0 if top > low else 0.0
    assert human == {"responsiveness": pytest.approx(expected), "purity": pytest.approx(1.0 if top > low else 0.5)}


def test_cli_explains_and_scores_a_circuit_file(api_settings, tmp_path, capsys):
    import argparse
    import json

    from backend import jobs as job_functions
    from backend.cli.interp import add_parsers
    from backend.store import queries
    from backend.store.db import open_store

    params = job_functions.normalise(job_functions.PruneParams(**PRUNE))
    circuit = job_functions.run_prune(job_functions.JobContext(api_settings), params).result
    path = tmp_path / "circuit.json"
    path.write_text(json.dumps(circuit.to_json()))
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["explain", "--circuit", str(path), "--corpus", "stories", "--corpus-tokens", "300"])
    args.run(args, api_settings)
    out = capsys.readouterr().out
    assert f"explained {len(circuit.features)} features" in out and "heuristic" in out
    args = parser.parse_args(["score", "--circuit", str(path), "--corpus", "stories", "--n-natural", "4",
                              "--n-generated", "2", "--no-faithfulness"])
    args.run(args, api_settings)
    out = capsys.readouterr().out
    assert "rater offline-proxy (a proxy, not a judgement of meaning)" in out

    engine, sessions = open_store(api_settings)
    with sessions() as session:
        rows, total = queries.list_circuits(session)
        assert total == 1  # the same file imports to the same circuit
        cost = queries.get_circuit(session, rows[0].id).cost
    engine.dispose()
    assert cost["explain_calls"] == len(circuit.features) and cost["score_calls"] > 0
    assert cost["active_features"] >= len(circuit.features)


def test_examples_keep_their_quantile_through_the_api(client):
    """Harvested examples are stored with the activation quantile they were sampled from."""
    circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
    run_job(client, "/api/jobs", {"kind": "explain", "params": {"circuit_id": circuit_id, "explainer": "offline",
                                                                 "corpus": "stories", "corpus_tokens": 600}})
    data = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    feature = next(f for f in data["features"] if f["examples"])
    quantiles = [e["quantile"] for e in feature["examples"]]
    assert quantiles[0] == 0 and quantiles == sorted(quantiles)
    via_features = client.get(f"/api/features/{feature['id']}/examples").json()
    assert [e["quantile"] for e in via_features] == quantiles
