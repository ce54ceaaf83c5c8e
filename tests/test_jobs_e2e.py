"""End to end: jobs through the HTTP API on a tiny Llama + random CLT, checked against direct
calls of the PIE engine with the same parameters."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("backend.circuits.pipeline")

from fastapi.testclient import TestClient  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.api.app import create_app  # noqa: E402
from backend.circuits import pipeline  # noqa: E402
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: E402,F401

DATASET = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 4, "seed": 0}
SWEEP = {**DATASET, "methods": ["fap", "random"], "ks": [4, 2], "random_seeds": 1, "batch_size": 1}
PRUNE = {**DATASET, "method": "fap", "k": 3, "batch_size": 2}


@pytest.fixture
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


def untimed(data):
    """`data` as plain JSON without wall-clock fields (`seconds`, `prep_seconds`), for comparing runs."""
    data = json.loads(json.dumps(data))

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(data)


def run_to_end(client: TestClient, body: dict, timeout: float = 120.0) -> tuple[dict, list[tuple[str, float]]]:
    """POST a job, poll it until it ends; returns the final job and the (status, progress) seen."""
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    seen = [(job["status"], job["progress"])]
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
        job = client.get(f"/api/jobs/{job['id']}").json()
        seen.append((job["status"], job["progress"]))
    return job, seen


def test_sweep_job_lifecycle_matches_a_direct_run_and_is_reused(client, api_settings, monkeypatch):
    job, seen = run_to_end(client, {"kind": "sweep", "params": SWEEP})
    assert job["status"] == "done", job["error"]
    progress = [p for _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and seen[0][0] == "queued"
    assert job["links"]["sweep"] == f"/api/sweeps/{job['sweep_id']}"
    stored = client.get(job["links"]["sweep"]).json()["result"]

    params = job_functions.normalise(job_functions.SweepParams(**SWEEP))
    direct = job_functions.run_sweep(job_functions.JobContext(api_settings), params).result
    assert untimed(stored) == untimed(direct.to_json())

    def must_not_run(*args, **kwargs):
        raise AssertionError("an identical request must be served from the store")
    monkeypatch.setattr(pipeline, "run_sweep", must_not_run)
    again = client.post("/api/jobs", json={"kind": "sweep", "params": {**SWEEP, "ks": [2, 4, 4]}})
    assert again.status_code == 200 and again.json()["reused"]
    assert (again.json()["id"], again.json()["sweep_id"]) == (job["id"], job["sweep_id"])
    assert client.get("/api/sweeps").json()["total"] == 1


def test_prune_job_stores_the_circuit_and_a_failing_job_leaves_it_alone(client, api_settings):
    job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
    assert job["status"] == "done", job["error"]
    circuit = client.get(f"/api/circuits/{job['circuit_id']}").json()
    params = job_functions.normalise(job_functions.PruneParams(**PRUNE))
    direct = job_functions.run_prune(job_functions.JobContext(api_settings), params).result
    assert untimed(circuit["prompts"]) == untimed(direct.to_json()["prompts"])
    assert circuit["kl_mean"] == pytest.approx(direct.kl.mean)
    assert all(len(p["kept"]) <= 3 for p in circuit["prompts"])

    bad, _ = run_to_end(client, {"kind": "prune", "params": {**PRUNE, "corruption": "no-such-corruption"}})
    assert bad["status"] == "failed" and "no-such-corruption" in bad["error"]
    assert client.get(f"/api/circuits/{job['circuit_id']}").json() == circuit
    assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "done"
    listed = client.get("/api/circuits", params={"model": TINY_MODEL, "task": "ioi", "method": "fap", "k": 3})
    assert [c["id"] for c in listed.json()["items"]] == [job["circuit_id"]]


def test_graph_job_stores_the_graph_on_the_circuit(client):
    pytest.importorskip("backend.circuits.graph")
    job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
    assert job["status"] == "done", job["error"]
    graph_job, _ = run_to_end(client, {"kind": "graph", "params": {"circuit_id": job["circuit_id"], "prompt": 0}})
    assert graph_job["status"] == "done", graph_job["error"]
    circuit = client.get(f"/api/circuits/{job['circuit_id']}").json()
    assert circuit["graph_keys"] == ["0"]
    graph = circuit["graphs"]["0"]
    assert [g["prompt"] for g in graph["graphs"]] == [0]
    kept = {f"{o['layer']}_{o['feature']}_{o['position']}" for o in circuit["prompts"][0]["kept"]}
    assert kept <= {n["node_id"] for n in graph["graphs"][0]["nodes"]}
    assert graph["graphs"][0]["links"] and graph["aggregate"]["nodes"]
    exported = client.get(f"/api/circuits/{job['circuit_id']}/graphs/0/neuronpedia").json()
    assert {"metadata", "qParams", "nodes", "links"} <= set(exported)
    assert kept <= {n["node_id"] for n in exported["nodes"]}
    missing = client.get(f"/api/circuits/{job['circuit_id']}/graphs/all/neuronpedia")
    assert missing.status_code == 404 and "no graph" in missing.json()["detail"]


def test_graph_targets_are_stored_apart_and_the_cli_builds_the_same_job(client, api_settings, monkeypatch, capsys):
    from backend.cli import main
    job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
    circuit_id = job["circuit_id"]
    logit_job, _ = run_to_end(client, {"kind": "graph", "params": {"circuit_id": circuit_id, "prompt": 0,
                                                                  "target": "logit"}})
    assert logit_job["status"] == "done", logit_job["error"]
    circuit = client.get(f"/api/circuits/{circuit_id}").json()
    assert circuit["graph_keys"] == ["0@logit"]
    target = circuit["graphs"]["0@logit"]["graphs"][0]["target"]
    assert target["kind"] == "logit" and target["label"].startswith("logit(") and " - " not in target["label"]
    assert client.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": circuit_id,
                                                                      "target": "loss"}}).status_code == 422
    # `piescope graph build` runs the same job in-process on the same store.
    monkeypatch.setenv("PIESCOPE_MODELS_CACHE", str(api_settings.models_cache))
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(api_settings.data_dir))
    assert main(["graph", "build", "--circuit", str(circuit_id), "--prompt", "0"]) == 0
    assert "stored graph '0'" in capsys.readouterr().out
    circuit = client.get(f"/api/circuits/{circuit_id}").json()
    assert circuit["graph_keys"] == ["0", "0@logit"]
    metric = circuit["graphs"]["0"]["graphs"][0]["target"]
    assert metric["kind"] == "metric" and metric["label"].count("logit(") == 2 and " - " in metric["label"]
    assert main(["graph", "build", "--circuit", str(circuit_id), "--prompt", "99"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_a_stored_circuit_registers_its_features(client):
    job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
    circuit = client.get(f"/api/circuits/{job['circuit_id']}").json()
    first = circuit["features"][0]
    found = client.get("/api/features/lookup", params={"transcoder": circuit["transcoder"],
                                                       "layer": first["layer"], "index": first["feature"]})
    assert found.status_code == 200 and found.json()["layer"] == first["layer"]


def test_a_cached_circuit_read_sees_a_new_graph(client):
    """Reads are cached by the circuit's revision, which every update bumps."""
    job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
    first = client.get(f"/api/circuits/{job['circuit_id']}").json()
    assert client.get(f"/api/circuits/{job['circuit_id']}").json() == first  # served from the cache
    run_to_end(client, {"kind": "graph", "params": {"circuit_id": job["circuit_id"], "prompt": 0}})
    after = client.get(f"/api/circuits/{job['circuit_id']}").json()
    assert first["graph_keys"] == [] and after["graph_keys"] == ["0"]
