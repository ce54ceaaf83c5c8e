"""HAGD benchmarks (issue 13): prints tables (run: `python bench/hagd.py`; slow on a busy CPU).

1. circuits: HAGD's circuit on modadd-113 (and tasks on the demo model with --demo, e.g.
   `--demo ioi,greater-than`): its size,
   sufficiency and necessity (mean +- std over 5 fresh prompt sets), against FAP's top features
   and random active features at the same number of features;
2. size sweep (modadd-113): sufficiency against circuit size, HAGD at several lambdas and FAP's
   top-k and random at each of HAGD's sizes, on the same fresh prompt sets;
3. cost against graph size: wall time (per stage and in total) and cluster evaluations for
   growing pools (top-N occurrences per prompt); their log-log exponents against the number of
   graph nodes, next to the exponent n^2 log n has over the same range (the HAGD abstract's claim);
4. the scorer: held-out Spearman of the learned GNN and of attribution mass, per held-out task,
   from the scorer file (`piescope hagd-scorer`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.circuits.attribution import Attributor  # noqa: E402
from backend.cli.hagd import scorer_rows  # noqa: E402
from backend.cli.output import print_table  # noqa: E402
from backend.hagd.feature_graph import build_feature_graph  # noqa: E402
from backend.hagd.hierarchy import build_hierarchy  # noqa: E402
from backend.hagd.pipeline import (HagdConfig, HagdVerifier, _prepare, cluster_score,  # noqa: E402
                                   equal_size_baselines, run_hagd, verify_sets)
from backend.hagd.scorer import load_scorer  # noqa: E402
from backend.hagd.search import ablation_score, coarse_to_fine, mask_search  # noqa: E402
from backend.hagd.verify import FeatureAblation, feature_codes, merge_verification  # noqa: E402
from backend.models.loading import load_model  # noqa: E402
from backend.models.transcoder_files import load_transcoder  # noqa: E402
from backend.models.transcoder_registry import resolve_transcoder  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.tasks import get_task  # noqa: E402


_LOADED: dict[tuple[str, str], tuple] = {}


def model_and_transcoder(settings: Settings, model: str, tc_name: str) -> tuple:
    """The model's adapter and the transcoder, loaded once per run (each section reuses them)."""
    if (model, tc_name) not in _LOADED:
        _LOADED[(model, tc_name)] = (load_model(model, settings),
                                     load_transcoder(resolve_transcoder(tc_name, settings)[1]))
    return _LOADED[(model, tc_name)]


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}% ± {100 * std:.1f}"


def circuits_table(settings: Settings, model: str, tc_name: str, task: str, n: int, options: dict) -> dict:
    adapter, transcoder = model_and_transcoder(settings, model, tc_name)
    result = run_hagd(adapter, transcoder, get_task(task), n, HagdConfig.from_options(options),
                      model_name=model, transcoder_name=tc_name, task_name=task)
    rows = [{"task": f"{task} ({model})", "circuit": name, "features": v["n_features"],
             "sufficiency": pct(v["sufficiency_mean"], v["sufficiency_std"]),
             "necessity": pct(v["necessity_mean"], v["necessity_std"]), "seeds": len(v["seeds"])}
            for name, v in result.verification.items()]
    print_table(rows)
    v = result.verification
    if "hagd" in v and "fap" in v:
        paired = paired_difference(v["hagd"]["sufficiency"], v["fap"]["sufficiency"])
        print(f"sufficiency, HAGD minus FAP on the same prompt sets: {paired['hagd - fap (paired)']} points, "
              f"HAGD ahead on {paired['sets ahead']}")
    print(f"levels {' > '.join(map(str, result.levels))}; {result.search['evaluations']} cluster evaluations; "
          f"{result.search['survivors']} survivors; " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    return result.to_json()


def size_sweep(settings: Settings, model: str, tc_name: str, task: str, n: int, lams: list[float],
               options: dict) -> list[dict]:
    """Sufficiency against circuit size: HAGD at several lambdas (one graph, hierarchy and
    coarse-to-fine search; a mask search per lambda), FAP's top-k and random at each HAGD size,
    all verified on the same fresh prompt sets (the pipeline's verify_sets)."""
    adapter, transcoder = model_and_transcoder(settings, model, tc_name)
    config = HagdConfig.from_options(options)
    attr = Attributor(adapter, transcoder, config.corruption, config.grad)
    runs_list = _prepare(attr, get_task(task).build(adapter.tokenizer, n, seed=config.seed), config.batch_size)
    graph = build_feature_graph(attr, runs_list, pool=config.pool)
    hierarchy = build_hierarchy(graph.symmetric_weights(), ratio=config.ratio, top=config.top, seed=config.seed)
    ablation = FeatureAblation(attr, runs_list)
    search = coarse_to_fine(hierarchy, graph, cluster_score(config, graph, hierarchy, ablation)[0],
                            threshold=config.threshold)
    survivors = feature_codes(graph.layer[search.survivors], graph.feature[search.survivors], transcoder.n_features)
    circuits: dict[str, torch.Tensor] = {}
    for lam in lams:
        found = mask_search(ablation, survivors, lam=lam, steps=config.steps, lr=config.lr, seed=config.seed,
                            metric_weight=config.metric_weight)
        k = len(found.codes)
        circuits[f"hagd lam={lam}"] = found.codes
        for name, codes in equal_size_baselines(runs_list, transcoder.n_features, k, config.seed).items():
            circuits[f"{name} k={k}"] = codes
    verifier = HagdVerifier(attr, get_task(task), n, config)
    verified = merge_verification(circuits, [verifier.verify_set(u, circuits) for u in verify_sets(config)])
    rows = []
    for lam in lams:
        hagd = verified[f"hagd lam={lam}"]
        k = hagd.n_features
        fap, rnd = verified[f"fap k={k}"], verified[f"random k={k}"]
        rows.append({"lambda": lam, "features": k,
                     "hagd": pct(hagd.sufficiency_mean, hagd.sufficiency_std),
                     "fap": pct(fap.sufficiency_mean, fap.sufficiency_std),
                     "random": pct(rnd.sufficiency_mean, rnd.sufficiency_std),
                     **paired_difference(hagd.sufficiency, fap.sufficiency)})
    print_table(rows)
    print(f"sufficiency, mean ± std over {config.verify_seeds} fresh prompt sets of {verifier.n}; "
          f"{len(survivors)} features survive the coarse-to-fine search ({search.evaluations} evaluations)")
    return rows


def paired_difference(a: list[float], b: list[float]) -> dict[str, str]:
    """HAGD minus FAP on the same prompt sets, seed by seed: mean ± std of the paired difference
    (in points) and on how many sets HAGD is ahead; the sets' shared noise cancels in it."""
    d = 100 * np.subtract(a, b)
    std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    return {"hagd - fap (paired)": f"{d.mean():+.1f} ± {std:.1f}", "sets ahead": f"{int((d > 0).sum())}/{len(d)}"}


def exponent(x: list[float], y: list[float]) -> float:
    """The slope of log y against log x (least squares): y ~ x^slope over the measured range."""
    return float(np.polyfit(np.log(x), np.log(np.maximum(y, 1e-9)), 1)[0]) if len(x) > 1 else float("nan")


def cost_table(settings: Settings, model: str, tc_name: str, task: str, n: int, pools: list[int],
               options: dict) -> list[dict]:
    adapter, transcoder = model_and_transcoder(settings, model, tc_name)
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
        survivors = feature_codes(graph.layer[search.survivors], graph.feature[search.survivors],
                                  transcoder.n_features)
        mask_search(ablation, survivors, lam=config.lam, steps=config.steps, lr=config.lr, seed=config.seed,
                    metric_weight=config.metric_weight)
        t4 = time.perf_counter()
        rows.append({"pool": pool, "nodes": len(graph), "features": int(graph.is_feature.sum()),
                     "levels": " > ".join(map(str, hierarchy.counts())), "evaluations": search.evaluations,
                     "survivors": len(search.survivors), "graph s": t1 - t0, "hierarchy s": t2 - t1,
                     "search s": t3 - t2, "mask s": t4 - t3, "total s": t4 - t0})
    print_table(rows)
    nodes = [r["nodes"] for r in rows]
    # The claimed n^2 log n, fitted the same way over the same n, is the exponent to compare with.
    claim = exponent(nodes, [x * x * np.log(x) for x in nodes])
    all_clusters = exponent(nodes, [r["nodes"] / config.ratio for r in rows])
    print(f"over n = {min(nodes)}..{max(nodes)} graph nodes, log-log least-squares exponents: "
          + ", ".join(f"{key} ~ n^{exponent(nodes, [r[key] for r in rows]):.2f}"
                      for key in ("evaluations", "graph s", "hierarchy s", "search s", "mask s", "total s")))
    print(f"O(n^2 log n) (the HAGD abstract's claim) over the same n: n^{claim:.2f}; "
          f"scoring every cluster of every level would be ~ n^{all_clusters:.2f}")
    return rows
def scorer_table(path: Path) -> list[dict]:
    if not path.is_file():
        print(f"(no scorer at {path}: build it with `piescope hagd-scorer`)")
        return []
    summary = load_scorer(path).summary()
    rows = scorer_rows(summary["loto"])
    print_table(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=128, help="modadd prompts for the graph and the search")
    parser.add_argument("--options", default='{"pool": 50, "threshold": 0.002, "lam": 0.05, "steps": 100, '
                        '"lr": 0.1, "metric_weight": 1.0}')
    parser.add_argument("--lams", default="0.02,0.05,0.1,0.2,0.5,1.0", help="the size sweep's lambdas")
    parser.add_argument("--pools", default="5,10,20,40,80")
    parser.add_argument("--demo", default="", help="comma-separated tasks to run on the demo model too, e.g. "
                        "ioi,greater-than,docstring (needs its CLT)")
    parser.add_argument("--demo-n", type=int, default=16,
                        help="demo-model prompts (graph, search and each verification set)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: circuits,sweep,cost,scorer "
                        "(modadd: the modadd circuits table only, e.g. with --demo)")
    parser.add_argument("--out", help="write every table as JSON here")
    args = parser.parse_args()
    settings = Settings()
    options = json.loads(args.options)
    skip = set(args.skip.split(","))
    out: dict = {}
    if "circuits" not in skip:
        print("\n## Circuits: sufficiency and necessity at equal size (mean ± std over prompt sets)\n")
        if "modadd" not in skip:
            out["modadd"] = circuits_table(settings, "modadd-113", "modadd-113/clt", "modadd", args.n, options)
        for task in filter(None, (t.strip() for t in args.demo.split(","))):
            out[task] = circuits_table(settings, "gemma-3-270m", "gemma-3-270m/clt", task, args.demo_n, options)
    if "sweep" not in skip:
        print("\n## Size sweep (modadd-113): sufficiency against circuit size\n")
        out["sweep"] = size_sweep(settings, "modadd-113", "modadd-113/clt", "modadd", args.n,
                                  [float(x) for x in args.lams.split(",")], options)
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
