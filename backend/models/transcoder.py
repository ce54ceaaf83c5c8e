"""Cross-layer and per-layer transcoders: encode `resid_mid`, decode writes into `mlp_out`.

Index conventions used throughout (as in circuit-tracer):
- L = number of layers, F = features per layer, d = d_model; `...` = any leading dims
  (batch, position).
- A feature at source layer l writes into the `mlp_out` of its target layers
  `targets(l)`: range(l, L) for a cross-layer transcoder (CLT), [l] for a per-layer one (PLT).
- The decoder of source layer l is a tensor [F, n_targets(l), d]; row j of the middle axis
  writes into layer l + j.

The decoders of public CLTs are large (tens of GB), so they may live on disk instead of in
memory: a `DecoderSource` (see `transcoder_files.py`) then serves the rows that are needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from backend.errors import ShapeMismatchError, UserError

Kind = Literal["clt", "plt"]
Activation = Literal["relu", "jumprelu", "topk"]

KINDS: tuple[str, ...] = ("clt", "plt")
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")


@dataclass(frozen=True)
class TranscoderConfig:
    """Shape and activation of a transcoder.

    `n_features` counts features per layer; `k` is the number of features kept per row by
    TopK and must be None for the other activations.
    """

    kind: Kind
    n_layers: int
    d_model: int
    n_features: int
    activation: Activation
    k: int | None = None
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"transcoder kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"transcoder activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        for name in ("n_layers", "d_model", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"transcoder {name} must be a positive integer, got {value!r}")
        if self.activation == "topk":
            if self.k is None or not 0 < self.k <= self.n_features:
                raise UserError(
                    f"a TopK transcoder needs 0 < k <= n_features={self.n_features}, got k={self.k}"
                )
        elif self.k is not None:
            raise UserError(f"k is only meaningful for TopK, not for {self.activation}")

    def n_targets(self, layer: int) -> int:
        """How many layers a feature of source layer `layer` writes into."""
        return self.n_layers - layer if self.kind == "clt" else 1

    def to_dict(self) -> dict:
        return asdict(self)


class DecoderSource(Protocol):
    """Decoder weights kept outside memory (read-only); implemented in `transcoder_files`."""

    def read_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Rows `features` (sorted, unique, int64 [n]) of source layer `layer`'s decoder.

        Returns [n, n_targets(layer), d] on the CPU in the stored dtype.
        """
        ...

    def read_all(self, layer: int) -> torch.Tensor:
        """The whole decoder of source layer `layer`: [F, n_targets(layer), d], CPU."""
        ...


class Transcoder(nn.Module):
    """A CLT or PLT over L layers with F features each.

    Parameters (fp32 unless loaded otherwise):
    - `W_enc` [L, F, d], `b_enc` [L, F]: pre-activations of layer l are
      `resid_mid[l] @ W_enc[l].T + b_enc[l]`.
    - `threshold` [L, F] for JumpReLU, else None.
    - `W_dec`: ParameterList; `W_dec[l]` is [F, n_targets(l), d] (CLT: [F, L-l, d]; PLT:
      [F, 1, d]). Empty when the decoder is lazily backed by files (`is_lazy`).
    - `b_dec` [L, d]: bias added to target layer t's reconstruction.
    """

    def __init__(self, config: TranscoderConfig, decoder_source: DecoderSource | None = None):
        """Allocate uninitialised parameters (use `random` or a loader to fill them)."""
        super().__init__()
        self.config = config
        L, F, d = config.n_layers, config.n_features, config.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, d))
        self.b_enc = nn.Parameter(torch.empty(L, F))
        self.b_dec = nn.Parameter(torch.empty(L, d))
        if config.activation == "jumprelu":
            self.threshold: nn.Parameter | None = nn.Parameter(torch.empty(L, F))
        else:
            self.register_parameter("threshold", None)
        self._decoder_source = decoder_source
        if decoder_source is None:
            self.W_dec = nn.ParameterList(
                [nn.Parameter(torch.empty(F, config.n_targets(l), d)) for l in range(L)]
            )
        else:
            self.W_dec = nn.ParameterList()

    # ----------------------------------------------------------------------------- basics

    @classmethod
    def random(cls, config: TranscoderConfig, seed: int = 0, scale: float = 1.0) -> Transcoder:
        """A random transcoder for tests and as a training start.

        W_enc ~ N(0, scale^2/d) so pre-activations of unit-variance inputs have variance
        ~scale^2; W_dec ~ N(0, scale^2/(F*L)) so the summed writes stay O(scale); biases are
        small, JumpReLU thresholds lie in [0.1, 0.6]*scale (positive, so they bite).
        """
        tc = cls(config)
        gen = torch.Generator().manual_seed(seed)
        L, F, d = config.n_layers, config.n_features, config.d_model
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(L, F, d, generator=gen) * (scale / math.sqrt(d)))
            tc.b_enc.copy_(torch.randn(L, F, generator=gen) * (0.01 * scale))
            tc.b_dec.copy_(torch.randn(L, d, generator=gen) * (0.01 * scale))
            dec_std = scale / math.sqrt(F * L)
            for w in tc.W_dec:
                w.copy_(torch.randn(w.shape, generator=gen) * dec_std)
            if tc.threshold is not None:
                tc.threshold.copy_((0.1 + 0.5 * torch.rand(L, F, generator=gen)) * scale)
        return tc

    @property
    def is_lazy(self) -> bool:
        """True when decoders are read from files on demand instead of held in memory."""
        return self._decoder_source is not None

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_features(self) -> int:
        return self.config.n_features

    def targets(self, layer: int) -> range:
        """Target layers that features of source layer `layer` write into."""
        self._check_layer(layer)
        if self.config.kind == "clt":
            return range(layer, self.config.n_layers)
        return range(layer, layer + 1)

    def check_fits(self, n_layers: int, d_model: int, model_name: str = "") -> None:
        """Raise ShapeMismatchError unless this transcoder fits a model of that shape."""
        model = f"model {model_name!r}" if model_name else "the model"
        if d_model != self.config.d_model:
            raise ShapeMismatchError(
                f"transcoder has d_model={self.config.d_model} but {model} has d_model={d_model}"
            )
        if n_layers != self.config.n_layers:
            raise ShapeMismatchError(
                f"transcoder has n_layers={self.config.n_layers} but {model} has "
                f"n_layers={n_layers}"
            )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.config.n_layers:
            raise UserError(f"layer {layer} out of range [0, {self.config.n_layers})")

    def _check_last_dim(self, x: torch.Tensor, size: int, what: str) -> None:
        if x.shape[-1] != size:
            raise ShapeMismatchError(
                f"{what} has last dimension {x.shape[-1]}, the transcoder expects {size}"
            )

    # ----------------------------------------------------------------------------- encoder

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] (resid_mid of `layer`) -> pre-activations [..., F].

        x @ W_enc[l].T + b_enc[l]; like circuit-tracer, b_dec is not subtracted first.
        """
        self._check_layer(layer)
        self._check_last_dim(x, self.config.d_model, "resid_mid")
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """pre-activations [..., F] -> activations [..., F].

        relu: max(pre, 0); jumprelu: pre * (pre > threshold[l]) (circuit-tracer's JumpReLU);
        topk: the k largest pre-activations of each row, relu'd, zero elsewhere.
        """
        act = self.config.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold[layer]).to(pre.dtype)
        values, idx = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] (resid_mid of `layer`) -> activations [..., F]."""
        return self.activate(layer, self.pre_activations(layer, x))

    def encode(self, resid_mid: torch.Tensor) -> torch.Tensor:
        """resid_mid [L, ..., d] -> activations [L, ..., F]."""
        if resid_mid.shape[0] != self.config.n_layers:
            raise ShapeMismatchError(
                f"resid_mid has {resid_mid.shape[0]} layers, the transcoder has "
                f"{self.config.n_layers}"
            )
        return torch.stack([self.encode_layer(l, resid_mid[l]) for l in range(self.n_layers)])

    # ----------------------------------------------------------------------------- decoder

    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows of `features` (int64 [n], any order, repeats allowed) of source layer
        `layer` -> [n, n_targets(layer), d], in the transcoder's dtype and device.

        In lazy mode only those rows are read from disk (no gradients).
        """
        self._check_layer(layer)
        features = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        if features.numel() and not (
            0 <= int(features.min()) and int(features.max()) < self.config.n_features
        ):
            raise UserError(
                f"feature index out of range [0, {self.config.n_features}) at layer {layer}"
            )
        if not self.is_lazy:
            return self.W_dec[layer].index_select(0, features.to(self.device))
        n_t = self.config.n_targets(layer)
        if features.numel() == 0:
            return torch.zeros(0, n_t, self.d_model, dtype=self.dtype, device=self.device)
        # Files are read in index order, in contiguous runs; then the caller's order is restored.
        unique, inverse = torch.unique(features.cpu(), sorted=True, return_inverse=True)
        rows = self._decoder_source.read_rows(layer, unique)
        return rows.to(device=self.device, dtype=self.dtype)[inverse.to(self.device)]

    def _full_decoder(self, layer: int) -> torch.Tensor:
        """[F, n_targets(layer), d]: the parameter, or a read-only copy from disk."""
        if not self.is_lazy:
            return self.W_dec[layer]
        return self._decoder_source.read_all(layer).to(device=self.device, dtype=self.dtype)

    def _source_writes(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        """acts [N, F] of source layer `layer` -> writes [N, n_targets(layer), d] (no bias).

        When at most half the features are active anywhere in `acts`, only their decoder rows
        are used (and, in lazy mode, read). The rule is the same in memory and in lazy mode,
        so both give bit-identical results.
        """
        n_t, d = self.config.n_targets(layer), self.config.d_model
        active = (acts != 0).any(dim=0).nonzero().squeeze(1)
        if active.numel() == 0:
            return acts.new_zeros(acts.shape[0], n_t, d)
        if active.numel() <= self.config.n_features // 2:
            rows = self.decoder_rows(layer, active)
            acts = acts.index_select(1, active)
        else:
            rows = self._full_decoder(layer)
        return (acts @ rows.reshape(rows.shape[0], n_t * d)).reshape(-1, n_t, d)

    def writes(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        """acts [..., F] of source layer `layer` -> writes [n_targets(layer), ..., d].

        writes[j] is what these features add to `mlp_out` of layer `layer + j` (no bias).
        """
        self._check_layer(layer)
        self._check_last_dim(acts, self.config.n_features, "acts")
        lead = acts.shape[:-1]
        out = self._source_writes(layer, acts.reshape(-1, self.config.n_features))
        return out.transpose(0, 1).reshape(out.shape[1], *lead, self.config.d_model)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [L, ..., F] -> reconstructed mlp_out [L, ..., d].

        recon[t] = b_dec[t] + sum over sources l with t in targets(l) of
        acts[l] @ W_dec[l][:, t - l, :]. In lazy mode one source layer is read at a time.
        """
        L, F, d = self.config.n_layers, self.config.n_features, self.config.d_model
        if acts.shape[0] != L:
            raise ShapeMismatchError(f"acts has {acts.shape[0]} layers, the transcoder has {L}")
        self._check_last_dim(acts, F, "acts")
        lead = acts.shape[1:-1]
        flat = acts.reshape(L, -1, F)
        recon = [self.b_dec[t].expand(flat.shape[1], d) for t in range(L)]
        for l in range(L):
            w = self._source_writes(l, flat[l])
            for j, t in enumerate(self.targets(l)):
                recon[t] = recon[t] + w[:, j]
        return torch.stack(recon).reshape(L, *lead, d)

    def forward(self, resid_mid: torch.Tensor) -> torch.Tensor:
        """resid_mid [L, ..., d] -> reconstructed mlp_out [L, ..., d]."""
        return self.decode(self.encode(resid_mid))

    def extra_repr(self) -> str:
        c = self.config
        lazy = ", lazy decoder" if self.is_lazy else ""
        k = f", k={c.k}" if c.k is not None else ""
        return (
            f"kind={c.kind}, n_layers={c.n_layers}, d_model={c.d_model}, "
            f"n_features={c.n_features}, activation={c.activation}{k}{lazy}"
        )
