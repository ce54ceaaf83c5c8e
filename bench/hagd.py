"""HAGD benchmarks (issue 13): prints tables (run: `python bench/hagd.py`; slow on a busy CPU).

1. circuits: HAGD's circuit on modadd-113 (and IOI on the demo model with --ioi): its size,
   sufficiency and necessity (mean +- std over 5 fresh prompt sets), against FAP's top features
   and random active features at the same number of features;
2. cost against graph size: wall time and cluster evaluations of the coarse-to-fine search for
   growing pools (top-N occurrences per prompt); the exponent of evaluations and of search time
   against the number of graph nodes, next to the O(n^2 log n) the HAGD abstract claims;
3. the scorer: held-out Spearman of the learned GNN and of attribution mass, per held-out task,
   from the scorer file (`piescope hagd-scorer`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.circuits.attribution import Attributor  # noqa: E402
from backend.cli.output import print_table  # noqa: E402
from backend.hagd.feature_graph import build_feature_graph  # noqa: E402
from backend.hagd.hierarchy import build_hierarchy  # noqa: E402
from backend.hagd.pipeline import HagdConfig, _prepare, run_hagd  # noqa: E402
from backend.hagd.scorer import load_scorer  # noqa: E402
from backend.hagd.search import ablation_score, coarse_to_fine  # noqa: E402
from backend.hagd.verify import FeatureAblation  # noqa: E402
from backend.models.loading import load_model  # noqa: E402
from backend.models.transcoder_files import load_transcoder  # noqa: E402
from backend.models.transcoder_registry import resolve_transcoder  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.tasks import get_task  # noqa: E402


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}% ± {100 * std:.1f}"


def circuits_table(settings: Settings, model: str, tc_name: str, task: str, n: int, options: dict) -> dict:
    adapter = load_model(model, settings)
    transcoder = load_transcoder(resolve_transcoder(tc_name, settings)[1])
    result = run_hagd(adapter, transcoder, get_task(task), n, HagdConfig.from_options(options),
                      model_name=model, transcoder_name=tc_name, task_name=task)
    rows = [{"task": f"{task} ({model})", "circuit": name, "features": v["n_features"],
             "sufficiency": pct(v["sufficiency_mean"], v["sufficiency_std"]),
             "necessity": pct(v["necessity_mean"], v["necessity_std"]), "seeds": len(v["seeds"])}
            for name, v in result.verification.items()]
    print_table(rows)
    print(f"levels {' > '.join(map(str, result.levels))}; {result.search['evaluations']} cluster evaluations; "
          f"{result.search['survivors']} survivors; " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    return result.to_json()


def cost_table(settings: Settings, model: str, tc_name: str, task: str, n: int, pools: list[int],
               options: dict) -> list[dict]:
    adapter = load_model(model, settings)
    transcoder = load_transcoder(resolve_transcoder(tc_name, settings)[1])
    config = HagdConfig.from_options(options)
    attr = Attributor(adapter, transcoder)
    runs_list = _prepare(attr, get_task(task).build(adapter.tokenizer, n, seed=config.seed), config.batch_size)
    ablation = FeatureAblation(attr, runs_list)
    rows = []
    for pool in pools:
        t0 = time.perf_counter()
        graph = build_feature_graph(attr, runs_list, pool=pool)
        t1 = time.perf_counter()
        hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=config.ratio, top=config.top, seed=config.seed)
        t2 = time.perf_counter()
        search = coarse_to_fine(hierarchy, graph, ablation_score(graph, ablation), threshold=config.threshold)
        t3 = time.perf_counter()
        rows.append({"pool": pool, "nodes": len(graph), "features": int(graph.is_feature.sum()),
                     "levels": " > ".join(map(str, hierarchy.counts())), "evaluations": search.evaluations,
                     "survivors": len(search.survivors), "graph s": t1 - t0, "hierarchy s": t2 - t1,
                     "search s": t3 - t2})
    print_table(rows)
    n_nodes = np.log([r["nodes"] for r in rows])
    for key in ("evaluations", "hierarchy s", "search s"):
        y = np.log([max(r[key], 1e-9) for r in rows])
        slope = np.polyfit(n_nodes, y, 1)[0] if len(rows) > 1 else float("nan")
        print(f"{key} ~ n^{slope:.2f}")
    print("(the HAGD abstract claims O(n^2 log n) overall, i.e. an exponent a little above 2)")
    return rows


def scorer_table(path: Path) -> list[dict]:
    if not path.is_file():
        print(f"(no scorer at {path}: build it with `piescope hagd-scorer`)")
        return []
    summary = load_scorer(path).summary()
    rows = [{"held-out task": r["heldout"], "clusters": r["clusters"], "GNN Spearman": r["gnn_spearman"],
             "attribution-mass Spearman": r["mass_spearman"]} for r in summary["loto"]]
    print_table(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--options", default='{"pool": 50, "lam": 0.002, "threshold": 0.005, "steps": 80, "lr": 0.2}')
    parser.add_argument("--pools", default="5,10,20,40,80")
    parser.add_argument("--ioi", action="store_true", help="also IOI on the demo model (needs its CLT)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: circuits,cost,scorer")
    parser.add_argument("--out", help="write every table as JSON here")
    args = parser.parse_args()
    settings = Settings()
    options = json.loads(args.options)
    skip = set(args.skip.split(","))
    out: dict = {}
    if "circuits" not in skip:
        print("\n## Circuits: sufficiency and necessity at equal size (mean ± std over prompt sets)\n")
        out["modadd"] = circuits_table(settings, "modadd-113", "modadd-113/clt", "modadd", args.n, options)
        if args.ioi:
            out["ioi"] = circuits_table(settings, "gemma-3-270m", "gemma-3-270m/clt", "ioi", min(args.n, 16),
                                        {**options, "verify_n": 8})
    if "cost" not in skip:
        print("\n## Cost against graph size (modadd-113)\n")
        out["cost"] = cost_table(settings, "modadd-113", "modadd-113/clt", "modadd", args.n,
                                 [int(p) for p in args.pools.split(",")], options)
    if "scorer" not in skip:
        print("\n## The learned scorer, leave-one-task-out\n")
        out["scorer"] = scorer_table(Path(settings.models_cache) / "hagd" / "scorer.pt")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
