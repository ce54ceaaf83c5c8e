"""Transcoder maths and the circuit-tracer file format, on tiny random transcoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend.errors import NotFoundError, ShapeMismatchError, UserError
from backend.models.transcoder import Transcoder, TranscoderConfig
from backend.models.transcoder_files import (
    load_transcoder,
    save_transcoder,
    transcoder_summary,
)

L, D, F, K = 3, 8, 16, 4

VARIANTS = [("clt", "relu"), ("clt", "jumprelu"), ("clt", "topk"), ("plt", "relu"),
            ("plt", "jumprelu")]


def make_config(kind: str, activation: str) -> TranscoderConfig:
    return TranscoderConfig(
        kind=kind, n_layers=L, d_model=D, n_features=F, activation=activation,
        k=K if activation == "topk" else None, model_name="tiny-model",
    )


@pytest.fixture(params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def tc(request) -> Transcoder:
    kind, activation = request.param
    return Transcoder.random(make_config(kind, activation), seed=1)


@pytest.fixture
def resid() -> torch.Tensor:
    """resid_mid [L, batch=2, pos=5, d]."""
    return torch.randn(L, 2, 5, D, generator=torch.Generator().manual_seed(7))


def dense_acts(seed: int = 3) -> torch.Tensor:
    """Activations [L, 2, 5, F] with every feature active somewhere (decoder's full path)."""
    return torch.rand(L, 2, 5, F, generator=torch.Generator().manual_seed(seed))


def sparse_acts(seed: int = 4) -> torch.Tensor:
    """Activations [L, 2, 5, F] with only a few features active (decoder's row-gather path)."""
    acts = torch.zeros(L, 2, 5, F)
    gen = torch.Generator().manual_seed(seed)
    for l in range(L):
        feats = torch.randperm(F, generator=gen)[:3]
        acts[l, ..., feats] = torch.rand(2, 5, 3, generator=gen)
    return acts


def einsum_decode(tc: Transcoder, acts: torch.Tensor) -> torch.Tensor:
    """recon[t] = b_dec[t] + sum_{l <= t} einsum('nf,fd->nd', acts[l], W_dec[l][:, t-l])."""
    flat = acts.reshape(L, -1, F)
    out = []
    for t in range(L):
        r = tc.b_dec[t].expand(flat.shape[1], D).clone()
        for l in range(L):
            if t in tc.targets(l):
                r = r + torch.einsum("nf,fd->nd", flat[l], tc.W_dec[l][:, t - l])
        out.append(r)
    return torch.stack(out).reshape(L, *acts.shape[1:-1], D)


# ------------------------------------------------------------------------------ maths


def test_parameter_shapes(tc: Transcoder) -> None:
    assert tc.W_enc.shape == (L, F, D)
    assert tc.b_enc.shape == (L, F) and tc.b_dec.shape == (L, D)
    assert (tc.threshold is not None) == (tc.config.activation == "jumprelu")
    for l in range(L):
        n_t = L - l if tc.config.kind == "clt" else 1
        assert tc.W_dec[l].shape == (F, n_t, D)
        assert list(tc.targets(l)) == list(range(l, l + n_t))


def test_decode_matches_einsum(tc: Transcoder) -> None:
    with torch.no_grad():
        for acts in (dense_acts(), sparse_acts()):
            torch.testing.assert_close(tc.decode(acts), einsum_decode(tc, acts), rtol=1e-5,
                                       atol=1e-6)


def test_writes_sum_to_decode(tc: Transcoder) -> None:
    acts = dense_acts()
    with torch.no_grad():
        recon = tc.b_dec.view(L, 1, 1, D).expand(L, 2, 5, D).clone()
        for l in range(L):
            w = tc.writes(l, acts[l])
            assert w.shape == (len(tc.targets(l)), 2, 5, D)
            for j, t in enumerate(tc.targets(l)):
                recon[t] += w[j]
        torch.testing.assert_close(recon, tc.decode(acts), rtol=1e-5, atol=1e-6)


def test_encode_matches_formula(tc: Transcoder, resid: torch.Tensor) -> None:
    with torch.no_grad():
        acts = tc.encode(resid)
        assert acts.shape == (L, 2, 5, F)
        for l in range(L):
            pre = resid[l] @ tc.W_enc[l].T + tc.b_enc[l]
            torch.testing.assert_close(tc.pre_activations(l, resid[l]), pre)
            assert torch.equal(acts[l], tc.encode_layer(l, resid[l]))
            nz = acts[l] != 0
            # Every active feature passes its pre-activation through unchanged.
            assert torch.equal(acts[l][nz], tc.pre_activations(l, resid[l])[nz])


def test_topk_keeps_exactly_k() -> None:
    tc = Transcoder.random(make_config("clt", "topk"))
    # Shift so the top k are positive: then ReLU removes none of them.
    pre = torch.randn(20, F, generator=torch.Generator().manual_seed(0)) + 5.0
    acts = tc.activate(0, pre)
    assert ((acts != 0).sum(-1) == K).all()
    kept_min = acts.masked_fill(acts == 0, float("inf")).min(-1).values
    dropped_max = pre.masked_fill(acts != 0, float("-inf")).max(-1).values
    assert (kept_min > dropped_max).all()
    # Negative winners are relu'd away.
    assert (tc.activate(0, -pre) == 0).all()


def test_jumprelu_zeroes_below_threshold() -> None:
    tc = Transcoder.random(make_config("clt", "jumprelu"))
    pre = torch.randn(50, F, generator=torch.Generator().manual_seed(0))
    acts = tc.activate(1, pre)
    above = pre > tc.threshold[1]
    assert above.any() and (~above & (pre > 0)).any()  # both regimes are exercised
    assert (acts[~above] == 0).all()
    assert torch.equal(acts[above], pre[above])


def test_relu() -> None:
    tc = Transcoder.random(make_config("plt", "relu"))
    pre = torch.randn(10, F)
    assert torch.equal(tc.activate(0, pre), pre.clamp(min=0))


def test_decoder_rows_in_memory(tc: Transcoder) -> None:
    idx = torch.tensor([5, 1, 5, 15, 0])
    for l in range(L):
        assert torch.equal(tc.decoder_rows(l, idx), tc.W_dec[l][idx])
    with pytest.raises(UserError):
        tc.decoder_rows(0, torch.tensor([F]))


def test_check_fits() -> None:
    tc = Transcoder.random(make_config("clt", "relu"))
    tc.check_fits(L, D, "tiny-model")
    with pytest.raises(ShapeMismatchError) as exc:
        tc.check_fits(L, 128, "x")
    assert "8" in str(exc.value) and "128" in str(exc.value) and "'x'" in str(exc.value)
    with pytest.raises(ShapeMismatchError) as exc:
        tc.check_fits(12, D)
    assert str(L) in str(exc.value) and "12" in str(exc.value)


def test_config_validation() -> None:
    with pytest.raises(UserError):
        TranscoderConfig("clt", L, D, F, "topk", k=None)
    with pytest.raises(UserError):
        TranscoderConfig("clt", L, D, F, "topk", k=F + 1)
    with pytest.raises(UserError):
        TranscoderConfig("clt", L, D, F, "relu", k=3)
    with pytest.raises(UserError):
        TranscoderConfig("mlp", L, D, F, "relu")


def test_gradients_flow_in_memory(resid: torch.Tensor) -> None:
    tc = Transcoder.random(make_config("clt", "relu"))
    tc(resid).square().sum().backward()
    assert tc.W_enc.grad is not None and tc.W_enc.grad.abs().sum() > 0
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in tc.W_dec)


# ------------------------------------------------------------------------------ files


def assert_same_transcoder(a: Transcoder, b: Transcoder) -> None:
    assert a.config == b.config
    assert torch.equal(a.W_enc, b.W_enc)
    assert torch.equal(a.b_enc, b.b_enc)
    assert torch.equal(a.b_dec, b.b_dec)
    if a.threshold is None:
        assert b.threshold is None
    else:
        assert torch.equal(a.threshold, b.threshold)
    for l in range(L):
        assert torch.equal(a._full_decoder(l), b._full_decoder(l))


def test_round_trip_exact(tc: Transcoder, resid: torch.Tensor, tmp_path: Path) -> None:
    save_transcoder(tc, tmp_path / "tc")
    back = load_transcoder(tmp_path / "tc")
    assert not back.is_lazy
    assert_same_transcoder(tc, back)
    with torch.no_grad():
        assert torch.equal(tc.encode(resid), back.encode(resid))
        assert torch.equal(tc(resid), back(resid))


def test_clt_file_names_and_shapes(tmp_path: Path) -> None:
    for activation in ("relu", "jumprelu", "topk"):
        tc = Transcoder.random(make_config("clt", activation))
        out = save_transcoder(tc, tmp_path / activation)
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["model_kind"] == "cross_layer_transcoder"
        assert cfg["model_name"] == "tiny-model"
        assert cfg["feature_input_hook"] == "hook_resid_mid"
        assert cfg["feature_output_hook"] == "hook_mlp_out"
        assert cfg["activation"] == activation
        assert cfg["k"] == (K if activation == "topk" else None)
        assert (cfg["n_layers"], cfg["d_model"], cfg["n_features"]) == (L, D, F)
        assert ("note" in cfg) == (activation == "topk")
        expected_files = {"config.yaml"} | {f"W_enc_{i}.safetensors" for i in range(L)} | {
            f"W_dec_{i}.safetensors" for i in range(L)}
        assert {p.name for p in out.iterdir()} == expected_files
        for i in range(L):
            with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            expected = {f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,)}
            if activation == "jumprelu":
                expected[f"threshold_{i}"] = (F,)
            assert shapes == expected and dtypes == {"F32"}
            with safe_open(str(out / f"W_dec_{i}.safetensors"), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert shapes == {f"W_dec_{i}": (F, L - i, D)}


def test_plt_file_names_and_shapes(tmp_path: Path) -> None:
    tc = Transcoder.random(make_config("plt", "jumprelu"))
    out = save_transcoder(tc, tmp_path / "plt", dtype=torch.bfloat16)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["activation"] == "jumprelu"
    assert {p.name for p in out.iterdir()} == {"config.yaml"} | {
        f"layer_{i}.safetensors" for i in range(L)}
    for i in range(L):
        with safe_open(str(out / f"layer_{i}.safetensors"), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert shapes == {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,),
                          "threshold": (F,)}
        assert dtypes == {"BF16"}
    # bf16 on disk loads back as the rounded fp32 values.
    back = load_transcoder(out)
    assert torch.equal(back.W_dec[1][:, 0], tc.W_dec[1][:, 0].detach().bfloat16().float())


def test_loads_public_style_config_without_extra_keys(tmp_path: Path, resid) -> None:
    """circuit-tracer's own configs lack n_layers/d_model/n_features (and maybe activation)."""
    tc = Transcoder.random(make_config("clt", "jumprelu"))
    out = save_transcoder(tc, tmp_path / "public")
    minimal = {"model_kind": "cross_layer_transcoder", "model_name": "tiny-model",
               "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    (out / "config.yaml").write_text(yaml.safe_dump(minimal))
    back = load_transcoder(out)
    assert back.config == tc.config  # sizes and JumpReLU inferred from the tensors
    with torch.no_grad():
        assert torch.equal(tc(resid), back(resid))


def test_lazy_matches_in_memory(tc: Transcoder, tmp_path: Path) -> None:
    out = save_transcoder(tc, tmp_path / "tc")
    eager = load_transcoder(out, lazy_decoder=False)
    lazy = load_transcoder(out, lazy_decoder=True)
    assert lazy.is_lazy and not eager.is_lazy and len(lazy.W_dec) == 0
    idx = torch.tensor([9, 2, 2, 15, 0, 3, 4, 9])  # unsorted, repeated, several runs
    with torch.no_grad():
        for l in range(L):
            assert torch.equal(lazy.decoder_rows(l, idx), eager.decoder_rows(l, idx))
            assert torch.equal(lazy.decoder_rows(l, idx), tc.W_dec[l][idx])
            assert lazy.decoder_rows(l, torch.tensor([], dtype=torch.long)).shape == (
                0, len(tc.targets(l)), D)
        for acts in (dense_acts(), sparse_acts()):
            assert torch.equal(lazy.decode(acts), eager.decode(acts))
            for l in range(L):
                assert torch.equal(lazy.writes(l, acts[l]), eager.writes(l, acts[l]))
    # Lazily read rows carry no gradient to any decoder parameter.
    assert not lazy.decoder_rows(0, idx).requires_grad


def test_lazy_save_copies_from_files(tmp_path: Path) -> None:
    tc = Transcoder.random(make_config("clt", "topk"))
    lazy = load_transcoder(save_transcoder(tc, tmp_path / "a"), lazy_decoder=True)
    back = load_transcoder(save_transcoder(lazy, tmp_path / "b"))
    assert_same_transcoder(tc, back)
    with pytest.raises(UserError):
        save_transcoder(lazy, tmp_path / "a")


def test_summary_reads_headers(tmp_path: Path) -> None:
    tc = Transcoder.random(make_config("clt", "topk"))
    out = save_transcoder(tc, tmp_path / "tc")
    s = transcoder_summary(out)
    assert (s["kind"], s["layers"], s["d_model"], s["features"]) == ("clt", L, D, F)
    assert (s["activation"], s["k"], s["model_name"]) == ("topk", K, "tiny-model")
    assert s["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())


def test_missing_directory_or_config(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nowhere"):
        load_transcoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="config.yaml"):
        load_transcoder(tmp_path / "empty")


def test_missing_layer_file(tmp_path: Path) -> None:
    out = save_transcoder(Transcoder.random(make_config("clt", "relu")), tmp_path / "tc")
    (out / "W_dec_1.safetensors").unlink()
    with pytest.raises(NotFoundError, match="W_dec_1.safetensors"):
        load_transcoder(out)


def test_wrong_shape_names_the_file(tmp_path: Path) -> None:
    out = save_transcoder(Transcoder.random(make_config("clt", "relu")), tmp_path / "tc")
    bad = out / "W_dec_2.safetensors"
    save_file({"W_dec_2": torch.zeros(F, 2, D)}, bad)  # layer 2 of 3 must be [F, 1, D]
    with pytest.raises(ShapeMismatchError, match="W_dec_2.safetensors") as exc:
        load_transcoder(out)
    assert "[16, 2, 8]" in str(exc.value) and "[16, 1, 8]" in str(exc.value)
    with pytest.raises(ShapeMismatchError, match="W_dec_2.safetensors"):
        transcoder_summary(out)


def test_wrong_tensor_names_the_file(tmp_path: Path) -> None:
    out = save_transcoder(Transcoder.random(make_config("clt", "relu")), tmp_path / "tc")
    f = out / "W_enc_1.safetensors"
    tensors = load_file(f)
    tensors["threshold_1"] = torch.zeros(F)  # thresholds in a ReLU transcoder
    save_file(tensors, f)
    with pytest.raises(UserError, match="W_enc_1.safetensors.*threshold_1"):
        load_transcoder(out)


def test_config_disagreeing_with_tensors(tmp_path: Path) -> None:
    out = save_transcoder(Transcoder.random(make_config("plt", "relu")), tmp_path / "tc")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["d_model"] = 12
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ShapeMismatchError, match="layer_0.safetensors"):
        load_transcoder(out)


def test_to_device_and_dtype(tmp_path: Path, resid) -> None:
    tc = Transcoder.random(make_config("clt", "relu"))
    moved = tc.to("cpu")
    assert moved.device.type == "cpu"
    lazy = load_transcoder(save_transcoder(tc, tmp_path / "tc"), lazy_decoder=True,
                           dtype=torch.float64)
    assert lazy.dtype == torch.float64
    assert lazy.decoder_rows(0, torch.tensor([1, 2])).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(lazy(resid.double()).float(), tc(resid))
