"""Patching any set of edges in one forward: a disentangled residual stream (DESIGN 8.1).

Every writer's state x_w [B, T, d] is recorded as the forward produces it, and every reader
sums its own mix instead of the model's residual:

    in_v = sum_w x~_w + sum_w m_{w,v} (x_w - x~_w)        (= sum_w m x_w + (1 - m) x~_w)

with x~ the writers' states on the corrupted run (constants) and m the edge mask ([E], or
[B, E] for one mask per batch row, float for Edge Pruning's soft masks). A pre-norm reader's
norm is part of the reader: q/k/v projections are recomputed per head from that head's own mix
(so a head reads its own inputs), the MLP's pre-norm and the final norm receive their mix.
Keeping every edge (m = 1) gives the clean model; removing every edge (m = 0) gives the
corrupted run.

Writer states: ``embed`` is the input of the first layer; a head's state is its output slice
``z_h @ W_O[h]`` (plus an equal share of the output bias, the same on both runs so it never
changes a patch); on Gemma-2/3 that is multiplied by the post-attention norm's gain over the rms
of *this run's* head sum, the frozen-scale split, so the shares add up to the block's output.
The MLP's state is ``mlp_out``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from backend.edges.graph import EdgeGraph, ReaderBlock
from backend.models.adapters import Intervention, ModelAdapter, norm_scale, norm_with_scale


class EdgePatch(Intervention):
    """Record writer states and, given corrupted states and a mask, patch every reader.

    corrupted: [W, B, T, d] writer states of the corrupted run (None: record only).
    mask: [E] or [B, E] (1 = the edge keeps the clean state); None with corrupted = keep all.
    embed: [B, T, d] replaces the embedding writer's state (EAP-IG's interpolated inputs).
    retain_grad: keep ``reader_inputs`` with their gradients (for EAP).
    After the pass: ``states`` [W, B, T, d] (this run's writer states) and ``reader_inputs``
    (reader index -> [B, T, d]).
    """

    def __init__(self, graph: EdgeGraph, corrupted: Tensor | None = None, mask: Tensor | None = None,
                 embed: Tensor | None = None, retain_grad: bool = False) -> None:
        self.graph, self.corrupted, self.mask, self.embed = graph, corrupted, mask, embed
        self.retain_grad = retain_grad
        self.patching = corrupted is not None
        self._chunks: list[Tensor] = []   # this run's writer states, one chunk per writer group
        self._deltas: list[Tensor] = []   # x - x~, the same chunks
        self._pending_heads: Tensor | None = None
        self._attn_mix: Tensor | None = None
        self.reader_inputs: dict[int, Tensor] = {}
        self._blocks: list[Tensor] = []   # each block's inputs [R, B, T, d], in reader order
        if self.patching:
            # Prefix sums of the corrupted states: the base every reader starts from.
            self._base = corrupted.cumsum(0)

    # -- the pass's results ----------------------------------------------------------------------
    @property
    def states(self) -> Tensor:
        return torch.cat(self._chunks)

    # -- writers ---------------------------------------------------------------------------------
    def _push(self, states: Tensor) -> None:
        """Append writer states [n, B, T, d] (in writer index order)."""
        start = sum(c.shape[0] for c in self._chunks)
        self._chunks.append(states)
        if self.patching:
            self._deltas.append(states - self.corrupted[start:start + states.shape[0]])

    def _mix(self, block: ReaderBlock) -> Tensor:
        """The inputs [R, B, T, d] of a block's readers."""
        base = self._base[block.n_writers - 1]
        R = block.n_readers
        if self.mask is None:  # keep all
            out = base.expand(R, *base.shape).clone()
            for delta in self._deltas:
                out = out + delta.sum(0)
            return out
        m = self.mask[..., block.edges].to(base.dtype)
        out, col = base.expand(R, *base.shape), 0
        for delta in self._deltas:
            n = delta.shape[0]
            if m.dim() == 1:
                part = m.view(R, block.n_writers)[:, col:col + n]
                out = out + torch.einsum("rw,wbtd->rbtd", part, delta)
            else:
                part = m.view(m.shape[0], R, block.n_writers)[:, :, col:col + n]
                out = out + torch.einsum("brw,wbtd->rbtd", part, delta)
            col += n
        return out

    def _keep(self, block: ReaderBlock, mix: Tensor) -> None:
        if self.retain_grad and mix.requires_grad:
            mix.retain_grad()
        for i in range(block.n_readers):
            self.reader_inputs[block.start + i] = mix[i]
        self._blocks.append(mix)

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        g = self.graph
        H, G, dh = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim
        handles: list[RemovableHandle] = []

        def embed_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if self.embed is not None:
                x = self.embed.to(x.dtype)
                args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            self._push(x.unsqueeze(0))
            return args, kwargs
        handles.append(adapter.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))

        for layer in range(adapter.n_layers):
            w = adapter.head_weights(layer)
            attn_block, mlp_block = g.attn_blocks[layer], g.mlp_blocks[layer]
            in_norm = adapter.attn_input_norm(layer)

            if self.patching:
                def attn_pre(module, args, block=attn_block):
                    self._attn_mix = self._mix(block)
                    self._keep(block, self._attn_mix)
                handles.append(adapter.attn_module(layer).register_forward_pre_hook(attn_pre))

                def project(mix: Tensor, weight: Tensor, bias: Tensor | None, norm: nn.Module) -> Tensor:
                    """Per-head inputs [n, B, T, d] -> projections [B, T, n * dh]."""
                    x = norm(mix)
                    y = torch.einsum("nbtd,ned->btne", x, weight.to(x.dtype))
                    if bias is not None:
                        y = y + bias
                    return y.reshape(*y.shape[:2], -1)

                def parts(w=w, norm=in_norm):
                    mix = self._attn_mix
                    return (project(mix[:H], w.wq, w.bq, norm), project(mix[H:H + G], w.wk, w.bk, norm),
                            project(mix[H + G:], w.wv, w.bv, norm))

                mods = adapter.qkv_modules(layer)
                if len(mods) == 1:
                    handles.append(mods[0].register_forward_hook(
                        lambda m, a, o, parts=parts: torch.cat(parts(), dim=-1)))
                else:
                    for i, mod in enumerate(mods):
                        handles.append(mod.register_forward_hook(
                            lambda m, a, o, i=i, parts=parts: parts()[i]))

            def o_hook(module, args, output, w=w, layer=layer):
                z = args[0]
                heads = torch.einsum("bthe,hde->hbtd", z.view(*z.shape[:2], H, dh), w.wo.to(z.dtype))
                if w.bo is not None:
                    heads = heads + w.bo / H
                if adapter.attn_post_norm(layer) is None:
                    self._push(heads)
                else:
                    self._pending_heads = heads
            handles.append(adapter.o_proj_module(layer).register_forward_hook(o_hook))

            post = adapter.attn_post_norm(layer)
            if post is not None:
                def post_hook(module, args, output):
                    # The frozen-scale split: each head's share of norm(sum of heads).
                    scale = norm_scale(module, args[0])
                    self._push(norm_with_scale(module, self._pending_heads, scale))
                handles.append(post.register_forward_hook(post_hook))

            if self.patching:
                def mlp_pre(module, args, block=mlp_block):
                    mix = self._mix(block)
                    self._keep(block, mix)
                    return (mix[0], *args[1:])
                handles.append(adapter.resid_mid_module(layer).register_forward_pre_hook(mlp_pre))

            def mlp_hook(module, args, output):
                self._push(output.unsqueeze(0))
            handles.append(adapter.mlp_out_module(layer).register_forward_hook(mlp_hook))

        if self.patching:
            def final_pre(module, args):
                mix = self._mix(g.logits_block)
                self._keep(g.logits_block, mix)
                return (mix[0], *args[1:])
            handles.append(adapter.final_norm().register_forward_pre_hook(final_pre))
        return handles

    def reader_grads(self) -> Tensor:
        """[R, B, T, d] gradients at every reader's input after backward (zeros where none)."""
        return torch.cat([b.grad if b.grad is not None else torch.zeros_like(b) for b in self._blocks])


def writer_states(adapter: ModelAdapter, graph: EdgeGraph, ids: Tensor, mask: Tensor) -> Tensor:
    """[W, B, T, d] writer states of a plain forward (no patching)."""
    rec = EdgePatch(graph)
    with torch.no_grad():
        adapter.forward_with([rec], ids, mask)
    return rec.states


def patched_logits(adapter: ModelAdapter, graph: EdgeGraph, ids: Tensor, mask: Tensor,
                   last_pos: Tensor, corrupted: Tensor, edge_mask: Tensor | None) -> Tensor:
    """Last-position logits [B, V] of the clean ids with ``edge_mask`` ([E] or [B, E]) applied."""
    patch = EdgePatch(graph, corrupted, edge_mask)
    return adapter.run(ids, mask, last_pos=last_pos, interventions=[patch]).logits
