"""The `piescope` command line: parse, call a service in backend/, print.

Any UserError becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from backend.errors import UserError
from backend.settings import Settings

Command = Callable[[argparse.Namespace, Settings], int | None]
COMMANDS: dict[str, Command] = {}


def command(name: str):
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn
    return register


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A plain aligned text table."""
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------

@command("models")
def cmd_models(args: argparse.Namespace, settings: Settings) -> None:
    from backend.models.loading import model_listing
    print_table(model_listing(settings), ["name", "architecture", "parameters", "source", "status"])


@command("tasks")
def cmd_tasks(args: argparse.Namespace, settings: Settings) -> None:
    from backend.tasks import get_task, list_tasks
    if not args.task:
        print_table(list_tasks())
        return
    options = {"path": args.path} if args.path else {}
    if args.task_corruption:
        options["corruption"] = args.task_corruption
    task = get_task(args.task, **options)
    if args.n <= 0:
        raise UserError(f"-n must be a positive number of prompts, not {args.n}")
    if not args.model:
        for pair in task.generate(args.n, seed=args.seed):
            print(f"clean:     {pair.clean!r}\ncorrupted: {pair.corrupted!r}\n"
                  f"answer: {pair.answer!r}  distractors: {list(pair.distractors)!r}\n")
        return
    from backend.circuits.behaviour import behaviour
    from backend.models.loading import load_model
    adapter = load_model(args.model, settings, report=_say)
    batch = task.build(adapter.tokenizer, args.n, seed=args.seed)
    result = behaviour(adapter, batch)
    rows = [{"#": i, "clean": p.clean, "answer": p.answer, "distractor": p.distractors[0] if p.distractors else "",
             "M(clean)": float(result.clean[i]), "M(corrupted)": float(result.corrupted[i])}
            for i, p in enumerate(batch.pairs)]
    print_table(rows)
    dropped = ", ".join(f"{v} {k}" for k, v in batch.dropped.items() if v) or "none"
    print(f"\nmean M: clean {result.clean.mean():.3f}, corrupted {result.corrupted.mean():.3f} "
          f"over {len(batch)} pairs (dropped while tokenising: {dropped})")


def _progress_bar(desc: str):
    """A tqdm bar driven by the job functions' (fraction, message) progress callback."""
    from tqdm import tqdm
    bar = tqdm(total=1000, desc=desc, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message[:60])
        bar.refresh()
    return bar, update


def _pie_inputs(args: argparse.Namespace, settings: Settings):
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
    adapter = load_model(args.model, settings, report=_say)
    transcoder = load_transcoder(tc_path, device=settings.device)
    transcoder.check_fits(adapter.n_layers, adapter.d_model, adapter.name)
    batch = task.build(adapter.tokenizer, args.n, seed=args.seed)
    dropped = ", ".join(f"{v} {k}" for k, v in batch.dropped.items() if v)
    _say(f"{len(batch)} {args.task} prompt pairs" + (f" (dropped: {dropped})" if dropped else ""))
    return adapter, transcoder, tc_name, batch


def _write_json(path: str, data: dict) -> None:
    import json
    from pathlib import Path
    Path(path).write_text(json.dumps(data, indent=1, allow_nan=False, default=_json_default))
    _say(f"wrote {path}")


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _options(text: str | None) -> dict:
    import json
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--options must be a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise UserError("--options must be a JSON object, e.g. '{\"lam\": 3}'")
    return value


@command("prune")
def cmd_prune(args: argparse.Namespace, settings: Settings) -> None:
    from backend.circuits.pipeline import PruneConfig, run_prune, validate_k
    from backend.circuits.selection import get_method
    options = get_method(args.method).options(_options(args.options))  # fail before loading anything
    validate_k(args.k)
    adapter, transcoder, tc_name, batch = _pie_inputs(args, settings)
    config = PruneConfig(method=args.method, k=args.k, budget=args.budget, corruption=args.corruption,
                         grad=args.grad, options=options, seed=args.seed, batch_size=args.batch_size)
    bar, update = _progress_bar(f"prune {args.method} K={args.k}")
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
        _write_json(args.out, _finite(circuit.to_json()))


@command("sweep")
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
    options = _options(args.options)
    for name, opts in options.items():
        get_method(name).options(opts)
    adapter, transcoder, tc_name, batch = _pie_inputs(args, settings)
    config = SweepConfig(methods=methods, ks=ks, budget=args.budget, corruption=args.corruption, grad=args.grad,
                         options=options, seed=args.seed, random_seeds=args.random_seeds,
                         batch_size=args.batch_size, random_curve=not args.no_random_curve)
    bar, update = _progress_bar("sweep")
    with bar:
        result = run_sweep(adapter, transcoder, batch, config, model_name=adapter.name,
                           transcoder_name=tc_name, task_name=args.task, progress=update)
    print_sweep(result)
    if args.out:
        _write_json(args.out, _finite(result.to_json()))
    if args.plot:
        from backend.circuits.plots import plot_kl_vs_k
        _say(f"wrote {plot_kl_vs_k(result, args.plot)}")


def print_sweep(result) -> None:
    """The KL table of a sweep with effective compression against random."""
    rows = []
    for r in result.rows:
        comp = result.effective_compression.get(r.method, {}).get(str(r.k))
        rows.append({"method": r.method, "K": r.k, "KL mean": r.kl_mean, "± std": r.kl_std,
                     "95% CI": f"{r.kl_ci95[0]:.3f}-{r.kl_ci95[1]:.3f}", "pred change": r.pred_change_rate,
                     "faithfulness mean": r.faithfulness_mean if r.faithfulness_mean is not None else "",
                     "median": r.faithfulness_median if r.faithfulness_median is not None else "",
                     "compression": f"{comp:.1f}x" if comp else "", "fwd": r.patched_forwards,
                     "s": r.seconds})
    print_table(rows)
    print(f"\nN={result.n_prompts}, mean active occurrences per prompt {result.n_active_mean:.0f}, "
          f"KL with every feature removed {result.kl_none_mean:.3f}, {result.seconds:.0f} s")


def _finite(value):
    """NaN/inf -> None, so the JSON is standard."""
    import math
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@command("train-clt")
def cmd_train_clt(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from backend.models.loading import load_model
    from backend.models.training import CHECKPOINT_FILE, TrainConfig, train_clt
    config = TrainConfig(features_per_layer=args.features_per_layer, k=args.k, tokens=args.tokens,
                         heldout_tokens=args.heldout_tokens, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, export_activation=args.activation,
                         calibration_tokens=min(8192, args.tokens))
    out = Path(args.out)
    resume = args.resume or (out / CHECKPOINT_FILE).exists()
    adapter = load_model(args.model, settings, report=_say)
    result = train_clt(adapter, out, config, corpus=args.corpus, resume=resume, report=_say)
    print(f"wrote {result.path}; report in {result.path / 'training_report.json'}")


@command("serve")
def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    from backend.api.app import serve
    serve(settings, host=args.host, port=args.port)


@command("dash")
def cmd_dash(args: argparse.Namespace, settings: Settings) -> None:
    from frontend_dash.app import serve
    if args.api_url:
        settings = settings.model_copy(update={"api_url": args.api_url})
    serve(settings, host=args.host, port=args.port, debug=args.debug)


@command("demo")
def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    from backend.demo import run_demo
    run_demo(settings, n=args.n, serve=not args.no_serve)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piescope", description="Find, explain and check circuits in language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the models PIEscope knows and where each comes from")

    p = sub.add_parser("tasks", help="list tasks, or show a task's prompt pairs and the model's metric on them")
    p.add_argument("task", nargs="?", help="task name (ioi, docstring, greater-than, jsonl)")
    p.add_argument("--model", help="model name (see `piescope models`) or local model directory")
    p.add_argument("-n", type=int, default=5, help="number of prompt pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", help="prompt file for the jsonl task")
    p.add_argument("--task-corruption", help="corruption scheme (ioi: abc or s2)")

    from backend.circuits.attribution import CORRUPTIONS, GRAD_MODES
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

    p = sub.add_parser("sweep", help="KL-vs-K for several methods, the random curve and compression")
    pie_args(p)
    p.add_argument("--methods", default="fap,fap-synergy,activation-magnitude,random",
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--ks", default="50,100,200,400,800", help="comma-separated budgets")
    p.add_argument("--options", help="per-method options as JSON, e.g. '{\"fap-synergy\": {\"lam\": 3}}'")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--no-random-curve", action="store_true", help="skip the random-from-active curve")
    p.add_argument("--plot", help="write the KL-vs-K plot (PNG) here")

    p = sub.add_parser("train-clt", help="train a cross-layer transcoder on a model's activations")
    p.add_argument("--model", required=True, help="model name or local directory")
    p.add_argument("--corpus", help="directory of .txt/.jsonl files (default: Python's bundled docs "
                   "and standard-library docstrings mixed with IOI-like stories)")
    p.add_argument("--features-per-layer", type=int, default=1024)
    p.add_argument("--k", type=int, default=32, help="active features per token and layer (TopK)")
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens to harvest")
    p.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens for the report")
    p.add_argument("--steps", type=int, help="optimiser steps (default: two epochs)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation", choices=["jumprelu", "topk"], default="jumprelu",
                   help="activation of the written files (JumpReLU loads identically in circuit-tracer)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--out", required=True, help="output directory (circuit-tracer format)")

    p = sub.add_parser("serve", help="run the worker's HTTP API (OpenAPI docs at /docs)")
    p.add_argument("--host", help="address to bind (default PIESCOPE_API_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default PIESCOPE_API_PORT, 8000)")

    p = sub.add_parser("dash", help="run the dashboard (Dash) over the worker API at PIESCOPE_API_URL")
    p.add_argument("--host", help="address to bind (default PIESCOPE_DASH_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default PIESCOPE_DASH_PORT, 8050)")
    p.add_argument("--api-url", help="the worker API (default PIESCOPE_API_URL, http://127.0.0.1:8000)")
    p.add_argument("--debug", action="store_true", help="Dash dev tools (no reloader)")

    p = sub.add_parser("demo", help="the main job: demo model, its CLT, a stored sweep, worker and dashboard")
    p.add_argument("-n", type=int, default=20, help="IOI prompts to show")
    p.add_argument("--no-serve", action="store_true",
                   help="only prepare the model and its CLT; start no servers")

    from backend.interp import cli_commands  # `explain` and `score` live with the interpretation code
    cli_commands.add_parsers(sub)
    COMMANDS.update(cli_commands.COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        return COMMANDS[args.command](args, settings) or 0
    except UserError as err:
        print(f"piescope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("piescope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
