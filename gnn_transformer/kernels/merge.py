"""Exact merge of two partial attention results through their log-sum-exps.

If the edges of a target ``i`` are split into two sets ``A`` and ``B``, each part's softmax gives
``out_A = sum_{j in A} e^{s_j - lse_A} v_j`` with ``lse_A = log sum_{j in A} e^{s_j}``, and the whole is

    lse = log(e^{lse_A} + e^{lse_B}),   out = e^{lse_A - lse} out_A + e^{lse_B - lse} out_B.

Rows empty in both parts stay empty: zero output, ``lse = -inf``, and finite gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``(out [N, H, D], lse [N, H])`` pairs of two disjoint edge sets (differentiable)."""
    top = torch.maximum(lse_a, lse_b).detach()  # [N, H]; the result does not depend on it
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_a = torch.exp(lse_a - top)  # [N, H]
    w_b = torch.exp(lse_b - top)  # [N, H]
    total = w_a + w_b
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, top + torch.log(safe), torch.full_like(total, float("-inf")))
    w_a, w_b = (w_a / safe).unsqueeze(-1), (w_b / safe).unsqueeze(-1)  # [N, H, 1]
    out = out_a.to(w_a.dtype) * w_a + out_b.to(w_b.dtype) * w_b  # [N, H, D], float32 or float64
    return out.to(out_a.dtype), lse
