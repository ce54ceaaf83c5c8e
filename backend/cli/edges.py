"""`piescope edges` and `piescope edge-sweep`: circuits over attention-head / MLP edges."""

from __future__ import annotations

import argparse

from backend.cli.output import parse_options, print_table, progress_bar, say, write_json
from backend.cli.ray_runs import add_ray_args, ray_inputs, say_pairs, wants_ray
from backend.errors import UserError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from backend.edges.registry import EDGE_METHODS

    def common(p: argparse.ArgumentParser, need_task: bool = True) -> None:
        p.add_argument("--model", required=True, help="model name (see `piescope models`) or local directory")
        p.add_argument("--task", required=need_task, help="ioi, docstring, greater-than or jsonl")
        p.add_argument("--path", help="prompt file for the jsonl task")
        p.add_argument("--task-corruption", help="the task's corruption scheme (ioi: abc or s2)")
        p.add_argument("-n", type=int, default=32, help="number of prompt pairs")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--out", help="write the result as JSON here")

    p = sub.add_parser("edges", help="an edge circuit (EAP, EAP-IG, ACDC, Edge Pruning, HAP), or --graph")
    common(p, need_task=False)
    p.add_argument("--graph", action="store_true", help="only print the model's edge graph counts")
    p.add_argument("--method", help=f"one of: {', '.join(EDGE_METHODS)}")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--edges", type=int, help="edges to keep")
    target.add_argument("--sparsity", type=float, help="fraction of the graph's edges removed, in [0, 1)")
    p.add_argument("--options", help="method options as JSON, e.g. '{\"rho\": 0.2, \"max_steps\": 200}'")
    p.set_defaults(run=cmd_edges)

    p = sub.add_parser("edge-sweep", help="edge methods over log-spaced edge counts: faithfulness curves")
    common(p)
    p.add_argument("--methods", default="eap,eap-ig", help=f"comma-separated, from: {', '.join(EDGE_METHODS)}")
    p.add_argument("--edge-counts", help="comma-separated edge counts (default: 8 log-spaced up to all)")
    p.add_argument("--options", help="per-method options as JSON, e.g. '{\"hap\": {\"rho\": 0.2}}'")
    p.add_argument("--plot", help="write the curves (PNG) here")
    add_ray_args(p, "the (method, edge count) points")
    p.set_defaults(run=cmd_edge_sweep)


def _task_options(args: argparse.Namespace) -> dict:
    options = {"path": args.path} if args.path else {}
    if args.task_corruption:
        options["corruption"] = args.task_corruption
    return options


def _inputs(args: argparse.Namespace, settings: Settings, check=None):
    from backend.models.loading import load_model
    from backend.tasks import get_task
    if args.n <= 0:
        raise UserError(f"-n must be a positive number of prompts, not {args.n}")
    task = get_task(args.task, **_task_options(args))
    adapter = load_model(args.model, settings, report=say)
    if check is not None:
        check(adapter)
    batch = task.build(adapter.tokenizer, args.n, seed=args.seed)
    if len(batch) == 0:
        raise UserError(f"no {args.task} prompt pair fits the tokenizer of {args.model}")
    say(f"{len(batch)} {args.task} prompt pairs")
    return adapter, batch


def cmd_edges(args: argparse.Namespace, settings: Settings) -> None:
    from backend.edges.graph import EdgeGraph
    from backend.edges.pipeline import EdgeConfig, run_edges
    from backend.edges.registry import get_edge_method
    if args.graph:
        from backend.models.loading import load_model
        adapter = load_model(args.model, settings, report=say)
        counts = EdgeGraph.for_adapter(adapter).counts()
        print_table([counts])
        print(f"\n{adapter.name}: {adapter.n_layers} layers, {adapter.n_heads} query heads, "
              f"{adapter.n_kv_heads} kv heads: {counts['edges']:,} edges")
        if args.out:
            write_json(args.out, {"model": adapter.name, **counts})
        return
    if not args.method or not args.task:
        raise UserError("give --method and --task (or --graph)")
    if args.edges is None and args.sparsity is None:
        raise UserError("give the target as --edges COUNT or --sparsity S")
    options = get_edge_method(args.method).options(parse_options(args.options))  # fail before loading
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), not {args.sparsity}")
    if args.edges is not None and args.edges < 1:
        raise UserError(f"--edges must be a positive count, not {args.edges}")
    from backend.edges.registry import target_count
    adapter, batch = _inputs(args, settings, check=lambda a: target_count(
        EdgeGraph.for_adapter(a).n_edges, args.edges, args.sparsity))
    config = EdgeConfig(args.method, args.edges, args.sparsity, options, args.seed, args.batch_size)
    bar, update = progress_bar(f"edges {args.method}")
    with bar:
        circuit = run_edges(adapter, batch, config, task_name=args.task, progress=update)
    m = circuit.metrics
    print_table([{k: e[k] for k in ("id", "score")} for e in circuit.kept[:15]])
    lo, hi = m["kl"]["ci95"]
    print(f"\n{args.method}: {circuit.n_kept} of {circuit.graph['edges']} edges (sparsity {circuit.sparsity:.3f}), "
          f"KL {m['kl']['mean']:.3f} (95% CI {lo:.3f}-{hi:.3f}), logit difference recovered "
          f"{m['recovered_of_means']:.3f}, accuracy {m['accuracy']['mean']:.2f}; "
          f"{circuit.cost['forwards']:.0f} forwards, {circuit.cost['backwards']:.0f} backwards, {circuit.seconds:.1f} s")
    if args.out:
        write_json(args.out, circuit.to_json())


def cmd_edge_sweep(args: argparse.Namespace, settings: Settings) -> None:
    from backend.edges.pipeline import EdgeSweepConfig, plot_edge_sweep, run_edge_sweep
    from backend.edges.registry import get_edge_method
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty")
    for m in methods:
        get_edge_method(m)
    counts = None
    if args.edge_counts:
        try:
            counts = [int(c) for c in args.edge_counts.split(",") if c.strip()]
        except ValueError:
            raise UserError(f"--edge-counts must be comma-separated whole numbers, not '{args.edge_counts}'") from None
        if any(c < 1 for c in counts):
            raise UserError("--edge-counts must be positive")
    options = parse_options(args.options)
    for name, opts in options.items():
        if name not in methods:
            raise UserError(f"--options names '{name}', which is not in --methods")
        if not isinstance(opts, dict):
            raise UserError(f"--options for '{name}' must be a JSON object")
        get_edge_method(name).options(opts)
    from backend.edges.graph import EdgeGraph
    from backend.edges.registry import target_count

    config = EdgeSweepConfig(methods, counts, options, args.seed, args.batch_size)
    if wants_ray(args, settings):
        sweep = _edge_sweep_on_ray(args, settings, config)
    else:
        def check(adapter) -> None:
            for c in counts or []:
                target_count(EdgeGraph.for_adapter(adapter).n_edges, edges=c)
        adapter, batch = _inputs(args, settings, check=check)
        bar, update = progress_bar("edge-sweep")
        with bar:
            sweep = run_edge_sweep(adapter, batch, config, task_name=args.task, progress=update)
    print_table([{"method": r.method, "target": r.n_target, "kept": r.n_kept, "KL mean": r.kl.mean,
                  "95% CI": f"{r.kl.ci95[0]:.3f}-{r.kl.ci95[1]:.3f}", "recovered": r.recovered_of_means,
                  "accuracy": r.accuracy.mean, "fwd": r.cost["forwards"], "bwd": r.cost["backwards"],
                  "s": r.cost["seconds"]} for r in sweep.rows])
    print("\narea over log edge counts: " + ", ".join(
        f"{m} KL {a['kl']:.3f} / recovered {a['recovered']:.3f}" for m, a in sweep.area.items()))
    if args.out:
        write_json(args.out, sweep.to_json())
    if args.plot:
        say(f"wrote {plot_edge_sweep(sweep, args.plot)}")


def _edge_sweep_on_ray(args: argparse.Namespace, settings: Settings, config):
    """The edge sweep's scores and points on Ray actors, which load the model themselves."""
    settings, inputs, model_name, _ = ray_inputs(args, settings, _task_options(args), transcoder=False)
    from backend.executors.ray_executor import run_edge_sweep as run_on_ray
    bar, update = progress_bar("edge-sweep on Ray")
    with bar:
        sweep, info = run_on_ray(settings, inputs, config, progress=update, workers=args.ray_workers,
                                 model_name=model_name)
    say_pairs(info, args.task)
    return sweep
