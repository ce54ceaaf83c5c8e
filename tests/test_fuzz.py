"""Fuzzing the live worker from its own OpenAPI spec with schemathesis.

A uvicorn server on loopback (an ephemeral port) over a store seeded with a circuit (with an
attribution graph), a sweep, a feature with examples, an explanation with scores and
annotations, and finished jobs; schemathesis generates requests for every operation from the
spec (its examples; boundary coverage: extreme integers, odd strings, missing and wrong-typed
fields; then random valid and invalid data, fixed seed, a bounded count per operation) and
checks that no answer is a server error and that every answer's status, content type, headers
and body are the ones the spec documents. It must find nothing. On PostgreSQL the examples and
boundary phases run (what differs there is what the database accepts), keeping the test within
a few minutes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from backend.api.app import create_app
from backend.store import queries
from backend.store.db import transaction
from tests.api_fixtures import BACKENDS, TINY_CLT, TINY_MODEL, pg_cluster, tiny_cache, tiny_settings  # noqa: F401
from tests.test_store import make_circuit, make_sweep

pytest.importorskip("schemathesis")

SEED = 20261201
MAX_EXAMPLES = 10  # per operation in the fuzzing phase (~2,000 cases in all on SQLite)
PHASES = {"sqlite": "examples,coverage,fuzzing", "postgres": "examples,coverage"}
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def seed_store(sessions) -> None:
    """Rows for the spec's example id (1) to find: circuit, graph, sweep, feature, explanation, jobs."""
    nodes = [{"node_id": "E_5_0", "kind": "token", "layer": -1, "position": 0, "feature": 5, "activation": None,
              "score": None, "token": "a", "token_prob": None},
             {"node_id": "1_7_1", "kind": "feature", "layer": 1, "position": 1, "feature": 7, "activation": 1.2,
              "score": 0.5, "token": "b", "token_prob": None},
             {"node_id": "L_9_1", "kind": "logit", "layer": 4, "position": 1, "feature": 9, "activation": None,
              "score": 1.0, "token": "c", "token_prob": 0.3}]
    links = [{"source": "E_5_0", "target": "1_7_1", "weight": 0.2}, {"source": "1_7_1", "target": "L_9_1", "weight": 0.4}]
    graph = {"graphs": [{"prompt": 0, "tokens": ["a", "b"], "nodes": nodes, "links": links}],
             "aggregate": {"nodes": [], "links": []}}
    with transaction(sessions) as s:
        model = queries.get_or_create_model(s, TINY_MODEL, "llama")
        tc = queries.get_or_create_transcoder(s, TINY_CLT, model, {"kind": "clt", "layers": 3, "d_model": 32,
                                                                   "features": 16})
        circuit = queries.save_circuit(s, make_circuit("fap", 4), "1" * 64, model, tc, None)
        queries.set_circuit_graph(s, circuit.id, None, graph)
        queries.set_circuit_graph(s, circuit.id, 0, graph)
        queries.save_sweep(s, make_sweep(), "2" * 64, model, tc, None)
        feature = queries.find_feature(s, TINY_CLT, 1, 7)
        queries.replace_examples(s, feature, [{"tokens": ["a", "b"], "activations": [0.1, 2.0], "quantile": 0}])
        explanation = queries.create_explanation(s, feature.id, "names of people", "human", "ann")
        queries.add_score(s, explanation.id, "clarity", 0.5, "offline")
        queries.create_annotation(s, explanation_id=explanation.id, rating=2, label="example:0", author="ann")
        done = queries.create_job(s, "prune", {"k": 4}, "3" * 64, "cpu")
        queries.finish_job(s, done.id, "done", message="done", circuit_id=circuit.id)
        failed = queries.create_job(s, "sweep", {"k": 8}, "4" * 64, "cpu")
        queries.finish_job(s, failed.id, "failed", message="x", error="x")


@pytest.fixture(params=BACKENDS)
def live_url(request, tiny_cache, tmp_path):
    """A seeded worker on 127.0.0.1 (default Host allow-list, no token); yields its base URL."""
    import uvicorn
    db_url = None
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        db_url = cluster.database("fuzz")
    settings = tiny_settings(tiny_cache, tmp_path / "data", db_url).model_copy(
        update={"allowed_hosts": "127.0.0.1,localhost,::1"})
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    seed_store(app.state.sessions)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", request.param
    finally:
        server.should_exit = True
        thread.join(30)
        if db_url:
            request.getfixturevalue("pg_cluster").drop(db_url)


def summary(output: str) -> str:
    """schemathesis's closing summary (operations tested, phases, cases generated, verdict)."""
    start = output.rfind("SUMMARY")
    return output[output.rfind("\n", 0, start) + 1:].strip() if start >= 0 else output[-3000:]


def test_schemathesis_finds_no_server_error_and_no_spec_violation(live_url, tmp_path):
    base, backend = live_url
    assert httpx.get(f"{base}/api/health").json() == {"status": "ok"}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--seed", str(SEED),
           "--max-examples", str(MAX_EXAMPLES), "--checks", CHECKS, "--phases", PHASES[backend],
           "--generation-database", "none", "--workers", "1", "--request-timeout", "60", "--no-color",
           "--suppress-health-check", "all", "--warnings", "off"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    print(summary(run.stdout))
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:]
    assert "No issues found" in run.stdout and re.search(r"Tested: \d+", run.stdout), summary(run.stdout)
