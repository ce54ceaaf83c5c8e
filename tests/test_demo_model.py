"""Slow integration tests on the real Gemma-3-270M demo model (converted once into models_cache)."""

from __future__ import annotations

import pytest

from backend.circuits.behaviour import behaviour
from backend.models.registry import DEMO_MODEL
from backend.tasks import get_task

pytestmark = pytest.mark.slow


def test_demo_model_does_ioi(demo_adapter):
    batch = get_task("ioi").build(demo_adapter.tokenizer, 20, seed=0)
    assert len(batch) == 20
    result = behaviour(demo_adapter, batch)
    assert result.clean.mean() > 2.0, result.clean
    assert result.corrupted.mean() < 0.5, result.corrupted


def test_demo_model_hook_points(demo_adapter):
    assert demo_adapter.family == "gemma3"
    assert (demo_adapter.n_layers, demo_adapter.d_model) == (18, 640)
    assert demo_adapter.name == DEMO_MODEL


def test_cli_shows_the_demo_models_metric_on_each_pair(capsys):
    from backend.cli import main
    assert main(["tasks", "ioi", "--model", DEMO_MODEL, "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert "M(clean)" in out and "M(corrupted)" in out and out.count("\n") >= 7


def test_pie_invariants_on_the_demo_model(demo_adapter):
    """On Gemma-3-270M with a CLT of its shapes: keeping everything gives KL 0, and FAP's
    first-order scores track exact removal effects."""
    import torch

    from backend.circuits.attribution import Attributor
    from backend.circuits.evaluation import Evaluator
    from backend.circuits.selection import SelectionContext
    from backend.models.transcoder import Transcoder, TranscoderConfig

    tc = Transcoder.random(TranscoderConfig("clt", demo_adapter.n_layers, demo_adapter.d_model, 64, "topk", k=4),
                           seed=0, scale=0.05)
    batch = get_task("ioi").build(demo_adapter.tokenizer, 3, seed=0)
    attr = Attributor(demo_adapter, tc)
    runs = attr.prepare(batch)
    ctx = SelectionContext(runs, attr, Evaluator(attr))
    keep_all = ctx.evaluator.evaluate(runs, [torch.ones(len(runs.occ), dtype=torch.bool)])[0]
    assert float(keep_all.kl_last.max()) < 1e-6
    top = torch.argsort(runs.fap.abs(), descending=True)[:40]
    exact = ctx.single_effects(top)
    corr = torch.corrcoef(torch.stack([runs.fap[top], exact]))[0, 1]
    assert corr > 0.8, corr


def test_cached_steering_on_the_demo_model_equals_rerunning_every_step(demo_adapter):
    """Gemma-3-270M mixes sliding-window and global attention: the key/value cache of steered
    generation must give the tokens of rerunning the whole sequence at every step."""
    import torch

    from backend.interp.steering import steered_continuations
    from backend.models.transcoder import Transcoder, TranscoderConfig

    tc = Transcoder.random(TranscoderConfig("clt", demo_adapter.n_layers, demo_adapter.d_model, 8, "relu"), seed=0)
    prompts = get_task("ioi").build(demo_adapter.tokenizer, 2, seed=0).clean_ids[:, :6]
    out = steered_continuations(demo_adapter, tc, [(3, 2)], [1.0], prompts, factors=(0.0, 8.0), n_new=5)
    rows = tc.decoder_rows(3, torch.tensor([2]))[0]
    for i, factor in enumerate((0.0, 8.0)):
        seq = prompts.clone()
        for _ in range(5):
            patch = torch.zeros(demo_adapter.n_layers, 2, seq.shape[1], demo_adapter.d_model)
            patch[3:, :, 5:] = factor * rows[:, None, None, :]
            seq = torch.cat([seq, demo_adapter.run(seq, patch=patch).logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out[0, i], seq[:, 6:]), factor
