"""Harvest, for a chosen set of features only: examples, histograms, density and logit lens.

One pass over a text corpus computes the activations of every requested feature at once: the
model runs once per batch of token windows with `resid_mid` captured; for each source layer that
holds a requested feature, only that layer is encoded and only the requested encoder rows are
used (ReLU/JumpReLU: x @ W_enc[l, idx].T; TopK needs every pre-activation of the layer to know
the top k, so the layer is encoded whole and the columns gathered). Only the nonzero
activations are kept (sorted by feature, window, position), plus each window's maximum per
feature, so memory grows with the active entries, not tokens x features. No Python loop runs
over tokens; loops run over batches, layers and (for the final bookkeeping) features/examples.

Per feature it returns (`FeatureHarvest`):
- statistics = {"histogram": {"edges": [...], "counts": [...]} of the *nonzero* activations,
  "density": fraction of tokens where the feature is active, "max_activation", "logit_lens":
  {"top": [[token, value], ...], "bottom": [...]}, "n_tokens": tokens seen, "corpus": name};
- examples = [{"tokens", "activations", "max_activation", "quantile", "split", "source"}]: windows
  around the maximum of a corpus window. quantile 0 = the top-activating windows; quantile q =
  1..Q = windows sampled from the q-th of Q equal-count bins of the remaining active windows,
  from high to low activation.

The explain / held-out split (FADE without leakage). Every corpus document belongs to one split
by its index in the corpus (`split_of`: even -> "explain", odd -> "holdout"), so no window, and
no document, is on both sides. Examples are sampled *within* each split (each split gets its own
top examples and quantile samples); an explainer is shown only the "explain" examples, and every
rater scores texts from "holdout" documents only (`backend.interp.pipeline`). The rule and the
count of windows per split are stored in the statistics ("split"), the split in every example.

Logit lens of a CLT feature: the *sum over its target layers* of its decoder rows (everything
the feature adds to the residual stream) times the unembedding W_U (no final-norm gain). For a
per-layer transcoder that is its single decoder row.

The BOS position (an attention sink with outsized activations) is excluded everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from backend.errors import UserError
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder

Progress = Callable[[float, str], None]
FeatureKey = tuple[int, int]  # (source layer, feature index)

EXPLAIN, HOLDOUT = "explain", "holdout"
SPLITS: tuple[str, ...] = (EXPLAIN, HOLDOUT)
SPLIT_RULE = "corpus document index: even -> explain, odd -> holdout"


def split_of(doc: int) -> str:
    """The split of corpus document `doc` (its index in the corpus): see the module docstring."""
    return EXPLAIN if doc % 2 == 0 else HOLDOUT


def split_documents(docs: Sequence[str], split: str) -> list[tuple[int, str]]:
    """(corpus index, text) of the documents of one split, in corpus order."""
    return [(i, d) for i, d in enumerate(docs) if split_of(i) == split]


@dataclass(frozen=True)
class HarvestConfig:
    """How much corpus to read and what to keep per feature."""

    n_tokens: int = 20_000       # corpus tokens budget (BOS excluded)
    seq_len: int = 64            # tokens per corpus window (BOS included)
    batch_size: int = 16         # windows per forward pass
    n_top: int = 8               # top-activating examples (quantile 0), per split
    n_quantiles: int = 4         # quantile bins below the top examples
    per_quantile: int = 3        # examples sampled per bin, per split
    before: int = 16             # example context before the max token
    after: int = 4               # and after it
    n_bins: int = 20             # histogram bins
    n_logits: int = 10           # logit-lens tokens on each side
    seed: int = 0


@dataclass
class TokenWindows:
    """Corpus windows: ids [N, T] right-padded, mask [N, T], has_bos, doc [N] (source document)."""

    ids: Tensor
    mask: Tensor
    has_bos: bool
    doc: list[int]

    @property
    def valid(self) -> Tensor:
        """[N, T] bool: real, non-BOS positions."""
        valid = self.mask.bool().clone()
        if self.has_bos:
            valid[:, 0] = False
        return valid


@dataclass
class FeatureHarvest:
    """What the harvest found for one feature (see the module docstring for the keys)."""

    layer: int
    feature: int
    statistics: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (leading spaces kept where the tokenizer has them)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def corpus_windows(tokenizer, docs: Sequence[str], n_tokens: int, seq_len: int) -> TokenWindows:
    """Windows of at most `seq_len` tokens (a BOS first when the tokenizer has one) cut from
    `docs` in order until `n_tokens` non-BOS tokens are collected."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    rows: list[list[int]] = []
    doc_of: list[int] = []
    total = 0
    for d, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start:start + body]
            if len(piece) < 2:
                continue
            rows.append(([bos] if bos is not None else []) + piece)
            doc_of.append(d)
            total += len(piece)
            if total >= n_tokens:
                break
        if total >= n_tokens:
            break
    if not rows:
        raise UserError("the corpus holds no text to harvest")
    return pad_windows(rows, bos is not None, doc_of, tokenizer.pad_token_id or 0)


def pad_windows(rows: Sequence[Sequence[int]], has_bos: bool, doc: list[int] | None = None,
                pad_id: int = 0) -> TokenWindows:
    """Right-pad token lists into TokenWindows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return TokenWindows(ids, mask, has_bos, doc if doc is not None else list(range(len(rows))))


def encode_features(transcoder: Transcoder, resid_mid: Tensor, features: Sequence[FeatureKey]) -> Tensor:
    """Activations of `features` only: resid_mid [L, B, T, d] -> [B, T, n] (column j = features[j]).

    Only the layers that hold a requested feature are encoded; for ReLU/JumpReLU only the
    requested encoder rows are multiplied.
    """
    L, B, T, _ = resid_mid.shape
    out = resid_mid.new_zeros(B, T, len(features))
    layers = torch.tensor([f[0] for f in features], dtype=torch.long)
    index = torch.tensor([f[1] for f in features], dtype=torch.long)
    for layer in torch.unique(layers).tolist():
        cols = (layers == layer).nonzero().squeeze(1)
        idx = index[cols].to(transcoder.device)
        x = resid_mid[layer].to(transcoder.dtype)
        if transcoder.config.activation == "topk":
            acts = transcoder.encode_layer(layer, x)[..., idx]
        else:
            pre = x @ transcoder.W_enc[layer, idx].T + transcoder.b_enc[layer, idx]
            if transcoder.config.activation == "relu":
                acts = torch.relu(pre)
            else:
                acts = pre * (pre > transcoder.threshold[layer, idx]).to(pre.dtype)
        out[..., cols.to(out.device)] = acts.to(out.dtype)
    return out


def batched_activations(adapter: ModelAdapter, transcoder: Transcoder, windows: TokenWindows,
                        features: Sequence[FeatureKey], batch_size: int = 16,
                        progress: Progress | None = None) -> Iterator[tuple[int, Tensor]]:
    """(first window index, activations [b, T, n]) per batch of windows; 0 at padding and BOS."""
    N = windows.ids.shape[0]
    valid = windows.valid
    with torch.no_grad():
        for start in range(0, N, batch_size):
            stop = min(start + batch_size, N)
            run = adapter.run(windows.ids[start:stop].to(adapter.device),
                              windows.mask[start:stop].to(adapter.device), capture=True)
            acts = encode_features(transcoder, run.resid_mid, features).float().cpu()
            yield start, acts * valid[start:stop, :, None]
            if progress:
                progress(stop / N, f"feature activations: {stop}/{N} windows")


def window_activations(adapter: ModelAdapter, transcoder: Transcoder, windows: TokenWindows,
                       features: Sequence[FeatureKey], batch_size: int = 16,
                       progress: Progress | None = None) -> Tensor:
    """Activations of `features` on every window, dense: [N, T, n] (0 at padding and BOS).

    For a few windows (texts to score); the harvest keeps only the nonzero entries instead.
    """
    N, T = windows.ids.shape
    out = torch.zeros(N, T, len(features))
    for start, acts in batched_activations(adapter, transcoder, windows, features, batch_size, progress):
        out[start:start + acts.shape[0]] = acts
    return out


@dataclass
class SparseActivations:
    """The nonzero activations of n features over N windows of T tokens, sorted by key.

    key = (feature * N + window) * T + position (int64 [m]); value [m]. Also the dense
    per-window maxima seq_max [N, n] and their positions seq_arg [N, n].
    """

    key: Tensor
    value: Tensor
    seq_max: Tensor
    seq_arg: Tensor
    n_windows: int
    seq_len: int

    @property
    def feature(self) -> Tensor:
        """[m] the feature column of each entry."""
        return self.key // (self.n_windows * self.seq_len)

    def row(self, feature: int, window: int, lo: int, hi: int) -> Tensor:
        """Dense activations [hi - lo] of `feature` on positions lo..hi-1 of `window`."""
        base = (feature * self.n_windows + window) * self.seq_len
        a, b = torch.searchsorted(self.key, torch.tensor([base + lo, base + hi])).tolist()
        out = torch.zeros(hi - lo)
        out[self.key[a:b] - base - lo] = self.value[a:b]
        return out


def sparse_activations(adapter: ModelAdapter, transcoder: Transcoder, windows: TokenWindows,
                       features: Sequence[FeatureKey], batch_size: int = 16,
                       progress: Progress | None = None) -> SparseActivations:
    """One pass over `windows` keeping only nonzero activations (memory ~ active entries)."""
    N, T = windows.ids.shape
    n = len(features)
    seq_max, seq_arg = torch.zeros(N, n), torch.zeros(N, n, dtype=torch.long)
    keys, values = [], []
    for start, acts in batched_activations(adapter, transcoder, windows, features, batch_size, progress):
        stop = start + acts.shape[0]
        seq_max[start:stop], seq_arg[start:stop] = acts.max(dim=1)
        w, t, j = acts.nonzero(as_tuple=True)
        keys.append((j * N + (w + start)) * T + t)
        values.append(acts[w, t, j])
    key, value = torch.cat(keys), torch.cat(values)
    order = torch.argsort(key)
    return SparseActivations(key[order], value[order], seq_max, seq_arg, N, T)


def summed_decoder_rows(transcoder: Transcoder, features: Sequence[FeatureKey]) -> Tensor:
    """[n, d]: per feature, the sum of its decoder rows over its target layers."""
    rows = torch.zeros(len(features), transcoder.d_model, dtype=transcoder.dtype, device=transcoder.device)
    layers = torch.tensor([f[0] for f in features], dtype=torch.long)
    index = torch.tensor([f[1] for f in features], dtype=torch.long)
    with torch.no_grad():
        for layer in torch.unique(layers).tolist():
            cols = (layers == layer).nonzero().squeeze(1)
            rows[cols.to(rows.device)] = transcoder.decoder_rows(layer, index[cols]).sum(1)
    return rows


@torch.no_grad()
def logit_lens(adapter: ModelAdapter, transcoder: Transcoder, features: Sequence[FeatureKey],
               n: int = 10, chunk: int = 32) -> list[dict[str, list[list[Any]]]]:
    """Per feature {"top": [[token, value], ...], "bottom": [...]}: W_U @ (summed decoder rows).

    Features go `chunk` at a time, so only [chunk, V] logits are ever held.
    """
    rows = summed_decoder_rows(transcoder, features)
    W_U = adapter.unembedding
    tok = adapter.tokenizer
    out = []
    for start in range(0, len(features), chunk):
        logits = (rows[start:start + chunk].to(W_U.device, W_U.dtype) @ W_U.T).float().cpu()   # [c, V]
        k = min(n, logits.shape[1])
        top_v, top_i = logits.topk(k, dim=1)
        bot_v, bot_i = logits.topk(k, dim=1, largest=False)
        out += [{"top": [[s, round(float(v), 4)] for s, v in zip(token_strings(tok, ti.tolist()), tv)],
                 "bottom": [[s, round(float(v), 4)] for s, v in zip(token_strings(tok, bi.tolist()), bv)]}
                for tv, ti, bv, bi in zip(top_v, top_i, bot_v, bot_i)]
    return out


def histograms(feature: Tensor, value: Tensor, n: int, n_bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Histograms of the nonzero activations of n features at once.

    feature [m] (column of each entry), value [m] (its nonzero activation). Returns (edges
    [n, n_bins+1] from min(0, lowest) to the max, counts [n, n_bins], n_active [n], max [n]);
    a feature that never fires gets edges 0..1 and zero counts.
    """
    n_active = torch.bincount(feature, minlength=n)
    hi = torch.zeros(n).scatter_reduce(0, feature, value, "amax", include_self=True)
    lo = torch.zeros(n).scatter_reduce(0, feature, value, "amin", include_self=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    edges = lo[:, None] + span[:, None] * torch.linspace(0, 1, n_bins + 1)[None, :]
    bins = ((value - lo[feature]) / span[feature] * n_bins).floor().clamp(0, n_bins - 1).long()
    counts = torch.bincount(feature * n_bins + bins, minlength=n * n_bins).view(n, n_bins)
    return edges, counts, n_active, hi


def sample_examples(seq_max: Tensor, config: HarvestConfig) -> list[tuple[int, int]]:
    """(window index, quantile) pairs for one feature, from its per-window maxima [N].

    The n_top highest windows get quantile 0; the remaining active windows are split into
    n_quantiles equal-count bins (high to low) and per_quantile windows are drawn from each.
    """
    active = (seq_max > 0).nonzero().squeeze(1)
    if active.numel() == 0:
        return []
    order = active[torch.argsort(seq_max[active], descending=True, stable=True)].tolist()
    picked = [(i, 0) for i in order[:config.n_top]]
    rest = order[config.n_top:]
    rng = random.Random(config.seed)
    n_q = min(config.n_quantiles, len(rest))
    for q in range(n_q):
        chunk = rest[q * len(rest) // n_q:(q + 1) * len(rest) // n_q]
        picked += [(chunk[i], q + 1) for i in sorted(rng.sample(range(len(chunk)), min(config.per_quantile,
                                                                                     len(chunk))))]
    return picked


def harvest(adapter: ModelAdapter, transcoder: Transcoder, docs: Sequence[str],
            features: Sequence[FeatureKey], config: HarvestConfig = HarvestConfig(),
            corpus_name: str = "default", progress: Progress | None = None) -> list[FeatureHarvest]:
    """Examples and statistics of `features` (in that order) from one pass over `docs`."""
    if not features:
        return []
    features = [(int(l), int(f)) for l, f in features]
    say = progress or (lambda f, m: None)
    say(0.0, "tokenising the corpus")
    windows = corpus_windows(adapter.tokenizer, docs, config.n_tokens, config.seq_len)
    sparse = sparse_activations(adapter, transcoder, windows, features, config.batch_size,
                                progress=lambda f, m: say(0.9 * f, m))
    n_tokens = int(windows.valid.sum())
    edges, counts, n_active, max_act = histograms(sparse.feature, sparse.value, len(features), config.n_bins)
    lens = logit_lens(adapter, transcoder, features, config.n_logits)
    lengths = windows.mask.sum(1)
    window_split = [split_of(d) for d in windows.doc]
    in_split = {name: torch.tensor([w == name for w in window_split]) for name in SPLITS}
    split_info = {"rule": SPLIT_RULE, **{f"{name}_windows": int(m.sum()) for name, m in in_split.items()}}
    results = []
    for j, (layer, feature) in enumerate(features):
        stats = {"histogram": {"edges": [round(float(e), 6) for e in edges[j]], "counts": counts[j].tolist()},
                 "density": float(n_active[j]) / max(n_tokens, 1), "max_activation": float(max_act[j]),
                 "logit_lens": lens[j], "n_tokens": n_tokens, "corpus": corpus_name, "split": split_info}
        examples = []
        for name in SPLITS:
            # Windows of the other split count as inactive, so each split is sampled on its own.
            for w, q in sample_examples(sparse.seq_max[:, j] * in_split[name], config):
                p = int(sparse.seq_arg[w, j])
                lo = max(int(windows.has_bos), p - config.before)
                hi = min(int(lengths[w]), p + config.after + 1)
                ids = windows.ids[w, lo:hi].tolist()
                vals = [round(float(v), 5) for v in sparse.row(j, w, lo, hi)]
                examples.append({"tokens": token_strings(adapter.tokenizer, ids), "activations": vals,
                                 "max_activation": float(sparse.seq_max[w, j]), "quantile": q, "split": name,
                                 "source": f"corpus={corpus_name};doc={windows.doc[w]};window={w};pos={p}"})
        results.append(FeatureHarvest(layer, feature, stats, examples))
    say(1.0, f"harvested {len(features)} features over {n_tokens} tokens")
    return results


