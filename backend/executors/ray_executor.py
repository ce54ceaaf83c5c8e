"""The Ray executor: a sweep's shards (prompt batches) run on Ray actors, merged into exactly the
in-process result.

Each actor (`ShardWorker`) loads the model, transcoder and prompts of one sweep once, by name
(or, from the CLI, by path) from its own `models_cache`, and runs `SweepShards.first_pass` /
`second_pass` for the shards the driver hands it, so the science has one code path
(`backend.circuits.pipeline.merge_sweep` merges the shard results wherever they ran; seeds depend
on the global prompt index, so a shard's result does not depend on which actor ran it).

The driver hands each idle actor the next shard (a slow shard never holds up the others), reports
progress (shards done of all) through the job's progress callback, and, when that callback raises
(the job was cancelled), cancels the pending tasks and kills the actors. An actor whose process
dies is restarted and its shard retried, `PIESCOPE_RAY_MAX_RETRIES` times at most; after that the
sweep fails with the reason (`ShardFailed`). Only the driver writes to the store, once, with the
merged result: a retried shard never writes rows, so nothing is duplicated, and the store needs no
network access from the Ray workers.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from backend.circuits.pipeline import SweepConfig, SweepShards, merge_sweep, plan_sweep
from backend.circuits.results import SweepResult
from backend.errors import UserError
from backend.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
NAMESPACE = "piescope"
POLL_SECONDS = 0.2  # how often the driver reports progress (and so notices a cancel) while it waits


class ShardFailed(RuntimeError):
    """A shard could not finish: its Ray worker died more often than allowed, or it raised."""


@dataclass(frozen=True)
class SweepInputs:
    """What a worker loads: the model and transcoder (registry names; paths only when
    allow_paths, the CLI's), and the task's prompts."""

    model: str
    transcoder: str
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


class ShardWorker:
    """A Ray actor's state: one sweep's model, transcoder and prompts, loaded on first use (and
    again after a restart), and its `SweepShards`."""

    def __init__(self, settings: Settings, inputs: SweepInputs, config: SweepConfig) -> None:
        import torch
        torch.set_num_threads(settings.ray_threads)
        if settings.device.startswith("cuda"):  # Ray made the actor's one GPU the only visible one
            settings = settings.model_copy(update={"device": "cuda"})
        self.settings, self.inputs, self.config = settings, inputs, config
        self._shards: SweepShards | None = None
        self._info: dict[str, Any] = {}

    def _loaded(self) -> SweepShards:
        if self._shards is None:
            from backend.jobs import _pairs_json
            from backend.models.loading import load_model
            from backend.models.transcoder_files import load_transcoder
            from backend.models.transcoder_registry import resolve_transcoder
            from backend.tasks import get_task
            s, i = self.settings, self.inputs
            adapter = load_model(i.model, s, allow_paths=i.allow_paths)
            tc_name, path = resolve_transcoder(i.transcoder, s, allow_paths=i.allow_paths)
            transcoder = load_transcoder(path, device=s.device)
            transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
            batch = get_task(i.task, **i.task_options).build(adapter.tokenizer, i.n, seed=i.seed)
            if len(batch) == 0:
                raise UserError(f"no prompt pair of task '{i.task}' fits the tokenizer of '{i.model}' "
                                f"(dropped: {batch.dropped})")
            self._info = {"model": adapter.name, "transcoder": tc_name, "pairs": _pairs_json(batch),
                          "dropped": dict(batch.dropped)}
            self._shards = SweepShards(adapter, transcoder, batch, self.config)
        return self._shards

    def load(self) -> dict[str, Any]:
        """Load everything -> {"model", "transcoder" (display names), "pairs", "dropped"}."""
        self._loaded()
        return self._info

    def run(self, method: str, args: tuple) -> Any:
        """`SweepShards.<method>(*args)` (first_pass or second_pass) on this worker's sweep."""
        return getattr(self._loaded(), method)(*args)


class RayShardPool:
    """The actors of one sweep (at most one per shard), killed when the sweep ends either way."""

    def __init__(self, settings: Settings, inputs: SweepInputs, config: SweepConfig, n_shards: int,
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
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

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
                    shard = args[i][0]
                    results[i] = self._get(ref, f"{label} of prompts {shard.start + 1}-{shard.stop}")
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


def run_sweep(settings: Settings, inputs: SweepInputs, config: SweepConfig, *, progress: Progress | None = None,
              workers: int | None = None, model_name: str | None = None,
              transcoder_name: str | None = None) -> tuple[SweepResult, dict[str, Any]]:
    """The sweep of `config` on `inputs`, its shards on Ray actors -> (SweepResult, info), info =
    the first worker's {"model", "transcoder" (display names), "pairs", "dropped"}; the result
    names the model and transcoder `model_name`/`transcoder_name`, by default the display names.
    The result equals `pipeline.run_sweep` in this process (up to float reduction order)."""
    say = progress or (lambda f, m: None)
    plan = plan_sweep(config)  # a bad config fails before any actor starts
    n_shards = math.ceil(inputs.n / config.batch_size)
    say(0.0, "starting Ray workers")
    with RayShardPool(settings, inputs, config, n_shards, workers) as pool:
        info = pool.load(say)
        result = merge_sweep(plan, len(info["pairs"]), pool.map, model_name=model_name or info["model"],
                             transcoder_name=transcoder_name or info["transcoder"], task_name=inputs.task, progress=say)
    return result, info


def absolute(ref: str) -> str:
    """A CLI argument that names an existing file or directory, made absolute (workers may run
    elsewhere); anything else (a registry name) unchanged."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref
