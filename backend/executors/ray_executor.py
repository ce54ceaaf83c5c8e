"""The Ray executor: the shards of a sweep, an edge sweep or a HAGD verification run on Ray
actors, merged into exactly the in-process result.

What fans out, and who merges it (the in-process run calls the same shard functions through
`backend.circuits.pipeline.local_map`, so the science has one code path):
- a sweep's prompt batches: `SweepShards.first_pass` / `second_pass`, merged by
  `backend.circuits.pipeline.merge_sweep` (seeds depend on the global prompt index, so a shard's
  result does not depend on which actor ran it);
- an edge sweep's attribution scores and (method, edge count) points: `EdgeSweepPoints.scores` /
  `point`, merged by `backend.edges.pipeline.merge_edge_sweep` (the driver ships the scores to
  the points: see that module);
- HAGD's verification prompt sets: `HagdVerifier.verify_set`, merged by
  `backend.hagd.verify.merge_verification` (HAGD's graph, hierarchy and search run in the driver).

Each actor (`ShardWorker`) loads the model (and transcoder) and builds its runner once, by name
(or, from the CLI, by path) from its own `models_cache`: which runner follows from the config's
type (`build_runner`). One pool class (`RayShardPool`) serves the three.

The driver hands each idle actor the next shard (a slow shard never holds up the others), reports
progress (shards done of all) through the job's progress callback, and, when that callback raises
(the job was cancelled), cancels the pending tasks and kills the actors. An actor whose process
dies is restarted and its shard retried, `PIESCOPE_RAY_MAX_RETRIES` times at most; after that the
work fails with the reason (`ShardFailed`). Only the driver writes to the store, once, with the
merged result: a retried shard never writes rows, so nothing is duplicated, and the store needs no
network access from the Ray workers.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions

from backend.circuits.pipeline import MapShards, SweepConfig, SweepShards, merge_sweep, plan_sweep
from backend.circuits.results import SweepResult
from backend.edges.evaluation import log_spaced_counts
from backend.edges.pipeline import (EdgeSweep, EdgeSweepConfig, EdgeSweepPoints, edge_sweep_options, merge_edge_sweep,
                                    plan_edge_sweep)
from backend.errors import UserError
from backend.hagd.pipeline import HagdConfig, HagdVerifier
from backend.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
R = TypeVar("R")
NAMESPACE = "piescope"
POLL_SECONDS = 0.2  # how often the driver reports progress (and so notices a cancel) while it waits
KILL_WAIT_SECONDS = 10.0  # how long closing a pool waits for Ray to confirm its actors are dead


class ShardFailed(RuntimeError):
    """A shard could not finish: its Ray worker died more often than allowed, or it raised."""


WorkConfig = SweepConfig | EdgeSweepConfig | HagdConfig


@dataclass(frozen=True)
class SweepInputs:
    """What a worker loads: the model and transcoder (registry names; paths only when
    allow_paths, the CLI's; no transcoder for an edge sweep), and the task's prompts."""

    model: str
    transcoder: str | None
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    n: int = 32
    seed: int = 0
    allow_paths: bool = False


def connect(settings: Settings) -> None:
    """Join the Ray cluster at PIESCOPE_RAY_ADDRESS, or start a local instance (no dashboard,
    workers' logs kept out of this process's output, workers at this process's priority); nothing
    when already connected."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **options)
    else:
        cpus = settings.ray_workers * settings.ray_threads if settings.ray_workers else None
        # Ray nices its workers to 15 by default; the shards are the job's own work, at its priority.
        ray.init(num_cpus=cpus, _system_config={"worker_niceness": 0}, **options)


def default_workers(settings: Settings) -> int:
    """One actor per GPU of the cluster on a CUDA device, else one per ray_threads CPUs."""
    if settings.ray_workers:
        return settings.ray_workers
    resources = ray.cluster_resources()
    if settings.device.startswith("cuda"):
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // settings.ray_threads)


def build_runner(settings: Settings, inputs: SweepInputs, config: WorkConfig) -> tuple[Any, dict[str, Any]]:
    """Load the inputs and build the runner of the config's kind of work -> (runner, info), info =
    {"model", "transcoder" (display names), and, but for HAGD (whose prompt sets are the tasks'),
    "pairs", "dropped"; an edge sweep's also "graph" (its counts)}."""
    from backend.circuits.attribution import Attributor
    from backend.jobs import _pairs_json
    from backend.models.loading import load_model
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.tasks import get_task
    s, i = settings, inputs
    adapter = load_model(i.model, s, allow_paths=i.allow_paths)
    info: dict[str, Any] = {"model": adapter.name, "transcoder": None}
    transcoder = None
    if i.transcoder is not None:
        info["transcoder"], path = resolve_transcoder(i.transcoder, s, allow_paths=i.allow_paths)
        transcoder = load_transcoder(path, device=s.device)
        transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
    task = get_task(i.task, **i.task_options)
    if isinstance(config, HagdConfig):
        return HagdVerifier(Attributor(adapter, transcoder, config.corruption, config.grad), task, i.n, config), info
    batch = task.build(adapter.tokenizer, i.n, seed=i.seed)
    if len(batch) == 0:
        raise UserError(f"no prompt pair of task '{i.task}' fits the tokenizer of '{i.model}' "
                        f"(dropped: {batch.dropped})")
    info |= {"pairs": _pairs_json(batch), "dropped": dict(batch.dropped)}
    if isinstance(config, EdgeSweepConfig):
        points = EdgeSweepPoints(adapter, batch, config)
        return points, info | {"graph": points.ctx.graph.counts()}
    return SweepShards(adapter, transcoder, batch, config), info


class ShardWorker:
    """A Ray actor's state: one piece of work's inputs loaded and its runner built on first use
    (and again after a restart)."""

    def __init__(self, settings: Settings, inputs: SweepInputs, config: WorkConfig) -> None:
        import torch
        torch.set_num_threads(settings.ray_threads)
        if settings.device.startswith("cuda"):  # Ray made the actor's one GPU the only visible one
            settings = settings.model_copy(update={"device": "cuda"})
        self.settings, self.inputs, self.config = settings, inputs, config
        self._runner: Any = None
        self._info: dict[str, Any] = {}

    def _loaded(self) -> Any:
        if self._runner is None:
            self._runner, self._info = build_runner(self.settings, self.inputs, self.config)
        return self._runner

    def load(self) -> dict[str, Any]:
        """Load everything -> `build_runner`'s info."""
        self._loaded()
        return self._info

    def run(self, method: str, args: tuple) -> Any:
        """`<runner>.<method>(*args)` (e.g. SweepShards.first_pass) on this worker's runner."""
        return getattr(self._loaded(), method)(*args)


class RayShardPool:
    """The actors of one piece of work (at most one per shard), killed when it ends either way."""

    def __init__(self, settings: Settings, inputs: SweepInputs, config: WorkConfig, n_shards: int,
                 workers: int | None = None) -> None:
        connect(settings)
        self.retries = settings.ray_max_retries
        n = max(1, min(workers or default_workers(settings), n_shards))
        gpus = 1 if settings.device.startswith("cuda") else 0
        self.prefix = f"sweep-{uuid.uuid4().hex[:12]}"
        actor = ray.remote(ShardWorker)
        self.actors = [actor.options(name=f"{self.prefix}-{i}", namespace=NAMESPACE, num_cpus=settings.ray_threads,
                                     num_gpus=gpus, max_restarts=self.retries, max_task_retries=self.retries
                                     ).remote(settings, inputs, config) for i in range(n)]

    def __enter__(self) -> RayShardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors and wait (briefly) until Ray reports them gone: `ray.kill` only sends the
        order, and a task submitted before it lands would still run on the dying worker."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while self._alive() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 4)

    def _alive(self) -> list[str]:
        """Names of this pool's actors Ray still lists as alive."""
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and a["name"].startswith(self.prefix)]

    def _get(self, ref: ray.ObjectRef, what: str) -> Any:
        """ray.get, with a shard's own UserError re-raised as itself and a dead worker explained."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            raise ShardFailed(f"{what} raised {type(cause).__name__ if cause else 'an error'}: {cause or err}") from err
        except ray.exceptions.RayError as err:
            raise ShardFailed(f"{what}: its Ray worker died and was restarted {self.retries} time(s) "
                              f"without finishing it ({type(err).__name__})") from err

    def load(self, progress: Progress) -> dict[str, Any]:
        """Every actor loads the model, transcoder and prompts (in parallel) -> the first's info."""
        refs = [a.load.remote() for a in self.actors]
        try:
            while True:
                progress(0.0, f"loading the model on {len(self.actors)} Ray worker(s)")
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)
                if len(ready) == len(refs):
                    break
        except BaseException:
            self._cancel(refs)
            raise
        infos = [self._get(ref, "loading the model") for ref in refs]
        return infos[0]

    def map(self, method: str, args: list[tuple], progress: Progress) -> list:
        """Run `ShardWorker.run(method, a)` for every a, each on the next idle actor -> results in order.
        `progress` is called at least every POLL_SECONDS; when it raises, the tasks are cancelled,
        the actors killed, and its exception goes on."""
        results: list[Any] = [None] * len(args)
        todo = list(range(len(args)))[::-1]
        running: dict[ray.ObjectRef, tuple[int, Any]] = {}
        idle = list(self.actors)
        done = 0
        label = method.replace("_", " ")
        try:
            while todo or running:
                while todo and idle:
                    i = todo.pop()
                    actor = idle.pop(0)
                    running[actor.run.remote(method, args[i])] = (i, actor)
                progress(done / len(args), f"{label}: {done} of {len(args)} shards done on "
                                           f"{len(self.actors)} Ray worker(s)")
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    i, actor = running.pop(ref)
                    results[i] = self._get(ref, f"{label} of {args[i][0].label}")
                    idle.append(actor)
                    done += 1
        except BaseException:
            self._cancel(list(running))
            raise
        return results

    def _cancel(self, refs: list[ray.ObjectRef]) -> None:
        """Cancel pending tasks and kill the actors (a running actor task cannot be interrupted)."""
        for ref in refs:
            ray.cancel(ref)
        self.close()


def _on_pool(settings: Settings, inputs: SweepInputs, config: WorkConfig, n_shards: int, workers: int | None,
             say: Progress, merge: Callable[[RayShardPool, dict[str, Any]], R]) -> tuple[R, dict[str, Any]]:
    """Start the actors, load everything on them, merge(pool, info) -> (its result, info)."""
    say(0.0, "starting Ray workers")
    with RayShardPool(settings, inputs, config, n_shards, workers) as pool:
        info = pool.load(say)
        return merge(pool, info), info


def run_sweep(settings: Settings, inputs: SweepInputs, config: SweepConfig, *, progress: Progress | None = None,
              workers: int | None = None, model_name: str | None = None,
              transcoder_name: str | None = None) -> tuple[SweepResult, dict[str, Any]]:
    """The sweep of `config` on `inputs`, its shards on Ray actors -> (SweepResult, info), info =
    the first worker's {"model", "transcoder" (display names), "pairs", "dropped"}; the result
    names the model and transcoder `model_name`/`transcoder_name`, by default the display names.
    The result equals `pipeline.run_sweep` in this process (up to float reduction order)."""
    say = progress or (lambda f, m: None)
    plan = plan_sweep(config)  # a bad config fails before any actor starts
    return _on_pool(settings, inputs, config, math.ceil(inputs.n / config.batch_size), workers, say,
                    lambda pool, info: merge_sweep(
                        plan, len(info["pairs"]), pool.map, model_name=model_name or info["model"],
                        transcoder_name=transcoder_name or info["transcoder"], task_name=inputs.task, progress=say))


def run_edge_sweep(settings: Settings, inputs: SweepInputs, config: EdgeSweepConfig, *,
                   progress: Progress | None = None, workers: int | None = None,
                   model_name: str | None = None) -> tuple[EdgeSweep, dict[str, Any]]:
    """The edge sweep of `config` on `inputs` (no transcoder), its attribution scores and points on
    Ray actors -> (EdgeSweep, info), info as `build_runner`'s. The result equals
    `backend.edges.pipeline.run_edge_sweep` in this process (up to float reduction order)."""
    say = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    options = edge_sweep_options(config)  # a bad method or option fails before any actor starts
    # at most this many points (the default counts depend on the graph, which only the actors load)
    n_points = len(options) * len(config.counts or log_spaced_counts(10 ** 9))

    def merge(pool: RayShardPool, info: dict[str, Any]) -> EdgeSweep:
        plan = plan_edge_sweep(config, info["graph"]["edges"])
        return merge_edge_sweep(plan, info["graph"], len(info["pairs"]), pool.map,
                                model_name=model_name or info["model"], task_name=inputs.task, progress=say)
    sweep, info = _on_pool(settings, inputs, config, n_points, workers, say, merge)
    sweep.seconds = time.perf_counter() - t0
    return sweep, info


@contextmanager
def task_map(settings: Settings, inputs: SweepInputs, config: WorkConfig, workers: int | None = None
             ) -> Iterator[MapShards]:
    """A MapShards that runs its tasks on Ray actors, started at its first call (one per task at
    most) and killed when the block ends: HAGD's verification (`run_hagd(..., verify_map=...)`),
    whose driver runs the search itself first."""
    pools: list[RayShardPool] = []

    def run(method: str, args: list[tuple], progress: Progress) -> list:
        if not pools:
            progress(0.0, "starting Ray workers")
            pools.append(RayShardPool(settings, inputs, config, len(args), workers))
        return pools[0].map(method, args, progress)
    try:
        yield run
    finally:
        for pool in pools:
            pool.close()


def absolute(ref: str) -> str:
    """A CLI argument that names an existing file or directory, made absolute (workers may run
    elsewhere); anything else (a registry name) unchanged."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref
