"""Peak memory of the demo's sweep at several N: it should not grow with the number of prompts.

    .venv/bin/python bench/sweep_memory.py -n 25,100

Each N runs in a fresh process (peak RSS only grows within one): the demo model and CLT, IOI,
FAP + activation magnitude + random at K = 50..800 with the random-from-active curve (the
sweep `make demo` stores). Prints a Markdown table: RSS after loading, peak RSS during the
sweep, and the sweep's own growth over the loaded baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import PeakMemory, rss_bytes, table  # noqa: E402

METHODS = ["fap", "activation-magnitude", "random"]


def one(n: int, ks: list[int], batch_size: int, random_clt: bool) -> dict:
    import torch

    from backend.circuits.pipeline import SweepConfig, run_sweep
    from backend.models.loading import load_model
    from backend.models.registry import DEMO_MODEL
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.settings import Settings
    from backend.tasks import get_task
    torch.set_num_threads(2)
    settings = Settings()
    adapter = load_model(DEMO_MODEL, settings)
    if random_clt:  # a stand-in of the demo CLT's shape (18 layers x 1024 TopK-32 features: ~10^4 occurrences/prompt)
        from backend.models.transcoder import Transcoder, TranscoderConfig
        tc_name = "random TopK-32 CLT, 1024 features per layer"
        tc = Transcoder.random(TranscoderConfig("clt", adapter.n_layers, adapter.d_model, 1024, "topk", k=32), seed=0)
    else:
        tc_name, tc_path = resolve_transcoder(f"{DEMO_MODEL}/clt", settings)
        tc = load_transcoder(tc_path)
    batch = get_task("ioi").build(adapter.tokenizer, n, seed=0)
    loaded = rss_bytes()
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        result = run_sweep(adapter, tc, batch, SweepConfig(methods=METHODS, ks=ks, batch_size=batch_size),
                           model_name=DEMO_MODEL, transcoder_name=tc_name, task_name="ioi")
    peak = max(mem.peaks.values())
    return {"N": len(batch), "CLT": tc_name, "active / prompt": result.n_active_mean, "batch size": batch_size, "RSS loaded GiB": loaded / 2**30,
            "peak RSS in sweep GiB": peak / 2**30, "growth over loaded GiB": (peak - loaded) / 2**30,
            "ru_maxrss GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "seconds": time.perf_counter() - t0, "FAP KL at K=100": next(
                r.kl_mean for r in result.rows if r.method == "fap" and r.k == 100) if 100 in ks else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", default="25,100", help="comma-separated numbers of prompts")
    parser.add_argument("--ks", default="50,100,200,400,800")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--random-clt", action="store_true",
                        help="a random CLT of the demo CLT's shape instead of the trained one")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one N, JSON out
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.one:
        print(json.dumps(one(args.one, ks, args.batch_size, args.random_clt)))
        return
    rows = []
    for n in (int(x) for x in args.n.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--ks", args.ks,
                              "--batch-size", str(args.batch_size)] + (["--random-clt"] if args.random_clt else []),
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]), flush=True)
    print("\n## Peak memory of the demo sweep by N\n")
    print(table(rows))
    if len(rows) > 1:
        lo, hi = rows[0]["peak RSS in sweep GiB"], rows[-1]["peak RSS in sweep GiB"]
        print(f"\npeak RSS at N={rows[-1]['N']} is {100 * (hi / lo - 1):+.1f}% of N={rows[0]['N']} (goal: within 10%)")


if __name__ == "__main__":
    main()
