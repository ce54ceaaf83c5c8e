"""CLT training on a tiny random model: loss falls, files round-trip, resume is exact; the fast
decoder kernels agree with the dense sum of writes; AuxK touches only dead features."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors import safe_open

from backend.errors import InvalidParameterError, UserError
from backend.models.adapters import ModelAdapter
from backend.models.corpus import (default_corpus, read_corpus, split_heldout, story_documents)
from backend.models.lazy_adam import LazyAdam
from backend.models.topk_clt import DeadFeatures, auxk_loss, clt_decode
from backend.models.training import (CHECKPOINT_FILE, PLOT_FILE, REPORT_FILE, Normaliser, TopKCLT,
                                     TrainConfig, export_transcoder, is_complete, make_optimizers,
                                     resolve_optimizer, sparse_decode, train_clt, train_loss)
from backend.models.transcoder_files import load_transcoder
from tests.tiny_models import tiny_model
from tests.tokenizers import tiny_tokenizer

L, D, FEATS, K = 3, 32, 64, 4
CONFIG = TrainConfig(features_per_layer=FEATS, k=K, tokens=4096, heldout_tokens=512,
                     batch_size=256, steps=40, lr=1e-2, warmup_steps=5, eval_every=20,
                     checkpoint_every=10, calibration_tokens=1024, seed=3, dead_tokens=1024)


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


@pytest.mark.parametrize("optimizer", ["adam", "lazy-adam"])
def test_resumed_run_ends_where_an_uninterrupted_one_ends(adapter, docs, tmp_path, optimizer):
    cfg = replace(CONFIG, steps=14, eval_every=7, export_activation="topk", keep_activations=True,
                  optimizer=optimizer)
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
    # AuxK was on across the interruption (its dead-feature state is in the checkpoint).
    aux_a, aux_b = straight.report["aux_loss_curve"], resumed.report["aux_loss_curve"]
    assert [s for s, _ in aux_a] == [s for s, _ in aux_b] and any(s > 6 for s, _ in aux_a)
    assert [v for _, v in aux_a] == pytest.approx([v for _, v in aux_b], rel=1e-5)
    assert straight.report["dead_curve"] == resumed.report["dead_curve"]


def test_export_folds_normalisation_into_model_units():
    gen = torch.Generator().manual_seed(0)
    model = TopKCLT(L, D, FEATS, K, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    norm = Normaliser(in_scale=torch.rand(L, generator=gen) + 0.5,
                      out_mean=torch.randn(L, D, generator=gen),
                      out_std=torch.rand(L, generator=gen) + 0.5,
                      in_mean=torch.randn(L, D, generator=gen))
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


# ------------------------------------------------------------------ fast trainer: kernels, AuxK


def _codes(gen, B, Fn, k, layers):
    codes = {}
    for l in layers:
        vals, idx = torch.rand(B, Fn, generator=gen).topk(k, dim=-1)
        codes[l] = (idx, vals)
    return codes


@pytest.mark.parametrize("backward", ["dense", "sparse", "blocked"])
def test_clt_decode_matches_the_dense_sum_of_writes(backward):
    gen = torch.Generator().manual_seed(2)
    Lc, B, Fn, k, d = 3, 9, 12, 3, 5
    weights = [torch.randn(Fn, (Lc - l) * d, dtype=torch.float64, generator=gen, requires_grad=True)
               for l in range(Lc)]
    codes = {l: (idx, vals.double().requires_grad_(True)) for l, (idx, vals) in _codes(gen, B, Fn, k, [0, 2]).items()}
    out = clt_decode(codes, weights, d, backward)
    expected = torch.zeros(B, Lc, d, dtype=torch.float64)
    for l, (idx, vals) in codes.items():
        dense = torch.zeros(B, Fn, dtype=torch.float64).scatter(1, idx, vals)
        expected[:, l:] += (dense @ weights[l]).view(B, Lc - l, d)
    assert torch.allclose(out, expected)
    g = torch.randn(B, Lc, d, dtype=torch.float64, generator=gen)
    inputs = [codes[0][1], codes[2][1], weights[0], weights[2]]
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(expected, inputs, g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)
    assert weights[1].grad is None  # a layer without codes gets no gradient


@pytest.mark.parametrize("backward", ["dense", "blocked"])
def test_bf16_decode_is_close_to_float32(backward):
    gen = torch.Generator().manual_seed(3)
    B, Fn, k, D = 64, 128, 8, 40
    w = torch.randn(Fn, D, generator=gen, requires_grad=True)
    vals, idx = torch.rand(B, Fn, generator=gen).topk(k, dim=-1)
    vals = vals.requires_grad_(True)
    g = torch.randn(B, D, generator=gen)
    ref = sparse_decode(idx, vals, w, backward)
    ref_grads = torch.autograd.grad(ref, [vals, w], g)
    low = sparse_decode(idx, vals, w.to(torch.bfloat16), backward)
    assert low.dtype == torch.float32
    low_grads = torch.autograd.grad(low, [vals, w], g)
    assert torch.allclose(low, ref, rtol=2e-2, atol=2e-2 * float(ref.detach().abs().mean()))
    for a, b in zip(low_grads, ref_grads):
        assert a.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 2e-2


def _step(model, cfg, x, y, dead):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, aux, codes = train_loss(model, x, y, dead, cfg)
    (loss if aux is None else loss + cfg.aux_coef * aux).backward()
    opt.step()
    return aux, codes


def _batch(seed=4, B=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, D, generator=gen), torch.randn(L, B, D, generator=gen)


def test_sparse_decoder_step_equals_the_dense_step():
    """Same batch, same start: the scatter-add (sparse), blocked-gather (blocked) and matmul
    (dense) decoder backwards give the same parameters after an Adam step, in float32."""
    x, y = _batch()
    cfg = replace(CONFIG, precision="float32", aux_coef=0.0)
    models = []
    for backward in ("dense", "sparse", "blocked"):
        model = TopKCLT(L, D, FEATS, K, seed=0)
        model.backward_kind = backward
        _step(model, cfg, x, y, torch.zeros(L, FEATS, dtype=torch.bool))
        models.append(model)
    for other in models[1:]:
        for (name, a), (_, b) in zip(models[0].named_parameters(), other.named_parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_auxk_is_inactive_when_nothing_is_dead():
    x, y = _batch()
    nothing_dead = torch.zeros(L, FEATS, dtype=torch.bool)
    with_aux, without = TopKCLT(L, D, FEATS, K, seed=0), TopKCLT(L, D, FEATS, K, seed=0)
    aux, _ = _step(with_aux, replace(CONFIG, precision="float32", aux_coef=1.0), x, y, nothing_dead)
    assert aux is None
    _step(without, replace(CONFIG, precision="float32", aux_coef=0.0), x, y, nothing_dead)
    for (name, a), (_, b) in zip(with_aux.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name


def test_auxk_trains_only_dead_features_on_the_residual_error():
    x, y = _batch()
    model = TopKCLT(L, D, FEATS, K, seed=0)
    dead = torch.zeros(L, FEATS, dtype=torch.bool)
    dead[1, :20] = True  # dead features of layer 1 only
    pre = model.pre_activations(x)
    recon = model.decode(dict(enumerate(model.topk(p) for p in pre)))
    error = (y - recon).detach()
    aux = auxk_loss(model, pre, error, dead, aux_k=6, n_tokens=32)
    assert aux is not None and float(aux) > 0
    aux.backward()
    assert model.W_dec[0].grad is None and model.W_dec[2].grad is None
    live_rows = model.W_dec[1].grad[20:]
    assert torch.count_nonzero(live_rows) == 0 and torch.count_nonzero(model.W_dec[1].grad[:20]) > 0
    assert torch.count_nonzero(model.W_enc[1].grad[20:]) == 0
    assert model.b_dec.grad is None  # the auxiliary reconstruction has no bias
    # Reconstructing the error exactly would give 0: the loss is ||e - e_aux||^2 / ||e||^2.
    assert float(aux) == pytest.approx(float(((model.decode(
        {1: model.topk(pre[1][:32].masked_fill(~dead[1], float("-inf")), 6)}, bias=False)
        - error[:, :32]).pow(2).sum() / error[:, :32].pow(2).sum())), rel=1e-5)


def test_dead_features_are_counted_in_tokens_since_they_fired():
    tracker = DeadFeatures(2, 5, dead_tokens=8, device=torch.device("cpu"))
    idx = torch.tensor([[0, 1], [1, 2], [0, 1], [0, 1]])  # 4 tokens
    vals = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # feature 2 never > 0
    tracker.update([(idx, vals), (idx, torch.zeros_like(vals))])
    assert tracker.since.tolist() == [[0, 0, 4, 4, 4], [4, 4, 4, 4, 4]]
    tracker.update([(idx, vals), (idx, vals)])
    assert tracker.mask.tolist() == [[False, False, True, True, True], [False, False, True, True, True]]
    assert tracker.count() == 6


def test_training_reports_dead_features_and_precision(trained):
    _, result = trained
    report = result.report
    assert report["compute_dtype"] in ("float32", "bfloat16") and report["device"] == "cpu"
    assert len(report["dead_curve"]) == len(report["heldout_curve"])
    assert all(len(row) == 3 for row in report["dead_curve"])


# ------------------------------------------------------------------ lazy (row-sparse) Adam, centring


def test_lazy_adam_equals_dense_adam_on_rows_active_at_every_step():
    gen = torch.Generator().manual_seed(0)
    dense_p = torch.randn(8, 3, 5, generator=gen, requires_grad=True)
    lazy_p = dense_p.detach().clone().requires_grad_(True)
    dense = torch.optim.Adam([dense_p], lr=1e-2, betas=(0.9, 0.99), foreach=False)
    lazy = LazyAdam([lazy_p], lr=1e-2, betas=(0.9, 0.99))
    for _ in range(4):  # rows 0..5 get a gradient every step, rows 6 and 7 never
        g = torch.randn(8, 3, 5, generator=gen)
        g[6:] = 0
        dense_p.grad, lazy_p.grad = g.clone(), g.clone()
        dense.step()
        lazy.step()
    assert torch.allclose(lazy_p, dense_p, atol=1e-7, rtol=1e-6)
    state = lazy.state[lazy_p]
    assert state["step"].tolist() == [4] * 6 + [0, 0]
    assert torch.allclose(state["exp_avg"], dense.state[dense_p]["exp_avg"], atol=1e-8)


def test_lazy_adam_leaves_untouched_rows_and_counts_steps_per_row():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4, 6, generator=gen, requires_grad=True)
    start = p.detach().clone()
    opt = LazyAdam([p], lr=0.1)
    for step in range(3):  # row 3 first moves at step 3: its update is Adam's first step
        g = torch.randn(4, 6, generator=gen)
        g[2:] = 0
        if step == 2:
            g[3] = torch.randn(6, generator=gen)
        p.grad = g
        opt.step()
    assert torch.equal(p[2], start[2]) and torch.count_nonzero(opt.state[p]["exp_avg"][2]) == 0
    fresh = start[3].clone().requires_grad_(True)
    ref = torch.optim.Adam([fresh], lr=0.1, foreach=False)
    fresh.grad = g[3].clone()
    ref.step()
    assert torch.allclose(p[3], fresh, atol=1e-7) and opt.state[p]["step"].tolist() == [3, 3, 0, 1]


def test_lazy_adam_trainer_step_equals_the_dense_step():
    """One trainer step on the same batch from the same start: dense Adam and lazy Adam (decoder)
    give the same parameters; rows no token activated do not move under either."""
    x, y = _batch()
    dead = torch.zeros(L, FEATS, dtype=torch.bool)
    dead[:, :8] = True  # AuxK active: dead rows get gradients too
    models = {}
    for name in ("adam", "lazy-adam"):
        cfg = replace(CONFIG, precision="float32", optimizer=name)
        model = TopKCLT(L, D, FEATS, K, seed=0)
        opts = make_optimizers(model, cfg)
        assert len(opts) == (2 if name == "lazy-adam" else 1)
        loss, aux, codes = train_loss(model, x, y, dead, cfg)
        (loss + cfg.aux_coef * aux).backward()
        for opt in opts:
            opt.step()
        models[name] = (model, codes)
    start = TopKCLT(L, D, FEATS, K, seed=0)
    (dense, codes), (lazy, _) = models["adam"], models["lazy-adam"]
    for (name, a), (_, b) in zip(dense.named_parameters(), lazy.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    touched = torch.zeros(FEATS, dtype=torch.bool)
    touched[codes[0][0].unique()] = True
    touched[:8] = True
    assert (~touched).any() and torch.equal(lazy.W_dec[0][~touched], start.W_dec[0][~touched])


def test_optimizer_auto_picks_lazy_adam_only_for_sparse_batches():
    assert resolve_optimizer(replace(CONFIG, batch_size=256, k=4, features_per_layer=64)) == "adam"
    assert resolve_optimizer(TrainConfig(features_per_layer=65536, k=8, batch_size=1024,
                                         tokens=4096)) == "lazy-adam"
    with pytest.raises(InvalidParameterError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_normaliser_centres_inputs_before_scaling(adapter, docs, tmp_path):
    from backend.models.harvest_activations import harvest
    store = harvest(adapter, docs[:50], tmp_path / "acts", 2048, progress=False)
    norm = Normaliser.fit(store)
    x, y = store.rows(slice(0, store.n_tokens))
    xn, _ = norm.apply(x.float(), y.float())
    assert torch.allclose(xn.mean(1), torch.zeros(L, D), atol=1e-3)
    assert torch.allclose(xn.norm(dim=-1).mean(1), torch.full((L,), D ** 0.5), rtol=1e-3)
    plain = Normaliser.fit(store, center=False)
    assert torch.count_nonzero(plain.in_mean) == 0
