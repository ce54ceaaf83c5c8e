"""`--executor ray` for the commands whose work fans out (sweep, edge-sweep, hagd): the options,
and what the Ray actors load. Not a command family: pie, edges and hagd use it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from backend.errors import UserError
from backend.settings import Settings


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """--executor, --address, --ray-workers; `what` names the shards (e.g. "the prompt batches")."""
    p.add_argument("--executor", choices=("inprocess", "ray"),
                   help=f"run {what} here, or as shards on Ray actors (default: PIESCOPE_EXECUTOR)")
    p.add_argument("--address", help="with --executor ray: the Ray cluster to join, e.g. 'auto' "
                                     "(default: PIESCOPE_RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--ray-workers", type=int, help="with --executor ray: actors, each loading the model once "
                                                   "(default: one per GPU, else one per CPU)")


def wants_ray(args: argparse.Namespace, settings: Settings) -> bool:
    return (args.executor or settings.executor) == "ray"


def ray_inputs(args: argparse.Namespace, settings: Settings, task_options: dict[str, Any], *,
               transcoder: bool = True):
    """Check the command's inputs without loading anything heavy -> (settings for the Ray executor,
    the `SweepInputs` every actor loads, the model's display name, the transcoder's or None).
    Paths are made absolute (on a cluster they must exist on every node)."""
    from backend.models.loading import locate
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.tasks import get_task
    if args.n <= 0:
        raise UserError(f"-n must be a positive number of prompts, not {args.n}")
    if args.ray_workers is not None and args.ray_workers <= 0:
        raise UserError(f"--ray-workers must be a positive number, not {args.ray_workers}")
    try:
        from backend.executors.ray_executor import SweepInputs, absolute
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'piescope[ray]'") from None
    if "path" in task_options:
        task_options = {**task_options, "path": absolute(task_options["path"])}
    get_task(args.task, **task_options)
    model_name, where, kind = locate(args.model, settings, allow_paths=True)
    tc_name, tc_path = resolve_transcoder(args.transcoder, settings, allow_paths=True) if transcoder else (None, None)
    settings = settings.model_copy(update={"executor": "ray", "models_cache": Path(settings.models_cache).resolve(),
                                           **({"ray_address": args.address} if args.address else {})})
    model_ref = str(Path(where).resolve()) if kind in ("dir", "gguf") else args.model  # else a registry name
    seed = getattr(args, "seed", 0)  # hagd has none: its verification's prompt sets carry their seeds
    inputs = SweepInputs(model_ref, None if tc_path is None else str(tc_path), args.task, task_options, args.n,
                         seed, allow_paths=True)
    return settings, inputs, model_name, tc_name


def say_pairs(info: dict[str, Any], task: str) -> None:
    """The prompt pairs the actors built, as the in-process commands say it."""
    from backend.cli.output import say
    dropped = ", ".join(f"{v} {k}" for k, v in info["dropped"].items() if v)
    say(f"{len(info['pairs'])} {task} prompt pairs" + (f" (dropped: {dropped})" if dropped else ""))
