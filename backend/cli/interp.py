"""`piescope explain` and `piescope score`: the same job functions the API runs, in-process.

`--circuit` takes a stored circuit id or a circuit JSON file (from `piescope prune --out`); a
file is first imported into the store (model, transcoder and circuit rows), so that its
features, explanations and scores are there for the dashboard afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from backend.errors import InvalidParameterError, NotFoundError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `explain` and `score` sub-commands."""
    p = sub.add_parser("explain", help="harvest and explain the features of a circuit")
    p.add_argument("--circuit", required=True, help="stored circuit id, or a circuit JSON file (prune --out)")
    p.add_argument("--explainer", choices=("offline", "llm"), default="offline",
                   help="offline: a deterministic heuristic; llm: PIESCOPE_LLM_BASE_URL/_MODEL/_API_KEY")
    p.add_argument("--top-n", type=int, help="only the circuit's top N features (default: all)")
    p.add_argument("--corpus", choices=("default", "stories"), default="default")
    p.add_argument("--corpus-tokens", type=int, default=20_000, help="corpus tokens budget of the harvest")
    p.add_argument("--force", action="store_true", help="explain again features this explainer already explained")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("score", help="FADE scores (clarity, responsiveness, purity, faithfulness) of a "
                                     "circuit's explanations")
    p.add_argument("--circuit", required=True, help="stored circuit id, or a circuit JSON file (prune --out)")
    p.add_argument("--explainer", choices=("offline", "llm", "human", "any"), default="any",
                   help="which explanations to score (the latest of that source)")
    p.add_argument("--rater", choices=("offline", "llm"), default="offline",
                   help="offline: a token-matching proxy, not a judgement of meaning; llm: the endpoint")
    p.add_argument("--top-n", type=int)
    p.add_argument("--corpus", choices=("default", "stories"), default="default")
    p.add_argument("--n-natural", type=int, default=20, help="random corpus windows (natural texts)")
    p.add_argument("--n-generated", type=int, default=10, help="texts written to express each concept")
    p.add_argument("--no-faithfulness", action="store_true", help="skip steering")
    p.add_argument("--factors", default="-50,-10,0,10,50", help="steering factors (x max activation)")
    p.add_argument("--steer-prompts", type=int, default=8, help="held-out prompts steered per factor")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per steered prompt")
    p.set_defaults(run=cmd_score)


def _params(model: type[BaseModel], **values: Any) -> BaseModel:
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InvalidParameterError(f"{where}: {first['msg']}") from None


def _circuit_id(settings: Settings, sessions, circuit: str) -> int:
    if circuit.isdigit():
        return int(circuit)
    path = Path(circuit).expanduser()
    if not path.is_file():
        raise NotFoundError(f"--circuit must be a stored circuit id or a circuit JSON file; {circuit} is neither")
    from backend.store.circuit_files import import_circuit_file
    return import_circuit_file(settings, sessions, path)


def _run(kind: str, settings: Settings, params: BaseModel, sessions) -> dict[str, Any]:
    from backend import jobs as job_functions
    from backend.cli.output import progress_bar
    from backend.store.interp import InterpStore, add_circuit_cost
    from backend.store.db import transaction
    run = job_functions.run_explain if kind == "explain" else job_functions.run_score
    bar, update = progress_bar(kind)
    try:
        output = run(job_functions.JobContext(settings), params, InterpStore(sessions), update)
    finally:
        bar.close()
    with transaction(sessions) as session:
        add_circuit_cost(session, params.circuit_id, output.result["cost"])
    return output.result


def _print_errors(errors: dict[str, str]) -> None:
    for name, message in list(errors.items())[:10]:
        print(f"  feature {name}: {message}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more")


def cmd_explain(args: argparse.Namespace, settings: Settings) -> None:
    from backend import jobs as job_functions
    from backend.cli.output import print_table
    from backend.store.interp import InterpStore
    from backend.store.db import open_store
    engine, sessions = open_store(settings)
    try:
        circuit_id = _circuit_id(settings, sessions, args.circuit)
        params = _params(job_functions.ExplainParams, circuit_id=circuit_id, explainer=args.explainer,
                         top_n=args.top_n, corpus=args.corpus, corpus_tokens=args.corpus_tokens, force=args.force)
        result = _run("explain", settings, params, sessions)
        store = InterpStore(sessions)
        info = store.circuit(circuit_id)
        keys = info.features[:args.top_n] if args.top_n else info.features
        states = store.features(info.transcoder, keys)
        rows = [{"layer": k[0], "feature": k[1],
                 "density": states[k].statistics.get("density", 0.0),
                 "max_act": states[k].statistics.get("max_activation", 0.0),
                 "explanation": (states[k].explanations[-1]["text"][:90] if states[k].explanations else "-")}
                for k in keys[:30]]
        print_table(rows)
    finally:
        engine.dispose()
    report, cost = result["report"], result["cost"]
    print(f"\ncircuit {circuit_id}: explained {report['explained']} features, reused {report['reused']}, "
          f"{len(report['errors'])} errors; {cost['explain_calls']} explainer calls, {cost['explain_tokens']} tokens; "
          f"explaining all {cost['active_features']} active features would take ~{cost['calls_if_all_active']} calls")
    _print_errors(report["errors"])


def cmd_score(args: argparse.Namespace, settings: Settings) -> None:
    from backend import jobs as job_functions
    from backend.cli.output import print_table
    from backend.store.db import open_store
    try:
        factors = [float(x) for x in args.factors.split(",") if x.strip()]
    except ValueError:
        raise InvalidParameterError(f"--factors must be comma-separated numbers, got {args.factors!r}") from None
    engine, sessions = open_store(settings)
    try:
        circuit_id = _circuit_id(settings, sessions, args.circuit)
        params = _params(job_functions.ScoreParams, circuit_id=circuit_id, explainer=args.explainer,
                         rater=args.rater, top_n=args.top_n, corpus=args.corpus, n_natural=args.n_natural,
                         n_generated=args.n_generated, faithfulness=not args.no_faithfulness, factors=factors,
                         n_steer_prompts=args.steer_prompts, n_new_tokens=args.new_tokens)
        result = _run("score", settings, params, sessions)
    finally:
        engine.dispose()
    report, cost = result["report"], result["cost"]
    metrics = ("clarity", "responsiveness", "purity", "faithfulness")
    print_table([{"feature": name, **{m: ("-" if s.get(m) is None else s[m]) for m in metrics}}
                 for name, s in list(report["scores"].items())[:30]])
    print(f"\ncircuit {circuit_id}: scored {report['scored']} explanations with rater {cost['rater']}"
          f"{' (a proxy, not a judgement of meaning)' if cost['rater'] == 'offline-proxy' else ''}; "
          f"{cost['score_calls']} rater calls, {cost['score_tokens']} tokens")
    _print_errors(report["errors"])

