"""PIE on the demo model: KL-vs-K for every method on IOI, compression, time and memory.

    .venv/bin/python bench/pie_ioi.py            # N=100, the five budgets, with FAP-Synergy
    .venv/bin/python bench/pie_ioi.py --no-synergy -n 20
    .venv/bin/python bench/pie_ioi.py --docstring 100   # also the base sweep on Doc-String

Prints Markdown tables and writes artifacts/bench/pie_ioi.{json,png}. Targets (issue 4): FAP
costs at most 4 forward-pass equivalents of the same batch; the fap + activation-magnitude +
random sweep (with the random-from-active curve) at five budgets on N=100 finishes within
5 minutes on 2 cores; the five-budget FAP-Synergy sweep within 45 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import demo_ioi, PeakMemory, rss_bytes, table  # noqa: E402

from backend.circuits import stats  # noqa: E402
from backend.circuits.attribution import Attributor  # noqa: E402
from backend.circuits.limits import DEFAULT_TOST_MARGIN  # noqa: E402
from backend.circuits.pipeline import SweepConfig, run_sweep  # noqa: E402
from backend.circuits.plots import plot_kl_vs_k  # noqa: E402
from backend.cli.pie import budget_row  # noqa: E402
from backend.models.registry import DEMO_MODEL  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.tasks import get_task  # noqa: E402

PAPER = "PIE paper, IOI, last-token KL at K=50/100/200: Llama-3.2-1B FAP 1.33/1.13/0.85, FAP-Synergy 1.22/1.12/0.85"


def forward_equivalents(adapter, tc, batch, batch_size: int) -> dict:
    """Time of FAP's shared preparation vs one plain forward of the same batch."""
    part = batch.subset(slice(0, batch_size))
    attr = Attributor(adapter, tc)
    with torch.no_grad():
        adapter.run(part.clean_ids, part.attention_mask, last_pos=part.last_pos)  # warm-up
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        with torch.no_grad():
            adapter.run(part.clean_ids, part.attention_mask, last_pos=part.last_pos)
    forward = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        attr.prepare(part)
    fap = (time.perf_counter() - t0) / reps
    return {"batch": len(part), "forward_s": forward, "fap_s": fap, "fap_forward_equivalents": fap / forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--ks", default="50,100,200,400,800")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--no-synergy", action="store_true")
    parser.add_argument("--tost-margin", type=float, default=DEFAULT_TOST_MARGIN,
                        help="effective-budget TOST margin, nats of last-token KL")
    parser.add_argument("--docstring", type=int, default=0, metavar="N",
                        help="also run the fap + activation-magnitude + random sweep on N Doc-String prompts")
    parser.add_argument("--out", default="artifacts/bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]

    adapter, tc_name, tc, batch = demo_ioi(args.n, settings)
    print(f"# PIE on {DEMO_MODEL} + {tc_name}, IOI (ABC), N={len(batch)}, K={ks}\n")

    cost = forward_equivalents(adapter, tc, batch, args.batch_size)
    print(table([cost]), "\n")

    kw = dict(model_name=DEMO_MODEL, transcoder_name=tc_name, task_name="ioi")
    with PeakMemory() as mem:
        def progress(fraction: float, message: str) -> None:
            mem.label = message.split(" on prompts")[0] if " on prompts" in message else message.split(" ")[0]
        t0 = time.perf_counter()
        base = run_sweep(adapter, tc, batch, SweepConfig(methods=["fap", "activation-magnitude", "random"], ks=ks,
                         random_seeds=args.random_seeds, batch_size=args.batch_size), progress=progress, **kw)
        base_seconds = time.perf_counter() - t0
        report(base, None, base_seconds, None, mem, len(batch))
        synergy = synergy_seconds = None
        if not args.no_synergy:
            t0 = time.perf_counter()
            # FAP again (cheap) so that the sweep itself runs FAP at round(K') and 1.5 K for the TOST.
            synergy = run_sweep(adapter, tc, batch, SweepConfig(methods=["fap", "fap-synergy"], ks=ks,
                                random_curve=False, batch_size=args.batch_size, tost_margin=args.tost_margin),
                                progress=progress, **kw)
            synergy_seconds = time.perf_counter() - t0
            report(base, synergy, base_seconds, synergy_seconds, mem, len(batch))
        docstring = None
        if args.docstring:
            doc_batch = get_task("docstring").build(adapter.tokenizer, args.docstring, seed=0)
            t0 = time.perf_counter()
            docstring = run_sweep(adapter, tc, doc_batch, SweepConfig(
                methods=["fap", "activation-magnitude", "random"], ks=ks, random_seeds=args.random_seeds,
                batch_size=args.batch_size), progress=progress, **{**kw, "task_name": "docstring"})
            print(f"# Doc-String, N={len(doc_batch)}\n")
            report(docstring, None, time.perf_counter() - t0, None, mem, len(doc_batch))
    (out / "pie_ioi.json").write_text(json.dumps({
        "cost": cost, "base": base.to_json(), "synergy": synergy.to_json() if synergy else None,
        "docstring": docstring.to_json() if docstring else None,
        "peak_rss": mem.peaks, "final_rss": rss_bytes()}, default=str))
    plot_kl_vs_k(base if synergy is None else _merged(base, synergy), out / "pie_ioi.png")
    print(f"\nwrote {out / 'pie_ioi.json'} and {out / 'pie_ioi.png'}")


def report(base, synergy, base_seconds, synergy_seconds, mem, n: int) -> None:
    """Print the tables (once after the base sweep, again with FAP-Synergy)."""
    rows = list(base.rows) + ([r for r in synergy.rows if r.method == "fap-synergy"] if synergy else [])
    rks, rkl = [r.k for r in base.random_curve], [r.kl_mean for r in base.random_curve]
    table_rows = []
    for r in sorted(rows, key=lambda r: (r.k, r.method)):
        comp = stats.effective_compression(r.kl_mean, r.k, rks, rkl)
        table_rows.append({"method": r.method, "K": r.k, "KL mean": r.kl_mean, "std": r.kl_std,
                           "95% CI": f"{r.kl_ci95[0]:.3f}-{r.kl_ci95[1]:.3f}", "pred change": r.pred_change_rate,
                           "faithfulness mean": r.faithfulness_mean, "median": r.faithfulness_median,
                           "completeness": r.completeness_mean, "compression vs random": comp,
                           "seconds": r.seconds, "patched fwd / prompt": r.patched_forwards / n,
                           "s / prompt": r.seconds / n})
    print("## KL vs K (last token)\n")
    print(table(table_rows), "\n")
    if synergy is None:
        print("## Random-from-active curve\n")
        print(table([{"K": r.k, "KL mean": r.kl_mean, "95% CI": f"{r.kl_ci95[0]:.3f}-{r.kl_ci95[1]:.3f}"}
                     for r in base.random_curve]), "\n")
        print(f"mean active occurrences per prompt: {base.n_active_mean:.0f}; KL with every feature removed: "
              f"{base.kl_none_mean:.3f}; shared preparation {base.options['prep_seconds']:.1f} s\n")
    timing = [{"run": "fap + activation-magnitude + random (+ random curve)", "seconds": base_seconds,
               "target": "<= 300 s"}]
    if synergy:
        timing.append({"run": "fap + fap-synergy, five budgets (+ FAP at round(K') and 1.5 K)",
                       "seconds": synergy_seconds, "target": "<= 2700 s"})
        timing.append({"run": "of which fap-synergy's own rows", "seconds": sum(
            r.seconds for r in synergy.rows if r.method == "fap-synergy"), "target": ""})
    print("## Time\n")
    print(table(timing), "\n")
    print("## Peak RSS while each stage ran (process total, GiB)\n")
    print(table([{"stage": k, "peak RSS GiB": v / 2**30} for k, v in mem.peaks.items()]), "\n")
    if synergy:
        fap_rows = {r.k: r.kl_mean for r in synergy.rows if r.method == "fap"}
        same = all(abs(fap_rows[r.k] - r.kl_mean) < 1e-6 for r in base.rows if r.method == "fap")
        print(f"## Effective budget of FAP-Synergy against FAP (FAP run at round(K') and at 1.5 K on the same "
              f"prompts; paired TOST on per-prompt KL, margin {synergy.options['tost_margin']} nats)\n")
        print(table([budget_row(e) for e in synergy.effective_budget]), "\n")
        print(f"FAP rows of the two sweeps agree: {same}\n")
        print("## FAP-Synergy: how each budget was filled\n")
        print(table([{"K": r.k, **{k: v for k, v in (r.selection or {}).items() if k != "rule"},
                      "rule": (r.selection or {}).get("rule")} for r in synergy.rows if r.method == "fap-synergy"]),
              "\n")
    print(PAPER, flush=True)


def _merged(base, synergy):
    import dataclasses
    rows = [r for r in synergy.rows if r.method == "fap-synergy"]
    return dataclasses.replace(base, methods=base.methods + ["fap-synergy"], rows=base.rows + rows)


if __name__ == "__main__":
    main()
