"""Attention dropout that the backward pass can regenerate: a counter-based keep mask.

Whether the weight of edge ``e`` (its position in the target-sorted order) and head ``h`` is kept is
a hash of ``(seed, e, h)``, not a draw from a random state: the backward pass recomputes the same
mask instead of storing ``[E, H]`` of it, and the PyTorch and Triton implementations agree bit for
bit (the tests compare them). The hash is ``lowbias32`` (C. Wellons) applied four times; an edge is
dropped when the 32-bit hash falls below ``p · 2**32``, and kept weights are scaled by
``1 / (1 - p)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_C1, _C2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def threshold(p: float) -> int:
    """The hash value below which a weight is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected 'dropout_p' in [0, 1) (got {p})")
    return int(p * 2 ** 32)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    """:func:`_mix` of one Python int."""
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def keep_hash(seed: int, edge: Tensor, head: int) -> Tensor:
    """The 32-bit hash (as int64) of ``(seed, edge, head)`` for every entry of ``edge``:
    ``mix(mix(mix(seed ^ head·φ) ^ (edge >> 32)) ^ (edge & 0xFFFFFFFF))``."""
    return keep_hashes(seed, edge, [head])[0]


def keep_hashes(seed: int, edge: Tensor, heads) -> Tensor:
    """:func:`keep_hash` for several heads at once: ``[len(heads), *edge.shape]``. The part that
    depends on the seed and head only is computed once, and so is the high word when every edge
    position is below ``2**32``."""
    e = edge.to(torch.int64)
    prefix = [_mix_int((seed ^ ((h * _GOLDEN) & _M32)) & _M32) for h in heads]
    shape = (len(prefix),) + (1,) * e.dim()
    if e.numel() == 0 or int(e.max()) < 2 ** 32:  # high word 0: one more mix per head, not per edge
        x = torch.tensor([_mix_int(p) for p in prefix], dtype=torch.int64, device=e.device).view(shape)
    else:
        x = _mix(torch.tensor(prefix, dtype=torch.int64, device=e.device).view(shape) ^ (e >> 32))
    return _mix(x ^ (e & _M32))


def keep_scale(seed: int, edge: Tensor, head: int, p: float, dtype: torch.dtype) -> Tensor:
    """``1 / (1 - p)`` where the weight of ``(edge, head)`` is kept, ``0`` where it is dropped."""
    kept = keep_hash(seed, edge, head) >= threshold(p)
    return kept.to(dtype) / (1.0 - p)


def keep_scales(seed: int, edge: Tensor, num_heads: int, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`keep_scale` of every head ``0..num_heads-1``: ``[num_heads, *edge.shape]``.

    One head at a time: the int64 temporaries of all heads at once outgrow the caches (4-6x slower
    on CPU for a million positions)."""
    e = edge.to(torch.int64)
    limit = threshold(p)
    scale = torch.ones((), dtype=dtype, device=e.device) / (1.0 - p)  # the rounding of keep_scale
    zero = torch.zeros((), dtype=dtype, device=e.device)
    out = torch.empty((num_heads,) + tuple(e.shape), dtype=dtype, device=e.device)
    for h in range(num_heads):
        torch.where(keep_hashes(seed, e, [h])[0] >= limit, scale, zero, out=out[h])
    return out
