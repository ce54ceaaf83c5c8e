"""`piescope prune` and `piescope sweep`: PIE's Prune step over CLT feature occurrences."""

from __future__ import annotations

import argparse

from backend.cli.output import parse_options, print_table, progress_bar, say, write_json
from backend.cli.ray_runs import add_ray_args, ray_inputs, say_pairs, wants_ray
from backend.errors import UserError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from backend.circuits.attribution import CORRUPTIONS, GRAD_MODES
    from backend.circuits.limits import DEFAULT_TOST_MARGIN
    from backend.circuits.selection import BUDGETS, METHODS

    def pie_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model name (see `piescope models`) or local directory")
        p.add_argument("--transcoder", required=True,
                       help="transcoder name <model>/<dir> under models_cache, or a directory")
        p.add_argument("--task", required=True, help="ioi, docstring, greater-than or jsonl")
        p.add_argument("--path", help="prompt file for the jsonl task")
        p.add_argument("--task-corruption", help="the task's corruption scheme (ioi: abc or s2)")
        p.add_argument("-n", type=int, default=100, help="number of prompt pairs")
        p.add_argument("--budget", choices=BUDGETS, default="global")
        p.add_argument("--corruption", choices=CORRUPTIONS, default="corrupted_prompt",
                       help="corrupted_prompt: a~ from the corrupted prompt; zero: a~ = 0")
        p.add_argument("--grad", choices=GRAD_MODES, default="replacement")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--out", help="write the result as JSON here")

    p = sub.add_parser("prune", help="keep the top-K feature occurrences per prompt and measure KL")
    pie_args(p)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--k", type=int, required=True, help="occurrences kept per prompt")
    p.add_argument("--options", help="method options as JSON, e.g. '{\"lam\": 3, \"bp\": 25}'")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("sweep", help="KL-vs-K for several methods, the random curve and compression")
    pie_args(p)
    p.add_argument("--methods", default="fap,fap-synergy,activation-magnitude,random",
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--ks", default="50,100,200,400,800", help="comma-separated budgets")
    p.add_argument("--options", help="per-method options as JSON, e.g. '{\"fap-synergy\": {\"lam\": 3}}'")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--tost-margin", type=float, default=DEFAULT_TOST_MARGIN,
                   help="equivalence margin of the effective-budget TOST, in nats of last-token KL "
                        f"(default {DEFAULT_TOST_MARGIN})")
    p.add_argument("--no-completeness", action="store_true",
                   help="skip completeness (one more patched forward per method and K)")
    p.add_argument("--no-random-curve", action="store_true", help="skip the random-from-active curve")
    p.add_argument("--plot", help="write the KL-vs-K plot (PNG) here")
    add_ray_args(p, "the prompt batches")
    p.set_defaults(run=cmd_sweep)


def pie_inputs(args: argparse.Namespace, settings: Settings):
    """(adapter, transcoder, transcoder name, prompt batch) for prune and sweep."""
    from backend.models.loading import load_model
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.tasks import get_task
    if args.n <= 0:
        raise UserError(f"-n must be a positive number of prompts, not {args.n}")
    task_options = {"path": args.path} if args.path else {}
    if args.task_corruption:
        task_options["corruption"] = args.task_corruption
    task = get_task(args.task, **task_options)
    tc_name, tc_path = resolve_transcoder(args.transcoder, settings, allow_paths=True)
    adapter = load_model(args.model, settings, report=say)
    transcoder = load_transcoder(tc_path, device=settings.device)
    transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
    batch = task.build(adapter.tokenizer, args.n, seed=args.seed)
    dropped = ", ".join(f"{v} {k}" for k, v in batch.dropped.items() if v)
    say(f"{len(batch)} {args.task} prompt pairs" + (f" (dropped: {dropped})" if dropped else ""))
    return adapter, transcoder, tc_name, batch


def cmd_prune(args: argparse.Namespace, settings: Settings) -> None:
    from backend.circuits.pipeline import PruneConfig, run_prune, validate_k
    from backend.circuits.selection import get_method
    options = get_method(args.method).options(parse_options(args.options))  # fail before loading anything
    validate_k(args.k)
    adapter, transcoder, tc_name, batch = pie_inputs(args, settings)
    config = PruneConfig(method=args.method, k=args.k, budget=args.budget, corruption=args.corruption,
                         grad=args.grad, options=options, seed=args.seed, batch_size=args.batch_size)
    bar, update = progress_bar(f"prune {args.method} K={args.k}")
    with bar:
        circuit = run_prune(adapter, transcoder, batch, config, model_name=adapter.name,
                            transcoder_name=tc_name, task_name=args.task, progress=update)
    print_table([{"prompt": p.index, "active": p.n_active, "kept": len(p.kept), "KL last": p.kl_last,
                  "KL all": p.kl_all, "pred changed": p.pred_changed, "faithfulness": p.faithfulness}
                 for p in circuit.prompts[:20]])
    lo, hi = circuit.kl.ci95
    print(f"\n{args.method} K={args.k}: KL {circuit.kl.mean:.3f} ± {circuit.kl.std:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
          f"prediction changed on {100 * circuit.pred_change_rate:.0f}% of {len(circuit.prompts)} prompts, "
          f"{len(circuit.features)} distinct features, {circuit.seconds:.1f} s")
    print_table([{"layer": f.layer, "feature": f.feature, "prompts": f.n_prompts, "mean |score|": f.mean_abs_score}
                 for f in circuit.features[:10]])
    if args.out:
        write_json(args.out, circuit.to_json())


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> None:
    from backend.circuits.pipeline import SweepConfig, run_sweep, validate_k
    from backend.circuits.selection import get_method
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--ks must be comma-separated whole numbers, not '{args.ks}'") from None
    for k in ks:
        validate_k(k)
    if not args.tost_margin > 0:  # NaN fails too
        raise UserError(f"--tost-margin must be a positive number of nats, not {args.tost_margin}")
    options = parse_options(args.options)
    for name, opts in options.items():
        get_method(name).options(opts)
    config = SweepConfig(methods=methods, ks=ks, budget=args.budget, corruption=args.corruption, grad=args.grad,
                         options=options, seed=args.seed, random_seeds=args.random_seeds,
                         batch_size=args.batch_size, random_curve=not args.no_random_curve,
                         tost_margin=args.tost_margin, completeness=not args.no_completeness)
    if wants_ray(args, settings):
        result = sweep_on_ray(args, settings, config)
    else:
        adapter, transcoder, tc_name, batch = pie_inputs(args, settings)
        bar, update = progress_bar("sweep")
        with bar:
            result = run_sweep(adapter, transcoder, batch, config, model_name=adapter.name,
                               transcoder_name=tc_name, task_name=args.task, progress=update)
    print_sweep(result)
    if args.out:
        write_json(args.out, result.to_json())
    if args.plot:
        from backend.circuits.plots import plot_kl_vs_k
        say(f"wrote {plot_kl_vs_k(result, args.plot)}")


def sweep_on_ray(args: argparse.Namespace, settings: Settings, config):
    """The sweep's shards on Ray actors, which load the model and transcoder themselves: nothing
    heavy loads here."""
    from backend.circuits.pipeline import plan_sweep
    plan_sweep(config)
    task_options = {"path": args.path} if args.path else {}
    if args.task_corruption:
        task_options["corruption"] = args.task_corruption
    settings, inputs, model_name, tc_name = ray_inputs(args, settings, task_options)
    from backend.executors.ray_executor import run_sweep as run_on_ray
    bar, update = progress_bar("sweep on Ray")
    with bar:
        result, info = run_on_ray(settings, inputs, config, progress=update, workers=args.ray_workers,
                                  model_name=model_name, transcoder_name=tc_name)
    say_pairs(info, args.task)
    return result


def print_sweep(result) -> None:
    """The KL table of a sweep with effective compression against random."""
    rows = []
    for r in result.rows:
        comp = result.effective_compression.get(r.method, {}).get(str(r.k))
        rows.append({"method": r.method, "K": r.k, "KL mean": r.kl_mean, "± std": r.kl_std,
                     "95% CI": f"{r.kl_ci95[0]:.3f}-{r.kl_ci95[1]:.3f}", "pred change": r.pred_change_rate,
                     "faithfulness mean": r.faithfulness_mean if r.faithfulness_mean is not None else "",
                     "median": r.faithfulness_median if r.faithfulness_median is not None else "",
                     "completeness": r.completeness_mean if r.completeness_mean is not None else "",
                     "compression": f"{comp:.1f}x" if comp else "", "fwd": r.patched_forwards,
                     "s": r.seconds})
    print_table(rows)
    if result.effective_budget:
        print(f"\nEffective budget against {result.effective_budget[0]['base']} (run at round(K') and round(1.5 K); "
              f"paired TOST, margin {result.effective_budget[0]['margin']} nats):")
        print_table([budget_row(e) for e in result.effective_budget])
    print(f"\nN={result.n_prompts}, mean active occurrences per prompt {result.n_active_mean:.0f}, "
          f"KL with every feature removed {result.kl_none_mean:.3f}, {result.seconds:.0f} s")


def budget_row(e: dict) -> dict:
    """One effective-budget row as a table row (CLI and bench)."""
    blank = lambda v: "" if v is None else v  # noqa: E731
    k_eq = e["k_equivalent"]
    return {"method": e["method"], "K": e["k"], "KL": e["kl_mean"],
            "K'": "" if k_eq is None else (f"<= {k_eq:.0f}" if e["k_equivalent_bound"] == "at_most" else k_eq),
            f"{e['base']} at round(K')": blank(e["k_base"]), "its KL": blank(e["base_kl_at_k_base"]),
            "p lower": blank(e["p_lower"]), "p upper": blank(e["p_upper"]), "TOST p": blank(e["p_value"]),
            "equivalent": blank(e["equivalent"]),
            f"{e['base']} at 1.5K": e["k_claimed"], "KL at 1.5K": blank(e["base_kl_at_k_claimed"]),
            "p lower 1.5K": blank(e["claimed_p_lower"]), "p upper 1.5K": blank(e["claimed_p_upper"]),
            "TOST p 1.5K": blank(e["claimed_p_value"]), "equivalent 1.5K": blank(e["claimed_equivalent"])}
