"""A modular-addition transformer PIEscope trains itself (DESIGN 8.4): (a + b) mod p.

The field's standard object (Nanda et al. 2023): one layer, d_model 128, 4 heads, MLP 512,
full-batch AdamW (lr 1e-3, weight decay 1.0, betas 0.9/0.98) on 30% of the p^2 pairs; it
memorises first and generalises ("groks") after roughly ten thousand steps.

It is saved as a plain transformers model, so adapters, CLTs, PIE and HAGD apply to it like to
any other. The architecture is GPT-2's (learned positions, ReLU MLP, no dropout, untied
unembedding): of the adapters' architectures it is the closest to Nanda's, and its
``ln_2``/``mlp`` hook points are already supported.

Tokens: the numbers "0".."p-1" are ids 0..p-1 (so the answer c is token id c), then "+", "=",
"<bos>", "<pad>", "<unk>". A prompt is "a + b =", tokenised as ``[<bos>, a, +, b, =]``; the model
is trained to predict c at "=".

Output directory (``models_cache/modadd-<p>/``):
- ``model/``: the Hugging Face directory (config, safetensors, tokenizer);
- ``training_report.json`` (config, accuracy curve, seconds), ``accuracy_curve.png``;
- ``corpus.jsonl``: every prompt "a + b =" once, the corpus ``piescope train-clt`` harvests on;
- ``checkpoint.pt`` while training (model, optimiser, step, curve; resumable).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from backend.errors import InvalidParameterError, UserError

log = logging.getLogger(__name__)
Report = Callable[[str], None]

SPECIALS = ("+", "=", "<bos>", "<pad>", "<unk>")
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_FILE = "training_report.json"
PLOT_FILE = "accuracy_curve.png"
CORPUS_FILE = "corpus.jsonl"
MIN_P, MAX_P = 3, 1000


def model_name(p: int) -> str:
    """The registry name of the modadd model for modulus p (``modadd-113``)."""
    return f"modadd-{p}"


@dataclass
class ModAddConfig:
    """Everything that determines a run. Defaults are Nanda et al.'s settings (DESIGN 8.4)."""

    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_layers: int = 1
    train_frac: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    steps: int = 20_000
    stop_at_accuracy: float | None = 0.999  # stop once train and test accuracy both reach this
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.p, int) or not MIN_P <= self.p <= MAX_P:
            raise InvalidParameterError(f"p must be a whole number from {MIN_P} to {MAX_P}, not {self.p!r}")
        if self.d_model % self.n_heads:
            raise InvalidParameterError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if not 0 < self.train_frac < 1:
            raise InvalidParameterError(f"train_frac must be in (0, 1), not {self.train_frac}")
        for name in ("d_model", "n_heads", "d_mlp", "n_layers", "steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(f"{name} must be a positive integer, not {value!r}")
        if self.stop_at_accuracy is not None and not 0 < self.stop_at_accuracy <= 1:
            raise InvalidParameterError(f"stop_at_accuracy must be in (0, 1], not {self.stop_at_accuracy}")
        self.betas = tuple(self.betas)  # JSON round trips give lists

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModAddResult:
    """Where the model went, and how well it does."""

    path: Path                      # the output directory (the HF model is path / "model")
    train_accuracy: float
    test_accuracy: float
    report: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ tokens and data


def make_tokenizer(p: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of p numbers and five specials; it prepends <bos> to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {str(i): i for i in range(p)} | {s: p + j for j, s in enumerate(SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", p + 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<pad>",
                                   pad_token="<pad>", unk_token="<unk>")


def prompt_text(a: int, b: int) -> str:
    return f"{a} + {b} ="


def prompt_ids(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """[N] operands -> [N, 5] ids of "<bos> a + b =" (what the tokenizer gives for prompt_text)."""
    n = len(a)
    col = lambda v: torch.full((n,), v, dtype=torch.long)  # noqa: E731
    return torch.stack([col(p + 2), a.long(), col(p), b.long(), col(p + 1)], dim=1)


def split_pairs(p: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 pairs (a, b), seeded-shuffled and split: (train [n, 2], test [p^2 - n, 2])."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, int(round(train_frac * p * p)))
    return pairs[order[:n_train]], pairs[order[n_train:]]


def build_model(cfg: ModAddConfig) -> GPT2LMHeadModel:
    """A fresh GPT-2-architecture model for (a + b) mod p, seeded."""
    torch.manual_seed(cfg.seed)
    p = cfg.p
    config = GPT2Config(vocab_size=p + len(SPECIALS), n_positions=8, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="relu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                        bos_token_id=p + 2, eos_token_id=p + 3, pad_token_id=p + 3)
    return GPT2LMHeadModel(config)


def answer_logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position ("="): [N, T] ids -> [N, V]; equal to the full forward's.

    Training cost is what decides whether this model trains in minutes on two cores, so a
    one-layer model is run only as far as the loss needs: the residual entering the block is a
    function of (token, position), so ``ln_1`` and the keys and values are computed once per
    distinct (token, position) and gathered; the query, the MLP, ``ln_f`` and the unembedding
    only at the last position (the only one the loss reads). Deeper models take the full forward.
    """
    if model.config.n_layer != 1:
        return model(input_ids=ids, use_cache=False).logits[:, -1]
    body, block = model.transformer, model.transformer.h[0]
    attn = block.attn
    N, T = ids.shape
    d, H = model.config.n_embd, model.config.n_head
    dh = d // H
    key = ids * T + torch.arange(T, device=ids.device)                         # (token, position) code
    codes, inverse = torch.unique(key, return_inverse=True)                    # [U], [N, T]
    resid_u = body.wte(codes // T) + body.wpe(codes % T)                       # [U, d]
    qkv_u = attn.c_attn(block.ln_1(resid_u))                                   # [U, 3d]
    # F.embedding gathers: its backward is a dense accumulation, far cheaper than index_put's.
    k = F.embedding(inverse, qkv_u[:, d:2 * d]).view(N, T, H, dh)
    v = F.embedding(inverse, qkv_u[:, 2 * d:]).view(N, T, H, dh)
    q = F.embedding(inverse[:, -1], qkv_u[:, :d]).view(N, H, dh)               # the last query only
    # Elementwise products, not einsum: batched GEMMs of 5 x 32 blocks are slow on a CPU.
    scores = (q[:, None] * k).sum(-1) * dh ** -0.5                             # [N, T, H]
    pattern = torch.softmax(scores, dim=1)                                     # causal: the last query sees all
    mixed = (pattern[..., None] * v).sum(1).reshape(N, d)
    resid = F.embedding(inverse[:, -1], resid_u) + attn.c_proj(mixed)                       # resid_mid at "=": [N, d]
    resid = resid + block.mlp(block.ln_2(resid))
    return model.lm_head(body.ln_f(resid))


@torch.no_grad()
def accuracy(model: GPT2LMHeadModel, pairs: torch.Tensor, p: int, chunk: int = 8192) -> float:
    """Share of pairs whose argmax at "=" is (a + b) mod p."""
    if len(pairs) == 0:
        return float("nan")
    correct = 0
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        pred = answer_logits(model, prompt_ids(part[:, 0], part[:, 1], p)).argmax(-1)
        correct += int((pred == (part[:, 0] + part[:, 1]) % p).sum())
    return correct / len(pairs)


# ------------------------------------------------------------------------------ training


def train_modadd(cfg: ModAddConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 report: Report = log.info, stop_after_step: int | None = None,
                 threads: int | None = 1) -> ModAddResult:
    """Train the model full-batch and save it as a Hugging Face directory in ``out_dir/model``.

    resume: continue from ``out_dir/checkpoint.pt`` (same config). stop_after_step: stop there,
    keeping the checkpoint (as if interrupted). The batch is the whole training split, so a
    resumed run equals an uninterrupted one. Training stops early once train and test
    accuracy both reach ``cfg.stop_at_accuracy`` (the model has grokked).
    threads: torch threads while training. One is the default: the model's matrices are so
    small that two threads on a shared 2-core machine ran 4x slower than one (measured here).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, Path(out_dir), resume, progress, report, stop_after_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: ModAddConfig, out: Path, resume: bool, progress: bool, report: Report,
           stop_after_step: int | None) -> ModAddResult:
    out.mkdir(parents=True, exist_ok=True)
    ckpt_file = out / CHECKPOINT_FILE
    if ckpt_file.exists() and not resume:
        raise UserError(f"{ckpt_file} exists: pass --resume to continue that run, or remove it")
    torch.manual_seed(cfg.seed)
    p = cfg.p
    train, test = split_pairs(p, cfg.train_frac, cfg.seed)
    ids = prompt_ids(train[:, 0], train[:, 1], p)
    target = (train[:, 0] + train[:, 1]) % p
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                            foreach=True)
    curve: list[tuple[int, float, float, float]] = []  # (step, loss, train acc, test acc)
    step, seconds = 0, 0.0
    if resume and ckpt_file.exists():
        ckpt = torch.load(ckpt_file, weights_only=False)
        if ckpt["config"] != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if ckpt["config"].get(k) != v)
            raise UserError(f"{ckpt_file} was made with different settings ({', '.join(diff)}); "
                            "use the same ones to resume, or remove the checkpoint")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, curve, seconds = ckpt["step"], [tuple(c) for c in ckpt["curve"]], ckpt["seconds"]
        report(f"resuming from step {step} of {cfg.steps}")

    def checkpoint() -> None:
        tmp = ckpt_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "curve": curve, "seconds": seconds, "config": cfg.to_dict()}, tmp)
        tmp.replace(ckpt_file)

    end = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    grokked = lambda: (cfg.stop_at_accuracy is not None and bool(curve)  # noqa: E731
                       and min(curve[-1][2], curve[-1][3]) >= cfg.stop_at_accuracy)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train modadd p={p}", unit="step", disable=not progress)
    model.train()
    t0 = time.perf_counter()
    while step < end and not grokked():
        loss = F.cross_entropy(answer_logits(model, ids).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            curve.append((step, float(loss.detach()), accuracy(model, train, p), accuracy(model, test, p)))
            model.train()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", train=f"{curve[-1][2]:.3f}", test=f"{curve[-1][3]:.3f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == end or grokked():
            seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint()
    bar.close()
    model.eval()
    seconds += time.perf_counter() - t0
    if step < cfg.steps and not grokked():
        checkpoint()
        report(f"stopped after step {step} of {cfg.steps}; --resume continues")
        return ModAddResult(out, accuracy(model, train, p), accuracy(model, test, p), {"complete": False})

    train_acc, test_acc = accuracy(model, train, p), accuracy(model, test, p)
    save_model(model, p, out / "model")
    write_corpus(p, out / CORPUS_FILE, cfg.seed)
    result = {"complete": True, "model_name": model_name(p), "config": cfg.to_dict(), "steps_run": step,
              "n_train": len(train), "n_test": len(test), "train_accuracy": train_acc,
              "test_accuracy": test_acc, "seconds": seconds, "steps_per_second": step / max(seconds, 1e-9),
              "threads": torch.get_num_threads(),
              "curve": [{"step": s, "loss": l, "train_accuracy": tr, "test_accuracy": te} for s, l, tr, te in curve]}
    (out / REPORT_FILE).write_text(json.dumps(result, indent=1))
    plot_curve(curve, out / PLOT_FILE, p)
    ckpt_file.unlink(missing_ok=True)
    report(f"modadd p={p}: train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f}, "
           f"{step} steps in {seconds:.0f} s ({step / max(seconds, 1e-9):.1f} steps/s) -> {out / 'model'}")
    return ModAddResult(out, train_acc, test_acc, result)


def save_model(model: GPT2LMHeadModel, p: int, directory: Path) -> None:
    """The model and its tokenizer as a Hugging Face directory (written atomically)."""
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp)
    make_tokenizer(p).save_pretrained(tmp)
    if directory.exists():
        import shutil
        shutil.rmtree(directory)
    tmp.rename(directory)


def write_corpus(p: int, path: Path, seed: int = 0) -> None:
    """Every prompt "a + b =" once, one JSON line each, seeded-shuffled: what a CLT for the model
    trains on (shuffled so that a harvest of the first N tokens covers every a and b)."""
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed)).tolist()
    with path.open("w") as f:
        for i in order:
            f.write(json.dumps({"text": prompt_text(i // p, i % p)}) + "\n")


def plot_curve(curve: list[tuple[int, float, float, float]], path: Path, p: int) -> None:
    """Train and test accuracy (and the training loss) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not curve:
        return
    steps = [c[0] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [c[2] for c in curve], label="train accuracy")
    ax.plot(steps, [c[3] for c in curve], label="test accuracy")
    ax.set_xlabel("full-batch step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    loss_ax = ax.twinx()
    loss_ax.semilogy(steps, [c[1] for c in curve], color="grey", alpha=0.5, label="train loss")
    loss_ax.set_ylabel("train loss")
    ax.set_title(f"(a + b) mod {p}")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
