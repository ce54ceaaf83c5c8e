"""Per-architecture hook points, additive patches, gradients and linearisation.

Hook points (TransformerLens names):
- ``resid_mid[l]``: the residual stream entering layer l's MLP block, before its pre-norm;
- ``mlp_out[l]``: what layer l's MLP block adds to the residual stream (for Gemma-2/3 after
  ``post_feedforward_layernorm``).

Linearisation, as in circuit-tracer's ReplacementModel: attention patterns and normalisation
scales are treated as constants for gradients (their forward values are unchanged), so that the
gradient of the metric at ``mlp_out`` is the exact effect of a small additive write there.

Everything is done with PyTorch module hooks and transformers' public ``AttentionInterface``
registration; no library object is modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from backend.errors import UserError

ATTN_IMPLEMENTATION = "piescope"
GradMode = Literal["replacement", "full"]


# --------------------------------------------------------------------------------------------
# Attention: eager attention whose pattern can be detached (linearised), recorded or replaced.


@dataclass
class AttentionControl:
    """What the attention function does on this forward pass.

    linearise: detach the softmax pattern, so gradients flow only through the values.
    record: when a dict, patterns are stored in it by layer index ([B, H, Tq, Tk]).
    override: patterns to use instead of computing them (layer index -> [B, H, Tq, Tk]).
    """

    linearise: bool = False
    record: dict[int, Tensor] | None = None
    override: dict[int, Tensor] | None = None


_ATTENTION: ContextVar[AttentionControl] = ContextVar("piescope_attention", default=AttentionControl())


def piescope_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, softcap: float | None = None,
                       **_: object) -> tuple[Tensor, Tensor]:
    """Eager attention (the same arithmetic as transformers' eager path) with pattern control.

    query [B, H, Tq, dh]; key, value [B, Hkv, Tk, dh] (grouped-query attention repeats k/v
    over the H // Hkv query heads that share them); returns ([B, Tq, H, dh], pattern).
    """
    control = _ATTENTION.get()
    layer = getattr(module, "layer_idx", None)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if control.override is not None and layer in control.override:
        pattern = control.override[layer].to(value.dtype)
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask[..., : key.shape[-2]]
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if control.linearise:
        pattern = pattern.detach()
    if control.record is not None and layer is not None:
        control.record[layer] = pattern.detach()
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(ATTN_IMPLEMENTATION, piescope_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# --------------------------------------------------------------------------------------------
# Normalisation with a frozen scale.


def norm_scale(module: nn.Module, x: Tensor) -> Tensor:
    """The per-token scale 1/rms (or 1/std for LayerNorm) that a norm module applies: [..., 1]."""
    xf = x.float()
    if isinstance(module, nn.LayerNorm):
        xf = xf - xf.mean(-1, keepdim=True)
        return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def norm_with_scale(module: nn.Module, x: Tensor, scale: Tensor) -> Tensor:
    """The norm's output computed with a given (constant) scale: linear in x."""
    if isinstance(module, nn.LayerNorm):
        out = (x - x.mean(-1, keepdim=True)) * scale.to(x.dtype)
        if module.weight is not None:
            out = out * module.weight
        return out + module.bias if module.bias is not None else out
    weight = module.weight.float()
    # Gemma's RMSNorm multiplies by (1 + weight); Llama/Qwen's by weight.
    gain = 1.0 + weight if type(module).__name__.startswith("Gemma") else weight
    return (x.float() * scale * gain).to(x.dtype)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _linearised_norm_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Keep the norm's value, but let gradients see it as x -> x * scale with scale constant."""
    x = args[0]
    linear = norm_with_scale(module, x, norm_scale(module, x).detach())
    return output.detach() + (linear - linear.detach())


# --------------------------------------------------------------------------------------------
# Architectures.


@dataclass(frozen=True)
class ArchSpec:
    """Where the hook points live in one transformers architecture."""

    family: str
    layers: Callable[[PreTrainedModel], nn.ModuleList]
    body: Callable[[PreTrainedModel], nn.Module]
    resid_mid_input: str  # submodule of a layer whose input is resid_mid
    mlp_out_output: str   # submodule of a layer whose output is mlp_out
    final_norm: Callable[[PreTrainedModel], nn.Module] = lambda m: m.model.norm
    attn: str = "self_attn"              # the attention submodule of a layer
    attn_input_norm: str = "input_layernorm"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # one name when fused (GPT-2's c_attn)
    o_proj: str = "o_proj"
    attn_post_norm: str | None = None    # Gemma-2/3 normalise the heads' sum before the residual


def _hf_layers(m: PreTrainedModel) -> nn.ModuleList:
    return m.model.layers


ARCHITECTURES: dict[str, ArchSpec] = {
    "gemma3_text": ArchSpec("gemma3", _hf_layers, lambda m: m.model,
                            "pre_feedforward_layernorm", "post_feedforward_layernorm",
                            attn_post_norm="post_attention_layernorm"),
    "gemma2": ArchSpec("gemma2", _hf_layers, lambda m: m.model,
                       "pre_feedforward_layernorm", "post_feedforward_layernorm",
                       attn_post_norm="post_attention_layernorm"),
    "llama": ArchSpec("llama", _hf_layers, lambda m: m.model, "post_attention_layernorm", "mlp"),
    "qwen2": ArchSpec("qwen2", _hf_layers, lambda m: m.model, "post_attention_layernorm", "mlp"),
    "qwen3": ArchSpec("qwen3", _hf_layers, lambda m: m.model, "post_attention_layernorm", "mlp"),
    "gpt2": ArchSpec("gpt2", lambda m: m.transformer.h, lambda m: m.transformer, "ln_2", "mlp",
                     final_norm=lambda m: m.transformer.ln_f, attn="attn", attn_input_norm="ln_1",
                     qkv=("c_attn",), o_proj="c_proj"),
}


@dataclass
class RunOutput:
    """What one forward pass returns.

    logits: [B, V] at ``last_pos`` (or [B, T, V] with ``logits_at="all"``; [B, K] with ``columns``).
    hidden: [B, T, d] final-normed hidden states with ``logits_at="none"`` (logits still at last_pos).
    resid_mid, mlp_out: [L, B, T, d] when captured, else None.
    mlp_out_leaves: per layer, the tensors whose ``.grad`` is dM/d mlp_out (gradient runs).
    """

    logits: Tensor
    hidden: Tensor | None = None
    resid_mid: Tensor | None = None
    mlp_out: Tensor | None = None
    mlp_out_leaves: list[Tensor] = field(default_factory=list)

    def mlp_out_grads(self) -> Tensor:
        """[L, B, T, d] gradients at every mlp_out after ``backward()``."""
        return torch.stack([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                            for leaf in self.mlp_out_leaves])


@dataclass
class SparsePatch:
    """Additive patches at a few rows of mlp_out, for many patched variants in one batch.

    rows[l]: [m] indices into the flattened (batch * position) rows of layer l's mlp_out;
    values[l]: [m, d] what to add there (repeated rows accumulate).
    """

    rows: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)

    def add(self, layer: int, rows: Tensor, values: Tensor) -> None:
        if layer in self.rows:
            rows = torch.cat([self.rows[layer], rows])
            values = torch.cat([self.values[layer], values])
        self.rows[layer], self.values[layer] = rows, values

    def apply(self, layer: int, output: Tensor) -> Tensor:
        if layer not in self.rows:
            return output
        flat = output.reshape(-1, output.shape[-1])
        return flat.index_add(0, self.rows[layer], self.values[layer].to(output.dtype)).view_as(output)


Patch = Tensor | dict[int, Tensor] | SparsePatch


# --------------------------------------------------------------------------------------------
# Composable interventions: each attaches its own hooks for one forward pass and keeps what it
# records. ``ModelAdapter.run`` attaches them in order (a later hook on the same module sees the
# earlier one's output), so PIE's feature patches and the edge patches share one forward path.


class Intervention:
    """One change to a forward pass. ``attach`` registers hooks and returns their handles."""

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        raise NotImplementedError

    def attention_control(self, control: AttentionControl) -> AttentionControl:
        """The attention control for the pass (default: unchanged)."""
        return control


class Linearise(Intervention):
    """Freeze attention patterns and normalisation scales for gradients (values unchanged).

    Attach it first: on Gemma the mlp_out module is itself a norm, and patches and gradient
    leaves must apply to the linearised norm's output, not under it.
    """

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        return [m.register_forward_hook(_linearised_norm_hook) for m in adapter.model.modules() if is_norm(m)]

    def attention_control(self, control: AttentionControl) -> AttentionControl:
        return control if control.linearise else AttentionControl(True, control.record, control.override)


class AddPatch(Intervention):
    """Add to mlp_out: a tensor [L, B, T, d], {layer: [B, T, d]} or a SparsePatch."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if isinstance(self.patch, SparsePatch):
                return self.patch.apply(layer, output)
            if isinstance(self.patch, Tensor) or layer in self.patch:
                return output + self.patch[layer].to(output.dtype)
            return output
        return hook

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        return [adapter.mlp_out_module(l).register_forward_hook(self._hook(l)) for l in range(adapter.n_layers)]


class GradLeaves(Intervention):
    """Gradient leaves at mlp_out: ``leaves[l].grad`` is dM/d mlp_out_l after backward.

    replacement: mlp_out becomes a leaf detached from its inputs (downstream MLPs do not see
    upstream writes); full: a zero leaf is added, so gradients also flow through later MLPs.
    """

    def __init__(self, mode: GradMode) -> None:
        self.mode = mode
        self.leaves: dict[int, Tensor] = {}

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if self.mode == "replacement":
                output = output.detach().requires_grad_(True)
                self.leaves[layer] = output
                return output
            leaf = torch.zeros_like(output, requires_grad=True)
            self.leaves[layer] = leaf
            return output + leaf
        return hook

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        return [adapter.mlp_out_module(l).register_forward_hook(self._hook(l)) for l in range(adapter.n_layers)]


class Capture(Intervention):
    """Record resid_mid[l] and mlp_out[l] ([B, T, d] each) as the forward passes them."""

    def __init__(self) -> None:
        self.resid_mid: dict[int, Tensor] = {}
        self.mlp_out: dict[int, Tensor] = {}

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        handles = []
        for layer in range(adapter.n_layers):
            def mid(module, args, layer=layer):
                self.resid_mid[layer] = args[0]

            def out(module, args, output, layer=layer):
                self.mlp_out[layer] = output
            handles.append(adapter.resid_mid_module(layer).register_forward_pre_hook(mid))
            handles.append(adapter.mlp_out_module(layer).register_forward_hook(out))
        return handles


class PatternControl(Intervention):
    """Use a given AttentionControl (override or record patterns) on this pass."""

    def __init__(self, control: AttentionControl) -> None:
        self.control = control

    def attach(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        return []

    def attention_control(self, control: AttentionControl) -> AttentionControl:
        return self.control


@dataclass(frozen=True)
class HeadWeights:
    """One layer's attention projections per head, in one layout for every architecture.

    wq [H, dh, d], wk / wv [G, dh, d] (G kv heads), biases [H, dh] / [G, dh] or None;
    wo [H, d, dh] (head h's slice of the output projection) and its bias bo [d] or None.
    """

    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None
    wv: Tensor
    bv: Tensor | None
    wo: Tensor
    bo: Tensor | None


class ModelAdapter:
    """A Hugging Face causal LM with PIEscope's hook points.

    ``run`` is the single entry point: optional additive patches at every ``mlp_out``, optional
    capture of ``resid_mid`` and ``mlp_out``, optional linearisation, and optional gradient
    leaves at ``mlp_out`` for the replacement or full gradient (DESIGN section 3).
    """

    def __init__(self, model: PreTrainedModel, tokenizer=None, name: str = "") -> None:
        model_type = model.config.model_type
        if model_type not in ARCHITECTURES:
            raise UserError(f"architecture '{model_type}' is not supported; "
                            f"supported: {', '.join(sorted(ARCHITECTURES))}")
        self.spec = ARCHITECTURES[model_type]
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", "") or model_type
        self.layers = self.spec.layers(model)
        self.body = self.spec.body(model)
        self.n_layers = len(self.layers)
        self.d_model = int(model.config.hidden_size)
        self.d_vocab = int(model.config.vocab_size)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    # -- hook points ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def resid_mid_module(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.resid_mid_input)

    def mlp_out_module(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.mlp_out_output)

    def unembed(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states [..., d] -> logits [..., V] (with Gemma-2's softcap)."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def unembed_columns(self, hidden: Tensor, columns: Tensor) -> Tensor:
        """The logits of vocabulary entries ``columns`` only: hidden [N, d], columns [N, K] -> [N, K].

        N*K*d work instead of N*V*d, for metrics that read a few logits (a logit difference);
        entries of ``columns`` < 0 are padding and give 0.
        """
        ids = columns.clamp(min=0)
        rows = self.unembedding[ids]                                          # [N, K, d]
        logits = torch.einsum("nd,nkd->nk", hidden.to(rows.dtype), rows)
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.masked_fill(columns < 0, 0.0)

    @property
    def unembedding(self) -> Tensor:
        """W_U [V, d]: the unembedding matrix (for logit-lens readings)."""
        return self.model.get_output_embeddings().weight

    # -- the attention block (edge readers and writers) ------------------------------------
    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.model.config, "head_dim", None) or self.d_model // self.n_heads)

    def attn_module(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.attn)

    def attn_input_norm(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.spec.attn_input_norm)

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        name = self.spec.attn_post_norm
        return getattr(self.layers[layer], name) if name else None

    def qkv_modules(self, layer: int) -> list[nn.Module]:
        return [getattr(self.attn_module(layer), n) for n in self.spec.qkv]

    def o_proj_module(self, layer: int) -> nn.Module:
        return getattr(self.attn_module(layer), self.spec.o_proj)

    def final_norm(self) -> nn.Module:
        return self.spec.final_norm(self.model)

    def head_weights(self, layer: int) -> HeadWeights:
        """Per-head q/k/v/o weights of layer ``layer`` (see HeadWeights for the layout)."""
        H, G, dh, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        mods = self.qkv_modules(layer)
        o = self.o_proj_module(layer)
        if len(mods) == 1:  # GPT-2's Conv1D: y = x @ W + b, W [d, 3d] with q | k | v columns
            w, b = mods[0].weight, mods[0].bias
            wq, wk, wv = (w[:, i * d:(i + 1) * d].T.reshape(H, dh, d) for i in range(3))
            bq, bk, bv = (b[i * d:(i + 1) * d].reshape(H, dh) for i in range(3))
            wo = o.weight.reshape(H, dh, d).permute(0, 2, 1)   # Conv1D W [H*dh, d]
            return HeadWeights(wq, bq, wk, bk, wv, bv, wo, o.bias)

        def split(lin: nn.Module, n: int) -> tuple[Tensor, Tensor | None]:
            bias = lin.bias.reshape(n, dh) if lin.bias is not None else None
            return lin.weight.reshape(n, dh, d), bias
        (wq, bq), (wk, bk), (wv, bv) = split(mods[0], H), split(mods[1], G), split(mods[2], G)
        wo = o.weight.reshape(d, H, dh).permute(1, 0, 2)       # Linear W [d, H*dh]
        return HeadWeights(wq, bq, wk, bk, wv, bv, wo, o.bias)

    # -- the forward pass ----------------------------------------------------------------------
    def run(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
            last_pos: Tensor | None = None, patch: Patch | None = None,
            capture: bool = False, linearise: bool = False, grad: GradMode | None = None,
            logits_at: Literal["last", "all", "none"] = "last",
            attention: AttentionControl | None = None, cache: object | None = None,
            interventions: Sequence[Intervention] = (), columns: Tensor | None = None) -> RunOutput:
        """One forward pass.

        input_ids, attention_mask: [B, T], right-padded. last_pos: [B] index of each row's last
        real token (defaults to T-1, or the mask's last 1).
        patch: added to mlp_out: a tensor [L, B, T, d], {layer: [B, T, d]} or a SparsePatch.
        grad: ``"replacement"`` makes every mlp_out a leaf detached from its inputs (a write
        reaches the metric only through the residual stream and attention; downstream MLPs see
        it not at all); ``"full"`` adds a zero leaf so gradients also flow through later MLPs.
        Either way ``RunOutput.mlp_out_leaves[l].grad`` is dM/d mlp_out_l after backward.
        Gradient runs need ``torch.enable_grad()``; other runs are fine under no_grad.
        cache: a transformers ``DynamicCache`` for greedy generation: the keys and values of this
        pass are appended to it, and input_ids are the tokens that follow those it already holds
        (patches then cover only these new positions). Unpadded inputs only.
        The flags are shorthands for interventions (Linearise, AddPatch, GradLeaves, Capture),
        attached in that order before ``interventions`` (e.g. an edge patch).
        columns: [B, K] vocabulary ids: the logits are only those at last_pos ([B, K]).
        """
        if last_pos is None:
            last_pos = (attention_mask.sum(-1) - 1 if attention_mask is not None
                        else torch.full((input_ids.shape[0],), input_ids.shape[1] - 1))
        chain: list[Intervention] = []
        if attention is not None:
            chain.append(PatternControl(attention))
        if linearise:
            chain.append(Linearise())
        if patch is not None:
            chain.append(AddPatch(patch))
        leaves = GradLeaves(grad) if grad is not None else None
        captured = Capture() if capture else None
        chain += [i for i in (leaves, captured) if i is not None]
        chain += list(interventions)
        hidden = self.forward_with(chain, input_ids, attention_mask, cache=cache)

        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if columns is not None:
            result = RunOutput(logits=self.unembed_columns(hidden[rows, last_pos.to(hidden.device)],
                                                           columns.to(hidden.device)))
        elif logits_at == "none":  # final-normed hidden states; unembed later, in chunks
            result = RunOutput(logits=self.unembed(hidden[rows, last_pos.to(hidden.device)]), hidden=hidden)
        elif logits_at == "last":
            result = RunOutput(logits=self.unembed(hidden[rows, last_pos.to(hidden.device)]))
        else:
            result = RunOutput(logits=self.unembed(hidden))
        if captured is not None:
            result.resid_mid = torch.stack([captured.resid_mid[l] for l in range(self.n_layers)])
            result.mlp_out = torch.stack([captured.mlp_out[l] for l in range(self.n_layers)])
        if leaves is not None:
            result.mlp_out_leaves = [leaves.leaves[l] for l in range(self.n_layers)]
        return result

    def forward_with(self, interventions: Sequence[Intervention], input_ids: Tensor,
                     attention_mask: Tensor | None, cache: object | None = None) -> Tensor:
        """The body's final-normed hidden states [B, T, d] with ``interventions`` attached.

        cache: an optional transformers ``DynamicCache`` (see ``run``)."""
        handles: list[RemovableHandle] = []
        control = _ATTENTION.get()
        try:
            for intervention in interventions:
                handles += intervention.attach(self)
                control = intervention.attention_control(control)
            token = _ATTENTION.set(control)
            try:
                extra = {} if cache is None else {"cache": cache}
                return self.body(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=cache is not None, **extra).last_hidden_state
            finally:
                _ATTENTION.reset(token)
        finally:
            for h in handles:
                h.remove()

    def mlp_out_gradients(self, input_ids: Tensor, attention_mask: Tensor | None,
                          metric: Callable[[Tensor], Tensor], *, last_pos: Tensor | None = None,
                          mode: GradMode = "replacement", linearise: bool = True,
                          capture: bool = True) -> tuple[RunOutput, Tensor]:
        """dM/d mlp_out at every layer and position from one forward and one backward.

        metric: last-position logits [B, V] -> [B]; rows are independent, so the sum's gradient
        gives each row its own gradient. Returns (run output, grads [L, B, T, d]).
        """
        with torch.enable_grad():
            out = self.run(input_ids, attention_mask, last_pos=last_pos, capture=capture,
                           linearise=linearise, grad=mode)
            metric(out.logits).sum().backward()
        grads = out.mlp_out_grads()
        out.logits = out.logits.detach()
        if capture:
            out.resid_mid, out.mlp_out = out.resid_mid.detach(), out.mlp_out.detach()
        out.mlp_out_leaves = []
        return out, grads

    @contextlib.contextmanager
    def recording_patterns(self) -> Iterator[dict[int, Tensor]]:
        """Record every layer's attention pattern ([B, H, Tq, Tk]) on the passes inside."""
        record: dict[int, Tensor] = {}
        token = _ATTENTION.set(AttentionControl(record=record))
        try:
            yield record
        finally:
            _ATTENTION.reset(token)
