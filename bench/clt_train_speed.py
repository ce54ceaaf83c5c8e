"""Training throughput of the CLT trainer: tokens per second over a few optimiser steps.

Shapes default to the demo (Gemma-3-270M: 18 layers, d=640; 1024 features per layer, k=32).
Data are random normal activations (timing does not depend on their values), or, with
--store, batches read from a harvested activation store as training reads them. Each row
times full steps (read, forward, backward, Adam) after one warm-up step; load on the machine
counts, so compare rows of one run; the CPU-seconds columns (process time, all threads) do
not depend on load as much: with --threads 1 they are the one-core cost of a step. Runs against whatever `backend` is on the path, so the
same script measures an older checkout (PYTHONPATH=that/checkout) for a before/after table.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backend  # noqa: E402,F401  (before torch: it turns on huge-page allocations, as the CLI does)
import torch  # noqa: E402

from backend.models import training  # noqa: E402


def _config(args, precision: str, batch: int, aux: bool, backward: str):
    names = {f.name for f in fields(training.TrainConfig)}
    base = dict(features_per_layer=args.features, k=args.k, tokens=max(batch, 4096), batch_size=batch)
    if "precision" in names:
        base.update(precision=precision, aux_coef=(1 / 32) if aux else 0.0, decoder_backward=backward)
    return training.TrainConfig(**base)


def time_steps(args, precision: str, batch: int, aux: bool, backward: str = "auto") -> dict:
    """Seconds per step of `args.steps` steps (after one warm-up step)."""
    torch.manual_seed(0)
    cfg = _config(args, precision, batch, aux, backward)
    model = training.TopKCLT(args.layers, args.d_model, args.features, args.k, seed=0)
    new_code = hasattr(training, "train_loss")
    if new_code:
        from backend.models.topk_clt import resolve_backward, resolve_precision
        model.compute_dtype = resolve_precision(cfg.precision, torch.device("cpu"))
        model.backward_kind = resolve_backward(cfg.decoder_backward, torch.device("cpu"), args.k, args.features)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    store = None
    if args.store:
        from backend.models.harvest_activations import ActivationStore
        store = ActivationStore.open(args.store)
    dead = torch.zeros(args.layers, args.features, dtype=torch.bool)
    if aux:  # a third of the features dead, as early in a run
        dead[:, : args.features // 3] = True
    times, cpu = [], []
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        if store is not None:
            x, y = store.rows(torch.randint(0, store.n_tokens, (batch,)))
            x, y = x / x.norm(dim=-1, keepdim=True).mean() * args.d_model ** 0.5, y / y.std()
        else:
            x, y = torch.randn(args.layers, batch, args.d_model), torch.randn(args.layers, batch, args.d_model)
        if new_code:
            loss, aux_loss, _ = training.train_loss(model, x, y, dead, cfg)
            total = loss if aux_loss is None else loss + cfg.aux_coef * aux_loss
        else:
            recon, _ = model(x)
            total = (recon - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    per_step = sorted(times)[len(times) // 2]
    cpu_per_step = sorted(cpu)[len(cpu) // 2]
    return {"precision": str(getattr(model, "compute_dtype", torch.float32)).removeprefix("torch."),
            "backward": getattr(model, "backward_kind", "dense (fp32)"), "batch": batch, "aux": aux,
            "s_per_step": per_step, "tok_per_s": batch / per_step, "cpu_s_per_step": cpu_per_step,
            "tok_per_cpu_s": batch / cpu_per_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (median)")
    parser.add_argument("--batches", default="1024,2048")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--backwards", default="auto",
                        help="decoder kernels to time (auto, dense, sparse, blocked; comma-separated)")
    parser.add_argument("--aux", action="store_true", help="also time steps with AuxK active")
    parser.add_argument("--store", type=Path, help="read batches from this activation store")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    new_code = hasattr(training, "train_loss")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for precision in (args.precisions.split(",") if new_code else ["float32"]):
            for backward in (args.backwards.split(",") if new_code else ["auto"]):
                for aux in ([False, True] if args.aux and new_code else [False]):
                    rows.append(time_steps(args, precision, batch, aux, backward))
                    r = rows[-1]
                    print(f"  {r['precision']:>8} {r['backward']:>12} B={r['batch']:>5} aux={r['aux']!s:>5} "
                          f"{r['s_per_step']:6.2f} s/step {r['tok_per_s']:7.0f} tok/s "
                          f"{r['cpu_s_per_step']:6.2f} CPU-s/step", file=sys.stderr, flush=True)
    where = Path(inspect.getfile(training)).resolve().parent.parent.parent
    print(f"\nCLT training steps, {args.layers} layers x {args.features} features, d={args.d_model}, "
          f"k={args.k}, {torch.get_num_threads()} threads; code from {where}\n")
    print("| matmuls | decoder backward | batch | AuxK | s/step | tokens/s | CPU-s/step | tokens/CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['backward']} | {r['batch']} | {'on' if r['aux'] else 'off'} | "
              f"{r['s_per_step']:.2f} | {r['tok_per_s']:.0f} | {r['cpu_s_per_step']:.2f} | {r['tok_per_cpu_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
