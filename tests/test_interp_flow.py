"""The explain-and-score flow through the HTTP API on a tiny Llama + random CLT, offline
explainer and rater: prune job -> explain job -> score job -> explanations, scores and cost."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.interp.explainers import FeatureInput, OfflineExplainer
from backend.interp.raters import OfflineRater
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
            assert s["rater"] == "offline-proxy" and s["proxy"] is True and 0.0 <= s["value"] <= 1.0
            metrics.add(s["metric"])
    assert metrics and metrics <= {"clarity", "responsiveness", "purity", "faithfulness"}
    cost = client.get(f"/api/circuits/{circuit_id}").json()["cost"]
    assert cost["score_calls"] > 0 and cost["score_tokens"] == 0 and cost["explain_calls"] == len(features)
    assert cost["rater"] == "offline-proxy" and cost["rater_proxy"] is True


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
    def held_out(f):
        return [e for e in f["examples"] if e["split"] == "holdout"]
    feat = max(view["features"], key=lambda f: (len(held_out(f)), len(f["examples"])))
    held = held_out(feat)
    assert len(held) >= 2 and any(e["split"] == "explain" for e in feat["examples"])
    expl = feat["explanations"][0]
    # A person rates the top held-out example 2 and the lowest one 0 in the dashboard; a rating of
    # an example the explainer saw (here: a 0 of the top one) must not count.
    seen = next(e for e in feat["examples"] if e["split"] == "explain")
    for example, rating in ((held[0], 2), (held[-1], 0), (seen, 0)):
        r = client.post(f"/api/explanations/{expl['id']}/annotations",
                        json={"rating": rating, "label": f"example:{example['rank']}"})
        assert r.status_code == 201
    score = {"circuit_id": circuit_id, "corpus": "stories", "n_natural": 4, "n_generated": 2, "faithfulness": False}
    run_job(client, "/api/jobs", {"kind": "score", "params": score})
    human = {s["metric"]: s["value"] for s in client.get(f"/api/explanations/{expl['id']}/scores").json()
             if s["rater"] == "human"}
    top, low = held[0]["max_activation"], held[-1]["max_activation"]
    expected = 1.0 if top > low else 0.0
    assert human == {"responsiveness": pytest.approx(expected), "purity": pytest.approx(1.0 if top > low else 0.5)}
    # The same request again is served from the store, until a new rating makes it stale.
    again = client.post("/api/jobs", json={"kind": "score", "params": score}).json()
    assert again["reused"] and again["status"] == "done"
    client.post(f"/api/explanations/{expl['id']}/annotations",
                json={"rating": 1, "label": f"example:{held[0]['rank']}"})
    assert not client.post("/api/jobs", json={"kind": "score", "params": score}).json()["reused"]


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
    quantiles = [(e["split"], e["quantile"]) for e in feature["examples"]]
    assert quantiles[0] == ("explain", 0) and quantiles == sorted(quantiles)   # per split, top examples first
    via_features = client.get(f"/api/features/{feature['id']}/examples").json()
    assert [(e["split"], e["quantile"]) for e in via_features] == quantiles
    detail = client.get(f"/api/features/{feature['id']}").json()
    assert [e["split"] for e in detail["examples"]] == [s for s, _ in quantiles]


# ------------------------------------------------------------------------------ no leakage

class SeeingExplainer(OfflineExplainer):
    """The offline explainer, keeping what it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[FeatureInput] = []

    def explain_all(self, inputs):
        self.seen += list(inputs)
        return super().explain_all(inputs)


class SeeingRater(OfflineRater):
    """The offline rater, keeping every text it rated."""

    def __init__(self) -> None:
        super().__init__()
        self.rated: list[str] = []

    def rate(self, explanation, texts):
        self.rated += list(texts)
        return super().rate(explanation, texts)


def _doc(example: dict) -> int:
    return int(dict(part.split("=") for part in example["source"].split(";"))["doc"])


def test_the_explainer_and_the_raters_never_see_the_same_texts(client, api_settings):
    from backend import jobs as job_functions
    from backend.interp.harvest import HarvestConfig, split_of
    from backend.interp.pipeline import ScoreConfig, explain_circuit, score_circuit, tokens_to_text
    from backend.store.db import open_store
    from backend.store.interp import InterpStore

    circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
    engine, sessions = open_store(api_settings)
    try:
        store = InterpStore(sessions)
        info = store.circuit(circuit_id)
        context = job_functions.JobContext(api_settings)
        adapter, transcoder = context.adapter(info.model), context.transcoder(info.transcoder)
        docs = job_functions.corpus_documents("stories")
        explainer, rater = SeeingExplainer(), SeeingRater()
        explain_circuit(adapter, transcoder, store, info.transcoder, info.features, docs, explainer, "stories",
                        HarvestConfig(n_tokens=800))
        report = score_circuit(adapter, transcoder, store, info.transcoder, info.features, docs, rater,
                               config=ScoreConfig(n_natural=6, n_generated=3, n_steer_prompts=2, n_new_tokens=3,
                                                  factors=(-10.0, 0.0, 10.0)), corpus="stories")
        states = store.features(info.transcoder, info.features)
    finally:
        engine.dispose()
    assert report.scored and not report.errors
    shown = [e for i in explainer.seen for e in i.examples]
    assert shown and all(e["split"] == "explain" and split_of(_doc(e)) == "explain" for e in shown)
    assert all(set(i.statistics) == {"logit_lens", "max_activation"} for i in explainer.seen)
    seen_docs = {_doc(e) for e in shown}
    held = [e for st in states.values() for e in st.examples if e["split"] == "holdout"]
    rated_docs = {_doc(e) for e in held} | set(report.texts["natural_docs"]) | set(report.texts["steer_docs"])
    assert held and rated_docs and not rated_docs & seen_docs           # disjoint documents
    shown_texts = {tokens_to_text(e["tokens"]) for e in shown}
    assert rater.rated and not shown_texts & set(rater.rated)            # and no shown text was rated
    assert {tokens_to_text(e["tokens"]) for e in held} <= set(rater.rated)


def test_one_feature_and_one_prompt_jobs(client):
    circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
    circuit = client.get(f"/api/circuits/{circuit_id}").json()
    on_prompt = {(o["layer"], o["feature"]) for o in circuit["prompts"][1]["kept"]}
    run_job(client, "/api/jobs", {"kind": "explain", "params": {"circuit_id": circuit_id, "prompt": 1,
                                                                 "corpus": "stories", "corpus_tokens": 600}})
    view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    explained = {(f["layer"], f["feature"]) for f in view["features"] if f["explanations"]}
    assert explained == on_prompt
    other = next(f for f in view["features"] if (f["layer"], f["feature"]) not in on_prompt)
    job = run_job(client, "/api/jobs", {"kind": "explain", "params": {"feature_id": other["id"],
                                                                       "corpus": "stories", "corpus_tokens": 600}})
    assert job["circuit_id"] is None
    feature = client.get(f"/api/features/{other['id']}").json()
    assert feature["examples"] and [e["source"] for e in feature["explanations"]] == ["offline"]
    run_job(client, "/api/jobs", {"kind": "score", "params": {"feature_id": other["id"], "corpus": "stories",
                                                               "n_natural": 4, "n_generated": 2,
                                                               "faithfulness": False}})
    scores = client.get(f"/api/explanations/{feature['explanations'][0]['id']}/scores").json()
    assert scores and all(s["proxy"] for s in scores)
    for bad in ({"circuit_id": circuit_id, "feature_id": other["id"]}, {}, {"feature_id": other["id"], "prompt": 0}):
        assert client.post("/api/jobs", json={"kind": "explain", "params": bad}).status_code == 422
    far = client.post("/api/jobs", json={"kind": "score", "params": {"circuit_id": circuit_id, "prompt": 50}})
    assert far.status_code in (400, 422) and "out of range" in far.text
    listing = client.get("/api/interpreters").json()
    assert [e["name"] for e in listing["explainers"]] == ["offline"]     # no PIESCOPE_LLM_* in the tests
    assert [(r["name"], r["proxy"]) for r in listing["raters"]] == [("offline", True)]
