"""The TopK cross-layer transcoder being trained, its sparse decoder and its AuxK loss.

Units are the trainer's normalised ones (see `training.py`). Per token and source layer l the
encoder keeps the k largest pre-activations (ReLU'd); feature f of layer l writes
W_dec[l][f, j] into `mlp_out` of layer l+j. The decoder is a sparse [B, F] x dense
[F, (L-l) d] product done as an `embedding_bag` (k/F of the dense cost). Its backward has two
kernels, chosen by `backward`:
- "dense": d/dW = A^T g as one matmul with A the dense [B, F] activations and d/dvals =
  (g W^T) at the active entries (or `sampled_addmm` in float32). At k/F = 1/32 on CPUs with
  bf16 matrix units (AMX) this is the fastest (measured, DESIGN.md section 11);
- "sparse": `embedding_bag`'s own scatter-add backward and a per-entry dot product, B*k*D
  work whatever F is: the right one on a GPU or for large F (k/F of a few per mille);
- "blocked": B*k*d work per (source, target) layer pair, one [F, d] block of W_dec at a time,
  so that the block and the rows it is gathered into stay in cache (a whole layer's
  [F, (L-l) d] rows are tens of MB and every one of the B*k gathers streams from memory). The
  forward is a gather-sum per block; d/dW is the same gather-sum over the *transposed*
  activations (each feature's bag of tokens, its activations as weights); d/dvals a
  `sampled_addmm` per block. The fastest on CPUs without bf16 matrix units (measured on an
  AVX2 EPYC: `bench/clt_train_speed.py`).
Mixed precision: with `compute_dtype=bfloat16` the matmuls and the decoder gather run in
bf16 on bf16 copies of the float32 master weights; the reconstruction, the loss, the gradients
handed to the optimiser and Adam's state stay float32.

AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): a feature is dead when it
has not fired for `dead_tokens` training tokens; the auxiliary loss reconstructs the main
loss's residual error e = y - recon (detached) from the top `aux_k` dead features of each
layer alone, ||e - e_aux||^2 / ||e||^2, so dead features get a gradient towards directions the
live ones miss. With no dead feature the term is exactly absent.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("auto", "float32", "bfloat16")
DECODER_BACKWARDS = ("auto", "dense", "sparse", "blocked")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on `device` (CUDA with bf16; CPUs with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 where it is fast, else float32."""
    if precision == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def resolve_backward(backward: str, device: torch.device, k: int, n_features: int) -> str:
    """"auto" -> on CPU "dense" with bf16 matrix units while k/F >= 1/64 (AMX matmuls beat
    gathers), else "blocked"; "sparse" on other devices."""
    if backward != "auto":
        return backward
    if device.type != "cpu":
        return "sparse"
    return "dense" if fast_bf16(device) and k * 64 >= n_features else "blocked"


class _CLTDecode(torch.autograd.Function):
    """out[b, t] = sum over source layers l <= t of sum_j vals_l[b, j] * W_l[idx_l[b, j], t - l].

    The "dense" backward (module docstring). Inputs, for the source layers in `layers`:
    idx_l [B, k_l] distinct features per row, vals_l [B, k_l], W_l [F, (L-l) d] (compute dtype).
    Output [B, L, d] float32.
    """

    @staticmethod
    def forward(ctx, meta: tuple, *tensors: torch.Tensor) -> torch.Tensor:
        layers, n_layers, d = meta
        n = len(layers)
        idx, vals, weights = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        B = idx[0].shape[0]
        out = vals[0].new_zeros(B, n_layers * d, dtype=_out_dtype(weights[0]))
        for l, i, v, w in zip(layers, idx, vals, weights):
            out[:, l * d:] += F.embedding_bag(i, w, per_sample_weights=v.to(w.dtype), mode="sum")
        ctx.meta = meta
        ctx.save_for_backward(*idx, *vals, *weights)
        return out.view(B, n_layers, d)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        layers, n_layers, d = ctx.meta
        n = len(layers)
        saved = ctx.saved_tensors
        idx, vals, weights = saved[:n], saved[n:2 * n], saved[2 * n:]
        B = g.shape[0]
        g = g.reshape(B, n_layers * d)
        grad_vals: list[torch.Tensor | None] = [None] * n
        grad_w: list[torch.Tensor | None] = [None] * n
        for m, (l, i, v, w) in enumerate(zip(layers, idx, vals, weights)):
            g_l = g[:, l * d:].to(w.dtype).contiguous()  # [B, (L-l) d]
            need_v, need_w = ctx.needs_input_grad[1 + n + m], ctx.needs_input_grad[1 + 2 * n + m]
            if need_w:
                dense = w.new_zeros(B, w.shape[0]).scatter_(1, i, v.to(w.dtype))
                grad_w[m] = dense.T @ g_l
            if need_v:
                grad_vals[m] = _active_dots(g_l, w, i, via_matmul=w.dtype in (torch.bfloat16, torch.float16)).to(v.dtype)
        return (None, *([None] * n), *grad_vals, *grad_w)


class _CLTDecodeBlocked(torch.autograd.Function):
    """The same sum as `_CLTDecode`, one (source l, target t) block W_l[:, t - l] [F, d] at a time
    (module docstring, "blocked"). Inputs as `_CLTDecode`; output [B, L, d] float32 (a
    transposed view of a contiguous [L, B, d], the layout `TopKCLT.decode` returns)."""

    @staticmethod
    def forward(ctx, meta: tuple, *tensors: torch.Tensor) -> torch.Tensor:
        layers, n_layers, d = meta
        n = len(layers)
        idx, vals, weights = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        B = idx[0].shape[0]
        out = vals[0].new_zeros(n_layers, B, d, dtype=_out_dtype(weights[0]))
        blocks = []
        for l, i, v, w in zip(layers, idx, vals, weights):
            wt = w.view(w.shape[0], n_layers - l, d).transpose(0, 1).contiguous()  # [L-l, F, d]
            v = v.to(w.dtype)
            for j in range(n_layers - l):
                out[l + j] += F.embedding_bag(i, wt[j], per_sample_weights=v, mode="sum")
            blocks.append(wt)
        ctx.meta = meta
        ctx.save_for_backward(*idx, *vals, *blocks)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        layers, n_layers, d = ctx.meta
        n = len(layers)
        saved = ctx.saved_tensors
        idx, vals, blocks = saved[:n], saved[n:2 * n], saved[2 * n:]
        B = g.shape[0]
        gt = g.transpose(0, 1).to(blocks[0].dtype).contiguous()  # [L, B, d]
        grad_vals: list[torch.Tensor | None] = [None] * n
        grad_w: list[torch.Tensor | None] = [None] * n
        for m, (l, i, v, wt) in enumerate(zip(layers, idx, vals, blocks)):
            n_f, k = wt.shape[1], i.shape[1]
            if ctx.needs_input_grad[1 + 2 * n + m]:
                # Each feature's bag of (token, activation): d/dW_l[f, j] = sum over its tokens.
                flat = i.reshape(-1)
                order = torch.argsort(flat, stable=True)
                tokens, weights = order // k, v.reshape(-1)[order].to(wt.dtype)
                counts = torch.bincount(flat, minlength=n_f)
                offsets = torch.cumsum(counts, 0) - counts
                gw = wt.new_empty(n_f, n_layers - l, d)
                for j in range(n_layers - l):
                    gw[:, j] = F.embedding_bag(tokens, gt[l + j], offsets, per_sample_weights=weights, mode="sum")
                grad_w[m] = gw.view(n_f, -1)
            if ctx.needs_input_grad[1 + n + m]:
                grad_vals[m] = _active_dots_blocked(gt[l:], wt, i).to(v.dtype)
        return (None, *([None] * n), *grad_vals, *grad_w)


def _active_dots_blocked(g: torch.Tensor, wt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j (g[j] @ wt[j]^T)[b, idx[b, i]]: g [J, B, d], wt [J, F, d], idx [B, k] -> [B, k]
    (`sampled_addmm` per block; bf16 and float16 blocks by a matmul and a gather)."""
    if wt.dtype in (torch.bfloat16, torch.float16):
        return sum((g[j] @ wt[j].T).gather(1, idx) for j in range(len(wt))).float()
    mask, order = _active_mask(idx, wt.shape[1], g)
    picked = g.new_zeros(idx.numel())
    for j in range(len(wt)):
        picked += torch.sparse.sampled_addmm(mask, g[j], wt[j].T).values()
    return torch.empty_like(idx, dtype=g.dtype).scatter_(1, order, picked.view(idx.shape))


def _out_dtype(w: torch.Tensor) -> torch.dtype:
    """Sums of writes are float32 at least (float64 stays float64, for gradcheck)."""
    return torch.promote_types(torch.float32, w.dtype)


def _active_dots(g: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, via_matmul: bool) -> torch.Tensor:
    """(g @ w^T)[b, idx[b, j]]: g [B, D], w [F, D], idx [B, k] -> [B, k].

    via_matmul: the full product then a gather (bf16 matrix units make that the fastest);
    else `sampled_addmm` over the active entries only (B*k*D work).
    """
    if via_matmul:
        return (g @ w.T).gather(1, idx)
    mask, order = _active_mask(idx, w.shape[0], g)
    picked = torch.sparse.sampled_addmm(mask, g, w.T).values().reshape(idx.shape)
    return torch.empty_like(picked).scatter_(1, order, picked)


def _active_mask(idx: torch.Tensor, n_cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [B, n_cols] CSR pattern of idx [B, k] (zeros of like's dtype, columns sorted per row)
    and the sort order [B, k] that maps `sampled_addmm` values back to idx's order."""
    B, k = idx.shape
    sorted_idx, order = idx.sort(dim=1)
    crow = torch.arange(0, B * k + 1, k, dtype=torch.long, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        mask = torch.sparse_csr_tensor(crow, sorted_idx.reshape(-1), like.new_zeros(B * k), (B, n_cols))
    return mask, order


def clt_decode(codes: dict[int, tuple[torch.Tensor, torch.Tensor]], weights: list[torch.Tensor],
               d_model: int, backward: str = "dense") -> torch.Tensor:
    """Sum of the writes of `codes` {source layer: (idx [B, k], vals [B, k])} -> [B, L, d].

    weights[l]: W_dec[l] reshaped to [F, (L-l) d], in the compute dtype.
    """
    layers = tuple(sorted(codes))
    if backward == "sparse":  # embedding_bag's own backward: scatter-adds, B*k*D work
        B, L, d = codes[layers[0]][0].shape[0], len(weights), d_model
        out = 0
        for l in layers:
            idx, vals = codes[l]
            w = F.embedding_bag(idx, weights[l], per_sample_weights=vals.to(weights[l].dtype), mode="sum")
            out = out + F.pad(w.to(_out_dtype(w)).view(B, L - l, d), (0, 0, l, 0))
        return out
    idx = [codes[l][0] for l in layers]
    vals = [codes[l][1] for l in layers]
    if backward == "blocked":
        return _CLTDecodeBlocked.apply((layers, len(weights), d_model), *idx, *vals, *[weights[l] for l in layers])
    return _CLTDecode.apply((layers, len(weights), d_model), *idx, *vals, *[weights[l] for l in layers])


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, weight: torch.Tensor,
                  backward: str = "dense") -> torch.Tensor:
    """Sum of `vals`-weighted rows `idx` of `weight`: [B, k], [B, k], [F, D] -> [B, D]."""
    return clt_decode({0: (idx, vals)}, [weight], weight.shape[1], backward).reshape(idx.shape[0], -1)


class TopKCLT(nn.Module):
    """The CLT being trained, in normalised units.

    W_enc[l] [F, d], b_enc[l] [F]; W_dec[l] [F, L-l, d] (row j writes into layer l+j);
    b_dec [L, d]. Activation: TopK (k per token and layer) of the pre-activations, relu'd.
    compute_dtype / backward: see the module docstring (float32 and "dense" by default).
    """

    def __init__(self, n_layers: int, d_model: int, n_features: int, k: int, seed: int):
        super().__init__()
        L, Fn, d = n_layers, n_features, d_model
        self.k = k
        self.compute_dtype = torch.float32
        self.backward_kind = "dense"
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

    @property
    def d_model(self) -> int:
        return self.W_enc[0].shape[1]

    def pre_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [L, B, d] -> per layer the pre-activations [B, F] (float32)."""
        xc = x.to(self.compute_dtype)
        return [(xc[l] @ self.W_enc[l].to(self.compute_dtype).T).float() + self.b_enc[l]
                for l in range(self.n_layers)]

    def topk(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pre [B, F] -> (indices [B, k], activations [B, k] >= 0)."""
        vals, idx = pre.topk(k or self.k, dim=-1, sorted=False)
        return idx, torch.relu(vals)

    def encode_layer(self, l: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (indices [B, k], activations [B, k] >= 0), in float32."""
        return self.topk(x @ self.W_enc[l].T + self.b_enc[l])

    def decoder_weights(self) -> list[torch.Tensor]:
        """W_dec[l] as [F, (L-l) d] in the compute dtype (bf16 copies keep their gradient path)."""
        return [w.reshape(w.shape[0], -1).to(self.compute_dtype) for w in self.W_dec]

    def decode(self, codes: dict[int, tuple[torch.Tensor, torch.Tensor]], *, bias: bool = True,
               weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """codes {layer: (idx, vals) [B, k]} -> reconstruction [L, B, d] (float32)."""
        weights = weights if weights is not None else self.decoder_weights()
        out = clt_decode(codes, weights, self.d_model, self.backward_kind)  # [B, L, d]
        if bias:
            out = out + self.b_dec
        return out.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """x [L, B, d] -> (reconstruction [L, B, d], per layer (indices, activations))."""
        codes = [self.topk(p) for p in self.pre_activations(x)]
        return self.decode(dict(enumerate(codes))), codes


class DeadFeatures:
    """Tokens since each feature last fired [L, F]; dead = not fired for `dead_tokens` tokens."""

    def __init__(self, n_layers: int, n_features: int, dead_tokens: int, device: torch.device):
        self.since = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)
        self.dead_tokens = dead_tokens

    def update(self, codes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """codes: per layer (idx, vals) [B, k] of one training batch."""
        B = codes[0][0].shape[0]
        fired = torch.zeros_like(self.since, dtype=torch.bool)
        for l, (idx, vals) in enumerate(codes):
            fired[l].scatter_(0, idx[vals > 0], True)
        self.since = torch.where(fired, 0, self.since + B)

    @property
    def mask(self) -> torch.Tensor:
        """[L, F] bool: the dead features."""
        return self.since >= self.dead_tokens

    def count(self) -> int:
        return int(self.mask.sum())


def auxk_loss(model: TopKCLT, pre: list[torch.Tensor], error: torch.Tensor, dead: torch.Tensor,
              aux_k: int, n_tokens: int, weights: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """AuxK: ||e - e_aux||^2 / ||e||^2 on the first `n_tokens` tokens, or None if nothing is dead.

    pre: per layer [B, F] pre-activations; error: y - recon [L, B, d] (detached); dead [L, F]
    bool. e_aux = sum of the writes (no bias) of the top min(aux_k, #dead_l) dead features of
    each layer l, chosen among the dead only.
    """
    codes = {}
    for l in range(model.n_layers):
        n_dead = int(dead[l].sum())
        if n_dead == 0:
            continue
        masked = pre[l][:n_tokens].masked_fill(~dead[l], float("-inf"))
        codes[l] = model.topk(masked, min(aux_k, n_dead))
    if not codes:
        return None
    e = error[:, :n_tokens]
    e_aux = model.decode(codes, bias=False, weights=weights)
    return (e_aux - e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-12)
