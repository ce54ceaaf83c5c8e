"""`piescope hagd`: hierarchical decomposition of a task's attribution graph (DESIGN 8.3)."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

from backend.cli.output import parse_options, print_table, progress_bar, say, write_json
from backend.cli.ray_runs import add_ray_args, ray_inputs, wants_ray
from backend.errors import UserError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hagd", help="HAGD: hierarchy of the feature attribution graph, coarse-to-fine "
                       "and mask search, verification by ablation")
    p.add_argument("--model", required=True, help="model name (see `piescope models`) or local directory")
    p.add_argument("--transcoder", required=True, help="transcoder name <model>/<dir> or a directory")
    p.add_argument("--task", required=True, help="e.g. modadd, ioi, docstring, greater-than; options as "
                   "task+key=value (e.g. modadd+corrupt=b)")
    p.add_argument("-n", type=int, default=32, help="prompt pairs for the graph and the search")
    p.add_argument("--options", help="HAGD options as JSON, e.g. '{\"pool\": 50, \"lam\": 0.05, "
                   "\"score\": \"mass\", \"verify_seeds\": 5}'")
    p.add_argument("--out", help="write the result (levels, circuit, verification, ...) as JSON here")
    add_ray_args(p, "the verification's prompt sets")
    p.set_defaults(run=cmd_hagd)

    p = sub.add_parser("hagd-scorer", help="build HAGD's learned cluster scorer (a small GNN) across tasks "
                       "and models, with its leave-one-task-out evaluation")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                   help="comma-separated model:transcoder:task triples; a task may carry options as "
                   "task+key=value (e.g. modadd+corrupt=b) (default: %(default)s)")
    p.add_argument("-n", type=int, default=16, help="prompt pairs per source")
    p.add_argument("--options", help="HAGD options for the graphs and hierarchies, as JSON (pool, ratio, top, ...)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--out", help="scorer file (default: models_cache/hagd/scorer.pt)")
    p.set_defaults(run=cmd_hagd_scorer)


DEFAULT_SOURCES = ("modadd-113:modadd-113/clt:modadd", "gemma-3-270m:gemma-3-270m/clt:ioi",
                   "gemma-3-270m:gemma-3-270m/clt:docstring", "gemma-3-270m:gemma-3-270m/clt:greater-than")


def cmd_hagd(args: argparse.Namespace, settings: Settings) -> None:
    from backend.hagd.pipeline import HagdConfig, run_hagd
    from backend.models.loading import load_model
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    if args.n <= 0:
        raise UserError(f"-n must be a positive number of prompts, not {args.n}")
    config = HagdConfig.from_options(parse_options(args.options))  # fail before loading anything
    task = task_with_options(args.task)
    verify_map = nullcontext(None)
    if wants_ray(args, settings):  # the driver runs the search; the actors verify
        ray_settings, inputs, _, _ = ray_inputs(args, settings, {})
        from backend.executors.ray_executor import task_map
        verify_map = task_map(ray_settings, inputs, config, workers=args.ray_workers)
    tc_name, tc_path = resolve_transcoder(args.transcoder, settings, allow_paths=True)
    adapter = load_model(args.model, settings, report=say)
    transcoder = load_transcoder(tc_path, device=settings.device)
    transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
    bar, update = progress_bar("hagd")
    with bar, verify_map as run_sets:
        result = run_hagd(adapter, transcoder, task, args.n, config, model_name=adapter.name,
                          transcoder_name=tc_name, task_name=args.task, progress=update, verify_map=run_sets)
    print_result(result)
    if args.out:
        write_json(args.out, result.to_json())


def print_result(result) -> None:
    """Levels, the search's cost, the circuit and its verification."""
    g = result.graph
    print(f"graph: {g['n_features']} features and {g['n_nodes'] - g['n_features']} input tokens, "
          f"{g['n_edges']} edges, over {result.n_prompts} prompts")
    print("levels (clusters, finest first): " + " > ".join(str(c) for c in result.levels))
    s = result.search
    print(f"coarse to fine: {s['evaluations']} cluster evaluations, {s['survivors']} features survive; "
          f"mask search keeps {len(result.circuit)}")
    rows = []
    for name, v in result.verification.items():
        rows.append({"circuit": name, "features": v["n_features"],
                     "sufficiency": f"{100 * v['sufficiency_mean']:.1f}% ± {100 * v['sufficiency_std']:.1f}",
                     "necessity": f"{100 * v['necessity_mean']:.1f}% ± {100 * v['necessity_std']:.1f}",
                     "seeds": len(v["seeds"])})
    print_table(rows)
    if result.scorer.get("heldout_spearman") is not None:
        print(f"scorer: held-out Spearman {result.scorer['heldout_spearman']:.3f}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))


def cmd_hagd_scorer(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from backend.hagd.pipeline import HagdConfig, scorer_samples
    from backend.hagd.scorer import build_scorer
    from backend.models.loading import load_model
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    config = HagdConfig.from_options(parse_options(args.options))
    sources = [s.strip().split(":") for s in args.sources.split(",") if s.strip()]
    if not sources or any(len(s) != 3 for s in sources):
        raise UserError("--sources must be comma-separated model:transcoder:task triples")
    tasks = {spec: task_with_options(spec) for _, _, spec in sources}  # fail before loading anything
    samples, adapters = [], {}
    for model, tc_ref, spec in sources:
        say(f"scorer data: {spec} on {model}")
        if model not in adapters:
            adapters[model] = load_model(model, settings, report=say)
        _, tc_path = resolve_transcoder(tc_ref, settings, allow_paths=True)
        tc = load_transcoder(tc_path, device=settings.device)
        samples += scorer_samples(adapters[model], tc, tasks[spec], args.n, config, label=f"{spec}@{model}")
    scorer = build_scorer(samples, epochs=args.epochs, seed=config.seed)
    out = Path(args.out) if args.out else Path(settings.models_cache) / "hagd" / "scorer.pt"
    scorer.save(out)
    print_table(scorer_rows(scorer.info["loto"]))
    print(f"wrote {out} (trained on {', '.join(scorer.info['tasks'])}; {scorer.info['n_clusters']} clusters)")


def scorer_rows(loto: list[dict]) -> list[dict]:
    """The leave-one-task-out table: per held-out task, the scorer's and attribution mass's
    Spearman with the true effect and the scorer's gain with its 95% CI."""
    def gain(r: dict) -> str | None:
        g = r.get("gain_over_mass")
        return f"{g[0]:+.4f} [{g[1]:+.4f}, {g[2]:+.4f}]" if g else None
    return [{"held-out task": r["heldout"], "clusters": r["clusters"], "scorer Spearman": r["gnn_spearman"],
             "blend alone": r.get("blend_spearman"), "attribution-mass Spearman": r["mass_spearman"],
             "scorer - mass [95% CI]": gain(r), "residual weight": r.get("alpha")} for r in loto]


def task_with_options(spec: str):
    """A task from "name" or "name+key=value+key=value" (values are ints when they look like one)."""
    from backend.tasks import get_task
    name, *pairs = spec.split("+")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"task option '{pair}' in '{spec}' must be key=value")
        options[key] = int(value) if value.isdigit() else value
    return get_task(name, **options)
