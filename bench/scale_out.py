"""The same sweep in-process and on 1 and 2 Ray workers (one torch thread each): wall time, speed-up,
shard times, and what 8 GPUs would give for a 5-model x 4-method x 5-K x N=500 study.

    flock /work/bench.lock env OMP_NUM_THREADS=1 PIESCOPE_MODELS_CACHE=... .venv/bin/python bench/scale_out.py

Model: the demo (Gemma-3-270M + its CLT), IOI, FAP + activation magnitude + random at K = 50..800
with the random-from-active curve (the sweep `make demo` stores), N prompts in shards of
--batch-size. The Ray runs start a local Ray instance with 2 CPUs; each actor loads the model and
CLT itself from models_cache. Every run's per-prompt KL is checked against the in-process run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import table

METHODS = ["fap", "activation-magnitude", "random"]


def recording(map_shards, seen: dict):
    def run(method, args, progress):
        t0 = time.perf_counter()
        seen[method] = map_shards(method, args, progress)
        seen[f"{method} wall"] = time.perf_counter() - t0
        return seen[method]
    return run


def in_process(settings, inputs, config) -> dict:
    import torch

    from backend import jobs
    from backend.circuits.pipeline import SweepShards, local_map, merge_sweep
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    adapter, tc, batch = jobs.prepare(jobs.JobContext(settings), jobs.DatasetParams(
        model=inputs.model, transcoder=inputs.transcoder, task=inputs.task, n=inputs.n, seed=inputs.seed))
    load = time.perf_counter() - t0
    shards = SweepShards(adapter, tc, batch, config)
    seen: dict = {}
    result = merge_sweep(shards.plan, len(batch), recording(local_map(shards), seen), model_name=inputs.model,
                         transcoder_name=inputs.transcoder, task_name=inputs.task)
    return {"result": result, "seen": seen, "load": load, "wall": time.perf_counter() - t0, "workers": 0}


def on_ray(settings, inputs, config, workers: int) -> dict:
    from backend.circuits.pipeline import merge_sweep, plan_sweep, sweep_shards
    from backend.executors.ray_executor import RayShardPool
    settings = settings.model_copy(update={"executor": "ray", "ray_workers": workers, "ray_threads": 1})
    t0 = time.perf_counter()
    seen: dict = {}
    with RayShardPool(settings, inputs, config, len(sweep_shards(inputs.n, config.batch_size))) as pool:
        info = pool.load(lambda f, m: None)
        load = time.perf_counter() - t0
        result = merge_sweep(plan_sweep(config), len(info["pairs"]), recording(pool.map, seen),
                             model_name=inputs.model, transcoder_name=inputs.transcoder, task_name=inputs.task)
    return {"result": result, "seen": seen, "load": load, "wall": time.perf_counter() - t0, "workers": workers}


def shard_seconds(run: dict) -> list[float]:
    return [s.seconds for name in ("first_pass", "second_pass") for s in run["seen"].get(name, [])]


def sweep_wall(run: dict) -> float:
    return run["seen"]["first_pass wall"] + run["seen"].get("second_pass wall", 0.0)


def max_kl_diff(a, b) -> float:
    return max(abs(x - y) for m in a.per_prompt_kl for k in a.per_prompt_kl[m]
               for x, y in zip(a.per_prompt_kl[m][k], b.per_prompt_kl[m][k], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ks", default="50,100,200,400,800")
    args = parser.parse_args()
    import ray

    from backend.circuits.pipeline import SweepConfig
    from backend.executors.ray_executor import SweepInputs
    from backend.models.registry import DEMO_MODEL
    from backend.settings import Settings
    settings = Settings()
    ks = [int(k) for k in args.ks.split(",")]
    config = SweepConfig(methods=METHODS, ks=ks, batch_size=args.batch_size)
    inputs = SweepInputs(DEMO_MODEL, f"{DEMO_MODEL}/clt", "ioi", {}, args.n, 0)

    runs = [in_process(settings, inputs, config)]
    t0 = time.perf_counter()
    # Ray runs its worker processes at nice 15 by default: they would lose the cores to any other
    # work on this shared box, while the in-process run has this process's priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    runs += [on_ray(settings, inputs, config, w) for w in (1, 2)]
    ray.shutdown()

    base = runs[0]
    walls = [sweep_wall(r) for r in runs]
    rows = []
    for r, wall in zip(runs, walls):
        shards = shard_seconds(r)
        rows.append({"executor": f"Ray, {r['workers']} worker(s) x 1 thread" if r["workers"] else "in-process (1 thread)",
                     "load s": r["load"], "sweep s (both passes)": wall, "total s": r["wall"],
                     "speed-up vs in-process": walls[0] / wall, "speed-up vs 1 Ray worker": walls[1] / wall,
                     "sum of shard s": sum(shards), "shard s min-max": f"{min(shards):.1f}-{max(shards):.1f}",
                     "max |dKL| vs in-process": max_kl_diff(r["result"], base["result"])})
    n = base["result"].n_prompts
    print(f"## Scale-out: the demo sweep ({', '.join(METHODS)} at K = {args.ks}, random curve), "
          f"N = {n}, {math.ceil(n / args.batch_size)} shards of {args.batch_size}\n")
    print(f"Local Ray start: {ray_start:.1f} s (not in the rows). 'load' = the actors loading the model "
          "and CLT (in parallel), 'shards' = both passes.\n")
    print(table(rows))

    # The projection: per prompt, the shard seconds of this sweep (3 methods x 5 K, one CPU thread).
    per_prompt = sum(shard_seconds(base)) / n
    e_here = walls[1] / (2 * walls[2])  # 1 -> 2 workers on these 2 shared cores
    firsts = [s.seconds for s in base["seen"]["first_pass"]]
    e_balance = (sum(firsts) / len(firsts)) / max(firsts)  # the slowest shard sets the pace on idle devices
    methods_factor = 4 / len(METHODS)
    work = 5 * 500 * per_prompt * methods_factor  # CPU-thread seconds
    load = base["load"]
    print("\n## 8 workers for a 5-model x 4-method x 5-K x N=500 study (a model, not a measurement)\n")
    print(f"Measured: {per_prompt:.2f} s of shard work per prompt for {len(METHODS)} methods x {len(ks)} K on one "
          f"CPU thread; loading the model and CLT {load:.0f} s; parallel efficiency 1 -> 2 workers on these two "
          f"shared cores e = {e_here:.2f}; shard balance (mean / slowest first-pass shard) {e_balance:.2f}.\n"
          f"Model: every model costs what the demo does per prompt; the 4th method what the mean of these three "
          f"does (x{methods_factor:.2f}; FAP-Synergy costs several times more, so a lower bound); work "
          f"W = 5 x 500 x {per_prompt:.2f} s x {methods_factor:.2f} = {work / 3600:.1f} CPU-thread hours; "
          f"wall(w workers) = W / (w e S) + 5 x load (each model's actors load it once), S = one device's speed "
          f"over one CPU thread here (not measured: no GPU here). 8 GPUs do not share compute, so their e is "
          f"the shard balance; e measured here (two workers contending for two cores) is the pessimistic row.\n")
    proj = []
    for label, speed in (("CPU threads like these (S = 1)", 1.0), ("GPUs, S = 20", 20.0), ("GPUs, S = 100", 100.0)):
        one_worker = work / speed + 5 * load
        balanced = work / (8 * e_balance * speed) + 5 * load
        contended = work / (8 * e_here * speed) + 5 * load
        proj.append({"devices": label, "1 worker h": one_worker / 3600, "8 workers h (shard balance)": balanced / 3600,
                     "speed-up": one_worker / balanced, "8 workers h (e measured here)": contended / 3600,
                     "speed-up (e here)": one_worker / contended})
    print(table(proj))


if __name__ == "__main__":
    main()
