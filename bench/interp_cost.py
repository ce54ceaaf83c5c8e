"""What interpreting a circuit costs, and how good its explanations are (PIE's Interpret/Evaluate).

    .venv/bin/python bench/interp_cost.py                       # demo model, IOI, N=20, offline
    .venv/bin/python bench/interp_cost.py -n 50 --top-n 0 --corpus-tokens 50000 --faithfulness

1. Cost: explainer and rater calls for FAP circuits at K=50 and K=100 against explaining every
   feature active on the same prompts (PIE: pruning first makes interpretation ~40x cheaper).
   One explainer call per feature; rater calls as the score job makes them.
2. Quality: FADE clarity / responsiveness / purity (and faithfulness with --faithfulness) of
   the explanations of fap, fap-synergy and random circuits at K=50, on held-out texts, with the
   offline explainer and the offline *proxy* rater (token matching, not a judgement of meaning);
   again with the LLM endpoint when PIESCOPE_LLM_BASE_URL/_MODEL are set (or --llm), in a
   separate table: proxy scores are never compared with LLM ones.

Runs the same job functions as the API, on a temporary SQLite store. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import table  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.circuits.pipeline import PruneConfig, run_prune  # noqa: E402
from backend.store.interp import InterpStore, add_circuit_cost  # noqa: E402
from backend.models.loading import load_model  # noqa: E402
from backend.models.registry import DEMO_MODEL  # noqa: E402
from backend.models.transcoder_files import load_transcoder, transcoder_summary  # noqa: E402
from backend.models.transcoder_registry import resolve_transcoder  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.store import queries  # noqa: E402
from backend.store.db import open_store, transaction  # noqa: E402
from backend.tasks import get_task  # noqa: E402

METRICS = ("clarity", "responsiveness", "purity", "faithfulness")


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--transcoder", default=f"{DEMO_MODEL}/clt")
    parser.add_argument("-n", type=int, default=20, help="IOI prompts")
    parser.add_argument("--ks", default="50,100", help="budgets of the cost table")
    parser.add_argument("--quality-k", type=int, default=50)
    parser.add_argument("--methods", default="fap,fap-synergy,random", help="methods of the quality table")
    parser.add_argument("--top-n", type=int, default=20,
                        help="features per circuit to score in the quality table (0: all)")
    parser.add_argument("--corpus", choices=("default", "stories"), default="default")
    parser.add_argument("--corpus-tokens", type=int, default=16_000)
    parser.add_argument("--faithfulness", action="store_true", help="also steer (slow on CPU)")
    parser.add_argument("--llm", action="store_true", help="also use the LLM endpoint (default: when configured)")
    parser.add_argument("--score-sample", type=int, default=20,
                        help="cost table: measure rater calls per feature on this many features (0: all)")
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tmp = Path(tempfile.mkdtemp(prefix="piescope-interp-bench-"))
    base = Settings()
    settings = base.model_copy(update={"data_dir": tmp, "db_url": None})
    use_llm = args.llm or bool(base.llm_base_url and base.llm_model)
    t0 = time.perf_counter()
    adapter = load_model(args.model, settings)
    tc_name, tc_path = resolve_transcoder(args.transcoder, settings)
    tc = load_transcoder(tc_path)
    context = job_functions.JobContext(settings)
    context.models.get(args.model, lambda: adapter)
    context.transcoders.get(tc_name, lambda: tc)
    batch = get_task("ioi").build(adapter.tokenizer, args.n, seed=0)
    engine, sessions = open_store(settings)
    store = InterpStore(sessions)
    with transaction(sessions) as session:
        model_row = queries.get_or_create_model(session, args.model)
        queries.get_or_create_transcoder(session, tc_name, model_row, transcoder_summary(tc_path))
    print(f"# Interpretation cost and FADE quality: {args.model} + {tc_name}, IOI, N={len(batch)}, "
          f"corpus {args.corpus} ({args.corpus_tokens} tokens), LLM: {'yes' if use_llm else 'not configured'}\n")

    def stage(message: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {message}", file=sys.stderr, flush=True)

    def prune(method: str, k: int) -> tuple[int, object]:
        stage(f"pruning {method} K={k}")
        circuit = run_prune(adapter, tc, batch, PruneConfig(method=method, k=k, batch_size=args.batch_size,
                                                            completeness=False, all_token_kl=False),
                            model_name=args.model, transcoder_name=tc_name, task_name="ioi")
        with transaction(sessions) as session:
            model = queries.get_or_create_model(session, args.model)
            tc_row = queries.find_transcoder(session, tc_name)
            row = queries.save_circuit(session, circuit, f"bench-{method}-{k}", model, tc_row, None)
            return row.id, circuit

    def run(kind: str, circuit_id: int, **params) -> dict:
        stage(f"{kind} circuit {circuit_id} {params}")
        fn, model = ((job_functions.run_explain, job_functions.ExplainParams) if kind == "explain"
                     else (job_functions.run_score, job_functions.ScoreParams))
        output = fn(context, model(circuit_id=circuit_id, corpus=args.corpus, corpus_tokens=args.corpus_tokens,
                                   **params), store)
        with transaction(sessions) as session:
            add_circuit_cost(session, circuit_id, output.result["cost"])
        return output.result

    # ---------------------------------------------------------------- 1. cost
    cost_rows = []
    circuits: dict[tuple[str, int], int] = {}
    for k in [int(x) for x in args.ks.split(",")]:
        cid, circuit = prune("fap", k)
        circuits[("fap", k)] = cid
        explained = run("explain", cid, explainer="offline", force=True)
        n_feat = len(circuit.features)
        sample = min(args.score_sample or n_feat, n_feat)
        scored = run("score", cid, rater="offline", faithfulness=args.faithfulness, top_n=sample)
        ec, sc = explained["cost"], scored["cost"]
        per_feature = sc["score_calls"] / max(sc["scored_features"], 1)
        active_occ = statistics.fmean(p.n_active for p in circuit.prompts)
        kept_occ = statistics.fmean(len(p.kept) for p in circuit.prompts)
        cost_rows.append({
            "K": k, "KL": circuit.kl.mean, "circuit features": n_feat, "explainer calls": ec["explain_calls"],
            "rater calls": round(per_feature * n_feat) if sample < n_feat else sc["score_calls"],
            "active features": ec["active_features"],
            "explainer calls, all active": ec["calls_if_all_active"],
            "rater calls, all active": round(per_feature * ec["active_features"]),
            "saving (features)": ec["active_features"] / max(n_feat, 1),
            "occurrences kept / active per prompt": f"{kept_occ:.0f} / {active_occ:.0f}",
            "saving (occurrences)": active_occ / max(kept_occ, 1)})
    print("## 1. Cost: calls for a pruned circuit vs for every active feature (offline explainer and rater)\n")
    print(table(cost_rows))
    print(f"\nOne explainer call per feature. Rater calls per feature (1 generation + the natural texts, 10 per "
          f"call, + the steered continuations with --faithfulness) measured on the top "
          f"{args.score_sample or 'all'} features of each circuit and multiplied out. PIE's ~40x compares "
          f"occurrences; distinct features are shared across prompts, so their saving is smaller.\n")

    # ---------------------------------------------------------------- 2. quality
    agents = [("offline", "offline")] + ([("llm", "llm")] if use_llm else [])
    quality_rows = []
    top_n = args.top_n or None
    for method in args.methods.split(","):
        key = (method, args.quality_k)
        if key not in circuits:
            circuits[key] = prune(method, args.quality_k)[0]
        cid = circuits[key]
        for explainer, rater in agents:
            run("explain", cid, explainer=explainer, top_n=top_n)
            result = run("score", cid, explainer=explainer, rater=rater, top_n=top_n,
                         faithfulness=args.faithfulness)
            scores = result["report"]["scores"]
            row = {"method": method, "K": args.quality_k, "explainer": explainer,
                   "rater": result["cost"]["rater"], "features": len(scores)}
            for m in METRICS:
                vals = [s[m] for s in scores.values() if s.get(m) is not None]
                row[m] = mean_or_none(vals)
                row[f"n {m[:5]}."] = len(vals)
            row["errors"] = len(result["report"]["errors"])
            quality_rows.append((result["cost"]["rater_proxy"], row))
    # Proxy scores (the offline lexical rater) are never tabled beside LLM or human ones.
    for proxy, title in ((True, "proxy scores: the offline lexical rater (not comparable with LLM or human "
                                "ratings)"), (False, "the LLM rater")):
        rows = [row for p, row in quality_rows if p == proxy]
        if not rows:
            continue
        print(f"## 2{'a' if proxy else 'b'}. FADE at K={args.quality_k}, {title} (mean over the top "
              f"{args.top_n or 'all'} features of each circuit, on held-out texts; metrics undefined for a "
              "feature are left out, counts alongside)\n")
        print(table(rows))
        print()
    print("The offline rater is a proxy (token matching against the explanation's quoted tokens), and the "
          "offline explainer a heuristic: on held-out texts its scores say whether the quoted tokens predict "
          "the feature's activation, not what the feature means.\n")
    engine.dispose()
    print(f"total {time.perf_counter() - t0:.0f} s; store {tmp / 'piescope.db'}")


if __name__ == "__main__":
    main()
