"""FAP-Synergy on the demo with and without the prefix cache: time, forwards, tokens, kept sets.

    flock /work/bench.lock nice -n 0 env OMP_NUM_THREADS=2 .venv/bin/python bench/synergy_cost.py   # N=20

Runs FAP-Synergy's five budgets on IOI exactly as a sweep does (each batch prepared once, single
effects shared across budgets, every budget's kept set evaluated), once with removal variants
forwarded over the whole prompt and once with the prefix store: singles from their first patched
position on the clean keys and values, pairs from their later member's position on the keys and
values of the earlier member's single removal. Prints Markdown tables and writes
artifacts/bench/synergy_cost.json. Target (issue 16): the five budgets in at most half the time,
with identical kept sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import demo_ioi, table  # noqa: E402

from backend.circuits.attribution import Attributor  # noqa: E402
from backend.circuits.evaluation import Evaluator  # noqa: E402
from backend.circuits.selection import METHODS, SelectionContext  # noqa: E402
from backend.models.registry import DEMO_MODEL  # noqa: E402
from backend.settings import Settings  # noqa: E402


def run(adapter, tc, batch, ks: list[int], batch_size: int, prefix_cache: bool, max_rows: int = 64) -> dict:
    """FAP-Synergy at every K on every batch: per K seconds (selection, evaluation), patched
    forwards, tokens forwarded and the kept masks."""
    method = METHODS["fap-synergy"]
    options = method.options({})
    attr = Attributor(adapter, tc, prefix_cache=prefix_cache, max_rows=max_rows)
    evaluator = Evaluator(attr)
    per_k = {k: {"select_s": 0.0, "evaluate_s": 0.0, "forwards": 0, "tokens": 0, "kept": []} for k in ks}
    prep = 0.0
    for start in range(0, len(batch), batch_size):
        t0 = time.perf_counter()
        runs = attr.prepare(batch.subset(slice(start, start + batch_size)), offset=start)
        prep += time.perf_counter() - t0
        ctx = SelectionContext(runs, attr, evaluator)
        for k in ks:
            row, before = per_k[k], dict(runs.counters)
            t0 = time.perf_counter()
            kept = method.select(ctx, k, options)
            t1 = time.perf_counter()
            evaluator.evaluate(runs, [kept], all_token=False, completeness=True)
            row["select_s"] += t1 - t0
            row["evaluate_s"] += time.perf_counter() - t1
            row["forwards"] += runs.counters["patched_forwards"] - before["patched_forwards"]
            row["tokens"] += runs.counters["tokens_forwarded"] - before["tokens_forwarded"]
            row["kept"].append(kept.cpu())
    return {"prep_s": prep, "per_k": per_k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--ks", default="50,100,200,400,800")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-control", action="store_true",
                        help="skip the third run (the cached path with 32-row chunks, the noise floor)")
    parser.add_argument("--out", default="artifacts/bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    adapter, tc_name, tc, batch = demo_ioi(args.n, settings)
    print(f"# FAP-Synergy cost on {DEMO_MODEL} + {tc_name}, IOI (ABC), N={len(batch)}, K={ks}, "
          f"batch size {args.batch_size}\n")
    with torch.no_grad():  # warm-up, so that neither run pays for first-call allocations
        part = batch.subset(slice(0, args.batch_size))
        adapter.run(part.clean_ids, part.attention_mask, last_pos=part.last_pos)

    plain = run(adapter, tc, batch, ks, args.batch_size, prefix_cache=False)
    cached = run(adapter, tc, batch, ks, args.batch_size, prefix_cache=True)
    # The noise floor: the same prefix-cached path with other chunks (32 variants per forward),
    # whose effects differ from the first only by float32 rounding.
    control = None if args.no_control else run(adapter, tc, batch, ks, args.batch_size, prefix_cache=True, max_rows=32)
    rows, totals = [], {"plain": [0.0, 0.0, 0, 0], "cached": [0.0, 0.0, 0, 0]}
    all_same, swapped = True, [0, 0]
    for k in ks:
        a, b = plain["per_k"][k], cached["per_k"][k]
        same = all(torch.equal(x, y) for x, y in zip(a["kept"], b["kept"]))
        all_same &= same
        differ = sum(int((x != y).sum()) for x, y in zip(a["kept"], b["kept"])) // 2
        noise = (sum(int((x != y).sum()) for x, y in zip(b["kept"], control["per_k"][k]["kept"])) // 2
                 if control else None)
        swapped[0] += differ
        swapped[1] = None if noise is None else swapped[1] + noise
        for name, r in (("plain", a), ("cached", b)):
            t = totals[name]
            t[0] += r["select_s"]; t[1] += r["evaluate_s"]; t[2] += r["forwards"]; t[3] += r["tokens"]  # noqa: E702
        rows.append({"K": k, "select s (full prompt)": a["select_s"], "select s (prefix cache)": b["select_s"],
                     "evaluate s (full / cache)": f"{a['evaluate_s']:.1f} / {b['evaluate_s']:.1f}",
                     "patched fwd (full / cache)": f"{a['forwards']} / {b['forwards']}",
                     "tokens fwd (full)": a["tokens"], "tokens fwd (cache)": b["tokens"],
                     "identical kept sets": "yes" if same else "NO",
                     "swapped occ. (full vs cache)": differ, "swapped occ. (cache, 64 vs 32 rows)": noise})
    p, c = totals["plain"], totals["cached"]
    rows.append({"K": "all", "select s (full prompt)": p[0], "select s (prefix cache)": c[0],
                 "evaluate s (full / cache)": f"{p[1]:.1f} / {c[1]:.1f}", "patched fwd (full / cache)": f"{p[2]} / {c[2]}",
                 "tokens fwd (full)": p[3], "tokens fwd (cache)": c[3], "identical kept sets": "yes" if all_same else "NO",
                 "swapped occ. (full vs cache)": swapped[0], "swapped occ. (cache, 64 vs 32 rows)": swapped[1]})
    print("## Per budget\n")
    print(table(rows), "\n")
    summary = [{"": "FAP-Synergy's five budgets, selection + evaluation (s)", "full prompt": p[0] + p[1],
                "prefix cache": c[0] + c[1], "cache / full": (c[0] + c[1]) / (p[0] + p[1])},
               {"": "selection only (s)", "full prompt": p[0], "prefix cache": c[0], "cache / full": c[0] / p[0]},
               {"": "tokens forwarded", "full prompt": p[3], "prefix cache": c[3], "cache / full": c[3] / p[3]},
               {"": "shared preparation (s)", "full prompt": plain["prep_s"], "prefix cache": cached["prep_s"],
                "cache / full": cached["prep_s"] / plain["prep_s"]}]
    print("## Totals\n")
    print(table(summary), "\n")
    print(f"identical kept sets at every K: {'yes' if all_same else 'NO'} (kept occurrences swapped: "
          f"{swapped[0]} full vs cache; {swapped[1]} between two chunkings of the cached path)")
    strip = lambda r: {k: {n: v for n, v in d.items() if n != "kept"} for k, d in r["per_k"].items()}  # noqa: E731
    (out / "synergy_cost.json").write_text(json.dumps({
        "n": len(batch), "ks": ks, "plain": {"prep_s": plain["prep_s"], "per_k": strip(plain)},
        "cached": {"prep_s": cached["prep_s"], "per_k": strip(cached)}, "identical": all_same}))
    print(f"\nwrote {out / 'synergy_cost.json'}")


if __name__ == "__main__":
    main()
