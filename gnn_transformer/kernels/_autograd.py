"""The one autograd function of every kernel: ``(out, lse)`` forward, backward from the saved
log-sum-exp.

A kernel is a pair of plain functions over a graph structure (a CSR graph or a tile list):

- ``forward(q, k, v, bias, structure, scale, **options) -> (out, lse)``;
- ``backward(q, k, v, bias, structure, scale, out, lse, dout, dlse, need_bias, **options)
  -> (dq, dk, dv, dbias)``, where ``dlse`` may be ``None`` (the log-sum-exp was not used).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Kernel(NamedTuple):
    """A kernel's forward and backward functions (see the module docstring)."""
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]]


class KernelAttention(torch.autograd.Function):
    """Differentiable ``(out, lse)`` of a :class:`Kernel` in ``q``, ``k``, ``v`` and ``bias``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kernel: Kernel, structure: Any, scale: float, options: dict):
        out, lse = kernel.forward(q, k, v, bias, structure, scale, **options)
        ctx.set_materialize_grads(False)  # an unused lse sends None, not zeros
        guards = structure.guards() if hasattr(structure, "guards") else ()  # views of edge_index
        ctx.save_for_backward(q, k, v, bias, out, lse, *guards)
        ctx.kernel, ctx.structure, ctx.scale, ctx.options = kernel, structure, scale, options
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors[:6]  # unpacking the guards checks their versions
        if dout is None:
            dout = torch.zeros_like(out)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = ctx.kernel.backward(q, k, v, bias, ctx.structure, ctx.scale, out, lse,
                                                dout, dlse, need_bias, **ctx.options)
        return dq, dk, dv, dbias, None, None, None, None


def softmax_delta(out: Tensor, dout: Tensor, dlse: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``delta_i = dO_i . O_i - dlse_i`` ``[N_dst, H]`` in ``dtype``: the per-target term of the
    softmax backward, ``ds_e = p_e (dO_i . v_j - delta_i)``, shared by every kernel."""
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1)  # [N_dst, H]
    return delta if dlse is None else delta - dlse.to(dtype)


def kernel_attention(kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                     structure: Any, scale: float, **options) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of ``kernel``, differentiable in ``q``, ``k``, ``v`` and ``bias``."""
    return KernelAttention.apply(q, k, v, bias, kernel, structure, scale, options)
