"""Steering a feature for FADE faithfulness: greedy continuations with the feature's write added.

Steering feature f (source layer l) with factor c adds c * max_act(f) * W_dec[l][f, t-l] to
`mlp_out` of every target layer t (a CLT feature writes into all of them) at every position
from the prompt's last token on, so every generated token is produced under the steer.
All (feature, factor, prompt) rows of a call run together, `max_rows` rows per forward, with a
key/value cache: the prompt runs once, then each step runs only the new token (the same tokens
as rerunning the whole sequence at every step, which the tests check).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder

FACTORS: tuple[float, ...] = (-50.0, -10.0, 0.0, 10.0, 50.0)


@torch.no_grad()
def steered_continuations(adapter: ModelAdapter, transcoder: Transcoder, features: Sequence[tuple[int, int]],
                          max_acts: Sequence[float], prompts: Tensor, factors: Sequence[float] = FACTORS,
                          n_new: int = 8, max_rows: int = 64) -> Tensor:
    """Greedy continuations under steering.

    features: n (layer, index); max_acts: [n]; prompts: [P, T0] token ids of equal length (no
    padding). Returns new token ids [n, len(factors), P, n_new].
    """
    n, F, (P, T0) = len(features), len(factors), prompts.shape
    L, d = adapter.n_layers, adapter.d_model
    # writes[j, t]: what feature j adds to mlp_out_t per unit of activation: [n, L, d]
    writes = torch.zeros(n, L, d, dtype=transcoder.dtype, device=transcoder.device)
    for j, (layer, index) in enumerate(features):
        rows = transcoder.decoder_rows(layer, torch.tensor([index]))[0]                 # [n_t, d]
        writes[j, layer:layer + rows.shape[0]] = rows
    scale = torch.tensor(list(factors), dtype=writes.dtype)[None, :] * torch.tensor(list(max_acts),
                                                                                  dtype=writes.dtype)[:, None]
    # Row r = (feature j, factor i, prompt p) in that order.
    row_writes = (scale[:, :, None, None] * writes[:, None]).repeat_interleave(P, dim=1).reshape(n * F * P, L, d)
    ids = prompts.repeat(n * F, 1).to(adapter.device)                                     # [R, T0]
    out = torch.empty(n * F * P, n_new, dtype=torch.long)
    for start in range(0, ids.shape[0], max_rows):
        seq = ids[start:start + max_rows]
        w = row_writes[start:start + max_rows].to(adapter.device, adapter.dtype)        # [r, L, d]
        cache = DynamicCache(config=adapter.model.config)
        step_ids = seq
        for step in range(n_new):
            T, done = seq.shape[1], seq.shape[1] - step_ids.shape[1]
            on = (torch.arange(done, T, device=seq.device) >= T0 - 1).to(w.dtype)      # [T - done]
            patch = w.permute(1, 0, 2)[:, :, None, :] * on[None, None, :, None]       # [L, r, T - done, d]
            logits = adapter.run(step_ids, patch=patch, cache=cache).logits             # [r, V]
            step_ids = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, step_ids], dim=1)
        out[start:start + max_rows] = seq[:, T0:].cpu()
    return out.view(n, F, P, n_new)
