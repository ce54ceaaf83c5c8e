"""Lazy (row-sparse) Adam for the CLT decoder: a step touches only the rows that were active.

A decoder row W_dec[l][f] gets a gradient only from tokens where feature f fired (or, through
AuxK, was among the top dead features), so with F features per layer and B*k activations per
batch most rows of a large CLT have an exactly zero gradient in a given step. Dense Adam still
reads and writes the parameter, its gradient and both moments for every row; this optimiser
updates only the rows with a non-zero gradient, each with its own step count t_r:

    m_r <- b1 m_r + (1 - b1) g_r,   v_r <- b2 v_r + (1 - b2) g_r^2,   t_r <- t_r + 1
    p_r <- p_r - lr * (m_r / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)

A row active at every step so far gets exactly dense Adam's update (same t, same moments); an
inactive row keeps its parameters and moments (dense Adam would decay the moments and still move
the row by the decayed momentum: "lazy" in the sense of TensorFlow's LazyAdam and of
`torch.optim.SparseAdam`, which however counts steps globally). Rows are the first dimension of
each parameter; the encoder and biases, whose gradients are dense, stay with ordinary Adam.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows (dim 0) of each parameter whose gradient is non-zero, t per row.

    params: tensors [R, ...]; lr, betas, eps as torch.optim.Adam (no weight decay).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0:
            raise ValueError(f"invalid LazyAdam settings lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @staticmethod
    def active_rows(grad: torch.Tensor) -> torch.Tensor:
        """Indices [n] of the rows of `grad` [R, ...] with any non-zero entry."""
        return grad.reshape(grad.shape[0], -1).ne(0).any(1).nonzero().squeeze(1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("LazyAdam takes dense gradients (zero rows are skipped)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                rows = self.active_rows(p.grad)
                if rows.numel() == 0:
                    continue
                g = p.grad.index_select(0, rows)
                t = state["step"].index_add_(0, rows, torch.ones_like(rows))[rows]  # [n]
                m = state["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                shape = (-1,) + (1,) * (p.dim() - 1)
                bias1 = (1 - b1 ** t.to(p.dtype)).view(shape)
                bias2 = (1 - b2 ** t.to(p.dtype)).view(shape)
                update = (m / bias1) / ((v / bias2).sqrt_().add_(eps))
                p.index_add_(0, rows, update, alpha=-lr)
        return loss
