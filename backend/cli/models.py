"""`piescope models` and `piescope tasks`: what PIEscope can run on."""

from __future__ import annotations

import argparse

from backend.cli.output import print_table, say
from backend.errors import UserError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models PIEscope knows and where each comes from")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("tasks", help="list tasks, or show a task's prompt pairs and the model's metric on them")
    p.add_argument("task", nargs="?", help="task name (ioi, docstring, greater-than, jsonl)")
    p.add_argument("--model", help="model name (see `piescope models`) or local model directory")
    p.add_argument("-n", type=int, default=5, help="number of prompt pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", help="prompt file for the jsonl task")
    p.add_argument("--task-corruption", help="corruption scheme (ioi: abc or s2)")
    p.set_defaults(run=cmd_tasks)


def cmd_models(args: argparse.Namespace, settings: Settings) -> None:
    from backend.models.loading import model_listing
    print_table(model_listing(settings), ["name", "architecture", "parameters", "source", "status"])


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
    adapter = load_model(args.model, settings, report=say)
    batch = task.build(adapter.tokenizer, args.n, seed=args.seed)
    result = behaviour(adapter, batch)
    rows = [{"#": i, "clean": p.clean, "answer": p.answer, "distractor": p.distractors[0] if p.distractors else "",
             "M(clean)": float(result.clean[i]), "M(corrupted)": float(result.corrupted[i])}
            for i, p in enumerate(batch.pairs)]
    print_table(rows)
    dropped = ", ".join(f"{v} {k}" for k, v in batch.dropped.items() if v) or "none"
    print(f"\nmean M: clean {result.clean.mean():.3f}, corrupted {result.corrupted.mean():.3f} "
          f"over {len(batch)} pairs (dropped while tokenising: {dropped})")
