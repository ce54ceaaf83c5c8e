"""Edge sweeps and HAGD's verification on the Ray executor (the local Ray instance of
tests/test_ray_executor.py): an edge sweep's scores and (method, count) points run on actors that
load the tiny model by name and merge into exactly the in-process edge sweep (rows in order, kept
sets, KL, costs), also when an actor is killed mid-run; HAGD's verification prompt sets run on
actors and give the in-process verification; an edge-sweep job through the API and the CLI's
`edge-sweep` / `hagd --executor ray` give the in-process results."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.api.app import create_app  # noqa: E402
from backend.circuits.pipeline import local_map  # noqa: E402
from backend.edges.pipeline import EdgeSweepConfig, EdgeSweepPoints, merge_edge_sweep, plan_edge_sweep  # noqa: E402
from backend.executors.ray_executor import RayShardPool, SweepInputs, task_map  # noqa: E402
from backend.hagd.pipeline import HagdConfig, run_hagd  # noqa: E402
from backend.tasks import get_task  # noqa: E402
from tests.api_fixtures import TINY_CLT, TINY_MODEL, tiny_cache, tiny_settings  # noqa: E402,F401
from tests.test_edges_api import one_thread  # noqa: E402,F401 (autouse: the driver at one thread, as the actors)
from tests.test_jobs_e2e import run_to_end, untimed  # noqa: E402
from tests.test_ray_executor import (TOL, _no_sweep_actors, _recording, assert_close, ray_instance,  # noqa: E402,F401
                                     kill_once, ray_settings, run_cli)

pytestmark = pytest.mark.ray

EDGE_SWEEP = {"model": TINY_MODEL, "task": "ioi", "n": 4, "seed": 0, "batch_size": 2,
              "methods": ["eap", "hap", "edge-pruning"], "edge_counts": [50, 100],
              "options": {"hap": {"rho": 0.6, "max_steps": 20}, "edge-pruning": {"max_steps": 20}}}
HAGD = {"pool": 10, "ratio": 3.0, "top": 3, "steps": 10, "lr": 0.3, "verify_seeds": 3, "verify_n": 3}


def _edge_params():
    return job_functions.normalise_edges(job_functions.EdgeSweepParams(**EDGE_SWEEP))


def _edge_config(params) -> EdgeSweepConfig:
    return EdgeSweepConfig(list(params.methods), params.edge_counts, {k: dict(v) for k, v in params.options.items()},
                           params.seed, params.batch_size)


def _edge_inputs(params) -> SweepInputs:
    return SweepInputs(params.model, None, params.task, dict(params.task_options), params.n, params.seed)


@pytest.fixture(scope="module")
def edge_in_process(tiny_cache, tmp_path_factory):
    """The in-process edge sweep, and every task's result by kind ("scores", "point")."""
    torch.set_num_threads(1)
    settings = tiny_settings(tiny_cache, tmp_path_factory.mktemp("edges-inproc"))
    params = _edge_params()
    adapter, batch = job_functions._edge_batch(job_functions.JobContext(settings), params, None)
    points = EdgeSweepPoints(adapter, batch, _edge_config(params))
    seen: dict[str, list] = {}
    sweep = merge_edge_sweep(points.plan, points.ctx.graph.counts(), len(batch), _recording(local_map(points), seen),
                             model_name=params.model, task_name=params.task)
    return sweep, seen


def _pool_edge_sweep(settings, hook=lambda pool, f, m: None):
    """The edge sweep through a RayShardPool -> (EdgeSweep, task results by kind); `hook` sees the
    pool at every progress report of the points."""
    params = _edge_params()
    config = _edge_config(params)
    seen: dict[str, list] = {}
    with RayShardPool(settings, _edge_inputs(params), config, 6) as pool:
        info = pool.load(lambda f, m: None)

        def watched(method, args, p):
            return pool.map(method, args, lambda f, m: (p(f, m), method == "point" and hook(pool, f, m)))
        sweep = merge_edge_sweep(plan_edge_sweep(config, info["graph"]["edges"]), info["graph"], len(info["pairs"]),
                                 _recording(watched, seen), model_name=params.model, task_name=params.task)
    return sweep, seen


def assert_same_points(seen, expected):
    """The same scores (within TOL) and, point by point, identical kept edge sets."""
    assert [k for k in seen] == [k for k in expected] == ["scores", "point"]
    for (got, _), (want, _) in zip(seen["scores"], expected["scores"], strict=True):
        assert torch.allclose(got, want, atol=TOL, rtol=0)
    for got, want in zip(seen["point"], expected["point"], strict=True):
        assert (got.row.method, got.row.n_target) == (want.row.method, want.row.n_target)
        assert torch.equal(got.kept, want.kept) and want.kept.any()


def test_a_ray_edge_sweep_equals_the_in_process_edge_sweep(ray_settings, edge_in_process):
    expected, expected_points = edge_in_process
    sweep, seen = _pool_edge_sweep(ray_settings)
    assert [(r.method, r.n_target) for r in sweep.rows] == [(m, c) for m in EDGE_SWEEP["methods"] for c in (50, 100)]
    # rows in order, KL within TOL, the same kept counts, areas and costs (forward / backward rows,
    # EAP's charged to the first row reading it: eap at 50 edges, not hap)
    assert_close(untimed(sweep.to_json()), untimed(expected.to_json()))
    assert sweep.rows[0].cost["backward_rows"] > 0 == sweep.rows[1].cost["backward_rows"]
    assert_same_points(seen, expected_points)
    assert _no_sweep_actors()


def test_a_killed_actor_during_an_edge_sweep_is_retried_with_an_identical_result(ray_settings, edge_in_process):
    expected, expected_points = edge_in_process
    killed: list = []
    sweep, seen = _pool_edge_sweep(ray_settings, kill_once(killed))  # during the points, not the scores
    assert killed
    assert_close(untimed(sweep.to_json()), untimed(expected.to_json()))
    assert_same_points(seen, expected_points)
    assert _no_sweep_actors()


def test_an_edge_sweep_job_through_the_api_on_ray_stores_the_in_process_rows(ray_settings, edge_in_process):
    expected, _ = edge_in_process
    with TestClient(create_app(ray_settings)) as client:
        job, seen = run_to_end(client, {"kind": "edge-sweep", "params": EDGE_SWEEP}, timeout=300)
        assert job["status"] == "done", job["error"]
        progress = [p for _, p in seen]
        assert progress == sorted(progress) and progress[-1] == 1.0
        stored = client.get(f"/api/edge-sweeps/{job['edge_sweep_id']}").json()["result"]
        assert client.get("/api/edge-sweeps").json()["total"] == 1
    want = untimed(expected.to_json())
    for key in ("rows", "area", "counts", "graph", "methods", "options", "n_prompts", "model"):
        assert_close(untimed(stored)[key], want[key], key)
    assert _no_sweep_actors()


def test_the_cli_edge_sweep_on_ray_writes_the_in_process_edge_sweep(ray_instance, tiny_cache, tmp_path, monkeypatch,
                                                                    edge_in_process):
    expected, _ = edge_in_process
    got = untimed(run_cli(monkeypatch, tiny_cache, tmp_path, [
        "edge-sweep", "--model", TINY_MODEL, "--task", "ioi", "-n", "4", "--batch-size", "2",
        "--methods", "eap,hap,edge-pruning", "--edge-counts", "50,100", "--options", json.dumps(EDGE_SWEEP["options"])]))
    want = untimed(expected.to_json())
    assert got["model"] == TINY_MODEL  # the name, not the directory the actors loaded
    for key in ("rows", "area", "counts", "graph", "methods", "options"):
        assert_close(got[key], want[key], key)
    assert _no_sweep_actors()


@pytest.fixture(scope="module")
def hagd_inputs(tiny_cache, tmp_path_factory):
    torch.set_num_threads(1)
    context = job_functions.JobContext(tiny_settings(tiny_cache, tmp_path_factory.mktemp("hagd-inproc")))
    return context.adapter(TINY_MODEL), context.transcoder(TINY_CLT), get_task("ioi"), HagdConfig(**HAGD)


def _hagd(inputs, verify_map=None):
    adapter, transcoder, task, config = inputs
    return run_hagd(adapter, transcoder, task, 3, config, model_name=TINY_MODEL, transcoder_name=TINY_CLT,
                    task_name="ioi", verify_map=verify_map)


def test_hagd_verification_on_ray_equals_the_in_process_verification(ray_settings, hagd_inputs):
    expected = _hagd(hagd_inputs).to_json()
    ran: list[int] = []
    with task_map(ray_settings, SweepInputs(TINY_MODEL, TINY_CLT, "ioi", {}, 3, 0), hagd_inputs[3]) as on_ray:
        def counted(method, args, progress):
            ran.extend(unit.seed for unit, _ in args)
            return on_ray(method, args, progress)
        result = _hagd(hagd_inputs, counted).to_json()
    assert ran == [1, 2, 3]  # every prompt set went to the actors
    assert set(result["verification"]) == {"hagd", "fap", "random"}
    assert all(v["seeds"] == [1, 2, 3] for v in result["verification"].values())
    assert_close(result["verification"], expected["verification"])
    assert_close(untimed(result), untimed(expected))
    assert _no_sweep_actors()


def test_the_cli_hagd_on_ray_verifies_as_in_process(ray_instance, tiny_cache, tmp_path, monkeypatch, hagd_inputs):
    expected = _hagd(hagd_inputs).to_json()
    got = run_cli(monkeypatch, tiny_cache, tmp_path, ["hagd", "--model", TINY_MODEL, "--transcoder", TINY_CLT,
                                                      "--task", "ioi", "-n", "3", "--options", json.dumps(HAGD)])
    assert_close(got["verification"], expected["verification"])
    assert got["circuit"] == expected["circuit"]
    assert _no_sweep_actors()


def test_a_hagd_job_through_the_api_on_ray_stores_the_in_process_verification(ray_settings, hagd_inputs):
    expected = _hagd(hagd_inputs).to_json()
    body = {"kind": "hagd", "params": {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 3,
                                       "options": HAGD}}
    with TestClient(create_app(ray_settings)) as client:
        job, _ = run_to_end(client, body, timeout=300)
        assert job["status"] == "done", job["error"]
        stored = client.get(job["links"]["hierarchy"]).json()["result"]
    assert_close(stored["verification"], expected["verification"])
    assert stored["circuit"] == expected["circuit"]
    assert _no_sweep_actors()
