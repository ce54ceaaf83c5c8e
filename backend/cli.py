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
    if args.corruption:
        options["corruption"] = args.corruption
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


@command("demo")
def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    from backend.demo import run_demo
    run_demo(settings, n=args.n)


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
    p.add_argument("--corruption", help="corruption scheme (ioi: abc or s2)")

    p = sub.add_parser("demo", help="prepare the Gemma-3-270M demo and show its IOI behaviour")
    p.add_argument("-n", type=int, default=20, help="IOI prompts to show")
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
