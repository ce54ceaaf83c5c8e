"""The `hagd` job kind and stored hierarchies (/api/hierarchies), on the tiny cache."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.hagd.hierarchy import Hierarchy
from backend.hagd.pipeline import HagdConfig
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401 (fixtures)
from tests.test_api import wait_for

OPTIONS = {"pool": 10, "ratio": 3.0, "top": 3, "steps": 10, "lr": 0.3, "verify_seeds": 2, "verify_n": 3}


@pytest.fixture
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


def hagd_body(**options) -> dict:
    return {"kind": "hagd", "params": {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 3,
                                       "options": {**OPTIONS, **options}}}


def test_hagd_job_stores_a_hierarchy_and_is_reused(client):
    r = client.post("/api/jobs", json=hagd_body())
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"], {"done", "failed"}, timeout=300)
    assert job["status"] == "done", job
    assert job["links"]["hierarchy"] == f"/api/hierarchies/{job['hierarchy_id']}"
    listed = client.get("/api/hierarchies", params={"task": "ioi"}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == job["hierarchy_id"]
    detail = client.get(job["links"]["hierarchy"]).json()
    Hierarchy.from_json(detail["result"]["hierarchy"]).check()
    assert detail["levels"] == detail["result"]["levels"] and detail["circuit_size"] == len(detail["result"]["circuit"])
    # Defaults are filled in before hashing: the same request spelled out is the same job.
    again = client.post("/api/jobs", json=hagd_body(threshold=HagdConfig().threshold))
    assert again.status_code == 200 and again.json()["reused"] and again.json()["id"] == job["id"]


@pytest.mark.parametrize("options, status, needle", [
    ({"scorer_path": "/etc/passwd"}, 422, "scorer_path"),
    ({"poool": 1}, 422, "unknown HAGD option"),
    ({"score": "magic"}, 422, "cluster score"),
    ({"seed": 3}, 422, "params.seed"),
])
def test_bad_hagd_requests(client, options, status, needle):
    r = client.post("/api/jobs", json=hagd_body(**options))
    assert r.status_code == status and needle in r.text


def test_unknown_hierarchy_is_404(client):
    assert client.get("/api/hierarchies/999").status_code == 404
