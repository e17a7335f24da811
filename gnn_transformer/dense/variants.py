"""Dense counterparts of the attention variants of :mod:`gnn_transformer.variants`.

Inputs are padded ``[B, H, T_q, D]`` queries and ``[B, H, T_k, D]`` keys/values (key/value heads
already repeated for grouped-query attention) and a boolean mask ``[B, T_q, T_k]`` (``True`` = may
attend). Rows without an allowed key give zero output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    *,
    score_bias: float | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``sigmoid(q k^T / sqrt(D) + bias + b)`` masked; ``b = -log(allowed keys of the row)`` if None.
    ``scale`` replaces ``1 / sqrt(D)``; ``softcap`` turns the scaled scores ``s`` into
    ``softcap * tanh(s / softcap)`` before ``bias`` and ``b``."""
    mask = mask.unsqueeze(1) if mask.dim() == 3 else mask  # [B, 1 or H, T_q, T_k] (per head: [B, H, T_q, T_k])
    if scale is None:
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.size(-1))  # [B, H, T_q, T_k]
    else:
        scores = (query @ key.transpose(-1, -2)) * scale  # [B, H, T_q, T_k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if score_bias is None:
        count = mask.sum(-1, keepdim=True).clamp(min=1).to(scores.dtype)  # [B, 1, T_q, 1]
        scores = scores - count.log()
    else:
        scores = scores + score_bias
    weights = torch.sigmoid(scores) * mask
    return weights @ value, weights


def linear_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor, *, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Masked ``phi(Q) phi(K)^T`` with ``phi = elu + 1``, rows normalized by their sum plus ``eps``."""
    kernel = (F.elu(query) + 1) @ (F.elu(key) + 1).transpose(-1, -2)  # [B, H, T_q, T_k]
    kernel = kernel * (mask.unsqueeze(1) if mask.dim() == 3 else mask)  # mask [B, T_q, T_k] or [B, H, T_q, T_k]
    weights = kernel / (kernel.sum(-1, keepdim=True) + eps)
    return weights @ value, weights
