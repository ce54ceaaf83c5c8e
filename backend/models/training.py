"""Train a cross-layer transcoder (CLT) on a model's activations (`piescope train-clt`).

Pipeline (DESIGN.md section 11 has the measurements behind each choice):
1. harvest `resid_mid` (inputs) and `mlp_out` (targets) of every layer over a corpus into
   memory-mapped float16 files (`harvest_activations.py`), BOS dropped; a held-out set from
   held-out documents;
2. normalise per layer: inputs by their mean norm (x * sqrt(d) / mean|x|), targets by their
   mean and one std (so that the mean squared error of layer t *is* its FVU and every layer
   counts the same); the loss is the mean FVU over layers;
3. train TopK features (k per token and layer): a feature of source layer l writes to `mlp_out`
   of layers l..L-1. The decoder is a sparse-times-dense product (`_SparseDecode`): k/F of the
   dense forward cost; its backward computes the decoder gradient densely (faster than any
   sparse kernel on 2 CPU cores at k/F = 1/32) and the activations' gradient only at the
   active entries (`torch.sparse.sampled_addmm`);
4. export: fold the normalisation into W_enc / W_dec / b_dec so the files are in plain model
   units, and (by default) convert TopK to JumpReLU with per-feature thresholds calibrated on
   training tokens so that each feature fires as often as under TopK. circuit-tracer's loader
   knows ReLU and JumpReLU only, so JumpReLU files activate the same everywhere; the report
   records the held-out FVU of both activations so the cost of the conversion is visible.
   `export_activation="topk"` writes TopK instead (with a note in config.yaml).

Written to OUT: the circuit-tracer files (`config.yaml`, `W_enc_{i}` / `W_dec_{i}`),
`training_report.json` (config, loss curve, per-layer held-out FVU, L0, dead features, tokens/s,
seconds) and `loss_curve.png`; while training also `checkpoint.pt` (parameters, Adam state,
step = data position; the batch order is a function of (seed, epoch), so a resumed run equals
an uninterrupted one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from backend.errors import InvalidParameterError, UserError
from backend.models.adapters import ModelAdapter
from backend.models.corpus import load_corpus, split_heldout
from backend.models.harvest_activations import ActivationStore, delete_store, harvest
from backend.models.transcoder import Transcoder, TranscoderConfig
from backend.models.transcoder_files import save_transcoder

log = logging.getLogger(__name__)
Report = Callable[[str], None]

REPORT_FILE = "training_report.json"
CHECKPOINT_FILE = "checkpoint.pt"
PLOT_FILE = "loss_curve.png"
EXPORT_ACTIVATIONS = ("jumprelu", "topk")


@dataclass
class TrainConfig:
    """Everything that determines a training run (the CLI maps its flags onto these fields).

    tokens: training tokens harvested (BOS excluded); heldout_tokens: from held-out documents.
    steps: optimiser steps of `batch_size` tokens; None means epochs * tokens / batch_size.
    lr: Adam's peak learning rate, after `warmup_steps`, cosine-decayed to lr * lr_final.
    export_activation: "jumprelu" (thresholds calibrated on `calibration_tokens` training
    tokens) or "topk".
    """

    features_per_layer: int = 1024
    k: int = 32
    tokens: int = 100_000
    heldout_tokens: int = 4096
    steps: int | None = None
    epochs: float = 2.0
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 20
    lr_final: float = 0.1
    seed: int = 0
    seq_len: int = 128
    harvest_batch_size: int = 16
    checkpoint_every: int = 50
    eval_every: int = 50
    export_activation: str = "jumprelu"
    calibration_tokens: int = 8192
    keep_activations: bool = False
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        positive = ("features_per_layer", "k", "tokens", "heldout_tokens", "batch_size", "seq_len",
                    "harvest_batch_size", "checkpoint_every", "eval_every", "calibration_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if self.k > self.features_per_layer:
            raise InvalidParameterError(
                f"k={self.k} must not exceed features_per_layer={self.features_per_layer}")
        if self.steps is not None and self.steps <= 0:
            raise InvalidParameterError(f"steps must be positive, got {self.steps}")
        if self.epochs <= 0 or self.lr <= 0 or not 0 <= self.lr_final <= 1:
            raise InvalidParameterError("epochs and lr must be positive and lr_final in [0, 1]")
        if self.batch_size > self.tokens:
            raise InvalidParameterError(
                f"batch_size={self.batch_size} exceeds the {self.tokens} training tokens")
        if self.export_activation not in EXPORT_ACTIVATIONS:
            raise InvalidParameterError(
                f"export_activation must be one of {EXPORT_ACTIVATIONS}, got {self.export_activation!r}")

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, int(self.epochs * self.tokens) // self.batch_size)

    # Fields that do not change the result; a resumed run may differ in these.
    RESUME_FREE = ("checkpoint_every", "keep_activations", "keep_checkpoint", "harvest_batch_size")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """Where the CLT went and what the report says (the same dict as training_report.json)."""

    path: Path
    report: dict = field(default_factory=dict)
    transcoder: Transcoder | None = None  # the exported CLT (None when stopped early)


# ------------------------------------------------------------------------------ sparse decoder


class _SparseDecode(torch.autograd.Function):
    """out[b] = sum_j vals[b, j] * weight[idx[b, j]]: a sparse [B, F] times dense [F, D].

    idx [B, k] (distinct features per row), vals [B, k], weight [F, D] -> out [B, D].
    Forward is an `embedding_bag` (B*k*D); backward gives d/dweight = A^T g with A the dense
    [B, F] activation matrix (a dense matmul: on CPU faster than sparse kernels at k/F ~ 1/32)
    and d/dvals only at the active entries (sampled_addmm, B*k*D).
    """

    @staticmethod
    def forward(ctx, idx: torch.Tensor, vals: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, vals, weight)
        return F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        idx, vals, weight = ctx.saved_tensors
        B, k = idx.shape
        grad_vals = grad_weight = None
        g = g.contiguous()
        if ctx.needs_input_grad[2]:
            dense = vals.new_zeros(B, weight.shape[0]).scatter_(1, idx, vals)
            grad_weight = dense.T @ g
        if ctx.needs_input_grad[1]:
            sorted_idx, order = idx.sort(dim=1)
            crow = torch.arange(0, B * k + 1, k, dtype=torch.long)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                mask = torch.sparse_csr_tensor(crow, sorted_idx.reshape(-1), vals.new_zeros(B * k),
                                               (B, weight.shape[0]))
            picked = torch.sparse.sampled_addmm(mask, g, weight.T).values().reshape(B, k)
            grad_vals = torch.empty_like(picked).scatter_(1, order, picked)
        return None, grad_vals, grad_weight


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of `vals`-weighted rows `idx` of `weight`: [B, k], [B, k], [F, D] -> [B, D]."""
    return _SparseDecode.apply(idx, vals, weight)


# ------------------------------------------------------------------------------ the model


class TopKCLT(nn.Module):
    """The CLT being trained, in normalised units (see the module docstring).

    W_enc[l] [F, d], b_enc[l] [F]; W_dec[l] [F, L-l, d] (row j writes into layer l+j);
    b_dec [L, d]. Activation: TopK (k per token and layer) of the pre-activations, relu'd.
    """

    def __init__(self, n_layers: int, d_model: int, n_features: int, k: int, seed: int):
        super().__init__()
        L, Fn, d = n_layers, n_features, d_model
        self.k = k
        gen = torch.Generator().manual_seed(seed)
        # Per-layer parameters (a [L, F, d] tensor indexed per layer would cost a full-size
        # zero gradient per layer in backward).
        self.W_enc = nn.ParameterList(
            [nn.Parameter(torch.randn(Fn, d, generator=gen) / math.sqrt(d)) for _ in range(L)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(Fn)) for _ in range(L)])
        dec_std = 0.1 / math.sqrt(k * L)
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.randn(Fn, L - l, d, generator=gen) * dec_std) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))

    @property
    def n_layers(self) -> int:
        return len(self.W_enc)

    @property
    def n_features(self) -> int:
        return self.W_enc[0].shape[0]

    def encode_layer(self, l: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (indices [B, k], activations [B, k] >= 0)."""
        pre = x @ self.W_enc[l].T + self.b_enc[l]
        vals, idx = pre.topk(self.k, dim=-1)
        return idx, torch.relu(vals)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """x [L, B, d] -> (reconstruction [L, B, d], per layer (indices, activations))."""
        L, B, d = x.shape
        total = self.b_dec.unsqueeze(0)  # [1, L, d], broadcast to [B, L, d]
        codes = []
        for l in range(L):
            idx, vals = self.encode_layer(l, x[l])
            codes.append((idx, vals))
            w = sparse_decode(idx, vals, self.W_dec[l].reshape(self.W_dec[l].shape[0], -1))
            # [B, L-l, d] padded to [B, L, d]: one op per source layer (slicing per target
            # would cost a full-size zero fill per (source, target) pair in backward).
            total = total + F.pad(w.view(B, L - l, d), (0, 0, l, 0))
        return total.transpose(0, 1), codes


@dataclass
class Normaliser:
    """Per-layer scales: x_n = x * in_scale[l]; y_n = (y - out_mean[l]) / out_std[l]."""

    in_scale: torch.Tensor  # [L]
    out_mean: torch.Tensor  # [L, d]
    out_std: torch.Tensor   # [L]

    @staticmethod
    def fit(store: ActivationStore, max_tokens: int = 32768) -> Normaliser:
        L, d = store.n_layers, store.d_model
        norm_sum = torch.zeros(L, dtype=torch.float64)
        y_sum = torch.zeros(L, d, dtype=torch.float64)
        y_sq = torch.zeros(L, dtype=torch.float64)
        n = 0
        for x, y in store.chunks(4096, max_tokens):
            norm_sum += x.double().norm(dim=-1).sum(-1)
            y_sum += y.double().sum(1)
            y_sq += y.double().pow(2).sum((1, 2))
            n += x.shape[1]
        mean = y_sum / n
        var = (y_sq / n - mean.pow(2).sum(-1)) / d  # per-dimension variance around the mean
        return Normaliser(in_scale=(math.sqrt(d) / (norm_sum / n)).float(),
                          out_mean=mean.float(), out_std=var.clamp_min(1e-12).sqrt().float())

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [L, B, d] in model units -> normalised."""
        return (x * self.in_scale[:, None, None],
                (y - self.out_mean[:, None, :]) / self.out_std[:, None, None])

    def state(self) -> dict:
        return {"in_scale": self.in_scale, "out_mean": self.out_mean, "out_std": self.out_std}


# ------------------------------------------------------------------------------ helpers


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to cfg.lr_final at the last step."""
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_index(step: int, cfg: TrainConfig, n_tokens: int) -> torch.Tensor:
    """Token rows of step `step`: epoch-wise permutations seeded by (seed, epoch)."""
    per_epoch = n_tokens // cfg.batch_size
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_tokens, generator=gen)
    return perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]


class ReconstructionStats:
    """Accumulates per-layer FVU, L0 and never-active features over chunks of tokens."""

    def __init__(self, n_layers: int, d_model: int, n_features: int) -> None:
        L = n_layers
        self.err = torch.zeros(L, dtype=torch.float64)
        self.y_sum = torch.zeros(L, d_model, dtype=torch.float64)
        self.y_sq = torch.zeros(L, dtype=torch.float64)
        self.l0 = torch.zeros(L, dtype=torch.float64)
        self.fired = torch.zeros(L, n_features, dtype=torch.bool)
        self.n = 0

    def add(self, recon: torch.Tensor, y: torch.Tensor, active: torch.Tensor) -> None:
        """recon, y: [L, B, d]; active: [L, B, F] bool."""
        self.err += (recon - y).double().pow(2).sum((1, 2))
        self.y_sum += y.double().sum(1)
        self.y_sq += y.double().pow(2).sum((1, 2))
        self.l0 += active.sum((1, 2)).double()
        self.fired |= active.any(1)
        self.n += y.shape[1]

    @property
    def fvu(self) -> list[float]:
        return (self.err / (self.y_sq - self.y_sum.pow(2).sum(-1) / self.n)).tolist()

    def result(self) -> dict:
        L, fvu = len(self.err), self.fvu
        return {"fvu_per_layer": fvu, "mean_fvu": sum(fvu) / L, "l0_per_layer": (self.l0 / self.n).tolist(),
                "mean_l0": float(self.l0.sum() / self.n / L), "dead_per_layer": (~self.fired).sum(1).tolist(),
                "dead": int((~self.fired).sum())}


@torch.no_grad()
def _evaluate(model: TopKCLT, store: ActivationStore, norm: Normaliser, chunk: int = 1024) -> dict:
    """Held-out per-layer FVU, L0 and the features never active, for the TopK model."""
    acc = ReconstructionStats(model.n_layers, store.d_model, model.n_features)
    for x, y in store.chunks(chunk):
        xn, yn = norm.apply(x, y)
        recon, codes = model(xn)
        active = torch.stack([torch.zeros(x.shape[1], model.n_features, dtype=torch.bool)
                              .scatter_(1, idx, vals > 0) for idx, vals in codes])
        acc.add(recon, yn, active)
    return acc.result()


def calibrate_thresholds(model: TopKCLT, store: ActivationStore, norm: Normaliser,
                         n_tokens: int) -> torch.Tensor:
    """JumpReLU thresholds [L, F] that make each feature fire as often as under TopK.

    On the first `n_tokens` training tokens: c_f = how often feature f is among the top k
    (and positive); the threshold is midway between the c_f-th and (c_f+1)-th largest
    pre-activation of f (the largest, if it never fires), and at least 0.
    """
    x, y = store.rows(slice(0, min(n_tokens, store.n_tokens)))
    xn, _ = norm.apply(x, y)
    out = []
    with torch.no_grad():
        for l in range(model.n_layers):
            pre = xn[l] @ model.W_enc[l].T + model.b_enc[l]  # [N, F]
            idx, vals = model.encode_layer(l, xn[l])
            counts = torch.zeros(pre.shape[1], dtype=torch.long).index_add_(
                0, idx[vals > 0], torch.ones_like(idx[vals > 0]))
            top = pre.sort(dim=0, descending=True).values  # [N, F]
            N = top.shape[0]
            upper = top.gather(0, (counts - 1).clamp(0, N - 1)[None]).squeeze(0)
            lower = top.gather(0, counts.clamp(max=N - 1)[None]).squeeze(0)
            thr = torch.where(counts > 0, (upper + lower) / 2, top[0])
            thr = torch.where(counts >= N, top[-1] - 1e-6, thr)
            out.append(thr.clamp_min(0.0))
    return torch.stack(out)


def export_transcoder(model: TopKCLT, norm: Normaliser, activation: str, model_name: str,
                      thresholds: torch.Tensor | None = None) -> Transcoder:
    """The trained CLT in model units, as a `Transcoder` (TopK or JumpReLU).

    pre = (x * s_l) @ W^T + b  =>  W_enc_file = W * s_l. recon_n = b_n + sum writes_n and
    y = recon_n * std + mean  =>  W_dec_file[l][:, j] = W_dec[l][:, j] * std[l+j],
    b_dec_file[t] = b_dec[t] * std[t] + mean[t]. Thresholds act on the (unchanged) pre-activations.
    """
    L, Fn, d = model.n_layers, model.n_features, model.W_enc[0].shape[1]
    cfg = TranscoderConfig(kind="clt", n_layers=L, d_model=d, n_features=Fn, activation=activation,
                           k=model.k if activation == "topk" else None, model_name=model_name)
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(torch.stack(list(model.W_enc)) * norm.in_scale[:, None, None])
        tc.b_enc.copy_(torch.stack(list(model.b_enc)))
        tc.b_dec.copy_(model.b_dec * norm.out_std[:, None] + norm.out_mean)
        for l in range(L):
            tc.W_dec[l].copy_(model.W_dec[l] * norm.out_std[l:, None])
        if activation == "jumprelu":
            assert thresholds is not None
            tc.threshold.copy_(thresholds)
    return tc


@torch.no_grad()
def evaluate_transcoder(tc: Transcoder, store: ActivationStore, chunk: int = 1024) -> dict:
    """Per-layer FVU of `mlp_out`, L0 and never-active features of a Transcoder on a store."""
    acc = ReconstructionStats(tc.n_layers, tc.d_model, tc.n_features)
    for x, y in store.chunks(chunk):
        acts = tc.encode(x)
        acc.add(tc.decode(acts), y, acts != 0)
    return acc.result()


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, _ in history["loss"]]
    ax.plot(steps, [v for _, v in history["loss"]], lw=0.8, label="train loss (mean FVU)")
    if history["heldout"]:
        ax.plot([s for s, _ in history["heldout"]], [v for _, v in history["heldout"]], "o-",
                label="held-out mean FVU")
    ax.set_xlabel("step")
    ax.set_ylabel("mean FVU over layers")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def is_complete(out_dir: str | Path) -> bool:
    """True when `out_dir` holds a finished training run (files and a complete report)."""
    out = Path(out_dir)
    report_file = out / REPORT_FILE
    if not (out / "config.yaml").is_file() or not report_file.is_file():
        return False
    try:
        report = json.loads(report_file.read_text())
    except json.JSONDecodeError:
        return False
    n_layers = report.get("n_layers", 0)
    return bool(report.get("complete")) and all(
        (out / f"W_enc_{i}.safetensors").is_file() and (out / f"W_dec_{i}.safetensors").is_file()
        for i in range(n_layers))


# ------------------------------------------------------------------------------ training


def train_clt(adapter: ModelAdapter, out_dir: str | Path, config: TrainConfig | None = None,
              corpus: str | Path | list[str] | None = None, *,
              activations_dir: str | Path | None = None, resume: bool = False,
              progress: bool = True, report: Report = log.info,
              stop_after_step: int | None = None) -> TrainResult:
    """Train a CLT on `adapter`'s activations over `corpus` and write it to `out_dir`.

    corpus: a list of documents, a path (directory of .txt/.jsonl, or a file), or None for the
    default corpus (`corpus.py`). activations_dir: where harvested activations go (default
    OUT/activations; deleted at the end unless config.keep_activations).
    resume: continue from OUT/checkpoint.pt (the config must match). stop_after_step: stop
    after that many steps in total, leaving the checkpoint (as if interrupted; for tests and
    time-sliced runs). Returns the output directory and the report.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    act_dir = Path(activations_dir) if activations_dir is not None else out / "activations"
    ckpt_file = out / CHECKPOINT_FILE
    if not resume and ckpt_file.exists():
        raise UserError(f"{ckpt_file} exists: pass resume to continue that run, or remove it")
    t_start = time.perf_counter()

    # 1. harvest
    docs = corpus if isinstance(corpus, list) else load_corpus(corpus, seed=cfg.seed)
    train_docs, held_docs = split_heldout(docs)
    report(f"corpus: {len(train_docs)} training and {len(held_docs)} held-out documents")
    store = harvest(adapter, train_docs, act_dir / "train", cfg.tokens, seq_len=cfg.seq_len,
                    batch_size=cfg.harvest_batch_size, progress=progress, desc="harvest train",
                    report=report)
    held = harvest(adapter, held_docs, act_dir / "heldout", cfg.heldout_tokens, seq_len=cfg.seq_len,
                   batch_size=cfg.harvest_batch_size, progress=progress, desc="harvest held-out",
                   report=report)
    harvest_seconds = time.perf_counter() - t_start

    # 2. model, optimiser, state
    L, d = adapter.n_layers, adapter.d_model
    norm = Normaliser.fit(store)
    model = TopKCLT(L, d, cfg.features_per_layer, cfg.k, cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    history: dict = {"loss": [], "heldout": []}
    step, train_seconds = 0, 0.0
    if resume and ckpt_file.exists():
        ckpt = torch.load(ckpt_file, weights_only=False)
        saved = {k: v for k, v in ckpt["config"].items() if k not in TrainConfig.RESUME_FREE}
        now = {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RESUME_FREE}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise UserError(f"{ckpt_file} was made with a different configuration ({', '.join(diff)});"
                            " use the same settings to resume, or remove the checkpoint")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        norm = Normaliser(**ckpt["normaliser"])
        history, step, train_seconds = ckpt["history"], ckpt["step"], ckpt["train_seconds"]
        report(f"resuming from step {step} of {cfg.total_steps}")

    def checkpoint() -> None:
        _save_checkpoint(ckpt_file, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "normaliser": norm.state(), "history": history, "step": step,
                                     "train_seconds": train_seconds, "config": cfg.to_dict()})

    # 3. train
    total = cfg.total_steps
    end = total if stop_after_step is None else min(total, stop_after_step)
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, desc="train CLT",
               unit="tok", unit_scale=True, disable=not progress)
    t_train = time.perf_counter()
    while step < end:
        rows = _batch_index(step, cfg, store.n_tokens)
        x, y = norm.apply(*store.rows(rows))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        recon, _ = model(x)
        loss = (recon - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss = float(loss.detach())
        history["loss"].append((step, loss))
        bar.update(cfg.batch_size)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.eval_every == 0 or step == total:
            history["heldout"].append((step, _evaluate(model, held, norm)["mean_fvu"]))
            bar.set_postfix(loss=f"{loss:.4f}", heldout=f"{history['heldout'][-1][1]:.4f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            train_seconds += time.perf_counter() - t_train
            t_train = time.perf_counter()
            checkpoint()
    bar.close()
    train_seconds += time.perf_counter() - t_train
    if step < total:
        checkpoint()
        report(f"stopped after step {step} of {total}; resume to continue")
        return TrainResult(out, {"complete": False, "step": step, "total_steps": total})

    # 4. export
    topk_eval = _evaluate(model, held, norm)
    thresholds = None
    if cfg.export_activation == "jumprelu":
        thresholds = calibrate_thresholds(model, store, norm, cfg.calibration_tokens)
    tc = export_transcoder(model, norm, cfg.export_activation, adapter.name, thresholds)
    exported_eval = evaluate_transcoder(tc, held)
    save_transcoder(tc, out)
    result = {
        "complete": True,
        "model_name": adapter.name,
        "n_layers": L,
        "d_model": d,
        "config": cfg.to_dict(),
        "total_steps": total,
        "tokens_trained": total * cfg.batch_size,
        "seconds": {"harvest": harvest_seconds, "train": train_seconds,
                    "total": time.perf_counter() - t_start},
        "train_tokens_per_second": total * cfg.batch_size / max(train_seconds, 1e-9),
        "exported_activation": cfg.export_activation,
        "heldout": exported_eval,
        "heldout_topk": topk_eval,
        "loss_curve": history["loss"],
        "heldout_curve": history["heldout"],
    }
    (out / REPORT_FILE).write_text(json.dumps(result, indent=1))
    _plot(history, out / PLOT_FILE)
    if not cfg.keep_checkpoint:
        ckpt_file.unlink(missing_ok=True)
    if not cfg.keep_activations:
        delete_store(act_dir / "train")
        delete_store(act_dir / "heldout")
        try:
            act_dir.rmdir()
        except OSError:
            pass
    report(f"CLT written to {out}: held-out mean FVU {exported_eval['mean_fvu']:.3f} "
           f"({cfg.export_activation}; TopK {topk_eval['mean_fvu']:.3f}), mean L0 "
           f"{exported_eval['mean_l0']:.1f}, dead features {exported_eval['dead']}, "
           f"{result['train_tokens_per_second']:.0f} tok/s")
    return TrainResult(out, result, tc)


def config_fields() -> list[str]:
    """Names of TrainConfig's fields (for the CLI's flag mapping)."""
    return [f.name for f in fields(TrainConfig)]
