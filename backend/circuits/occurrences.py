"""Feature occurrences of a batch of prompts, and the Delta-writes of any subset of them.

An occurrence is (prompt, source layer l, position p, feature f) whose activation differs
between the clean and the corrupted prompt. Its Delta-write into target layer t >= l is
d_{f,p,t} = (a_f(p; x) - a_f(p; x~)) * W_dec[l][f, t-l] (DESIGN section 5). Positions where
clean and corrupted activations agree contribute nothing and are not occurrences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backend.models.adapters import SparsePatch
from backend.models.transcoder import Transcoder

@dataclass
class Occurrences:
    """Every occurrence of a batch, as flat tensors of length n sorted by (prompt, layer, pos, feature).

    prompt: row in the batch; layer: source layer; pos: token position; feature: index in its layer;
    act: a_f(p; x) (clean); delta: a_f(p; x) - a_f(p; x~).
    """

    prompt: Tensor
    layer: Tensor
    pos: Tensor
    feature: Tensor
    act: Tensor
    delta: Tensor
    n_prompts: int
    seq_len: int

    def __len__(self) -> int:
        return int(self.prompt.numel())

    @property
    def row(self) -> Tensor:
        """[n] flat (prompt * seq_len + pos) row of each occurrence in a [B*T, d] activation."""
        return self.prompt * self.seq_len + self.pos

    def counts(self) -> Tensor:
        """[B] occurrences per prompt."""
        return torch.bincount(self.prompt, minlength=self.n_prompts)


def collect_occurrences(acts_clean: Tensor, acts_corrupted: Tensor, valid: Tensor) -> Occurrences:
    """Occurrences from dense activations.

    acts_clean, acts_corrupted: [L, B, T, F]; valid: [B, T] bool (real, non-BOS positions).
    """
    L, B, T, F = acts_clean.shape
    delta = (acts_clean - acts_corrupted) * valid[None, :, :, None]
    # Permute to [B, L, T, F] so nonzero() comes out sorted by prompt first.
    b, l, p, f = torch.nonzero(delta.permute(1, 0, 2, 3), as_tuple=True)
    return Occurrences(prompt=b, layer=l, pos=p, feature=f, act=acts_clean[l, b, p, f],
                       delta=delta[l, b, p, f], n_prompts=B, seq_len=T)


def decoder_projection(tc: Transcoder, occ: Occurrences, grads: Tensor) -> Tensor:
    """sum over t >= l of W_dec[l][f, t-l] . grads[t, b, p] for every occurrence: [n].

    grads: [L, B, T, d]. Per source layer one GEMM between the distinct (prompt, position) rows
    and the distinct active features, [R, n_t*d] x [n_t*d, U] (each decoder row is read once,
    not once per occurrence), then the occurrences' entries are picked out of [R, U].
    """
    L, B, T, d = grads.shape
    flat = grads.reshape(L, B * T, d)
    out = torch.zeros(len(occ), dtype=grads.dtype, device=grads.device)
    rows = occ.row
    for layer in torch.unique(occ.layer).tolist():
        idx = torch.nonzero(occ.layer == layer, as_tuple=True)[0]
        feats, f_inv = torch.unique(occ.feature[idx], return_inverse=True)
        r_ids, r_inv = torch.unique(rows[idx], return_inverse=True)
        dec = tc.decoder_rows(layer, feats).to(grads.dtype)                     # [U, n_t, d]
        n_t = dec.shape[1]
        g = flat[layer:layer + n_t, r_ids].transpose(0, 1).reshape(len(r_ids), n_t * d)
        out[idx] = (g @ dec.reshape(len(feats), n_t * d).T)[r_inv, f_inv]       # [R, U] -> [n_l]
    return out


def decoder_norms(tc: Transcoder, layer: int, features: Tensor) -> Tensor:
    """Frobenius norm of each feature's decoder rows over all its target layers: [n]."""
    feats, inverse = torch.unique(features, return_inverse=True)
    return tc.decoder_rows(layer, feats).flatten(1).norm(dim=-1)[inverse]


def delta_write_patch(tc: Transcoder, occ: Occurrences, select: Tensor, scale: float = -1.0) -> Tensor:
    """scale * (sum of Delta-writes of the selected occurrences) as a dense patch [L, B, T, d].

    select: [n] bool. With scale=-1 this is the evaluation patch that removes those occurrences.
    Per source layer, a sparse [B*T, U] x dense [U, (L-l)*d] product over the U distinct
    features, so the cost is proportional to the number of selected occurrences.
    """
    L, B, T, d = tc.n_layers, occ.n_prompts, occ.seq_len, tc.d_model
    patch = torch.zeros(L, B * T, d, dtype=tc.dtype, device=occ.delta.device)
    if not bool(select.any()):
        return patch.view(L, B, T, d)
    rows = occ.row
    for layer in torch.unique(occ.layer[select]).tolist():
        idx = torch.nonzero(select & (occ.layer == layer), as_tuple=True)[0]
        feats, inverse = torch.unique(occ.feature[idx], return_inverse=True)
        dec = tc.decoder_rows(layer, feats).to(patch.dtype)                      # [U, n_t, d]
        n_t = dec.shape[1]
        coef = torch.sparse_coo_tensor(torch.stack([rows[idx], inverse]), occ.delta[idx] * scale,
                                       (B * T, len(feats)), check_invariants=False)
        writes = torch.sparse.mm(coef, dec.reshape(len(feats), n_t * d)).view(B * T, n_t, d)
        patch[layer:layer + n_t] += writes.transpose(0, 1)
    return patch.view(L, B, T, d)


def variant_patch(tc: Transcoder, occ: Occurrences, variant: Tensor, members: Tensor,
                  seq_len: int, scale: float = -1.0, start: int = 0) -> SparsePatch:
    """A SparsePatch removing sets of occurrences, one set per batch row (variant).

    variant: [m] the row (variant) each membership belongs to; members: [m] occurrence ids.
    Row v of the patched batch must hold the prompt of its members; each member's Delta-write
    goes to (v, pos) at every target layer. start: the patched forward covers positions
    [start, seq_len) only (the rest comes from a clean cache), so every member's pos >= start.
    """
    patch = SparsePatch()
    rows = variant * (seq_len - start) + occ.pos[members] - start
    layers = occ.layer[members]
    for layer in torch.unique(layers).tolist():
        sel = layers == layer
        m = members[sel]
        dec = tc.decoder_rows(layer, occ.feature[m]) * (scale * occ.delta[m])[:, None, None]  # [c, n_t, d]
        for j, target in enumerate(tc.targets(layer)):
            patch.add(target, rows[sel], dec[:, j])
    return patch
