"""Attention dropout that the backward pass can regenerate: a counter-based keep mask.

Whether the weight of edge ``e`` (its position in the target-sorted order) and head ``h`` is kept is
a hash of ``(seed, e, h)``, not a draw from a random state: the backward pass recomputes the same
mask instead of storing ``[E, H]`` of it, and the PyTorch and Triton implementations agree bit for
bit (the tests compare them). The hash is ``lowbias32`` (C. Wellons) applied four times; an edge is
dropped when the 32-bit hash falls below ``p · 2**32``, and kept weights are scaled by
``1 / (1 - p)``. On PyTorch tensors the hash runs in int32 with wrapping products while every
position is below ``2**31`` (half the bytes and operations of exact int64 arithmetic, which
remains the fallback and the reference).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_C1, _C2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def threshold(p: float) -> int:
    """The hash value below which a weight is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected 'dropout_p' in [0, 1) (got {p})")
    return int(p * 2**32)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (in place)."""
    lo, hi = c & 0xFFFF, c >> 16
    t = x * hi
    t &= 0xFFFF
    t <<= 16
    x *= lo
    x += t
    x &= _M32
    return x


def _mix(x: Tensor) -> Tensor:
    """``lowbias32`` of int64 values in ``[0, 2**32)`` (a new tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x ^= x >> 15
    x = _mul32(x, _C2)
    x ^= x >> 16
    return x


def _signed32(c: int) -> int:
    """The int32 whose bits are those of ``0 <= c < 2**32``."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32_(x: Tensor) -> Tensor:
    """``lowbias32`` in place on int32 tensors holding the 32 bits: products wrap modulo ``2**32``
    (checked once by :func:`_int32_wraps`), shifts are made logical by masking the sign's copies.
    Half the bytes and half the operations of the int64 arithmetic."""
    x ^= (x >> 16) & 0xFFFF
    x *= _signed32(_C1)
    x ^= (x >> 15) & 0x1FFFF
    x *= _signed32(_C2)
    x ^= (x >> 16) & 0xFFFF
    return x


@functools.cache
def _int32_wraps() -> bool:
    """Whether int32 products wrap here (they do on every platform PyTorch builds for; the fast path
    is checked against the exact int64 arithmetic once, on values whose products overflow)."""
    probe = torch.tensor([0, 1, 0x7FFFFFFF, 0x12345678, 0x6B43A9B5, 0x3FFFFFFF] * 8, dtype=torch.int64)
    fast = _mix32_(probe.to(torch.int32)).to(torch.int64) & _M32
    return bool(torch.equal(fast, _mix(probe)))


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


def _prefixes(seed: int, heads) -> list[int]:
    """``mix(seed ^ head·φ)`` of each head: the part of the hash that does not depend on the edge."""
    return [_mix_int((seed ^ ((h * _GOLDEN) & _M32)) & _M32) for h in heads]


def _fast(edge: Tensor) -> bool:
    """Whether the int32 hash applies: every position below ``2**31`` and int32 products wrap."""
    return (edge.numel() == 0 or int(edge.max()) < 2**31) and _int32_wraps()


def _hash32(seed: int, edge: Tensor, head: int) -> Tensor:
    """The hash of ``(seed, edge, head)`` as int32 bits, for positions below ``2**31``
    (:func:`_fast`)."""
    x = edge.to(torch.int32, copy=True)  # mixed in place
    x ^= _signed32(_mix_int(_prefixes(seed, [head])[0]))  # high word 0: one more mix of the prefix
    return _mix32_(x)


def keep_hashes(seed: int, edge: Tensor, heads) -> Tensor:
    """:func:`keep_hash` for several heads at once: ``[len(heads), *edge.shape]``. The part that
    depends on the seed and head only is computed once, and so is the high word when every edge
    position is below ``2**32``."""
    e = edge.to(torch.int64)
    heads = list(heads)
    if e.numel() and heads and _fast(e):
        return torch.stack([_hash32(seed, e, h) for h in heads]).to(torch.int64) & _M32
    prefix = _prefixes(seed, heads)
    shape = (len(prefix),) + (1,) * e.dim()
    if e.numel() == 0 or int(e.max()) < 2**32:  # high word 0: one more mix per head, not per edge
        x = torch.tensor([_mix_int(p) for p in prefix], dtype=torch.int64, device=e.device).view(shape)
    else:
        x = _mix(torch.tensor(prefix, dtype=torch.int64, device=e.device).view(shape) ^ (e >> 32))
    return _mix(x ^ (e & _M32))


def _kept(seed: int, edge: Tensor, head: int, p: float, fast: bool) -> Tensor:
    """``[*edge.shape]`` bool: whether the weight of ``(edge, head)`` survives (hash >= threshold);
    ``fast``: :func:`_fast` of ``edge``."""
    if not fast:
        return keep_hash(seed, edge, head) >= threshold(p)
    x = _hash32(seed, edge, head)
    # unsigned comparison of the int32 bits: flip the sign bit of both sides
    x ^= -(1 << 31)
    return x >= _signed32(threshold(p) ^ (1 << 31))


def keep_scale(seed: int, edge: Tensor, head: int, p: float, dtype: torch.dtype) -> Tensor:
    """``1 / (1 - p)`` where the weight of ``(edge, head)`` is kept, ``0`` where it is dropped."""
    return _kept(seed, edge, head, p, _fast(edge)).to(dtype) / (1.0 - p)


def keep_scales(seed: int, edge: Tensor, num_heads: int, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`keep_scale` of every head ``0..num_heads-1``: ``[num_heads, *edge.shape]``.

    One head at a time: the temporaries of all heads at once outgrow the caches (with int64
    arithmetic 4-6x slower on CPU for a million positions)."""
    scale = torch.ones((), dtype=dtype, device=edge.device) / (1.0 - p)  # the rounding of keep_scale
    zero = torch.zeros((), dtype=dtype, device=edge.device)
    out = torch.empty((num_heads,) + tuple(edge.shape), dtype=dtype, device=edge.device)
    fast = _fast(edge)
    for h in range(num_heads):
        torch.where(_kept(seed, edge, h, p, fast), scale, zero, out=out[h])
    return out
