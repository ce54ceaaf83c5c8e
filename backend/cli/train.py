"""`piescope train-clt`: train a cross-layer transcoder on a model's activations."""

from __future__ import annotations

import argparse
from pathlib import Path

from backend.cli.output import say
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="matmul dtype; auto: bfloat16 where the device has fast bf16 (AMX CPUs, CUDA)")
    p.add_argument("--aux-coef", type=float, default=1 / 32,
                   help="weight of the AuxK loss that revives dead features (0: off)")
    p.add_argument("--optimizer", choices=["auto", "adam", "lazy-adam"], default="auto",
                   help="lazy-adam updates only the decoder rows a batch touched; auto picks it when "
                        "a batch touches under half of them (large CLTs), else dense Adam")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--out", required=True, help="output directory (circuit-tracer format)")
    p.set_defaults(run=cmd_train_clt)


def cmd_train_clt(args: argparse.Namespace, settings: Settings) -> None:
    from backend.models.loading import load_model
    from backend.models.training import CHECKPOINT_FILE, TrainConfig, train_clt
    config = TrainConfig(features_per_layer=args.features_per_layer, k=args.k, tokens=args.tokens,
                         heldout_tokens=args.heldout_tokens, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, export_activation=args.activation,
                         precision=args.precision, aux_coef=args.aux_coef, optimizer=args.optimizer,
                         calibration_tokens=min(8192, args.tokens))
    out = Path(args.out)
    resume = args.resume or (out / CHECKPOINT_FILE).exists()
    adapter = load_model(args.model, settings, report=say)
    result = train_clt(adapter, out, config, corpus=args.corpus, resume=resume, report=say)
    print(f"wrote {result.path}; report in {result.path / 'training_report.json'}")
