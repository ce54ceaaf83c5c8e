"""The Ray executor on a local Ray instance (one per test session, 2 CPUs): a sweep's shards run on
actors that load the tiny model and CLT by name from a models_cache on disk, as a deployment's
would, and merge into exactly the in-process sweep — also when an actor is killed mid-run; a
worker that dies too often fails the sweep with the reason; cancelling kills the actors; a sweep
job through the API with PIESCOPE_EXECUTOR=ray stores the same result."""

from __future__ import annotations

import json
import math
import time

import pytest

ray = pytest.importorskip("ray")

from fastapi.testclient import TestClient  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.api.app import create_app  # noqa: E402
from backend.circuits.pipeline import SweepShards, local_map, merge_sweep, plan_sweep, sweep_shards  # noqa: E402
from backend.executors.ray_executor import NAMESPACE, RayShardPool, ShardFailed, SweepInputs  # noqa: E402
from tests.api_fixtures import (TINY_CLT, TINY_MODEL, pg_cluster, store_settings, store_url,  # noqa: E402,F401
                                tiny_cache, tiny_settings)
from tests.test_jobs_e2e import run_to_end, untimed  # noqa: E402

pytestmark = pytest.mark.ray

SWEEP = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 6, "seed": 0,
         "methods": ["fap", "fap-synergy", "random"], "ks": [2, 4], "random_seeds": 2, "batch_size": 2}
TOL = 1e-6


@pytest.fixture(scope="session")
def ray_instance():
    """A local Ray instance for the session: 2 CPUs (two one-thread actors), no dashboard, actors
    at the tests' priority (Ray would nice them 15 further)."""
    started = not ray.is_initialized()  # once per session, whichever module's tests come first
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="piescope-tests",
                 _system_config={"worker_niceness": 0})
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def ray_settings(ray_instance, tiny_cache, tmp_path):
    return tiny_settings(tiny_cache, tmp_path / "data").model_copy(
        update={"executor": "ray", "ray_workers": 2, "ray_threads": 1, "ray_max_retries": 2})


def _params():
    return job_functions.normalise(job_functions.SweepParams(**SWEEP))


def _inputs(params) -> SweepInputs:
    return SweepInputs(params.model, params.transcoder, params.task, dict(params.task_options), params.n, params.seed)


@pytest.fixture(scope="module")
def in_process(tiny_cache, tmp_path_factory):
    """The in-process sweep, and every shard's result by pass ("first_pass", "second_pass")."""
    settings = tiny_settings(tiny_cache, tmp_path_factory.mktemp("inproc"))
    params = _params()
    adapter, transcoder, batch = job_functions.prepare(job_functions.JobContext(settings), params)
    shards = SweepShards(adapter, transcoder, batch, job_functions.sweep_config(params))
    seen: dict[str, list] = {}
    result = merge_sweep(shards.plan, len(batch), _recording(local_map(shards), seen), model_name=params.model,
                         transcoder_name=params.transcoder, task_name=params.task)
    return result, seen


def _recording(map_shards, seen: dict[str, list]):
    def run(method, args, progress):
        seen[method] = map_shards(method, args, progress)
        return seen[method]
    return run


def assert_close(a, b, path="result"):
    """Equal JSON, floats within TOL."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL, (path, a, b)
    else:
        assert a == b, (path, a, b)


def _points(shard_result) -> dict:
    """Every accumulated point of one shard's result, by (what, method or "extra"/"curve", K)."""
    points = {("extra", k): p for k, p in shard_result.extra.items()}
    points |= {(name, k): p for (name, k), p in getattr(shard_result, "points", {}).items()}
    return points | {("curve", k): p for k, p in getattr(shard_result, "curve", {}).items()}


def assert_same_shards(seen, expected):
    """Per shard and (method, K): per-prompt KL within TOL and identical kept sets (digests)."""
    assert seen.keys() == expected.keys()
    for method in expected:
        for got, want in zip(seen[method], expected[method], strict=True):
            got_points, want_points = _points(got), _points(want)
            assert got_points.keys() == want_points.keys()
            for key, p in want_points.items():
                assert got_points[key].kept == p.kept and len(p.kept) > 0, (method, key)
                assert max(abs(x - y) for x, y in zip(got_points[key].kl, p.kl, strict=True)) <= TOL, (method, key)


def _pool_sweep(settings, hook=lambda pool, f, m: None):
    """The sweep through a RayShardPool -> (result, shard results by pass)."""
    params = _params()
    config = job_functions.sweep_config(params)
    shards = sweep_shards(params.n, params.batch_size)
    seen: dict[str, list] = {}
    with RayShardPool(settings, _inputs(params), config, len(shards)) as pool:
        info = pool.load(lambda f, m: None)

        def watched(method, args, p):  # the test's hook sees the pool at every progress report
            return pool.map(method, args, lambda f, m: (p(f, m), hook(pool, f, m)))
        result = merge_sweep(plan_sweep(config), len(info["pairs"]), _recording(watched, seen),
                             model_name=params.model, transcoder_name=params.transcoder, task_name=params.task)
    return result, seen


def _no_sweep_actors(timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_a_ray_sweep_equals_the_in_process_sweep(ray_settings, in_process):
    expected, expected_shards = in_process
    result, seen = _pool_sweep(ray_settings)
    assert_close(untimed(result.to_json()), untimed(expected.to_json()))
    assert_same_shards(seen, expected_shards)
    assert _no_sweep_actors()


def kill_once(killed: list):
    """A progress hook that kills actor 0 (to be restarted) at its first call, right after the
    first shards were handed out: actor 0 is running one."""
    def hook(pool, fraction, message):
        if not killed:
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0], no_restart=False)
    return hook


def test_a_killed_actor_is_restarted_its_shard_retried_and_the_result_is_identical(ray_settings, in_process):
    expected, expected_shards = in_process
    killed: list = []
    result, seen = _pool_sweep(ray_settings, kill_once(killed))
    assert killed
    assert_close(untimed(result.to_json()), untimed(expected.to_json()))
    assert_same_shards(seen, expected_shards)


def test_a_worker_that_keeps_dying_fails_the_sweep_with_the_reason(ray_settings):
    settings = ray_settings.model_copy(update={"ray_max_retries": 0})

    def kill(pool, fraction, message):
        ray.kill(pool.actors[0], no_restart=False)
    with pytest.raises(ShardFailed, match="Ray worker died"):
        _pool_sweep(settings, kill)
    assert _no_sweep_actors()


def test_cancel_kills_the_actors_and_stops_the_shards(ray_settings):
    class Cancelled(Exception):
        pass
    params = _params()
    shards = sweep_shards(params.n, 1)
    config = job_functions.sweep_config(params.model_copy(update={"batch_size": 1}))
    calls = []

    def cancel_after_a_shard(fraction, message):
        calls.append(fraction)
        if fraction > 0:
            raise Cancelled
    with RayShardPool(ray_settings, _inputs(params), config, len(shards)) as pool:
        pool.load(lambda f, m: None)
        with pytest.raises(Cancelled):
            pool.map("first_pass", [(s,) for s in shards], cancel_after_a_shard)
        assert 0 < calls[-1] < 1  # cancelled with shards still to run
        for actor in pool.actors:  # killed: no shard runs (or reports) any more
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(actor.load.remote(), timeout=30)
    assert _no_sweep_actors()


def test_a_sweep_job_through_the_api_on_ray_stores_the_in_process_result(ray_instance, store_settings, in_process):
    """On SQLite and on PostgreSQL: only the driver (the API worker) writes, once, the merged result."""
    expected, _ = in_process
    settings = store_settings.model_copy(update={"executor": "ray", "ray_workers": 2, "ray_threads": 1})
    with TestClient(create_app(settings)) as client:
        job, seen = run_to_end(client, {"kind": "sweep", "params": SWEEP}, timeout=300)
        assert job["status"] == "done", job["error"]
        progress = [p for _, p in seen]
        assert progress == sorted(progress) and progress[-1] == 1.0
        stored = client.get(job["links"]["sweep"]).json()["result"]
        assert client.get("/api/sweeps").json()["total"] == 1
    assert_close(untimed(stored), untimed(expected.to_json()))
    assert _no_sweep_actors()


def test_cancelling_a_ray_sweep_job_marks_it_cancelled_and_stores_nothing(ray_settings):
    body = {"kind": "sweep", "params": {**SWEEP, "n": 24, "batch_size": 1}}
    with TestClient(create_app(ray_settings)) as client:
        job = client.post("/api/jobs", json=body).json()
        deadline = time.monotonic() + 120
        while client.get(f"/api/jobs/{job['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
        while (job := client.get(f"/api/jobs/{job['id']}").json())["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "cancelled", job
        assert client.get("/api/sweeps").json()["total"] == 0
    assert _no_sweep_actors()


def run_cli(monkeypatch, tiny_cache, tmp_path, argv: list[str]) -> dict:
    """`piescope <argv> --executor ray --ray-workers 2 --out FILE` on the tiny cache -> the JSON written."""
    from backend.cli import main
    monkeypatch.setenv("PIESCOPE_MODELS_CACHE", str(tiny_cache))
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out.json"
    assert main([*argv, "--executor", "ray", "--ray-workers", "2", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_cli_sweep_on_ray_writes_the_in_process_sweep(ray_instance, tiny_cache, tmp_path, monkeypatch,
                                                          in_process):
    from backend.cli.output import finite
    expected, _ = in_process
    written = run_cli(monkeypatch, tiny_cache, tmp_path, [
        "sweep", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi", "-n", "6",
        "--methods", "fap,fap-synergy,random", "--ks", "2,4", "--random-seeds", "2", "--batch-size", "2"])
    assert_close(untimed(written), untimed(finite(expected.to_json())))
    assert _no_sweep_actors()
