"""The HTTP API: listings, validation and security, the executor's lifecycle, stored results,
explanations and annotations. Jobs here never load a model (see test_jobs_e2e.py for that)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from backend.api.app import create_app
from backend.api.jobs import JobKind
from backend.store import queries
from backend.store.db import make_engine, session_factory, transaction, upgrade_to_head
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401 (fixtures)
from tests.test_store import make_circuit, make_sweep


@pytest.fixture
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


def prune_body(**overrides) -> dict:
    params = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 4, "method": "fap", "k": 8}
    params.update(overrides)
    return {"kind": "prune", "params": params}


def detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


# ------------------------------------------------------------------------------ listings

def test_listings_name_the_tiny_model_and_transcoder(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    assert TINY_MODEL in [m["name"] for m in client.get("/api/models").json()]
    assert "ioi" in [t["name"] for t in client.get("/api/tasks").json()]
    transcoders = client.get("/api/transcoders").json()
    assert [t["name"] for t in transcoders] == [TINY_CLT]
    assert transcoders[0]["summary"]["layers"] == 3
    assert "/api/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_methods_come_from_the_selection_registry(client):
    response = client.get("/api/methods")
    try:
        from backend.circuits.selection import list_methods
    except ImportError:
        assert response.status_code == 503 and "registry" in detail(response)
    else:
        assert response.json() == list_methods()


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("model", ["/etc/passwd", "../tiny-llama", "tiny-llama/model", "C:\\models\\x", ""])
def test_a_path_where_a_model_name_is_expected_is_rejected(client, model):
    response = client.post("/api/jobs", json=prune_body(model=model))
    assert response.status_code == 422
    assert "model" in str(detail(response))


@pytest.mark.parametrize("transcoder", ["../../etc", "/abs/path/clt", "tiny-llama/../x", "tiny-llama/clt/.."])
def test_a_path_where_a_transcoder_name_is_expected_is_rejected(client, transcoder):
    response = client.post("/api/jobs", json=prune_body(transcoder=transcoder))
    assert response.status_code in (404, 422)
    assert "transcoder" in detail(response)


def test_a_file_path_task_option_is_rejected(client):
    response = client.post("/api/jobs", json=prune_body(task="jsonl", task_options={"path": "/etc/passwd"}))
    assert response.status_code == 422 and "path" in detail(response)


def test_unknown_model_is_404_with_the_known_names(client):
    response = client.post("/api/jobs", json=prune_body(model="no-such-model", transcoder="no-such-model/clt"))
    assert response.status_code == 404
    assert "no-such-model" in detail(response) and "gemma-3-270m" in detail(response)


def test_unknown_transcoder_is_404(client):
    response = client.post("/api/jobs", json=prune_body(transcoder="tiny-llama/nope"))
    assert response.status_code == 404 and TINY_CLT in detail(response)


def test_transcoder_of_another_model_is_422(client, api_settings):
    response = client.post("/api/jobs", json=prune_body(model="gemma-3-270m"))
    assert response.status_code == 422 and "belongs to model" in detail(response)


def test_unknown_task_is_404(client):
    response = client.post("/api/jobs", json=prune_body(task="no-such-task"))
    assert response.status_code == 404 and "known tasks" in detail(response)


def test_unknown_task_option_is_422(client):
    response = client.post("/api/jobs", json=prune_body(task_options={"colour": "red"}))
    assert response.status_code == 422 and "colour" in detail(response)


def test_unknown_method_is_404(client):
    pytest.importorskip("backend.circuits.selection")
    response = client.post("/api/jobs", json=prune_body(method="no-such-method"))
    assert response.status_code == 404 and "known methods" in detail(response)


@pytest.mark.parametrize("overrides", [{"k": 0}, {"k": 100_001}, {"n": 0}, {"n": 1001}, {"k": -3}])
def test_k_or_n_out_of_range_is_422(client, overrides):
    response = client.post("/api/jobs", json=prune_body(**overrides))
    assert response.status_code == 422
    assert list(overrides)[0] in str(response.json()["detail"])


def test_sweep_k_out_of_range_is_422(client):
    body = {"kind": "sweep", "params": {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi",
                                       "methods": ["fap"], "ks": [1, 200_000]}}
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 422 and "K" in detail(response)


@pytest.mark.parametrize("margin", [0, -0.1])
def test_sweep_tost_margin_must_be_positive(client, margin):
    body = {"kind": "sweep", "params": {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi",
                                       "methods": ["fap", "fap-synergy"], "ks": [50], "tost_margin": margin}}
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 422 and "tost_margin" in detail(response)


def test_one_k_limit_for_the_cli_and_the_api():
    from backend.circuits.pipeline import validate_k
    from backend.errors import InvalidParameterError
    from backend.jobs import MAX_K, PruneParams
    assert validate_k(MAX_K) == MAX_K
    with pytest.raises(InvalidParameterError):
        validate_k(MAX_K + 1)
    PruneParams(model=TINY_MODEL, transcoder=TINY_CLT, task="ioi", method="fap", k=MAX_K)
    with pytest.raises(ValueError):
        PruneParams(model=TINY_MODEL, transcoder=TINY_CLT, task="ioi", method="fap", k=MAX_K + 1)


def test_unknown_job_kind_is_422(client):
    response = client.post("/api/jobs", json={"kind": "mine-bitcoin", "params": {}})
    assert response.status_code == 422


def test_body_over_the_limit_is_413(api_settings):
    with TestClient(create_app(api_settings, max_body_bytes=1024)) as c:
        body = prune_body(task_options={"corruption": "x" * 2000})
        assert c.post("/api/jobs", json=body).status_code == 413
        chunked = c.post("/api/jobs", content=iter([b"{" + b" " * 800, b" " * 800 + b"}"]),
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert c.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": 99}}).status_code == 404


def test_default_body_limit_is_one_mebibyte(client):
    response = client.post("/api/jobs", content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in detail(response)


def test_writes_need_the_token_when_it_is_set(api_settings):
    settings = api_settings.model_copy(update={"api_token": "s3cret"})
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/health").status_code == 200  # reads stay open
        assert c.get("/api/jobs").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = c.post("/api/jobs", json=prune_body(k=0), headers=headers)
            assert response.status_code == 401, headers
        assert c.delete("/api/jobs/1").status_code == 401
        assert c.patch("/api/explanations/1", json={"text": "x"}).status_code == 401
        authorised = c.post("/api/jobs", json=prune_body(k=0), headers={"Authorization": "Bearer s3cret"})
        assert authorised.status_code == 422  # past the token check, on to validation


def test_unknown_records_are_404(client):
    for path in ("/api/jobs/5", "/api/circuits/5", "/api/sweeps/5", "/api/features/5", "/api/explanations/5",
                 "/api/features/lookup?transcoder=tiny-llama/clt&layer=0&index=1"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "no " in detail(response), path
    assert client.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": 5}}).status_code == 404


# ------------------------------------------------------------------------------ the executor (plain functions)

class CountParams(BaseModel):
    steps: int = 3
    fail: bool = False
    tag: str = ""


class Counter:
    """A plain job function: reports progress `steps` times, waiting on `gate` before each step."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    def run(self, context, sessions, params: CountParams, progress):
        self.calls += 1
        for i in range(params.steps):
            assert self.gate.wait(10)
            if params.fail and i == 1:
                raise ValueError("boom at step 1")
            progress(i / params.steps, f"step {i}")
            time.sleep(0.3)
        return params.steps


def counting_app(settings, counter: Counter):
    kind = JobKind(CountParams, check=lambda settings, session, params: None, run=counter.run,
                   store=lambda settings, session, params, output: {})
    return create_app(settings, job_kinds={"count": kind})


def wait_for(client: TestClient, job_id: int, statuses: set[str], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_executor_lifecycle_progress_and_reuse(api_settings):
    counter = Counter()
    with TestClient(counting_app(api_settings, counter)) as c:
        executor = c.app.state.executor
        job, reused = executor.submit("count", {"steps": 4})
        assert not reused and job.status == "queued"
        seen = []
        while (state := c.get(f"/api/jobs/{job.id}").json())["status"] != "done":
            seen.append(state["progress"])
            time.sleep(0.05)
        assert state["progress"] == 1.0 and state["started_at"] and state["finished_at"]
        assert max(seen) > 0 and seen == sorted(seen)
        again, reused = executor.submit("count", {"steps": 4})
        assert reused and again.id == job.id and counter.calls == 1
        listed = c.get("/api/jobs", params={"status": "done"}).json()
        assert listed["total"] == 1 and listed["items"][0]["id"] == job.id


def test_a_second_request_while_running_returns_the_running_job(api_settings):
    counter = Counter()
    counter.gate.clear()
    with TestClient(counting_app(api_settings, counter)) as c:
        executor = c.app.state.executor
        first, _ = executor.submit("count", {"steps": 2, "tag": "a"})
        wait_for(c, first.id, {"running"})
        second, reused = executor.submit("count", {"steps": 2, "tag": "a"})
        assert reused and second.id == first.id and second.status == "running"
        counter.gate.set()
        wait_for(c, first.id, {"done"})
        assert counter.calls == 1


def test_a_job_that_raises_fails_with_its_message_and_leaves_others_alone(api_settings):
    counter = Counter()
    with TestClient(counting_app(api_settings, counter)) as c:
        executor = c.app.state.executor
        good, _ = executor.submit("count", {"steps": 2, "tag": "good"})
        bad, _ = executor.submit("count", {"steps": 3, "fail": True})
        after, _ = executor.submit("count", {"steps": 2, "tag": "after"})
        assert wait_for(c, good.id, {"done", "failed"})["status"] == "done"
        failed = wait_for(c, bad.id, {"done", "failed"})
        assert failed["status"] == "failed" and failed["error"] == "ValueError: boom at step 1"
        assert wait_for(c, after.id, {"done", "failed"})["status"] == "done"
        assert c.get(f"/api/jobs/{good.id}").json()["status"] == "done"
        # the failed job can be asked for again: the same row runs again
        retry, reused = executor.submit("count", {"steps": 3, "fail": True})
        assert not reused and retry.id == bad.id


def test_cancel_queued_at_once_and_running_at_next_progress(api_settings):
    counter = Counter()
    counter.gate.clear()
    with TestClient(counting_app(api_settings, counter)) as c:
        executor = c.app.state.executor
        running, _ = executor.submit("count", {"steps": 3, "tag": "r"})
        queued, _ = executor.submit("count", {"steps": 3, "tag": "q"})
        wait_for(c, running.id, {"running"})
        assert c.delete(f"/api/jobs/{queued.id}").json()["status"] == "cancelled"
        assert c.delete(f"/api/jobs/{running.id}").json()["status"] == "running"
        counter.gate.set()
        assert wait_for(c, running.id, {"cancelled", "done", "failed"})["status"] == "cancelled"
        assert counter.calls == 1  # the queued job never ran


def test_a_restart_marks_interrupted_jobs_failed(api_settings):
    url = api_settings.database_url
    upgrade_to_head(url)
    engine = make_engine(url)
    with transaction(session_factory(engine)) as s:
        running = queries.create_job(s, "prune", {"x": 1}, "a" * 64, "cpu")
        running.status = "running"
        queued_id = queries.create_job(s, "sweep", {"x": 2}, "b" * 64, "cpu").id
        running_id = running.id
    engine.dispose()
    with TestClient(create_app(api_settings)) as c:
        for job_id in (running_id, queued_id):
            job = c.get(f"/api/jobs/{job_id}").json()
            assert job["status"] == "failed"
            assert job["error"] == "interrupted: the worker stopped before the job finished"


# ------------------------------------------------------------------------------ stored results

def seed_results(client: TestClient) -> tuple[int, int, int]:
    with transaction(client.app.state.sessions) as s:
        model = queries.get_or_create_model(s, TINY_MODEL)
        tc = queries.get_or_create_transcoder(s, TINY_CLT, model)
        a = queries.save_circuit(s, make_circuit("fap", 4), "1" * 64, model, tc, None).id
        b = queries.save_circuit(s, make_circuit("random", 8, task="docstring"), "2" * 64, model, tc, None).id
        sweep = queries.save_sweep(s, make_sweep(), "3" * 64, model, tc, None).id
    return a, b, sweep


def test_circuits_filter_paginate_and_detail(client):
    a, b, _ = seed_results(client)
    assert client.get("/api/circuits").json()["total"] == 2
    page = client.get("/api/circuits", params={"model": TINY_MODEL, "method": "fap", "k": 4}).json()
    assert [c["id"] for c in page["items"]] == [a]
    assert client.get("/api/circuits", params={"task": "docstring"}).json()["items"][0]["id"] == b
    assert client.get("/api/circuits", params={"limit": 1, "offset": 1}).json()["items"][0]["id"] == a
    assert client.get("/api/circuits", params={"limit": 0}).status_code == 422
    circuit = client.get(f"/api/circuits/{a}").json()
    assert circuit["prompts"][0]["kept"][0]["feature"] == 7 and circuit["kl_mean"] == pytest.approx(0.25)
    assert circuit["graphs"] == {} and circuit["transcoder"] == TINY_CLT


def test_sweeps_return_the_full_result(client):
    _, _, sweep_id = seed_results(client)
    assert client.get("/api/sweeps").json()["items"][0]["id"] == sweep_id
    assert client.get(f"/api/sweeps/{sweep_id}").json()["result"] == make_sweep().to_json() | {
        "rows": [dict(r, kl_ci95=list(r["kl_ci95"])) for r in make_sweep().to_json()["rows"]],
        "random_curve": [dict(r, kl_ci95=list(r["kl_ci95"])) for r in make_sweep().to_json()["random_curve"]]}


def test_graph_job_needs_a_circuit_with_a_dataset(client):
    a, _, _ = seed_results(client)
    response = client.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": a}})
    assert response.status_code == 400 and "dataset" in detail(response)
    response = client.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": a, "prompt": 5}})
    assert response.status_code == 400 and "out of range" in detail(response)


# ------------------------------------------------------------------------------ explanations, annotations

def seed_feature(client: TestClient) -> int:
    with transaction(client.app.state.sessions) as s:
        model = queries.get_or_create_model(s, TINY_MODEL)
        tc = queries.get_or_create_transcoder(s, TINY_CLT, model)
        feature = queries.get_or_create_feature(s, tc, 2, 11, {"density": 0.02})
        queries.replace_examples(s, feature, [{"tokens": ["Mary", "went"], "activations": [0.1, 2.0]}])
        return feature.id


def test_explanations_create_edit_with_history_and_annotate(client):
    fid = seed_feature(client)
    lookup = client.get("/api/features/lookup", params={"transcoder": TINY_CLT, "layer": 2, "index": 11}).json()
    assert lookup["id"] == fid and lookup["examples"][0]["max_activation"] == 2.0
    raw = "<script>alert('x')</script> names"
    created = client.post(f"/api/features/{fid}/explanations", json={"text": raw, "source": "llm", "model": "m"})
    assert created.status_code == 201 and created.json()["text"] == raw  # stored as given
    eid = created.json()["id"]
    edited = client.patch(f"/api/explanations/{eid}", json={"text": "person names", "source": "human",
                                                            "author": "ann"}).json()
    assert (edited["text"], edited["revision"], edited["model"]) == ("person names", 2, "m")
    history = client.get(f"/api/explanations/{eid}/revisions").json()
    assert [r["text"] for r in history] == [raw, "person names"]
    note = client.post(f"/api/explanations/{eid}/annotations", json={"rating": 2, "label": "clear", "author": "bo"})
    assert note.status_code == 201 and note.json()["feature_id"] == fid
    assert client.post(f"/api/explanations/{eid}/annotations", json={"rating": 3}).status_code == 422
    assert client.post(f"/api/features/{fid}/annotations", json={"comment": "dense"}).json()["rating"] is None
    assert len(client.get(f"/api/features/{fid}/annotations").json()) == 2
    assert client.patch(f"/api/annotations/{note.json()['id']}", json={"rating": 0}).json()["rating"] == 0
    score = client.post(f"/api/explanations/{eid}/scores", json={"metric": "clarity", "value": 0.5, "rater": "fade"})
    assert score.status_code == 201 and client.get(f"/api/explanations/{eid}/scores").json()[0]["value"] == 0.5
    assert client.post(f"/api/features/{fid}/explanations", json={"text": "x", "source": "oracle"}).status_code == 422
    assert client.post("/api/features/999/explanations", json={"text": "x"}).status_code == 404
    assert client.get(f"/api/features/{fid}").json()["explanations"][0]["text"] == "person names"


# ------------------------------------------------------------------------------ a real server on loopback

def test_uvicorn_serves_on_loopback_with_an_ephemeral_port(api_settings):
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(create_app(api_settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (server.started and server.servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        response = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
        assert response.json() == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(10)
