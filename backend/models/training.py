"""Train a cross-layer transcoder (CLT) on a model's activations (`piescope train-clt`).

Pipeline (DESIGN.md section 11 has the measurements behind each choice):
1. harvest `resid_mid` (inputs) and `mlp_out` (targets) of every layer over a corpus into
   memory-mapped float16 files (`harvest_activations.py`), BOS dropped; a held-out set from
   held-out documents;
2. normalise per layer: inputs centred and scaled to mean norm sqrt(d), targets by their
   mean and one std (so that the mean squared error of layer t *is* its FVU and every layer
   counts the same); the loss is the mean FVU over layers;
3. train TopK features (k per token and layer): a feature of source layer l writes to `mlp_out`
   of layers l..L-1 (`topk_clt.py`: the model, its sparse decoder with a dense-matmul, a
   scatter-add or a cache-blocked gather backward, bf16 matmuls where the device has them, and the AuxK loss that trains
   dead features on the residual error);
4. export: fold the normalisation into W_enc / W_dec / b_dec so the files are in plain model
   units, and (by default) convert TopK to JumpReLU with per-feature thresholds calibrated on
   training tokens so that each feature fires as often as under TopK. circuit-tracer's loader
   knows ReLU and JumpReLU only, so JumpReLU files activate the same everywhere; the report
   records the held-out FVU of both activations so the cost of the conversion is visible.
   `export_activation="topk"` writes TopK instead (with a note in config.yaml).

Written to OUT: the circuit-tracer files (`config.yaml`, `W_enc_{i}` / `W_dec_{i}`),
`training_report.json` (config, loss curve, per-layer held-out FVU, L0, dead features and their
curve over training, device and matmul dtype, tokens/s, seconds) and `loss_curve.png`; while
training also `checkpoint.pt` (parameters, Adam state, the dead-feature counters, step = data
position; the batch order is a function of (seed, epoch), so a resumed run equals
an uninterrupted one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from backend.errors import InvalidParameterError, UserError
from backend.models.adapters import ModelAdapter
from backend.models.corpus import load_corpus, split_heldout
from backend.models.harvest_activations import ActivationStore, delete_store, harvest
from backend.models.lazy_adam import LazyAdam
from backend.models.topk_clt import (DECODER_BACKWARDS, PRECISIONS, DeadFeatures, TopKCLT, auxk_loss,  # noqa: F401
                                     resolve_backward, resolve_precision, sparse_decode)
from backend.models.transcoder import Transcoder, TranscoderConfig
from backend.models.transcoder_files import save_transcoder

log = logging.getLogger(__name__)
Report = Callable[[str], None]

REPORT_FILE = "training_report.json"
CHECKPOINT_FILE = "checkpoint.pt"
PLOT_FILE = "loss_curve.png"
EXPORT_ACTIVATIONS = ("jumprelu", "topk")
OPTIMIZERS = ("auto", "adam", "lazy-adam")


@dataclass
class TrainConfig:
    """Everything that determines a training run (the CLI maps its flags onto these fields).

    tokens: training tokens harvested (BOS excluded); heldout_tokens: from held-out documents.
    steps: optimiser steps of `batch_size` tokens; None means epochs * tokens / batch_size.
    lr: Adam's peak learning rate, after `warmup_steps`, cosine-decayed to lr * lr_final.
    export_activation: "jumprelu" (thresholds calibrated on `calibration_tokens` training
    tokens) or "topk".
    precision: matmul dtype, "auto" = bfloat16 where the device has fast bf16 (AMX, CUDA), else
    float32 (master weights, loss and Adam are float32 either way); decoder_backward: "dense",
    "sparse", "blocked" or "auto" (`topk_clt.py`). The device is the adapter's (PIESCOPE_DEVICE).
    optimizer: "adam" (dense, fused), "lazy-adam" (decoder rows with a zero gradient are not
    touched: `lazy_adam.py`; encoder and biases dense Adam) or "auto" = lazy-adam when a batch
    activates fewer than half of the decoder rows (batch_size * k < features_per_layer / 2),
    else dense Adam, which is cheaper per row when nearly every row moves anyway.
    AuxK: a feature is dead after `dead_tokens` tokens without firing; the auxiliary loss
    (weight aux_coef, 0 = off) trains the top `aux_k` dead features per layer on the residual
    error of the first `aux_tokens` tokens of each batch.
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
    precision: str = "auto"
    decoder_backward: str = "auto"
    aux_k: int = 128
    aux_coef: float = 1 / 32
    aux_tokens: int = 256
    dead_tokens: int = 16_384
    optimizer: str = "auto"

    def __post_init__(self) -> None:
        positive = ("features_per_layer", "k", "tokens", "heldout_tokens", "batch_size", "seq_len",
                    "harvest_batch_size", "checkpoint_every", "eval_every", "calibration_tokens",
                    "aux_k", "aux_tokens", "dead_tokens")
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
        if self.aux_coef < 0:
            raise InvalidParameterError(f"aux_coef must not be negative, got {self.aux_coef}")
        if self.precision not in PRECISIONS:
            raise InvalidParameterError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.decoder_backward not in DECODER_BACKWARDS:
            raise InvalidParameterError(
                f"decoder_backward must be one of {DECODER_BACKWARDS}, got {self.decoder_backward!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidParameterError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
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


@dataclass
class Normaliser:
    """Per-layer maps: x_n = (x - in_mean[l]) * in_scale[l]; y_n = (y - out_mean[l]) / out_std[l].

    Inputs are centred before scaling: 80-97% of resid_mid's squared norm on Gemma-3 is its
    mean direction, so uncentred pre-activations are nearly the same for every token, the same
    k features win everywhere and most of the others never fire (70% dead within 50 steps,
    measured). in_scale makes the mean norm of a centred input sqrt(d).
    """

    in_scale: torch.Tensor  # [L]
    out_mean: torch.Tensor  # [L, d]
    out_std: torch.Tensor   # [L]
    in_mean: torch.Tensor | None = None  # [L, d]; None (checkpoints before centring) = zeros

    def __post_init__(self) -> None:
        if self.in_mean is None:
            self.in_mean = torch.zeros_like(self.out_mean)

    @staticmethod
    def fit(store: ActivationStore, max_tokens: int = 32768, center: bool = True) -> Normaliser:
        L, d = store.n_layers, store.d_model
        x_sum = torch.zeros(L, d, dtype=torch.float64)
        y_sum = torch.zeros(L, d, dtype=torch.float64)
        y_sq = torch.zeros(L, dtype=torch.float64)
        n = 0
        for x, y in store.chunks(4096, max_tokens):
            x_sum += x.double().sum(1)
            y_sum += y.double().sum(1)
            y_sq += y.double().pow(2).sum((1, 2))
            n += x.shape[1]
        in_mean = (x_sum / n).float() if center else torch.zeros(L, d)
        norm_sum = torch.zeros(L, dtype=torch.float64)
        for x, _ in store.chunks(4096, max_tokens):
            norm_sum += (x.float() - in_mean[:, None, :]).double().norm(dim=-1).sum(-1)
        mean = y_sum / n
        var = (y_sq / n - mean.pow(2).sum(-1)) / d  # per-dimension variance around the mean
        return Normaliser(in_scale=(math.sqrt(d) / (norm_sum / n)).float(), out_mean=mean.float(),
                          out_std=var.clamp_min(1e-12).sqrt().float(), in_mean=in_mean)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [L, B, d] in model units -> normalised."""
        return ((x - self.in_mean[:, None, :]) * self.in_scale[:, None, None],
                (y - self.out_mean[:, None, :]) / self.out_std[:, None, None])

    def state(self) -> dict:
        return {"in_scale": self.in_scale, "out_mean": self.out_mean, "out_std": self.out_std,
                "in_mean": self.in_mean}


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
        """recon, y: [L, B, d]; active: [L, B, F] bool (on any device; the sums are kept on CPU)."""
        self.err += (recon - y).double().pow(2).sum((1, 2)).cpu()
        self.y_sum += y.double().sum(1).cpu()
        self.y_sq += y.double().pow(2).sum((1, 2)).cpu()
        self.l0 += active.sum((1, 2)).double().cpu()
        self.fired |= active.any(1).cpu()
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
    device = model.b_dec.device
    for x, y in store.chunks(chunk):
        xn, yn = norm.apply(x.to(device), y.to(device))
        recon, codes = model(xn)
        active = torch.stack([torch.zeros(x.shape[1], model.n_features, dtype=torch.bool, device=device)
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
    device = model.b_dec.device
    xn, _ = norm.apply(x.to(device), y.to(device))
    out = []
    with torch.no_grad():
        for l in range(model.n_layers):
            pre = xn[l] @ model.W_enc[l].T + model.b_enc[l]  # [N, F]
            idx, vals = model.encode_layer(l, xn[l])
            counts = torch.zeros(pre.shape[1], dtype=torch.long, device=device).index_add_(
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

    pre = ((x - mu_l) * s_l) @ W^T + b  =>  W_enc_file = W * s_l, b_enc_file = b - (mu_l * s_l) @ W^T.
    recon_n = b_n + sum writes_n and
    y = recon_n * std + mean  =>  W_dec_file[l][:, j] = W_dec[l][:, j] * std[l+j],
    b_dec_file[t] = b_dec[t] * std[t] + mean[t]. Thresholds act on the (unchanged) pre-activations.
    """
    L, Fn, d = model.n_layers, model.n_features, model.W_enc[0].shape[1]
    cfg = TranscoderConfig(kind="clt", n_layers=L, d_model=d, n_features=Fn, activation=activation,
                           k=model.k if activation == "topk" else None, model_name=model_name)
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(torch.stack(list(model.W_enc)) * norm.in_scale[:, None, None])
        tc.b_enc.copy_(torch.stack([b - (norm.in_mean[l] * norm.in_scale[l]) @ model.W_enc[l].T
                                    for l, b in enumerate(model.b_enc)]))
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
    ax.legend(loc="upper left")
    if history.get("dead"):  # (step, dead in training, never active on held-out)
        ax2 = ax.twinx()
        ax2.plot([r[0] for r in history["dead"]], [r[1] for r in history["dead"]], "s--", color="tab:red",
                 label="dead features (training window)")
        ax2.set_ylabel("dead features")
        ax2.legend(loc="upper right")
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


def resolve_optimizer(cfg: TrainConfig) -> str:
    """"auto" -> "lazy-adam" when a batch's B*k activations cover under half of a layer's rows."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "lazy-adam" if 2 * cfg.batch_size * cfg.k < cfg.features_per_layer else "adam"


def make_optimizers(model: TopKCLT, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Dense Adam for everything, or dense Adam for encoder and biases plus LazyAdam for W_dec."""
    adam = {"lr": cfg.lr, "betas": (0.9, 0.999)}
    if resolve_optimizer(cfg) == "adam":
        return [torch.optim.Adam(model.parameters(), **adam, fused=True)]
    dense = [*model.W_enc, *model.b_enc, model.b_dec]
    return [torch.optim.Adam(dense, **adam, fused=True), LazyAdam(model.W_dec, **adam)]


def train_loss(model: TopKCLT, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """One batch's losses: (mean FVU over layers, AuxK loss or None, per layer (idx, vals)).

    x, y [L, B, d] normalised; dead [L, F] bool. The AuxK term is None when cfg.aux_coef is 0
    or no feature is dead, so it then adds nothing to the step.
    """
    pre = model.pre_activations(x)
    codes = [model.topk(p) for p in pre]
    weights = model.decoder_weights()  # one bf16 copy per step, shared by both decodes
    recon = model.decode(dict(enumerate(codes)), weights=weights)
    loss = (recon - y).pow(2).mean()
    aux = None
    if cfg.aux_coef > 0:
        aux = auxk_loss(model, pre, (y - recon).detach(), dead, cfg.aux_k,
                        min(cfg.aux_tokens, x.shape[1]), weights)
    return loss, aux, codes



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
    device = torch.device(adapter.device)
    norm = Normaliser.fit(store)
    model = TopKCLT(L, d, cfg.features_per_layer, cfg.k, cfg.seed).to(device)
    model.compute_dtype = resolve_precision(cfg.precision, device)
    model.backward_kind = resolve_backward(cfg.decoder_backward, device, cfg.k, cfg.features_per_layer)
    opts = make_optimizers(model, cfg)
    dead = DeadFeatures(L, cfg.features_per_layer, cfg.dead_tokens, device)
    history: dict = {"loss": [], "heldout": [], "dead": [], "aux_loss": []}
    step, train_seconds = 0, 0.0
    if resume and ckpt_file.exists():
        ckpt = torch.load(ckpt_file, weights_only=False, map_location=device)
        # Fields added since a checkpoint was written count as their defaults.
        saved = {**{f.name: f.default for f in fields(TrainConfig)}, **ckpt["config"]}
        saved = {k: v for k, v in saved.items() if k not in TrainConfig.RESUME_FREE}
        now = {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RESUME_FREE}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise UserError(f"{ckpt_file} was made with a different configuration ({', '.join(diff)});"
                            " use the same settings to resume, or remove the checkpoint")
        model.load_state_dict(ckpt["model"])
        states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
        for opt, state in zip(opts, states, strict=True):
            opt.load_state_dict(state)
        norm = Normaliser(**ckpt["normaliser"])
        dead.since = ckpt["dead_since"]
        history, step, train_seconds = ckpt["history"], ckpt["step"], ckpt["train_seconds"]
        report(f"resuming from step {step} of {cfg.total_steps}")
    norm = Normaliser(**{k: v.to(device) for k, v in norm.state().items()})
    report(f"training on {device} with {str(model.compute_dtype).removeprefix('torch.')} matmuls "
           f"and the {model.backward_kind} decoder backward")

    def checkpoint() -> None:
        _save_checkpoint(ckpt_file, {"model": model.state_dict(), "optimizer": [o.state_dict() for o in opts],
                                     "normaliser": norm.state(), "history": history, "step": step,
                                     "dead_since": dead.since, "train_seconds": train_seconds,
                                     "config": cfg.to_dict()})

    # 3. train
    total = cfg.total_steps
    end = total if stop_after_step is None else min(total, stop_after_step)
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, desc="train CLT",
               unit="tok", unit_scale=True, disable=not progress)
    t_train = time.perf_counter()
    while step < end:
        rows = _batch_index(step, cfg, store.n_tokens)
        x, y = (t.to(device, non_blocking=True) for t in store.rows(rows))
        x, y = norm.apply(x, y)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
        loss, aux, codes = train_loss(model, x, y, dead.mask, cfg)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + cfg.aux_coef * aux).backward()
        for opt in opts:
            opt.step()
        dead.update(codes)
        step += 1
        loss = float(loss.detach())
        history["loss"].append((step, loss))
        if aux is not None:
            history["aux_loss"].append((step, float(aux.detach())))
        bar.update(cfg.batch_size)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.eval_every == 0 or step == total:
            held_eval = _evaluate(model, held, norm)
            history["heldout"].append((step, held_eval["mean_fvu"]))
            history["dead"].append((step, dead.count(), held_eval["dead"]))
            bar.set_postfix(loss=f"{loss:.4f}", heldout=f"{history['heldout'][-1][1]:.4f}",
                            dead=dead.count())
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
        "device": str(device),
        "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
        "decoder_backward": model.backward_kind,
        "optimizer": resolve_optimizer(cfg),
        "dead_curve": history["dead"],
        "aux_loss_curve": history["aux_loss"],
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
