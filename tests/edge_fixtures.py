"""Tiny models and IOI prompts for the edge engine, and a planted circuit."""

from __future__ import annotations

import torch

from backend.edges.context import EdgeContext
from backend.models.adapters import ModelAdapter
from backend.tasks import get_task
from tests.tiny_models import tiny_model
from tests.tokenizers import tiny_tokenizer


def edge_context(arch: str = "llama", n_prompts: int = 4, n_layers: int = 2, seed: int = 0,
                 batch_size: int = 3, dtype: torch.dtype = torch.float32) -> EdgeContext:
    """A tiny model of ``arch`` on tiny-tokenizer IOI prompts (parts of ``batch_size``)."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok), n_layers=n_layers, d_model=32, seed=seed).to(dtype)
    adapter = ModelAdapter(model, tok, name=f"tiny-{arch}")
    batch = get_task("ioi").build(tok, n_prompts, seed=seed)
    return EdgeContext.create(adapter, batch, batch_size=batch_size, seed=seed)


PLANTED = ("embed->a1.k0", "embed->a1.v0", "a1.h0->logits")


def planted_context(n_prompts: int = 6) -> EdgeContext:
    """A 2-layer Llama (GQA: 4 query heads, 2 kv heads) in which only head a1.h0 writes anything:
    every other head's output slice and every MLP's down projection are zero, so every edge from
    them carries nothing, and the answer reaches the logits only through a1.h0. The corrupted
    prompts (ABC) differ from the clean ones only before the last position, so a1.h0's query (read
    at the last position, whose token never changes) and embed->logits carry nothing either: the
    circuit is exactly PLANTED (the key and value inputs of a1.h0's kv head and its output)."""
    ctx = edge_context("llama", n_prompts=n_prompts, batch_size=n_prompts)
    model, H, dh = ctx.adapter.model, ctx.adapter.n_heads, ctx.adapter.head_dim
    with torch.no_grad():
        model.lm_head.weight *= 30.0   # confident logits, so KL differences are large
        for layer, block in enumerate(model.model.layers):
            block.mlp.down_proj.weight.zero_()
            w = block.self_attn.o_proj.weight.view(-1, H, dh)
            w[:, 0 if layer == 0 else 1:] = 0.0
            if layer == 0:
                w.zero_()
            else:
                w[:, 0] *= 40.0   # a strong, sharp head, so each of its edges matters clearly
                block.self_attn.k_proj.weight[:dh] *= 25.0
    ctx._parts = None
    return ctx
