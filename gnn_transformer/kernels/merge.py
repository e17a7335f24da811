"""Exact merge of two partial attention results through their log-sum-exps.

If the edges of a target ``i`` are split into two sets ``A`` and ``B``, each part's softmax gives
``out_A = sum_{j in A} e^{s_j - lse_A} v_j`` with ``lse_A = log sum_{j in A} e^{s_j}``, and the whole is

    lse = log(e^{lse_A} + e^{lse_B}),   out = w_A out_A + w_B out_B,   w_A = e^{lse_A - lse}.

The backward pass is written out rather than left to autograd:

    dout_A = w_A dout,   dlse_A = w_A dlse + w_A w_B (dout . (out_A - out_B))   (and B alike).

Autograd would form ``w_A (dout . out_A - (w_A dout . out_A + w_B dout . out_B))``: where one
part holds nearly all the weight, that is a tiny difference of two numbers of size
``|dout| |out|``, and the part's backward pass multiplies its rounding by ``|K|`` (dQ off by 2e-3 of
10 at scores near 1e4 in float32). ``w_A w_B`` is small exactly there, and ``out_A - out_B`` does
not cancel. Under ``create_graph=True`` (a gradient that is differentiated again) the weights are
recomputed from the log-sum-exps in the backward pass, so that autograd records these formulas too.

Rows empty in both parts stay empty: zero output, ``lse = -inf``, and finite gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .primitives import finite_or_zero, lse_pair


def _weights(lse_a: Tensor, lse_b: Tensor, lo_a: Tensor | None, lo_b: Tensor | None):
    """``(w_a, w_b, lse, lo)``: the parts' normalized weights ``[N, H]`` and the merged log-sum-exp
    pair (``-inf``, 0 and zero weights on rows empty in both parts)."""
    top = finite_or_zero(torch.maximum(lse_a, lse_b))  # [N, H]; the result does not depend on it
    d_a, d_b = lse_a - top, lse_b - top  # [N, H]; exact where the two are close
    if lo_a is not None and lo_b is not None:
        d_a, d_b = d_a + lo_a, d_b + lo_b
    w_a, w_b = torch.exp(d_a), torch.exp(d_b)  # [N, H]
    total = w_a + w_b
    safe = torch.where(total > 0, total, torch.ones_like(total))
    lse, lo = lse_pair(top, total)
    return w_a / safe, w_b / safe, lse, lo


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_a, lse_a, out_b, lse_b, lo_a, lo_b):
        w_a, w_b, lse, lo = _weights(lse_a, lse_b, lo_a, lo_b)
        wa3, wb3 = w_a.unsqueeze(-1), w_b.unsqueeze(-1)  # [N, H, 1]
        out = (out_a.to(w_a.dtype) * wa3 + out_b.to(w_b.dtype) * wb3).to(out_a.dtype)  # [N, H, D]
        ctx.mark_non_differentiable(lo)
        ctx.save_for_backward(out_a, out_b, w_a, w_b, lse_a, lse_b, lo_a, lo_b)
        ctx.lo_grads = (lo_a is not None and lo_a.requires_grad, lo_b is not None and lo_b.requires_grad)
        return out, lse, lo

    @staticmethod
    def backward(ctx, dout, dlse, _dlo):
        out_a, out_b, w_a, w_b, lse_a, lse_b, lo_a, lo_b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the weights as operations on the log-sum-exps
            w_a, w_b, _, _ = _weights(lse_a, lse_b, lo_a, lo_b)
        cd = w_a.dtype
        grads: list[Tensor | None] = [None] * 6
        d_a = d_b = None
        if dout is not None:
            g = dout.to(cd)  # [N, H, D]
            if ctx.needs_input_grad[0]:
                grads[0] = (g * w_a.unsqueeze(-1)).to(out_a.dtype)
            if ctx.needs_input_grad[2]:
                grads[2] = (g * w_b.unsqueeze(-1)).to(out_b.dtype)
            cross = w_a * w_b * (g * (out_a.to(cd) - out_b.to(cd))).sum(-1)  # [N, H]
            d_a, d_b = cross, -cross
        if dlse is not None:
            dl = dlse.to(cd)
            d_a = w_a * dl if d_a is None else d_a + w_a * dl
            d_b = w_b * dl if d_b is None else d_b + w_b * dl
        grads[1], grads[3] = d_a, d_b
        # lse_lo is part of the same number as lse (the kernels mark it non-differentiable)
        grads[4] = d_a if ctx.lo_grads[0] else None
        grads[5] = d_b if ctx.lo_grads[1] else None
        return tuple(grads)


def merge_partials(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, lse_lo: tuple[Tensor, Tensor] | None = None
):
    """Merge ``(out [N, H, D], lse [N, H])`` pairs of two disjoint edge sets (differentiable).

    ``lse_lo = (lo_a, lo_b)``: what rounding each ``lse`` lost (the kernels' third result, see
    :mod:`.primitives`); then the merged ``lse``'s own remainder is returned too,
    ``(out, lse, lse_lo)``, and huge log-sum-exps (all scores near ``-1e9``) merge exactly."""
    lo_a, lo_b = (None, None) if lse_lo is None else lse_lo
    out, lse, lo = _Merge.apply(out_a, lse_a, out_b, lse_b, lo_a, lo_b)
    if lse_lo is None:
        return out, lse
    return out, lse, lo
