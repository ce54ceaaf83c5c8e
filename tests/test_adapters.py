"""Model adapters on tiny random models of every architecture: hook points, patches, gradients."""

from __future__ import annotations

import pytest
import torch

from backend.errors import UserError
from backend.models.adapters import ModelAdapter
from tests.frozen import FrozenModel


def metric(logits: torch.Tensor) -> torch.Tensor:
    """A nonlinear metric of the last logits: [B, V] -> [B]."""
    return logits[:, 5] - torch.logsumexp(logits, dim=-1)


def test_zero_patch_gives_identical_logits(adapter, token_batch):
    ids, mask = token_batch
    with torch.no_grad():
        plain = adapter.run(ids, mask).logits
        zero = torch.zeros(adapter.n_layers, *ids.shape, adapter.d_model)
        patched = adapter.run(ids, mask, patch=zero).logits
    assert torch.equal(plain, patched)


def test_logits_match_the_hf_model(adapter, token_batch):
    ids, mask = token_batch
    last = mask.sum(-1) - 1
    with torch.no_grad():
        ours = adapter.run(ids, mask).logits
        theirs = adapter.model(input_ids=ids, attention_mask=mask).logits[torch.arange(3), last]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_right_padding_does_not_change_real_positions(adapter, token_batch):
    ids, mask = token_batch
    with torch.no_grad():
        batched = adapter.run(ids, mask).logits
        single = adapter.run(ids[1:2, :5], mask[1:2, :5]).logits
    torch.testing.assert_close(batched[1:2], single, rtol=1e-5, atol=1e-5)


def _hand_mlp_block(adapter: ModelAdapter, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    block = adapter.layers[layer]
    if adapter.family in ("gemma2", "gemma3"):
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(resid_mid)))
    if adapter.family == "gpt2":
        return block.mlp(block.ln_2(resid_mid))
    return block.mlp(block.post_attention_layernorm(resid_mid))


def test_captured_hook_points_match_a_hand_computation(adapter, token_batch):
    ids, mask = token_batch
    layer_outputs: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, output):
            layer_outputs[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(adapter.layers)]
    try:
        with torch.no_grad():
            out = adapter.run(ids, mask, capture=True)
    finally:
        for h in handles:
            h.remove()
    L, d = adapter.n_layers, adapter.d_model
    assert out.resid_mid.shape == out.mlp_out.shape == (L, *ids.shape, d)
    with torch.no_grad():
        for layer in range(L):
            torch.testing.assert_close(out.mlp_out[layer], _hand_mlp_block(adapter, layer, out.resid_mid[layer]))
            # The block's output is the residual entering the MLP plus what the MLP adds.
            torch.testing.assert_close(layer_outputs[layer], out.resid_mid[layer] + out.mlp_out[layer])


def test_patch_adds_to_mlp_out(adapter, token_batch):
    ids, mask = token_batch
    patch = {0: torch.randn(*ids.shape, adapter.d_model)}
    with torch.no_grad():
        clean = adapter.run(ids, mask, capture=True)
        patched = adapter.run(ids, mask, capture=True, patch=patch)
    torch.testing.assert_close(patched.mlp_out[0], clean.mlp_out[0] + patch[0])
    assert not torch.allclose(patched.logits, clean.logits)


def _frozen_reference_gradients(adapter: ModelAdapter, ids, mask, mode: str) -> torch.Tensor:
    """Autograd through a pass whose attention patterns and norm scales are constants."""
    frozen = FrozenModel(adapter, ids, mask, freeze_mlps=False)
    with torch.enable_grad():
        out = frozen.run(grad=mode)
        metric(out.logits).sum().backward()
    return out.mlp_out_grads()


@pytest.mark.parametrize("mode", ["replacement", "full"])
def test_linearised_gradients_equal_autograd_with_constant_patterns_and_scales(adapter, token_batch, mode):
    ids, mask = token_batch
    out, grads = adapter.mlp_out_gradients(ids, mask, metric, mode=mode, linearise=True)
    reference = _frozen_reference_gradients(adapter, ids, mask, mode)
    assert grads.abs().sum() > 0
    torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-6)
    # Linearising changes gradients only, never values.
    with torch.no_grad():
        torch.testing.assert_close(out.logits, adapter.run(ids, mask).logits)


def test_linearisation_changes_the_gradient(adapter, token_batch):
    ids, mask = token_batch
    _, lin = adapter.mlp_out_gradients(ids, mask, metric, mode="replacement", linearise=True)
    _, raw = adapter.mlp_out_gradients(ids, mask, metric, mode="replacement", linearise=False)
    assert not torch.allclose(lin, raw)


def test_replacement_gradient_ignores_downstream_mlps(adapter, token_batch):
    """At the last layer nothing is downstream, so both gradients agree there and only there."""
    ids, mask = token_batch
    _, rep = adapter.mlp_out_gradients(ids, mask, metric, mode="replacement")
    _, full = adapter.mlp_out_gradients(ids, mask, metric, mode="full")
    torch.testing.assert_close(rep[-1], full[-1])
    assert not torch.allclose(rep[0], full[0])


def test_padding_positions_get_no_gradient(adapter, token_batch):
    ids, mask = token_batch
    _, grads = adapter.mlp_out_gradients(ids, mask, metric)
    assert torch.all(grads[:, 1, 5:] == 0) and torch.all(grads[:, 2, 6:] == 0)


def test_unsupported_architecture_is_a_user_error():
    from transformers import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UserError, match="not supported"):
        ModelAdapter(model)


def test_sparse_patch_equals_dense_patch(adapter, token_batch):
    from backend.models.adapters import SparsePatch
    ids, mask = token_batch
    B, T = ids.shape
    dense = torch.zeros(adapter.n_layers, B, T, adapter.d_model)
    sparse = SparsePatch()
    g = torch.Generator().manual_seed(1)
    for layer, b, p in [(0, 0, 2), (1, 2, 4), (1, 2, 4), (2, 1, 3)]:
        v = torch.randn(1, adapter.d_model, generator=g)
        dense[layer, b, p] += v[0]
        sparse.add(layer, torch.tensor([b * T + p]), v)
    with torch.no_grad():
        a = adapter.run(ids, mask, patch=dense).logits
        b_ = adapter.run(ids, mask, patch=sparse).logits
    torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_hidden_states_unembed_to_the_logits(adapter, token_batch):
    ids, mask = token_batch
    with torch.no_grad():
        out = adapter.run(ids, mask, logits_at="none")
        full = adapter.run(ids, mask, logits_at="all").logits
    torch.testing.assert_close(adapter.unembed(out.hidden), full)
    torch.testing.assert_close(out.logits, full[torch.arange(3), mask.sum(-1) - 1])
