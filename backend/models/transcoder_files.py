"""Transcoders on disk in circuit-tracer's format (DESIGN.md section 4).

CLT directory (`model_kind: cross_layer_transcoder`), for each source layer i:
- `W_enc_{i}.safetensors` = {`W_enc_{i}` [F, d], `b_enc_{i}` [F], `b_dec_{i}` [d],
  `threshold_{i}` [F] (JumpReLU only)}
- `W_dec_{i}.safetensors` = {`W_dec_{i}` [F, L-i, d]}; row j of the middle axis writes to layer i+j.

Per-layer transcoder directory (`model_kind: transcoder_set`), for each layer i:
- `layer_{i}.safetensors` = {`W_enc` [F, d], `W_dec` [F, d], `b_enc` [F], `b_dec` [d],
  `threshold` [F] (JumpReLU only)}

`config.yaml` also carries `model_name`, `feature_input_hook: hook_resid_mid`,
`feature_output_hook: hook_mlp_out`, `activation`, `k`, and our own `n_layers`, `d_model`,
`n_features`. Public circuit-tracer CLTs lack the last three (and sometimes `activation`):
they are inferred from the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from backend.errors import NotFoundError, ShapeMismatchError, UserError
from backend.models.transcoder import Transcoder, TranscoderConfig

CLT_KIND = "cross_layer_transcoder"
PLT_KIND = "transcoder_set"
INPUT_HOOK = "hook_resid_mid"
OUTPUT_HOOK = "hook_mlp_out"
TOPK_NOTE = (
    "TopK activation: circuit-tracer's loader does not implement TopK (it applies ReLU, or "
    "JumpReLU when threshold tensors exist), so other tools will activate these features "
    "differently."
)
# Above this many bytes of decoder weights, `load_transcoder` leaves decoders on disk.
LAZY_DEFAULT_BYTES = 1 << 30

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ------------------------------------------------------------------------------ file names


def _clt_enc_file(i: int) -> str:
    return f"W_enc_{i}.safetensors"


def _clt_dec_file(i: int) -> str:
    return f"W_dec_{i}.safetensors"


def _plt_file(i: int) -> str:
    return f"layer_{i}.safetensors"


def _enc_names(kind: str, i: int, jumprelu: bool) -> dict[str, str]:
    """Our role -> the tensor's name in the file, for layer i's encoder side."""
    if kind == "clt":
        names = {"W_enc": f"W_enc_{i}", "b_enc": f"b_enc_{i}", "b_dec": f"b_dec_{i}"}
        if jumprelu:
            names["threshold"] = f"threshold_{i}"
    else:
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "b_dec": "b_dec"}
        if jumprelu:
            names["threshold"] = "threshold"
    return names


def _dec_name(kind: str, i: int) -> str:
    return f"W_dec_{i}" if kind == "clt" else "W_dec"


# ------------------------------------------------------------------------------ saving


def save_transcoder(tc: Transcoder, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `tc` as a circuit-tracer directory at `path` (created if needed); returns it.

    Tensors are cast to `dtype`, made contiguous and moved to the CPU. A lazily loaded
    transcoder is copied layer by layer from its files.
    """
    out = Path(path)
    source = getattr(tc, "_decoder_source", None)
    if isinstance(source, SafetensorsDecoderSource) and out.exists() and (
        out.resolve() == source.directory.resolve()
    ):
        raise UserError(f"cannot save a lazily loaded transcoder over its own files: {out}")
    out.mkdir(parents=True, exist_ok=True)
    c = tc.config
    jumprelu = c.activation == "jumprelu"

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype).contiguous()

    for i in range(c.n_layers):
        names = _enc_names(c.kind, i, jumprelu)
        enc = {names["W_enc"]: prep(tc.W_enc[i]), names["b_enc"]: prep(tc.b_enc[i]),
               names["b_dec"]: prep(tc.b_dec[i])}
        if jumprelu:
            enc[names["threshold"]] = prep(tc.threshold[i])
        dec = prep(tc._full_decoder(i))  # [F, n_targets, d]
        if c.kind == "clt":
            save_file(enc, out / _clt_enc_file(i), metadata={"format": "pt"})
            save_file({_dec_name("clt", i): dec}, out / _clt_dec_file(i), metadata={"format": "pt"})
        else:
            enc[_dec_name("plt", i)] = dec[:, 0].contiguous()  # PLT files hold W_dec as [F, d]
            save_file(enc, out / _plt_file(i), metadata={"format": "pt"})

    config = {
        "model_kind": CLT_KIND if c.kind == "clt" else PLT_KIND,
        "model_name": c.model_name,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "activation": c.activation,
        "k": c.k if c.activation == "topk" else None,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "n_features": c.n_features,
    }
    if c.activation == "topk":
        config["note"] = TOPK_NOTE
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# ------------------------------------------------------------------------------ inspecting


@dataclass(frozen=True)
class _Layout:
    """A checked directory: its config and, per layer, where each tensor lives."""

    directory: Path
    config: TranscoderConfig
    enc_files: list[Path]
    dec_files: list[Path]
    decoder_bytes: int
    size_bytes: int


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string), reading only the file's header."""
    if not file.is_file():
        raise NotFoundError(f"transcoder file not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (OSError, SafetensorError) as exc:  # truncated or not a safetensors file
        raise UserError(f"cannot read safetensors file {file}: {exc}") from exc


def _read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise NotFoundError(f"transcoder directory not found: {directory}")
    cfg_file = directory / "config.yaml"
    if not cfg_file.is_file():
        raise NotFoundError(f"transcoder config not found: {cfg_file}")
    try:
        raw = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {cfg_file}: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_file} must hold a mapping of keys to values")
    return raw


def _count_layers(directory: Path, pattern: str) -> int:
    """Number of layers, from files `pattern` (a regex with one group) numbered 0..L-1."""
    found = sorted(
        int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(pattern, p.name))
    )
    if not found:
        raise NotFoundError(f"no transcoder files matching {pattern!r} in {directory}")
    return found[-1] + 1  # gaps are reported as missing files below


def _expect_shape(file: Path, name: str, header: dict, shape: tuple[int, ...]) -> None:
    actual = header[name][0]
    if actual != shape:
        raise ShapeMismatchError(
            f"{file}: tensor {name!r} has shape {list(actual)}, expected {list(shape)}"
        )


def _inspect(path: str | Path) -> _Layout:
    """Read config.yaml and every tensor header; check names and shapes (no tensor data)."""
    directory = Path(path)
    raw = _read_config(directory)
    cfg_file = directory / "config.yaml"
    model_kind = raw.get("model_kind")
    if model_kind == CLT_KIND:
        kind = "clt"
        n_layers = raw.get("n_layers") or _count_layers(directory, r"W_enc_(\d+)\.safetensors")
        enc_files = [directory / _clt_enc_file(i) for i in range(n_layers)]
        dec_files = [directory / _clt_dec_file(i) for i in range(n_layers)]
    elif model_kind == PLT_KIND:
        kind = "plt"
        n_layers = raw.get("n_layers") or _count_layers(directory, r"layer_(\d+)\.safetensors")
        enc_files = [directory / _plt_file(i) for i in range(n_layers)]
        dec_files = list(enc_files)
    else:
        raise UserError(
            f"{cfg_file}: model_kind must be {CLT_KIND!r} or {PLT_KIND!r}, got {model_kind!r}"
        )
    for key, want in (("feature_input_hook", INPUT_HOOK), ("feature_output_hook", OUTPUT_HOOK)):
        if raw.get(key, want) != want:
            raise UserError(f"{cfg_file}: {key} is {raw[key]!r}; only {want!r} is supported")

    headers = [_read_header(f) for f in enc_files]
    dec_headers = [_read_header(f) for f in dec_files] if kind == "clt" else headers
    first = headers[0]
    w0 = _enc_names(kind, 0, False)["W_enc"]
    if w0 not in first or len(first[w0][0]) != 2:
        raise ShapeMismatchError(f"{enc_files[0]}: expected a 2-d tensor {w0!r} [F, d]")
    n_features = raw.get("n_features") or first[w0][0][0]
    d_model = raw.get("d_model") or first[w0][0][1]
    # circuit-tracer decides JumpReLU by the presence of thresholds; do the same when unset.
    thr0 = _enc_names(kind, 0, True)["threshold"]
    activation = raw.get("activation") or ("jumprelu" if thr0 in first else "relu")
    k = raw.get("k")
    try:
        config = TranscoderConfig(
            kind=kind, n_layers=int(n_layers), d_model=int(d_model), n_features=int(n_features),
            activation=activation, k=None if k is None else int(k),
            model_name=str(raw.get("model_name") or ""),
        )
    except UserError as exc:
        raise UserError(f"{cfg_file}: {exc}") from exc

    L, F, d = config.n_layers, config.n_features, config.d_model
    jumprelu = activation == "jumprelu"
    decoder_bytes = 0
    for i in range(L):
        names = _enc_names(kind, i, jumprelu)
        expected = set(names.values()) | ({_dec_name(kind, i)} if kind == "plt" else set())
        got = set(headers[i])
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            hint = ""
            if not jumprelu and any(n.startswith("threshold") for n in extra):
                hint = f" (thresholds present but activation is {activation!r})"
            raise UserError(
                f"{enc_files[i]}: tensors missing {missing}, unexpected {extra}{hint}"
            )
        shapes = {"W_enc": (F, d), "b_enc": (F,), "b_dec": (d,), "threshold": (F,)}
        for role, name in names.items():
            _expect_shape(enc_files[i], name, headers[i], shapes[role])
        dec_name = _dec_name(kind, i)
        if kind == "clt" and set(dec_headers[i]) != {dec_name}:
            raise UserError(
                f"{dec_files[i]}: expected exactly one tensor {dec_name!r}, "
                f"found {sorted(dec_headers[i])}"
            )
        dec_shape = (F, L - i, d) if kind == "clt" else (F, d)
        _expect_shape(dec_files[i], dec_name, dec_headers[i], dec_shape)
        n_elem = 1
        for s in dec_shape:
            n_elem *= s
        decoder_bytes += n_elem * _ITEMSIZE.get(dec_headers[i][dec_name][1], 4)

    files = {*enc_files, *dec_files, cfg_file}
    size = sum(f.stat().st_size for f in files)
    return _Layout(directory, config, enc_files, dec_files, decoder_bytes, size)


def transcoder_summary(path: str | Path) -> dict:
    """What a `models` listing shows, from config.yaml and tensor headers only.

    Returns {"path", "kind" ("clt"|"plt"), "model_name", "layers", "d_model", "features"
    (per layer), "activation", "k", "size_bytes" (on disk)}.
    """
    layout = _inspect(path)
    c = layout.config
    return {
        "path": str(layout.directory),
        "kind": c.kind,
        "model_name": c.model_name,
        "layers": c.n_layers,
        "d_model": c.d_model,
        "features": c.n_features,
        "activation": c.activation,
        "k": c.k,
        "size_bytes": layout.size_bytes,
    }


# ------------------------------------------------------------------------------ loading


class SafetensorsDecoderSource:
    """Decoder weights left in their safetensors files; rows are read on demand (read-only).

    Only the requested rows are read, as contiguous runs via `safe_open(...).get_slice`.
    """

    def __init__(self, directory: Path, kind: str, files: list[Path]):
        self.directory = directory
        self.kind = kind
        self.files = files

    def _slice_reader(self, layer: int):
        return safe_open(str(self.files[layer]), framework="pt")

    def read_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Rows `features` (sorted, unique int64 [n]) -> [n, n_targets(layer), d], CPU."""
        idx = features.reshape(-1).cpu()
        # Split the sorted indices into runs of consecutive rows: one read per run.
        breaks = (idx[1:] - idx[:-1] != 1).nonzero().squeeze(1) + 1
        starts = torch.cat([idx[:1], idx[breaks]]).tolist()
        ends = (torch.cat([idx[breaks - 1], idx[-1:]]) + 1).tolist()
        with self._slice_reader(layer) as f:
            sl = f.get_slice(_dec_name(self.kind, layer))
            rows = torch.cat([sl[a:b] for a, b in zip(starts, ends)])
        return rows if self.kind == "clt" else rows.unsqueeze(1)

    def read_all(self, layer: int) -> torch.Tensor:
        """The whole decoder of `layer`: [F, n_targets(layer), d], CPU."""
        with self._slice_reader(layer) as f:
            rows = f.get_tensor(_dec_name(self.kind, layer))
        return rows if self.kind == "clt" else rows.unsqueeze(1)


def load_transcoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    lazy_decoder: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Transcoder:
    """Load a circuit-tracer directory as a `Transcoder` on `device`, tensors cast to `dtype`.

    Every tensor's name and shape is checked first (headers only). With `lazy_decoder`
    (default: when decoders exceed 1 GiB) encoders are loaded but decoders stay on disk and
    are read row by row by `decoder_rows`, `writes` and `decode`.
    """
    layout = _inspect(path)
    c = layout.config
    lazy = layout.decoder_bytes > LAZY_DEFAULT_BYTES if lazy_decoder is None else lazy_decoder
    source = SafetensorsDecoderSource(layout.directory, c.kind, layout.dec_files) if lazy else None
    tc = Transcoder(c, decoder_source=source)
    jumprelu = c.activation == "jumprelu"
    with torch.no_grad():
        for i in range(c.n_layers):
            names = _enc_names(c.kind, i, jumprelu)
            with safe_open(str(layout.enc_files[i]), framework="pt") as f:
                # Copy layer by layer so peak memory stays at one layer above the parameters.
                tc.W_enc[i].copy_(f.get_tensor(names["W_enc"]))
                tc.b_enc[i].copy_(f.get_tensor(names["b_enc"]))
                tc.b_dec[i].copy_(f.get_tensor(names["b_dec"]))
                if jumprelu:
                    tc.threshold[i].copy_(f.get_tensor(names["threshold"]))
            if not lazy:
                with safe_open(str(layout.dec_files[i]), framework="pt") as f:
                    w = f.get_tensor(_dec_name(c.kind, i))
                tc.W_dec[i].copy_(w if c.kind == "clt" else w.unsqueeze(1))
    return tc.to(device=device, dtype=dtype)
