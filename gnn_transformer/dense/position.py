"""Dense counterparts of :mod:`gnn_transformer.position` on padded ``[B, T, ...]`` tensors.

Written from the papers' formulas independently of the graph path: a sinusoid table built entry
by entry, RoPE as explicit 2x2 rotation matrices, ALiBi slopes by the paper's recursive recipe and
the bias as a padded ``[B, H, T_q, T_k]`` tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_table(max_len: int, dim: int, base: float = 10000.0, dtype=None) -> Tensor:
    """``[max_len, dim]``: ``PE[p, 2k] = sin(p / base^(2k/dim))``, ``PE[p, 2k+1] = cos(...)``."""
    table = [[0.0] * dim for _ in range(max_len)]
    for p in range(max_len):
        for k in range(dim // 2):
            angle = p / base ** (2 * k / dim)
            table[p][2 * k] = math.sin(angle)
            table[p][2 * k + 1] = math.cos(angle)
    return torch.tensor(table, dtype=torch.float64).to(dtype or torch.get_default_dtype())


def rope_rotation(pos: Tensor, dim: int, base: float = 10000.0, dtype=torch.float64) -> Tensor:
    """Rotation matrices ``[B, T, dim, dim]``: the plane ``(k, k + dim/2)`` turned by
    ``pos * base^(-2k/dim)``."""
    half = dim // 2
    rot = torch.zeros(*pos.shape, dim, dim, dtype=dtype)
    ad = torch.promote_types(dtype, torch.float32)  # angles in float32 at least, as the graph path
    for k in range(half):
        angle = pos.to(ad) * torch.tensor(base, dtype=ad) ** (-2.0 * k / dim)  # [B, T]
        c, s = angle.cos().to(dtype), angle.sin().to(dtype)
        rot[..., k, k], rot[..., k, k + half] = c, -s
        rot[..., k + half, k], rot[..., k + half, k + half] = s, c
    return rot


def apply_rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by the positions ``pos`` ``[B, T]`` (matrix times vector)."""
    rot = rope_rotation(pos, x.size(-1), base, dtype=x.dtype)  # [B, T, D, D]
    return torch.einsum("btde,bhte->bhtd", rot, x)


def alibi_slopes(num_heads: int) -> list[float]:
    """The slopes of Press et al. (2022), following the recipe of their reference code."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(pos_query: Tensor, pos_key: Tensor, num_heads: int, dtype=None) -> Tensor:
    """``[B, H, T_q, T_k]``: ``-m_h |pos_q - pos_k|``."""
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=dtype or torch.get_default_dtype())
    dist = (pos_query.unsqueeze(-1) - pos_key.unsqueeze(-2)).abs().to(slopes.dtype)  # [B, T_q, T_k]
    return -slopes.view(1, -1, 1, 1) * dist.unsqueeze(1)
