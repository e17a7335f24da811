"""Exact merge of two partial attention results through their log-sum-exps.

If the edges of a target ``i`` are split into two sets ``A`` and ``B``, each part's softmax gives
``out_A = sum_{j in A} e^{s_j - lse_A} v_j`` with ``lse_A = log sum_{j in A} e^{s_j}``, and the whole is

    lse = log(e^{lse_A} + e^{lse_B}),   out = e^{lse_A - lse} out_A + e^{lse_B - lse} out_B.

Rows empty in both parts stay empty: zero output, ``lse = -inf``, and finite gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .primitives import finite_or_zero, lse_pair


def merge_partials(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, lse_lo: tuple[Tensor, Tensor] | None = None
):
    """Merge ``(out [N, H, D], lse [N, H])`` pairs of two disjoint edge sets (differentiable).

    ``lse_lo = (lo_a, lo_b)``: what rounding each ``lse`` lost (the kernels' third result, see
    :mod:`.primitives`); then the merged ``lse``'s own remainder is returned too,
    ``(out, lse, lse_lo)``, and huge log-sum-exps (all scores near ``-1e9``) merge exactly."""
    top = torch.maximum(lse_a, lse_b).detach()  # [N, H]; the result does not depend on it
    top = finite_or_zero(top)
    d_a, d_b = lse_a - top, lse_b - top  # [N, H]; exact where the two are close
    if lse_lo is not None:
        d_a, d_b = d_a + lse_lo[0], d_b + lse_lo[1]
    w_a, w_b = torch.exp(d_a), torch.exp(d_b)  # [N, H]
    total = w_a + w_b
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    lse, lo = lse_pair(top, total)
    w_a, w_b = (w_a / safe).unsqueeze(-1), (w_b / safe).unsqueeze(-1)  # [N, H, 1]
    out = (out_a.to(w_a.dtype) * w_a + out_b.to(w_b.dtype) * w_b).to(out_a.dtype)  # [N, H, D]
    if lse_lo is None:
        return out, lse
    return out, lse, lo
