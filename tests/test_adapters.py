"""Model adapters on tiny random models of every architecture: hook points, patches, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backend.errors import UserError
from backend.models.adapters import AttentionControl, ModelAdapter


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
    """Autograd through a pass whose attention patterns and norm scales are constants.

    The scales are recorded by hand-written formulas on a clean pass, then substituted as fixed
    tensors; the patterns are recorded and passed in as overrides.
    """
    norms = [m for m in adapter.model.modules()
             if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    scales: dict[nn.Module, torch.Tensor] = {}

    def hand_scale(m, x):
        if isinstance(m, nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
            return 1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
        eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
        return 1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def record(m, args, output):
        scales[m] = hand_scale(m, args[0]).detach().clone()

    def frozen(m, args, output):
        x, s = args[0], scales[m]
        if isinstance(m, nn.LayerNorm):
            return (x - x.mean(-1, keepdim=True)) * s * m.weight + m.bias
        if type(m).__name__.startswith("Gemma"):
            return x * s * (1.0 + m.weight)
        return m.weight * (x * s)

    handles = [m.register_forward_hook(record) for m in norms]
    with torch.no_grad(), adapter.recording_patterns() as patterns:
        adapter.run(ids, mask)
    for h in handles:
        h.remove()
    constants = {k: v.clone() for k, v in patterns.items()}
    handles = [m.register_forward_hook(frozen) for m in norms]
    try:
        with torch.enable_grad():
            out = adapter.run(ids, mask, grad=mode, attention=AttentionControl(override=constants))
            metric(out.logits).sum().backward()
    finally:
        for h in handles:
            h.remove()
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
