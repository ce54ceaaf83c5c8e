"""The OpenAI-compatible client against a real HTTP server on loopback (http.server in a
thread, ephemeral port): replies, usage accounting, 429 + Retry-After, 5xx backoff, timeouts,
malformed replies; and the LLM explainer storing what it gets while other features fail."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.interp.explainers import LLMExplainer
from backend.interp.harvest import HarvestConfig
from backend.interp.llm import LLMClient, LLMConfig, LLMError, MalformedReply, retry_after_seconds
from backend.interp.pipeline import explain_circuit
from backend.interp.raters import GENERATE_SYSTEM, RATE_SYSTEM, LLMRater
from backend.store.interp import InterpStore
from backend.models.corpus import story_documents
from backend.store import queries
from backend.store.db import open_store, transaction
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401
from tests.pie_fixtures import pie_setup


def ok(content: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> dict:
    return {"status": 200, "body": {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}}


class FakeOpenAI:
    """A scripted chat-completions server: each request takes the next scripted answer.

    Answers: {"status", "body", "headers"} or {"sleep": seconds} (then a normal 200 too late).
    Every request's path, headers and JSON body are recorded.
    """

    def __init__(self) -> None:
        self.script: deque[dict] = deque()
        self.default: dict = ok("[EXPLANATION]: default")
        self.responder: Callable[[dict], dict] | None = None
        self.requests: list[dict] = []
        self.in_flight, self.peak = 0, 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if fake.script:
                    answer = fake.script.popleft()
                else:
                    answer = fake.responder(body) if fake.responder else fake.default
                with fake.lock:
                    fake.in_flight += 1
                    fake.peak = max(fake.peak, fake.in_flight)
                if "sleep" in answer:
                    time.sleep(answer["sleep"])
                    answer = ok("[EXPLANATION]: too late")
                with fake.lock:
                    fake.in_flight -= 1
                payload = answer["body"] if isinstance(answer["body"], bytes) else json.dumps(answer["body"]).encode()
                try:
                    self.send_response(answer["status"])
                    for k, v in answer.get("headers", {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    s = FakeOpenAI()
    yield s
    s.close()


def client_for(server: FakeOpenAI, waits: list[float] | None = None, **overrides) -> LLMClient:
    options = {"timeout": 5.0, "max_retries": 2, "backoff": 0.5, "concurrency": 1, **overrides}
    config = LLMConfig(base_url=server.url, model="test-model", api_key="sk-test", **options)
    return LLMClient(config, sleep=(waits.append if waits is not None else time.sleep))


def test_chat_sends_an_openai_request_and_counts_usage(server):
    server.script.extend([ok("hello", 7, 3), ok("again", 1, 2)])
    with client_for(server) as client:
        assert client.chat([{"role": "user", "content": "hi"}]) == "hello"
        assert client.chat([{"role": "user", "content": "hi"}]) == "again"
        usage = client.usage.snapshot()
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "test-model" and req["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert usage == {"calls": 2, "requests": 2, "retries": 0, "failures": 0, "prompt_tokens": 8,
                     "completion_tokens": 5, "total_tokens": 13}


def test_429_waits_for_retry_after_then_succeeds(server):
    server.script.extend([{"status": 429, "body": {"error": "slow down"}, "headers": {"Retry-After": "3"}},
                          ok("fine")])
    waits: list[float] = []
    with client_for(server, waits) as client:
        assert client.chat([{"role": "user", "content": "x"}]) == "fine"
        assert client.usage.retries == 1 and client.usage.requests == 2 and client.usage.failures == 0
    assert waits == [3.0]


def test_5xx_backs_off_exponentially_and_gives_up(server):
    server.script.extend([{"status": 503, "body": {"error": "down"}}] * 3)
    waits: list[float] = []
    with client_for(server, waits, max_retries=2) as client:
        with pytest.raises(LLMError, match="HTTP 503"):
            client.chat([{"role": "user", "content": "x"}])
        assert client.usage.failures == 1 and client.usage.requests == 3
    assert waits == [0.5, 1.0]


def test_4xx_other_than_429_is_not_retried(server):
    server.script.append({"status": 401, "body": {"error": "bad key"}})
    with client_for(server, []) as client:
        with pytest.raises(LLMError, match="HTTP 401"):
            client.chat([{"role": "user", "content": "x"}])
        assert client.usage.requests == 1


def test_timeout_is_retried_then_reported(server):
    server.script.extend([{"sleep": 0.6}, ok("on time")])
    with client_for(server, [], timeout=0.2, max_retries=1) as client:
        assert client.chat([{"role": "user", "content": "x"}]) == "on time"
    server.script.extend([{"sleep": 0.6}, {"sleep": 0.6}])
    with client_for(server, [], timeout=0.2, max_retries=1) as client:
        with pytest.raises(LLMError, match="timed out"):
            client.chat([{"role": "user", "content": "x"}])


def test_malformed_bodies_are_errors(server):
    server.script.extend([{"status": 200, "body": b"not json"}, {"status": 200, "body": {"choices": []}}])
    with client_for(server, []) as client:
        with pytest.raises(MalformedReply):
            client.chat([{"role": "user", "content": "x"}])
        with pytest.raises(MalformedReply):
            client.chat([{"role": "user", "content": "x"}])
        assert client.usage.failures == 2


def test_concurrency_limit_bounds_requests_in_flight(server):
    server.default = {"sleep": 0.15}
    with client_for(server, [], concurrency=2) as client:
        # Six caller threads at once: the client's semaphore lets only two requests out.
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda i: client.chat([{"role": "user", "content": str(i)}]), range(6)))
        assert client.map(lambda i: i * 2, [1, 2, 3]) == [2, 4, 6]
    assert results == ["[EXPLANATION]: too late"] * 6 and len(server.requests) == 6
    assert server.peak == 2


def test_retry_after_parses_seconds_and_http_dates():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_llm_rater_parses_ratings_and_generated_texts(server):
    server.script.extend([ok("1: 2\n2: 0\n3: 1"), ok("- first text\n- second text"), ok("nonsense")])
    with client_for(server, []) as client:
        rater = LLMRater(client)
        assert rater.rate("names", ["a", "b", "c"]) == [2, 0, 1]
        assert rater.generate("names", 2) == ["first text", "second text"]
        with pytest.raises(MalformedReply):
            rater.rate("names", ["a"])
        assert rater.calls == 3 and rater.tokens == 45 and rater.name == "llm:test-model"


def test_llm_explainer_keeps_what_it_stored_when_features_fail(server, api_settings):
    engine, sessions = open_store(api_settings)
    with transaction(sessions) as session:
        model = queries.get_or_create_model(session, TINY_MODEL)
        queries.get_or_create_transcoder(session, TINY_CLT, model)
    store = InterpStore(sessions)
    setup = pie_setup(n_features=16, seed=0)
    features = [(0, 1), (0, 2), (1, 3), (2, 4), (2, 5)]
    docs = story_documents(3000, seed=1)
    harvest_config = HarvestConfig(n_tokens=200, seq_len=24)
    server.script.extend([
        ok("[EXPLANATION]: first feature", 100, 10),                          # (0, 1)
        ok("This feature is about names.", 100, 10),                          # (0, 2): malformed
        {"sleep": 0.6}, {"sleep": 0.6},                                        # (1, 3): times out twice
        {"status": 429, "body": {"error": "rate"}, "headers": {"Retry-After": "0"}},
        ok("[EXPLANATION]: fourth feature", 100, 10),                         # (2, 4): 429, then fine
        ok("[EXPLANATION]: fifth feature", 100, 10),                          # (2, 5)
    ])
    with client_for(server, [], timeout=0.2, max_retries=1) as client:
        report = explain_circuit(setup.adapter, setup.transcoder, store, TINY_CLT, features, docs,
                                 LLMExplainer(client), "stories", harvest_config, chunk=2)
        usage = client.usage.snapshot()
    assert report.explained == 3 and set(report.errors) == {"0/2", "1/3"}
    assert "MalformedReply" in report.errors["0/2"] and "timed out" in report.errors["1/3"]
    # The malformed reply was billed too: four answers of 110 tokens each.
    assert report.calls == 5 and report.tokens == 440 == usage["total_tokens"]
    assert usage["requests"] == 7 and usage["retries"] == 2

    def stored() -> dict:
        states = store.features(TINY_CLT, features)
        return {k: [(e["text"], e["source"], e["model"]) for e in s.explanations] for k, s in states.items()}
    first = stored()
    assert first[(0, 1)] == [("first feature", "llm", "test-model")]
    assert first[(0, 2)] == [] and first[(1, 3)] == []
    assert first[(2, 4)] == [("fourth feature", "llm", "test-model")]

    # A second run whose endpoint is down: every feature fails, nothing stored is lost, and
    # features already explained by this model are not asked again.
    server.default = {"status": 500, "body": {"error": "down"}}
    with client_for(server, [], max_retries=0) as client:
        again = explain_circuit(setup.adapter, setup.transcoder, store, TINY_CLT, features, docs,
                                LLMExplainer(client), "stories", harvest_config)
    assert again.reused == 3 and again.harvested == 0 and set(again.errors) == {"0/2", "1/3"}
    assert stored() == first
    engine.dispose()


def openai_like(body: dict) -> dict:
    """A well-behaved fake model: explains, rates every numbered text, writes concept texts."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system == RATE_SYSTEM:
        n = len(re.findall(r"^\d+\. ", user, re.MULTILINE))
        return ok("\n".join(f"{i}: {2 if 'Mary' in line else 0}" for i, line in
                            enumerate(user.splitlines()[2:2 + n], 1)), 50, 5)
    if system == GENERATE_SYSTEM:
        return ok("- Mary went home.\n- Mary and John talked.\n- Mary smiled.", 30, 12)
    return ok("Looking at the examples...\n[EXPLANATION]: the name Mary", 200, 20)


def test_llm_explain_and_score_jobs_through_the_api(server, api_settings):
    from fastapi.testclient import TestClient

    from backend.api.app import create_app
    from tests.test_interp_flow import PRUNE, run_job
    server.responder = openai_like
    settings = api_settings.model_copy(update={"llm_base_url": server.url, "llm_model": "fake-gpt",
                                               "llm_api_key": "sk-test"})
    with TestClient(create_app(settings)) as client:
        circuit_id = run_job(client, "/api/jobs", {"kind": "prune", "params": PRUNE})["circuit_id"]
        n_features = len(client.get(f"/api/circuits/{circuit_id}").json()["features"])
        run_job(client, "/api/jobs", {"kind": "explain", "params": {
            "circuit_id": circuit_id, "explainer": "llm", "corpus": "stories", "corpus_tokens": 300}})
        run_job(client, "/api/jobs", {"kind": "score", "params": {
            "circuit_id": circuit_id, "explainer": "llm", "rater": "llm", "corpus": "stories", "n_natural": 4,
            "n_generated": 3, "n_steer_prompts": 1, "n_new_tokens": 2, "factors": [0, 10]}})
        view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
        cost = client.get(f"/api/circuits/{circuit_id}").json()["cost"]
    for feat in view["features"]:
        [expl] = feat["explanations"]
        assert (expl["text"], expl["source"], expl["model"]) == ("the name Mary", "llm", "fake-gpt")
        assert {s["rater"] for s in expl["scores"]} == {"llm:fake-gpt"}
        assert {s["metric"] for s in expl["scores"]} <= {"clarity", "responsiveness", "purity", "faithfulness"}
    assert cost["explain_calls"] == n_features and cost["explain_tokens"] == 220 * n_features
    # Per feature: one generation, the natural texts in calls of 10, one call for the continuations.
    assert cost["score_calls"] >= 3 * n_features and cost["score_tokens"] > 0
    assert cost["calls_if_all_active"] == cost["active_features"]
    assert all(r["auth"] == "Bearer sk-test" for r in server.requests)
