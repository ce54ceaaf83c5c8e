"""Ground truth for linearised quantities: a model whose nonlinear parts are frozen constants.

`FrozenModel` records a clean pass with hand-written formulas (norm scales, attention patterns,
optionally every MLP output) and then runs patched passes in which those are constants. In that
model the metric's dependence on additive mlp_out patches is exactly what the linearised
replacement gradient describes.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.adapters import AttentionControl, ModelAdapter


def _norms(adapter: ModelAdapter) -> list[nn.Module]:
    return [m for m in adapter.model.modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def _hand_scale(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
        return 1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
    eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
    return 1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _frozen_norm(m: nn.Module, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.LayerNorm):
        return (x - x.mean(-1, keepdim=True)) * s * m.weight + m.bias
    if type(m).__name__.startswith("Gemma"):
        return x * s * (1.0 + m.weight)
    return m.weight * (x * s)


class FrozenModel:
    """Record once on (ids, mask); then `run(patch)` with constant patterns, scales and MLPs."""

    def __init__(self, adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor,
                 freeze_mlps: bool = True) -> None:
        self.adapter, self.ids, self.mask = adapter, ids, mask
        self.scales: dict[nn.Module, torch.Tensor] = {}
        handles = [m.register_forward_hook(self._record) for m in _norms(adapter)]
        try:
            with torch.no_grad(), adapter.recording_patterns() as patterns:
                out = adapter.run(ids, mask, capture=True)
        finally:
            for h in handles:
                h.remove()
        self.patterns = {k: v.clone() for k, v in patterns.items()}
        self.mlp_out = out.mlp_out if freeze_mlps else None

    def _record(self, m, args, output):
        self.scales[m] = _hand_scale(m, args[0]).detach().clone()

    def run(self, patch: torch.Tensor | None = None, grad: str | None = None, **kwargs):
        """Logits at the last position with everything nonlinear frozen; patch: [L, B, T, d].

        kwargs go to `ModelAdapter.run` (e.g. logits_at="none" for the final hidden states)."""
        handles = [m.register_forward_hook(lambda m, a, o: _frozen_norm(m, a[0], self.scales[m]))
                   for m in _norms(self.adapter)]
        if self.mlp_out is not None:
            for layer in range(self.adapter.n_layers):
                frozen = self.mlp_out[layer]
                handles.append(self.adapter.mlp_out_module(layer).register_forward_hook(
                    lambda m, a, o, frozen=frozen: frozen))
        try:
            return self.adapter.run(self.ids, self.mask, patch=patch, grad=grad,
                                    attention=AttentionControl(override=self.patterns), **kwargs)
        finally:
            for h in handles:
                h.remove()
