r"""Positions on token graphs: every node carries its own position ``pos`` (an int per node).

A token graph has no order of its own, so position enters in one of four ways:

- **sinusoidal** absolute embeddings (Vaswani et al. 2017), added to the node features:
  :math:`PE(p, 2k) = \sin(p / b^{2k/C})`, :math:`PE(p, 2k+1) = \cos(p / b^{2k/C})`;
- **learned** absolute embeddings: one trained vector per position (BERT, GPT-2);
- **RoPE** (Su et al. 2021): queries and keys are rotated by their node's position, so the score
  of an edge ``j -> i`` depends on ``pos_i - pos_j`` only (see ``GraphMultiheadAttention(rope=True)``);
- **ALiBi** (Press et al. 2022): an ``edge_bias`` ``-m_h |pos_i - pos_j|`` per edge and head, with the
  geometric slopes ``m_h`` of the paper.

Positions usually come from a node's index within its sequence (``pos = arange(L)`` per sequence),
but any integer per node works (e.g. positions in a tree or on a grid).

Notation: ``N`` nodes, ``E`` edges, ``H`` heads, ``D`` head dimension, ``C`` feature dimension.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_pos(pos: Tensor, name: str = "pos") -> None:
    if not isinstance(pos, Tensor) or pos.dim() != 1:
        got = list(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(f"Expected '{name}' to be a 1-D tensor, one position per node (got {got})")


def check_base(base: object, name: str = "base") -> float:
    """``base`` if it is a finite number above 1 (the frequency base of RoPE / sinusoids)."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1.0 < base < math.inf:
        raise ValueError(f"Expected '{name}' to be a finite number > 1 (got {base!r})")
    return base


def sinusoidal_embedding(pos: Tensor, dim: int, base: float = 10000.0,
                         dtype: torch.dtype | None = None) -> Tensor:
    r"""Sinusoidal embeddings ``[N, dim]`` of the positions ``pos`` ``[N]`` (computed in float64,
    returned in ``dtype``, default ``torch.get_default_dtype()``).

    Example:
        >>> sinusoidal_embedding(torch.tensor([0, 1]), 4)
        tensor([[0.0000, 1.0000, 0.0000, 1.0000],
                [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    _check_pos(pos)
    if dim <= 0 or dim % 2:
        raise ValueError(f"Expected 'dim' to be a positive even int (got {dim})")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # [C/2]
    angle = pos.to(torch.float64).unsqueeze(-1) * freq  # [N, C/2]
    out = torch.stack([angle.sin(), angle.cos()], dim=-1)  # [N, C/2, 2]: sin at even, cos at odd
    return out.reshape(pos.size(0), dim).to(dtype)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal position embeddings: ``forward(pos [N]) -> [N, dim]`` (no parameters).

    Args:
        dim: embedding size (even).
        base: frequency base. Default ``10000.0``.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"Expected 'dim' to be a positive even int (got {dim!r})")
        self.dim, self.base = dim, check_base(base)

    def forward(self, pos: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return sinusoidal_embedding(pos, self.dim, self.base, dtype)


class LearnedPositionalEmbedding(nn.Embedding):
    """One learned vector per position, ``forward(pos [N]) -> [N, dim]`` (an ``nn.Embedding``).

    Args:
        max_positions: number of positions (``pos`` must be in ``[0, max_positions)``).
        dim: embedding size.
    """

    def __init__(self, max_positions: int, dim: int, device=None, dtype=None) -> None:
        super().__init__(max_positions, dim, device=device, dtype=dtype)

    def forward(self, pos: Tensor) -> Tensor:
        _check_pos(pos)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.num_embeddings):
            raise ValueError(f"Expected 'pos' in [0, {self.num_embeddings}) (got values in "
                             f"[{int(pos.min())}, {int(pos.max())}])")
        return super().forward(pos)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the half-split RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding of per-head vectors ``[N, H, D]`` by per-node positions ``[N]``.

    Dimension ``k`` and ``k + D/2`` form a plane rotated by the angle ``pos * base^{-2k/D}``
    (the half-split layout of GPT-NeoX / LLaMA). Rotating queries and keys makes the score of an
    edge depend only on the position difference ``pos_i - pos_j``. No parameters, no buffers.

    Example:
        >>> rope = RotaryEmbedding(4)
        >>> q = torch.randn(3, 2, 4)
        >>> torch.allclose(rope(q, torch.zeros(3)), q)  # position 0: identity
        True
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"Expected 'dim' to be a positive even int (got {dim!r})")
        self.dim, self.base = dim, check_base(base)

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and ``sin`` ``[N, 1, D]`` of the rotation angles, in ``dtype``. The angles are
        computed in float32 at least: bfloat16 cannot even hold position 257."""
        ad = torch.promote_types(dtype, torch.float32)
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=ad, device=pos.device)
                                 / self.dim)  # [D/2]
        angle = pos.to(ad).unsqueeze(-1) * inv_freq  # [N, D/2]
        angle = torch.cat([angle, angle], dim=-1).unsqueeze(1)  # [N, 1, D]
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        _check_pos(pos)
        if x.dim() != 3 or x.size(-1) != self.dim or x.size(0) != pos.size(0):
            raise ValueError(f"Expected 'x' of shape [{pos.size(0)}, H, {self.dim}] (got "
                             f"{list(x.shape)})")
        cos, sin = self.cos_sin(pos, x.dtype)
        return x * cos + rotate_half(x) * sin  # [N, H, D]

    def extra_repr(self) -> str:
        return f"{self.dim}, base={self.base}"


def alibi_slopes(num_heads: int) -> Tensor:
    r"""ALiBi's per-head slopes: :math:`m_h = 2^{-8h/H}` for ``H`` a power of two; otherwise those
    of the next lower power of two followed by every other slope of twice as many heads.

    Example:
        >>> alibi_slopes(4)
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"Expected 'num_heads' to be a positive int (got {num_heads!r})")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)]
    if closest < num_heads:
        extra = [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(2 * closest)]
        slopes += extra[0::2][: num_heads - closest]
    return torch.tensor(slopes)


def alibi_edge_bias(edge_index: Tensor, pos_src: Tensor, pos_dst: Tensor | None = None,
                    slopes: Tensor | int = 1) -> Tensor:
    r"""ALiBi as an ``edge_bias`` ``[E, H]``: :math:`b_{ji}^h = -m_h \, |pos_i - pos_j|`.

    For a causal graph this is the paper's ``-m (i - j)``; for a bidirectional graph the symmetric
    distance. ``slopes`` is ``[H]`` or a number of heads (then :func:`alibi_slopes`).

    Example:
        >>> ei = torch.tensor([[0, 0, 1], [0, 1, 1]])
        >>> alibi_edge_bias(ei, torch.arange(2), slopes=torch.tensor([0.5]))
        tensor([[-0.0000],
                [-0.5000],
                [-0.0000]])
    """
    pos_dst = pos_src if pos_dst is None else pos_dst
    _check_pos(pos_src, "pos_src")
    _check_pos(pos_dst, "pos_dst")
    if not isinstance(slopes, Tensor):
        slopes = alibi_slopes(slopes)
    ei = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    dtype = slopes.dtype if slopes.is_floating_point() else torch.get_default_dtype()
    dist = (pos_dst[ei[1]] - pos_src[ei[0]]).abs().to(dtype)  # [E]
    return -dist.unsqueeze(-1) * slopes.to(device=dist.device, dtype=dtype)  # [E, H]
