"""The HTTP API: listings, validation and security, the executor's lifecycle, stored results,
explanations and annotations, on SQLite and PostgreSQL (`api_settings` is parametrised over the
store's backends here). Jobs here never load a model (see test_jobs_e2e.py for that)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from pydantic import BaseModel

from backend.api.app import create_app
from backend.api.jobs import JobKind
from backend.settings import Settings
from backend.store import queries
from backend.store.db import make_engine, session_factory, transaction, upgrade_to_head
from backend.store.tables import Circuit
from tests.api_fixtures import (TINY_CLT, TINY_MODEL, pg_cluster, store_settings, store_url,  # noqa: F401
                                tiny_cache)
from tests.test_store import make_circuit, make_sweep


@pytest.fixture
def api_settings(store_settings):
    """Every test here runs on both backends."""
    return store_settings


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


def test_unknown_job_kind_is_one_error_saying_so(client):
    response = client.post("/api/jobs", json={"kind": "mine-bitcoin", "params": {}})
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": ["body", "kind"], "type": "union_tag_invalid",
                                          "msg": "unknown job kind 'mine-bitcoin'; known kinds: "
                                                 "prune, sweep, graph, explain, score, edges, edge-sweep, hagd"}]
    assert "unknown job kind 'mine-bitcoin'" in detail(response)
    missing = client.post("/api/jobs", json={"params": {}})
    assert missing.status_code == 422 and "kind is missing" in detail(missing)


def test_a_bad_k_is_one_error_naming_its_own_field(client):
    response = client.post("/api/jobs", json=prune_body(k=0))
    assert response.status_code == 422
    assert response.json() == {"detail": "params.k: Input should be greater than or equal to 1",
                               "errors": [{"loc": ["body", "params", "k"], "type": "greater_than_equal",
                                           "msg": "Input should be greater than or equal to 1"}]}


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

    def __init__(self, timeout: float = 10.0) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.timeout = timeout

    def run(self, context, sessions, params: CountParams, progress):
        self.calls += 1
        for i in range(params.steps):
            assert self.gate.wait(self.timeout)
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


# ------------------------------------------------------------------------------ requests that used to be 500s

HUGE = 99999999999999999999  # beyond 2^63


@pytest.mark.parametrize("path", [
    f"/api/jobs/{HUGE}", f"/api/circuits/{HUGE}", f"/api/sweeps/{HUGE}", f"/api/features/{HUGE}",
    f"/api/explanations/{HUGE}", f"/api/explanations/{HUGE}/scores", f"/api/circuits/{HUGE}/interpretation",
    f"/api/jobs/{2**31}", f"/api/jobs?offset={HUGE}", f"/api/circuits?k={HUGE}", f"/api/circuits?offset={2**31}",
    f"/api/features?layer={HUGE}", f"/api/features/lookup?transcoder={TINY_CLT}&layer=0&index={HUGE}",
    f"/api/circuits/1/graphs/all/neuronpedia?prompt={HUGE}", f"/api/circuits/1/interpretation?top_n={HUGE}",
])
def test_integers_beyond_the_store_are_422(client, path):
    response = client.get(path)
    assert response.status_code == 422, response.text
    assert "less than or equal to 2147483647" in detail(response)


@pytest.mark.parametrize("kind", ["graph", "explain", "score"])
def test_a_circuit_id_beyond_the_store_is_422(client, kind):
    response = client.post("/api/jobs", json={"kind": kind, "params": {"circuit_id": HUGE}})
    assert response.status_code == 422 and "params.circuit_id" in detail(response)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_422_and_never_stored(client, number):
    fid = seed_feature(client)
    eid = client.post(f"/api/features/{fid}/explanations", json={"text": "names"}).json()["id"]
    response = client.post(f"/api/explanations/{eid}/scores", content=b'{"metric": "clarity", "value": %s}' % number,
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in detail(response)
    assert client.get(f"/api/explanations/{eid}/scores").json() == []
    ok = client.post(f"/api/explanations/{eid}/scores", json={"metric": "clarity", "value": -1.5e300})
    assert ok.status_code == 201 and client.get(f"/api/explanations/{eid}/scores").json()[0]["value"] == -1.5e300


@pytest.mark.parametrize("text", [b'"\\ud800"', b'"a\\udfffb"', b'"nul\\u0000"'])
def test_text_no_store_can_keep_is_422_anywhere_in_the_body(client, text):
    fid = seed_feature(client)
    for body in (b'{"text": %s}' % text, b'{"text": "ok", "author": %s}' % text, b'{%s: "x"}' % text):
        response = client.post(f"/api/features/{fid}/explanations", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == 422, body
        assert response.json()["errors"][0]["loc"] == ["body"]
    assert client.get(f"/api/features/{fid}/explanations").json() == []
    job = client.post("/api/jobs", content=b'{"kind": "prune", "params": {"model": %s}}' % text,
                      headers={"content-type": "application/json"})
    assert job.status_code == 422


def test_nul_in_a_query_or_path_is_422(client):
    assert client.get("/api/circuits", params={"model": "a\x00b"}).status_code == 422
    assert client.get("/api/features/lookup?transcoder=%00&layer=0&index=0").status_code == 422
    assert client.get("/api/circuits/1/graphs/%00/neuronpedia").status_code == 422
    assert client.get("/api/circuits", params={"model": "\u00e9\u4e2d"}).json()["total"] == 0  # real Unicode is fine


def test_malformed_and_deeply_nested_json_is_422(client):
    for body in (b"{", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00", b'{"kind": 1' + b"0" * 5000 + b"}"):
        response = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, body[:20]
        assert response.json()["detail"].startswith("body:")


def test_score_job_with_only_the_zero_factor_is_422(client):
    response = client.post("/api/jobs", json={"kind": "score", "params": {"circuit_id": 1, "factors": [0, 0]}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "params", "factors"]
    assert "besides the 0 baseline" in detail(response)


def test_unknown_corruption_is_422_at_request_time(client):
    pytest.importorskip("backend.circuits.pipeline")
    response = client.post("/api/jobs", json=prune_body(corruption="no-such-corruption"))
    assert response.status_code == 422 and "unknown corruption 'no-such-corruption'" in detail(response)
    sweep = {"kind": "sweep", "params": {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi",
                                        "methods": ["fap"], "ks": [2], "corruption": "bogus"}}
    assert client.post("/api/jobs", json=sweep).status_code == 422
    assert client.get("/api/jobs").json()["total"] == 0  # nothing was queued


def test_neuronpedia_export_of_a_circuit_without_a_graph_is_404(client):
    a, _, _ = seed_results(client)
    missing = client.get(f"/api/circuits/{a}/graphs/all/neuronpedia")
    assert missing.status_code == 404 and "no graph 'all'" in detail(missing)
    with transaction(client.app.state.sessions) as s:
        queries.set_circuit_graph(s, a, None, {"nodes": [], "links": []})  # a graph holding no prompt graph
        queries.set_circuit_graph(s, a, 0, {"graphs": [{"prompt": 0, "nodes": [], "links": []}]})
    empty = client.get(f"/api/circuits/{a}/graphs/all/neuronpedia")
    assert empty.status_code == 404 and "no graph 'all'" in detail(empty)  # it holds no prompt graph
    no_target = client.get(f"/api/circuits/{a}/graphs/0/neuronpedia")
    assert no_target.status_code == 404, no_target.text


def test_cancelling_a_finished_job_is_409(api_settings):
    counter = Counter()
    with TestClient(counting_app(api_settings, counter)) as c:
        job, _ = c.app.state.executor.submit("count", {"steps": 1})
        wait_for(c, job.id, {"done"})
        response = c.delete(f"/api/jobs/{job.id}")
        assert response.status_code == 409 and "already done" in detail(response)
        assert c.get(f"/api/jobs/{job.id}").json()["status"] == "done"
        assert c.delete("/api/jobs/999").status_code == 404


def test_timestamps_carry_their_zone_on_post_and_get(client):
    fid = seed_feature(client)
    created = client.post(f"/api/features/{fid}/explanations", json={"text": "names"}).json()
    fetched = client.get(f"/api/explanations/{created['id']}").json()
    for stamp in (created["created_at"], fetched["created_at"], fetched["updated_at"]):
        assert stamp.endswith("Z") or stamp.endswith("+00:00"), stamp
    assert created["created_at"] == fetched["created_at"]
    job = client.post("/api/jobs", json={"kind": "graph", "params": {"circuit_id": 1}})
    assert job.status_code == 404  # no circuit: nothing stored, but the listing below is read back
    seed_results(client)
    for circuit in client.get("/api/circuits").json()["items"]:
        assert circuit["created_at"].endswith(("Z", "+00:00"))


class PathParams(BaseModel):
    where: str = ""


def test_no_server_path_in_job_errors_or_listings(api_settings):
    settings = api_settings
    cache = settings.models_cache
    broken = cache / TINY_MODEL / "broken-clt"
    broken.mkdir(exist_ok=True)
    (broken / "config.yaml").write_text("not: [a transcoder")
    try:
        def run(context, sessions, params, progress):
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{cache}/{TINY_MODEL}/x/w.safetensors' "
                                    f"(also tried /opt/secret/place/w.bin)")
        kind = JobKind(PathParams, check=lambda *a: None, run=run, store=lambda *a: {})
        with TestClient(create_app(settings, job_kinds={"paths": kind})) as c:
            job, _ = c.app.state.executor.submit("paths", {})
            failed = wait_for(c, job.id, {"failed"})
            assert str(cache) not in failed["error"] and "/opt/secret" not in failed["error"]
            assert "<models_cache>/tiny-llama/x/w.safetensors" in failed["error"] and ".../w.bin" in failed["error"]
            listing = c.get("/api/transcoders").text + c.get("/api/models").text
            assert str(cache) not in listing and str(cache.resolve()) not in listing
            assert "broken-clt" in listing
    finally:
        import shutil
        shutil.rmtree(broken)


# ------------------------------------------------------------------------------ the spec tells the truth

def test_openapi_declares_auth_on_writes_only_and_every_error_it_sends(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearerToken"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            if method == "get":
                assert "security" not in op, (path, method)
            else:
                assert op["security"] == [{"bearerToken": []}], (path, method)
                assert {"401", "413"} <= codes, (path, method)
            assert "400" in codes
            if op.get("parameters") or "requestBody" in op:
                assert "422" in codes, (path, method)
            if "{" in path:
                assert "404" in codes, (path, method)
            for code in codes - {"200", "201", "202"}:
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (path, method, code)
    assert "409" in spec["paths"]["/api/jobs/{job_id}"]["delete"]["responses"]
    assert "404" in spec["paths"]["/api/jobs"]["post"]["responses"]
    assert "404" in spec["paths"]["/api/features/lookup"]["get"]["responses"]


def test_every_error_answer_is_the_documented_error_shape(client):
    from backend.api.schemas import ErrorOut
    answers = [client.post("/api/jobs", json=prune_body(k=0)), client.get("/api/jobs/7"),
               client.get(f"/api/jobs/{HUGE}"), client.post("/api/jobs", content=b"{",
                                                          headers={"content-type": "application/json"}),
               client.post("/api/jobs", json=prune_body(task="no-such-task")),
               client.get("/api/jobs", headers={"host": "evil.example"})]
    assert [a.status_code for a in answers] == [422, 404, 422, 422, 404, 400]
    for answer in answers:
        ErrorOut.model_validate(answer.json(), strict=True)
        assert "\n" not in answer.json()["detail"]


# ------------------------------------------------------------------------------ who may talk to the worker

def test_an_empty_token_is_an_error_not_open_writes(api_settings):
    from backend.errors import UserError
    for empty in ("", "   "):
        with pytest.raises(UserError, match="set but empty"):
            create_app(api_settings.model_copy(update={"api_token": empty}))


def test_listening_beyond_loopback_needs_a_token(api_settings):
    from backend.api.app import check_exposure
    from backend.errors import UserError
    for host in ("0.0.0.0", "192.168.1.5", "::", "gpu-box"):
        with pytest.raises(UserError, match="needs PIESCOPE_API_TOKEN"):
            check_exposure(api_settings, host)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(api_settings, host)
    check_exposure(api_settings.model_copy(update={"api_token": "s3cret"}), "0.0.0.0")


def test_host_header_allow_list_defaults_to_loopback_names(api_settings):
    defaults = api_settings.model_copy(update={"allowed_hosts": Settings.model_fields["allowed_hosts"].default})
    with TestClient(create_app(defaults)) as c:
        refused = c.get("/api/jobs")  # TestClient's Host is 'testserver'
        assert refused.status_code == 400 and "does not answer for Host 'testserver'" in detail(refused)
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"):
            assert c.get("/api/jobs", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example:8000", ""):
            assert c.get("/api/health", headers={"host": host}).status_code == 400, host
        assert c.post("/api/jobs", json=prune_body(), headers={"host": "evil.example"}).status_code == 400
    with TestClient(create_app(defaults.model_copy(update={"allowed_hosts": "*"}))) as c:
        assert c.get("/api/health", headers={"host": "anything.example"}).status_code == 200


def test_a_cached_circuit_follows_commits_here_at_once_and_other_processes_within_max_age(client, api_settings,
                                                                                        monkeypatch):
    a, _, _ = seed_results(client)
    clock = [1000.0]
    monkeypatch.setattr("backend.api.cache.time.monotonic", lambda: clock[0])
    assert client.get(f"/api/circuits/{a}").json()["graphs"] == {}
    with transaction(client.app.state.sessions) as s:  # a writer in this process: seen at once
        queries.set_circuit_graph(s, a, 0, {"graphs": []})
    assert set(client.get(f"/api/circuits/{a}").json()["graphs"]) == {"0"}
    # Another process's writer: no Session of this process sees it (a Core UPDATE on its own engine).
    engine = make_engine(api_settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(Circuit).where(Circuit.id == a).values(
                graphs={"0": {"graphs": []}, "1": {"graphs": []}}, graph_keys=["0", "1"],
                revision=Circuit.revision + 1))
    finally:
        engine.dispose()
    # Within max_age the cached body may still be served (or the refresher has dropped it already);
    # once max_age has passed, the revision is re-read.
    clock[0] += client.app.state.circuit_cache.max_age + 0.5
    assert set(client.get(f"/api/circuits/{a}").json()["graphs"]) == {"0", "1"}


def test_the_refresher_confirms_unchanged_entries_and_drops_changed_or_deleted_ones(client):
    from backend.api.cache import read_revisions
    a, b, _ = seed_results(client)
    cache, engine = client.app.state.circuit_cache, client.app.state.engine
    for cid in (a, b):
        client.get(f"/api/circuits/{cid}")
    cache.put(10**6, 1, b"{}")  # an entry whose row is gone
    with engine.begin() as conn:  # b changes behind the cache's back
        conn.execute(update(Circuit).where(Circuit.id == b).values(revision=Circuit.revision + 1))
    keys = cache.ask()
    cache.confirm(read_revisions(engine, Circuit, keys), checked_at=0.0)
    assert cache.get(a, read_revisions(engine, Circuit, [a])[a]) is not None
    assert set(cache._data) == {a}


def test_a_rolled_back_write_leaves_the_cached_circuit_valid(client):
    a, _, _ = seed_results(client)
    body = client.get(f"/api/circuits/{a}").json()
    with pytest.raises(RuntimeError), transaction(client.app.state.sessions) as s:
        queries.set_circuit_graph(s, a, 0, {"graphs": []})
        s.flush()
        raise RuntimeError("the job crashed")
    assert client.get(f"/api/circuits/{a}").json() == body


def test_concurrent_misses_of_one_circuit_share_one_build_and_at_most_max_builds_run_at_once():
    import asyncio
    import threading

    from backend.api.cache import ResponseCache
    cache = ResponseCache(Circuit, max_builds=2)
    calls: list[int] = []
    running, peak, gate = [0], [0], threading.Event()
    lock = threading.Lock()

    def make(key: int) -> tuple[int, bytes]:
        with lock:
            calls.append(key)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(5)
        with lock:
            running[0] -= 1
        return 7, f"body {key}".encode()

    async def main() -> list[bytes]:
        requests = [cache.build(key, make, key) for key in (1, 1, 1, 2, 3, 4)]
        tasks = [asyncio.ensure_future(r) for r in requests]
        await asyncio.sleep(0.2)
        gate.set()
        return await asyncio.gather(*tasks)

    bodies = asyncio.run(main())
    assert bodies == [b"body 1"] * 3 + [b"body 2", b"body 3", b"body 4"]
    assert sorted(calls) == [1, 2, 3, 4]  # the three requests for circuit 1 shared one build
    assert peak[0] == 2
    assert cache.get(1, 7) == b"body 1" and cache.holds(4)


def test_a_failed_build_reaches_every_waiter_and_the_next_request_builds_again():
    import asyncio

    from backend.api.cache import ResponseCache
    from backend.errors import NotFoundError
    cache = ResponseCache(Circuit)
    attempts = [0]

    def make(key: int) -> tuple[int, bytes]:
        attempts[0] += 1
        if attempts[0] == 1:
            raise NotFoundError(f"no circuit with id {key}")
        return 1, b"{}"

    async def main():
        first = await asyncio.gather(cache.build(5, make, 5), cache.build(5, make, 5), return_exceptions=True)
        return first, await cache.build(5, make, 5)

    first, second = asyncio.run(main())
    assert all(isinstance(e, NotFoundError) for e in first) and second == b"{}" and attempts[0] == 2


def test_a_circuit_read_cold_goes_straight_to_its_build_and_a_stale_one_revalidates_with_one_read(client,
                                                                                               monkeypatch):
    from backend.api import cache as cache_module
    from backend.api.routers import results
    a, _, _ = seed_results(client)
    reads = []
    monkeypatch.setattr(results, "read_revisions", lambda *args: reads.append(args) or
                        cache_module.read_revisions(*args))
    clock = [1000.0]
    monkeypatch.setattr("backend.api.cache.time.monotonic", lambda: clock[0])
    body = client.get(f"/api/circuits/{a}").json()
    assert reads == []  # nothing cached: no revision read before the build (which reads the row)
    clock[0] += client.app.state.circuit_cache.max_age + 0.5
    assert client.get(f"/api/circuits/{a}").json() == body and len(reads) == 1


def test_stored_json_decodes_with_orjson_and_falls_back_for_nan_tokens():
    import math

    from backend.store.db import load_json
    assert load_json('{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}
    assert math.isnan(load_json('[NaN]')[0]) and load_json(b'{"k": Infinity}')["k"] == math.inf
