"""The one autograd function of every kernel: ``(out, lse, lse_lo)`` forward, backward from the
saved log-sum-exp.

A kernel is a pair of plain functions over a graph structure (a CSR graph or a tile list):

- ``forward(q, k, v, bias, structure, scale, **options) -> (out, lse, lse_lo)``;
- ``backward(q, k, v, bias, structure, scale, out, lse, lse_lo, dout, dlse, need_bias, **options)
  -> (dq, dk, dv, dbias)``, where ``dlse`` may be ``None`` (the log-sum-exp was not used);
- optionally ``prepare(structure, **options)``, run by the forward pass when a gradient will be
  needed: builds what the backward pass reads (the CSC of a graph) before the backward's memory
  peak, where the activations of every layer are held.

The log-sum-exp of a row, ``m + log l`` (``m`` the row's largest score, ``l`` the sum of
``exp(s - m)``), is kept as two numbers of the accumulation dtype: ``lse``, the sum rounded, and
``lse_lo``, what the rounding lost (:func:`lse_pair`). Where the scores are huge (a row whose every
edge carries a bias of ``-1e9``), ``log l`` is below ``lse``'s rounding step; the backward pass's
``p = exp((s - lse) - lse_lo)`` and the merges of partial results keep it all the same. ``lse_lo``
is 0 on empty rows and not differentiable (the gradient of the log-sum-exp reaches ``lse``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .primitives import no_autocast


class Kernel(NamedTuple):
    """A kernel's forward and backward functions (see the module docstring)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]]
    prepare: Callable[..., object] | None = None


def lse_pair(top: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """``(lse, lse_lo)`` of rows with largest score ``top`` (0 on empty rows) and ``total`` the sum
    of ``exp(s - top)``: ``top + log total`` rounded and its rounding error, exactly (Knuth's
    two-sum); ``(-inf, 0)`` where ``total`` is 0 (an empty row). Differentiable in ``lse``."""
    nonempty = total > 0
    log_l = torch.log(torch.where(nonempty, total, torch.ones_like(total)))
    lse = top + log_l
    b = (lse - top).detach()
    lo = ((top - (lse - b)) + (log_l - b)).detach()
    return (
        torch.where(nonempty, lse, torch.full_like(lse, float("-inf"))),
        torch.where(nonempty, lo, torch.zeros_like(lo)),
    )


class KernelAttention(torch.autograd.Function):
    """Differentiable ``(out, lse, lse_lo)`` of a :class:`Kernel` in ``q``, ``k``, ``v`` and ``bias``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kernel: Kernel, structure: Any, scale: float, options: dict):
        with no_autocast(q.device.type):  # the kernels pick their accumulation dtype themselves
            out, lse, lse_lo = kernel.forward(q, k, v, bias, structure, scale, **options)
        ctx.set_materialize_grads(False)  # an unused lse sends None, not zeros
        ctx.mark_non_differentiable(lse_lo)
        guards = structure.guards() if hasattr(structure, "guards") else ()  # views of edge_index
        ctx.save_for_backward(q, k, v, bias, out, lse, lse_lo, *guards)
        ctx.kernel, ctx.structure, ctx.scale, ctx.options = kernel, structure, scale, options
        return out, lse, lse_lo

    @staticmethod
    def backward(ctx, dout, dlse, _dlse_lo):
        q, k, v, bias, out, lse, lse_lo = ctx.saved_tensors[:7]  # unpacking the guards checks their versions
        if dout is None:
            dout = torch.zeros_like(out)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        with no_autocast(q.device.type):  # a backward pass run inside an autocast region, too
            dq, dk, dv, dbias = ctx.kernel.backward(
                q, k, v, bias, ctx.structure, ctx.scale, out, lse, lse_lo, dout, dlse, need_bias, **ctx.options
            )
        return dq, dk, dv, dbias, None, None, None, None


def kernel_attention(
    kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, structure: Any, scale: float, **options
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, lse, lse_lo)`` of ``kernel``, differentiable in ``q``, ``k``, ``v`` and ``bias``."""
    if (
        kernel.prepare is not None
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in (q, k, v, bias))
    ):
        kernel.prepare(structure, **options)
    return KernelAttention.apply(q, k, v, bias, kernel, structure, scale, options)
