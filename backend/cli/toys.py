"""`piescope train-toy`: models PIEscope trains itself (today: modular addition, DESIGN 8.4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from backend.cli.output import say
from backend.settings import Settings

TOYS = ("modadd",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-toy", help="train a toy model of our own (modadd: (a + b) mod p)")
    p.add_argument("toy", choices=TOYS)
    p.add_argument("--p", type=int, default=113, help="the modulus")
    p.add_argument("--steps", type=int, default=20_000, help="at most this many full-batch steps")
    p.add_argument("--stop-at-accuracy", type=float, default=0.999,
                   help="stop once train and test accuracy reach this (0 disables)")
    p.add_argument("--train-frac", type=float, default=0.3, help="share of the p^2 pairs trained on")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--out", help="output directory (default: models_cache/modadd-<p>, which names the model)")
    p.set_defaults(run=cmd_train_toy)


def cmd_train_toy(args: argparse.Namespace, settings: Settings) -> None:
    from backend.toys.modadd import CHECKPOINT_FILE, PLOT_FILE, ModAddConfig, model_name, train_modadd
    cfg = ModAddConfig(p=args.p, steps=args.steps, train_frac=args.train_frac, lr=args.lr,
                       weight_decay=args.weight_decay, seed=args.seed,
                       stop_at_accuracy=args.stop_at_accuracy or None)
    name = model_name(args.p)
    out = Path(args.out) if args.out else Path(settings.models_cache) / name
    resume = args.resume or (out / CHECKPOINT_FILE).exists()
    result = train_modadd(cfg, out, resume=resume, report=say, threads=args.threads)
    if not result.report.get("complete", True):
        return
    print(f"wrote {out / 'model'} (train accuracy {result.train_accuracy:.3f}, test {result.test_accuracy:.3f}); "
          f"accuracy curve {out / PLOT_FILE}")
    print(f"next: piescope train-clt --model {name if not args.out else out / 'model'} --corpus "
          f"{out / 'corpus.jsonl'} --features-per-layer 512 --k 16 --tokens 40000 --heldout-tokens 2048 "
          f"--batch-size 512 --out {out / 'clt'}")
