"""Edge jobs through the worker: `edges` and `edge-sweep` kinds, stored, listed, reused; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.cli import main
from tests.api_fixtures import TINY_MODEL, api_settings, tiny_cache  # noqa: F401 (fixtures)
from tests.test_api import wait_for


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def edges_body(**overrides) -> dict:
    params = {"model": TINY_MODEL, "task": "ioi", "n": 4, "method": "eap", "sparsity": 0.9}
    params.update(overrides)
    return {"kind": "edges", "params": params}


def test_edge_jobs_store_list_and_reuse(api_settings):
    with TestClient(create_app(api_settings)) as c:
        r = c.post("/api/jobs", json=edges_body())
        assert r.status_code == 202, r.text
        job = wait_for(c, r.json()["id"], {"done", "failed"}, timeout=120)
        assert job["status"] == "done", job
        cid = job["edge_circuit_id"]
        assert job["links"]["edge_circuit"] == f"/api/edge-circuits/{cid}"
        detail = c.get(f"/api/edge-circuits/{cid}").json()
        assert detail["method"] == "eap" and detail["n_edges"] == 190
        assert detail["n_kept"] == len(detail["result"]["kept"]) <= 19
        assert detail["result"]["metrics"]["kl"]["ci95"][0] <= detail["kl_mean"]
        again = c.post("/api/jobs", json=edges_body())
        assert again.status_code == 200 and again.json()["reused"] and again.json()["id"] == job["id"]
        listed = c.get("/api/edge-circuits", params={"method": "eap"}).json()
        assert listed["total"] == 1 and listed["items"][0]["id"] == cid

        sweep = {"kind": "edge-sweep", "params": {"model": TINY_MODEL, "task": "ioi", "n": 4,
                                                   "methods": ["eap", "eap-ig"], "edge_counts": [10, 40],
                                                   "options": {"eap-ig": {"steps": 2}}}}
        r = c.post("/api/jobs", json=sweep)
        job = wait_for(c, r.json()["id"], {"done", "failed"}, timeout=120)
        assert job["status"] == "done", job
        s = c.get(f"/api/edge-sweeps/{job['edge_sweep_id']}").json()
        assert s["counts"] == [10, 40] and len(s["result"]["rows"]) == 4
        assert set(s["result"]["area"]) == {"eap", "eap-ig"}
        assert c.get("/api/edge-sweeps").json()["total"] == 1
        assert {m["name"] for m in c.get("/api/edge-methods").json()} == {"eap", "eap-ig", "acdc", "edge-pruning", "hap"}


@pytest.mark.parametrize("overrides,status", [
    ({"method": "magic"}, 404),
    ({"options": {"stepz": 1}}, 422),
    ({"sparsity": 1.0}, 422),
    ({"sparsity": None, "edges": 0}, 422),
    ({"sparsity": None}, 422),                  # no target at all
    ({"edges": 5}, 422),                        # both targets
    ({"model": "no-such-model"}, 404),
])
def test_bad_edge_requests_are_4xx_with_a_message(api_settings, overrides, status):
    with TestClient(create_app(api_settings)) as c:
        r = c.post("/api/jobs", json=edges_body(**overrides))
        assert r.status_code == status, r.text
        assert r.json()["detail"]


def test_cli_edges_graph_circuit_and_errors(api_settings, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIESCOPE_MODELS_CACHE", str(api_settings.models_cache))
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(tmp_path / "data"))
    assert main(["edges", "--graph", "--model", TINY_MODEL]) == 0
    assert "190 edges" in capsys.readouterr().out
    out = tmp_path / "c.json"
    assert main(["edges", "--method", "hap", "--model", TINY_MODEL, "--task", "ioi", "-n", "3", "--edges", "12",
                 "--options", json.dumps({"rho": 0.3, "max_steps": 6, "warmup": 3, "window": 2}),
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "edge-circuit" and data["n_kept"] <= 12 and data["cost"]["backwards"] > 0
    sweep, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["edge-sweep", "--methods", "eap", "--edge-counts", "5,50", "--model", TINY_MODEL, "--task", "ioi",
                 "-n", "3", "--out", str(sweep), "--plot", str(plot)]) == 0
    assert json.loads(sweep.read_text())["counts"] == [5, 50] and plot.stat().st_size > 0
    capsys.readouterr()
    for argv in (["edges", "--method", "nope", "--model", TINY_MODEL, "--task", "ioi", "--edges", "3"],
                 ["edges", "--method", "eap", "--model", TINY_MODEL, "--task", "ioi", "--sparsity", "1.5"],
                 ["edges", "--method", "eap", "--model", TINY_MODEL, "--task", "ioi"],
                 ["edges", "--method", "eap-ig", "--model", TINY_MODEL, "--task", "ioi", "--edges", "3",
                  "--options", '{"steps": "five"}'],
                 ["edges", "--method", "eap", "--model", TINY_MODEL, "--task", "ioi", "--edges", "100000"],
                 ["edge-sweep", "--methods", "eap", "--edge-counts", "a,b", "--model", TINY_MODEL, "--task", "ioi"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("piescope: error:"), (argv, err)
