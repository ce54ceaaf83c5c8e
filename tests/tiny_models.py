"""Tiny randomly initialised models of every supported architecture (no downloads)."""

from __future__ import annotations

import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel)

ARCHS = ("gemma3", "gemma2", "llama", "gpt2")


def tiny_model(arch: str, vocab_size: int = 128, n_layers: int = 3, d_model: int = 32,
               seed: int = 0) -> PreTrainedModel:
    """A random fp32 causal LM of the given family, small enough for unit tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=4,
                               query_pre_attn_scalar=8,
                               layer_types=(["sliding_attention", "full_attention"] * n_layers)[:n_layers])
        model = Gemma3ForCausalLM(cfg)
    elif arch == "gemma2":
        cfg = Gemma2Config(**common, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           query_pre_attn_scalar=8)
        model = Gemma2ForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(**common, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4,
                         n_positions=128, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # Gemma initialises norm weights at zero (gain 1); randomise them so that tests of the norm
    # arithmetic are not blind to the weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
