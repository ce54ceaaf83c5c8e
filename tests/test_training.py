"""CLT training on a tiny random model: loss falls, files round-trip, resume is exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from backend.errors import UserError
from backend.models.adapters import ModelAdapter
from backend.models.corpus import (default_corpus, read_corpus, split_heldout, story_documents)
from backend.models.training import (CHECKPOINT_FILE, PLOT_FILE, REPORT_FILE, Normaliser, TopKCLT,
                                     TrainConfig, export_transcoder, is_complete, sparse_decode,
                                     train_clt)
from backend.models.transcoder_files import load_transcoder
from tests.tiny_models import tiny_model
from tests.tokenizers import tiny_tokenizer

L, D, FEATS, K = 3, 32, 64, 4
CONFIG = TrainConfig(features_per_layer=FEATS, k=K, tokens=4096, heldout_tokens=512,
                     batch_size=256, steps=40, lr=1e-2, warmup_steps=5, eval_every=20,
                     checkpoint_every=10, calibration_tokens=1024, seed=3)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return story_documents(60_000, seed=0)


@pytest.fixture(scope="module")
def adapter(docs) -> ModelAdapter:
    tok = tiny_tokenizer(extra_words=docs[:200])
    return ModelAdapter(tiny_model("gemma3", vocab_size=len(tok), n_layers=L, d_model=D), tok,
                        name="tiny-gemma3")


@pytest.fixture(scope="module")
def trained(adapter, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clt")
    result = train_clt(adapter, out, CONFIG, corpus=docs, progress=False)
    return out, result


def test_sparse_decode_matches_dense_and_gradients():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    vals, idx = torch.randn(10, 16, dtype=torch.float64, generator=gen).topk(3, dim=-1)
    vals = vals.detach().requires_grad_(True)
    dense = torch.zeros(10, 16, dtype=torch.float64).scatter(1, idx, vals)
    assert torch.allclose(sparse_decode(idx, vals, weight), dense @ weight)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(idx, v, w), (vals, weight))


def test_training_lowers_the_loss(trained):
    out, result = trained
    report = json.loads((out / REPORT_FILE).read_text())
    losses = [loss for _, loss in report["loss_curve"]]
    assert len(losses) == CONFIG.total_steps
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert report["heldout"]["mean_fvu"] < 0.8
    assert 0 < report["heldout"]["mean_l0"] <= 2 * K
    assert len(report["heldout"]["fvu_per_layer"]) == L
    assert {"dead", "dead_per_layer", "l0_per_layer"} <= set(report["heldout"])
    assert report["train_tokens_per_second"] > 0
    assert (out / PLOT_FILE).is_file()
    assert is_complete(out)
    # Training artefacts are cleaned up.
    assert not (out / CHECKPOINT_FILE).exists() and not (out / "activations").exists()


def test_saved_clt_reloads_and_reconstructs_identically(trained):
    out, result = trained
    loaded = load_transcoder(out)
    x = torch.randn(L, 2, 7, D, generator=torch.Generator().manual_seed(1)) * 3
    assert loaded.config == result.transcoder.config
    assert torch.equal(loaded(x), result.transcoder(x))
    assert torch.equal(loaded.encode(x), result.transcoder.encode(x))


def test_files_carry_circuit_tracer_names_and_shapes(trained):
    out, _ = trained
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert cfg["feature_input_hook"] == "hook_resid_mid"
    assert cfg["feature_output_hook"] == "hook_mlp_out"
    assert cfg["activation"] == "jumprelu" and cfg["model_name"] == "tiny-gemma3"
    names = {p.name for p in out.glob("*.safetensors")}
    assert names == {f"W_{kind}_{i}.safetensors" for kind in ("enc", "dec") for i in range(L)}
    for i in range(L):
        with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert shapes == {f"W_enc_{i}": (FEATS, D), f"b_enc_{i}": (FEATS,), f"b_dec_{i}": (D,),
                          f"threshold_{i}": (FEATS,)}
        with safe_open(str(out / f"W_dec_{i}.safetensors"), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert shapes == {f"W_dec_{i}": (FEATS, L - i, D)}


def test_resumed_run_ends_where_an_uninterrupted_one_ends(adapter, docs, tmp_path):
    cfg = replace(CONFIG, steps=14, eval_every=7, export_activation="topk", keep_activations=True)
    acts = tmp_path / "acts"
    straight = train_clt(adapter, tmp_path / "a", cfg, corpus=docs, activations_dir=acts,
                         progress=False)
    partial = train_clt(adapter, tmp_path / "b", cfg, corpus=docs, activations_dir=acts,
                        progress=False, stop_after_step=6)
    assert not partial.report["complete"] and (tmp_path / "b" / CHECKPOINT_FILE).is_file()
    assert not is_complete(tmp_path / "b")
    with pytest.raises(UserError, match="resume"):
        train_clt(adapter, tmp_path / "b", cfg, corpus=docs, activations_dir=acts, progress=False)
    with pytest.raises(UserError, match="different configuration"):
        train_clt(adapter, tmp_path / "b", replace(cfg, lr=1e-3), corpus=docs,
                  activations_dir=acts, progress=False, resume=True)
    resumed = train_clt(adapter, tmp_path / "b", cfg, corpus=docs, activations_dir=acts,
                        progress=False, resume=True)
    a, b = load_transcoder(tmp_path / "a"), load_transcoder(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), name
    curve_a = [v for _, v in straight.report["loss_curve"]]
    curve_b = [v for _, v in resumed.report["loss_curve"]]
    assert len(curve_b) == cfg.steps and curve_a == pytest.approx(curve_b, rel=1e-5)


def test_export_folds_normalisation_into_model_units():
    gen = torch.Generator().manual_seed(0)
    model = TopKCLT(L, D, FEATS, K, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    norm = Normaliser(in_scale=torch.rand(L, generator=gen) + 0.5,
                      out_mean=torch.randn(L, D, generator=gen),
                      out_std=torch.rand(L, generator=gen) + 0.5)
    x, y = torch.randn(L, 20, D, generator=gen), torch.zeros(L, 20, D)
    xn, _ = norm.apply(x, y)
    recon_n, _ = model(xn)
    expected = recon_n * norm.out_std[:, None, None] + norm.out_mean[:, None, :]
    tc = export_transcoder(model, norm, "topk", "m")
    assert torch.allclose(tc(x), expected, atol=1e-5)


def test_corpus_reading_and_default(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"other": 1}\n{"text": "third"}\n')
    (tmp_path / "ignored.md").write_text("not read")
    assert read_corpus(tmp_path) == ["first document", "second", "third"]
    with pytest.raises(UserError):
        read_corpus(tmp_path / "ignored.md")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        read_corpus(tmp_path)
    docs = default_corpus(seed=0)
    assert len(docs) > 100 and docs == default_corpus(seed=0)
    assert any("gave" in d and " to " in d for d in docs)  # the stories
    assert any("def " in d or "class " in d for d in docs)  # Python docs
    train, held = split_heldout(docs)
    assert len(held) * 19 <= len(train) + 19 and not set(held) & set(train)
