"""End to end: jobs through the HTTP API on a tiny Llama + random CLT, checked against direct
calls of the PIE engine with the same parameters; and 20 concurrent writers while jobs store
their results. Everything runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("backend.circuits.pipeline")

from fastapi.testclient import TestClient  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.api.app import create_app  # noqa: E402
from backend.circuits import pipeline  # noqa: E402
from backend.store import queries  # noqa: E402
from backend.store.db import transaction  # noqa: E402
from tests.api_fixtures import (TINY_CLT, TINY_MODEL, pg_cluster, store_settings, store_url,  # noqa: E402,F401
                                tiny_cache)

DATASET = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 4, "seed": 0}
SWEEP = {**DATASET, "methods": ["fap", "random"], "ks": [4, 2], "random_seeds": 1, "batch_size": 1}
PRUNE = {**DATASET, "method": "fap", "k": 3, "batch_size": 2}


@pytest.fixture
def api_settings(store_settings):
    """Every test here runs on both backends."""
    return store_settings


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


def test_prune_job_stores_the_circuit_and_a_failing_job_leaves_it_alone(api_settings, tmp_path):
    import shutil

    from backend.models.transcoder import Transcoder, TranscoderConfig
    from backend.models.transcoder_files import save_transcoder
    cache = tmp_path / "models_cache"  # the tiny cache plus a transcoder whose shapes do not fit the model
    shutil.copytree(api_settings.models_cache, cache)
    save_transcoder(Transcoder.random(TranscoderConfig(kind="clt", n_layers=3, d_model=8, n_features=4,
                                                       activation="relu", model_name=TINY_MODEL)),
                    cache / TINY_MODEL / "narrow")
    settings = api_settings.model_copy(update={"models_cache": cache})
    with TestClient(create_app(settings)) as client:
        job, _ = run_to_end(client, {"kind": "prune", "params": PRUNE})
        assert job["status"] == "done", job["error"]
        circuit = client.get(f"/api/circuits/{job['circuit_id']}").json()
        params = job_functions.normalise(job_functions.PruneParams(**PRUNE))
        direct = job_functions.run_prune(job_functions.JobContext(settings), params).result
        assert untimed(circuit["prompts"]) == untimed(direct.to_json()["prompts"])
        assert circuit["kl_mean"] == pytest.approx(direct.kl.mean)
        assert all(len(p["kept"]) <= 3 for p in circuit["prompts"])

        bad, _ = run_to_end(client, {"kind": "prune", "params": {**PRUNE, "transcoder": f"{TINY_MODEL}/narrow"}})
        assert bad["status"] == "failed" and "d_model" in bad["error"], bad["error"]
        assert str(cache) not in bad["error"]  # the reason, without server paths
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
    if api_settings.db_url:
        monkeypatch.setenv("PIESCOPE_DB_URL", api_settings.db_url)
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


# ------------------------------------------------------------------------------ concurrent writers

CLIENTS = 20
ROUNDS = 4
N_EXPLANATIONS = 3  # shared by the clients: every edit of one contends for its revision counter


@pytest.fixture
def live_server(api_settings):
    """The worker on 127.0.0.1 (an ephemeral port) in a thread; yields (base URL, app)."""
    import uvicorn
    app = create_app(api_settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)


def test_twenty_clients_writing_while_jobs_store_results_lose_nothing(live_server):
    """20 clients edit shared explanations, annotate, rate and score while prune jobs store
    circuits: every write answers 2xx and is there afterwards, and every explanation's revisions
    run 1..R without a gap or a duplicate."""
    import httpx
    base, app = live_server
    with transaction(app.state.sessions) as s:
        model = queries.get_or_create_model(s, TINY_MODEL, "llama")
        tc = queries.get_or_create_transcoder(s, TINY_CLT, model)
        feature_id = queries.get_or_create_feature(s, tc, 0, 1).id
    http = httpx.Client(base_url=base, timeout=120)
    explanations = [http.post(f"/api/features/{feature_id}/explanations", json={"text": f"original {e}"}).json()["id"]
                    for e in range(N_EXPLANATIONS)]
    jobs = [http.post("/api/jobs", json={"kind": "prune", "params": {**PRUNE, "k": k}}).json()["id"] for k in (2, 3)]
    start = threading.Barrier(CLIENTS)

    def writer(i: int) -> list[tuple[str, int, str, int]]:
        """One client's writes: (what, explanation id, text or label, HTTP status / revision)."""
        done = []
        with httpx.Client(base_url=base, timeout=120) as c:
            start.wait()
            for r in range(ROUNDS):
                eid = explanations[(i + r) % N_EXPLANATIONS]
                text = f"client {i} round {r}"
                edit = c.patch(f"/api/explanations/{eid}", json={"text": text, "author": f"c{i}"})
                assert edit.status_code == 200, edit.text
                done.append(("edit", eid, text, edit.json()["revision"]))
                label = f"c{i}-r{r}"
                note = c.post(f"/api/explanations/{eid}/annotations", json={"rating": r % 3, "label": label})
                assert note.status_code == 201, note.text
                done.append(("rating", eid, label, note.json()["rating"]))
                comment = c.post(f"/api/features/{feature_id}/annotations", json={"comment": label})
                assert comment.status_code == 201, comment.text
                score = c.post(f"/api/explanations/{eid}/scores", json={"metric": label, "value": i + r / 10})
                assert score.status_code == 201, score.text
                done.append(("score", eid, label, 0))
        return done

    with ThreadPoolExecutor(CLIENTS) as pool:
        writes = [w for result in pool.map(writer, range(CLIENTS)) for w in result]

    deadline = time.monotonic() + 300
    for job_id in jobs:
        while (job := http.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "done", job["error"]
        assert http.get(f"/api/circuits/{job['circuit_id']}").status_code == 200

    for eid in explanations:
        edits = [(text, rev) for what, e, text, rev in writes if what == "edit" and e == eid]
        current = http.get(f"/api/explanations/{eid}").json()
        history = http.get(f"/api/explanations/{eid}/revisions").json()
        assert current["revision"] == 1 + len(edits) == len(history)
        assert [h["revision"] for h in history] == list(range(1, len(edits) + 2))
        assert sorted(rev for _, rev in edits) == list(range(2, len(edits) + 2))  # each edit its own number
        by_revision = {h["revision"]: h["text"] for h in history}
        assert all(by_revision[rev] == text for text, rev in edits)  # each edit's text at its revision
        assert current["text"] == history[-1]["text"]
        notes = http.get(f"/api/explanations/{eid}/annotations").json()
        assert sorted(n["label"] for n in notes) == sorted(t for w, e, t, _ in writes if w == "rating" and e == eid)
        scores = http.get(f"/api/explanations/{eid}/scores").json()
        assert sorted(s["metric"] for s in scores) == sorted(t for w, e, t, _ in writes if w == "score" and e == eid)
    comments = http.get(f"/api/features/{feature_id}/annotations").json()
    assert len([c for c in comments if c["explanation_id"] is None]) == CLIENTS * ROUNDS
    http.close()
