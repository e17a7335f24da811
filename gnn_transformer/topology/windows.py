"""Local attention: sliding windows (Longformer, Mistral) and dilated sliding windows.

``window`` is a radius: query ``i`` sees keys ``j`` with ``|i - j| <= window`` (symmetric, ``2w + 1``
keys away from the borders) or ``0 <= i - j <= window`` (causal, ``w + 1`` keys). A model described
by a total window size ``W`` (Longformer's ``attention_window=512``) has radius ``W // 2``; a causal
window of ``W`` keys including the query itself (Mistral's ``sliding_window``) has radius ``W - 1``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch_geometric import EdgeIndex

from ._common import (
    Lengths,
    as_lengths,
    check_bool,
    check_edges,
    check_int,
    expand_ranges,
    local_positions,
    window_edges,
    wrap_sorted,
)
from .implicit import BlockGraph, implicit_window


def dilated_edges(L: int, window: int, dilation: int, causal: bool = False) -> int:
    """Edges of a dilated window on one sequence of ``L`` tokens (``dilation=1``: a sliding window)."""
    if L == 0:
        return 0
    k = min(window, (L - 1) // dilation)  # steps that stay inside the sequence
    back = (k + 1) * L - dilation * k * (k + 1) // 2  # 0 <= i - j = s * dilation, s <= k
    return back if causal else 2 * back - L


@overload
def sliding_window(
    n: Lengths, window: int, *, causal: bool = ..., implicit: Literal[False] = ..., block_size: int | None = ...
) -> EdgeIndex: ...
@overload
def sliding_window(
    n: Lengths, window: int, *, causal: bool = ..., implicit: Literal[True], block_size: int | None = ...
) -> BlockGraph: ...
@overload
def sliding_window(
    n: Lengths, window: int, *, causal: bool = ..., implicit: bool, block_size: int | None = ...
) -> EdgeIndex | BlockGraph: ...


def sliding_window(
    n: Lengths, window: int, *, causal: bool = False, implicit: bool = False, block_size: int | None = None
) -> EdgeIndex | BlockGraph:
    r"""Sliding-window attention, ``j -> i`` iff ``|i - j| <= window`` (``0 <= i - j <= window``
    when ``causal``), within each sequence.

    Edges per sequence of length ``L``: :math:`\sum_{d=-w}^{w} \max(L - |d|, 0)`
    (``L(2w+1) - w(w+1)`` for ``L > w``); causal: :math:`\sum_{d=0}^{w} \max(L - d, 0)`.

    Args:
        n: sequence length, or a list of lengths (a batch, disjoint union).
        window: radius ``w >= 0``; ``w = 0`` gives self-loops only, ``w >= L - 1`` gives full
            (or causal) attention (any ``w``, however large: it is clamped to the sequence).
        causal: only look back.
        implicit: return the graph as a :class:`~gnn_transformer.topology.BlockGraph` (tiles the
            kernels read without an edge list; its ``edges()`` are this builder's edges).
        block_size: tile side of the implicit graph (default 64, less for fewer tokens).

    Example:
        >>> sliding_window(4, 1).tolist()
        [[0, 1, 0, 1, 2, 1, 2, 3, 2, 3], [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]]
        >>> sliding_window(3, 1, causal=True).tolist()
        [[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]]
    """
    lengths = as_lengths(n)
    check_int("window", window)
    check_bool("causal", causal)
    window = min(window, max(lengths, default=0))  # a wider window sees the same keys
    if check_bool("implicit", implicit):
        return implicit_window(lengths, window, causal, block_size, "sliding_window")
    check_edges("sliding_window", sum(window_edges(L, window, causal) for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)  # [N] each
    lo = (pos - window).clamp(min=0)
    hi = pos if causal else torch.minimum(pos + window, length - 1)
    dst, src_local = expand_ranges(lo, hi - lo + 1)  # [E]
    return wrap_sorted(offset[dst] + src_local, dst, pos.numel())


def sliding_window_predicate(i: int, j: int, *, window: int, causal: bool = False) -> bool:
    """Predicate twin of :func:`sliding_window`."""
    return 0 <= i - j <= window if causal else abs(i - j) <= window


def dilated(n: Lengths, window: int, dilation: int = 1, *, causal: bool = False) -> EdgeIndex:
    r"""Dilated sliding window (Longformer): ``j -> i`` iff ``i - j = k * dilation`` for an
    integer ``|k| <= window`` (``0 <= k <= window`` when ``causal``).

    Edges per sequence of length ``L``: :math:`\sum_{k=-w}^{w} \max(L - |k| d, 0)` (causal:
    :math:`\sum_{k=0}^{w}`). ``dilation=1`` is :func:`sliding_window`.

    Args:
        n: sequence length, or a list of lengths.
        window: number of steps ``w >= 0`` on each side.
        dilation: gap ``d >= 1`` between attended keys (``d >= L``: self-loops only).
        causal: only look back.

    Example:
        >>> dilated(5, 1, 2, causal=True).tolist()
        [[0, 1, 0, 2, 1, 3, 2, 4], [0, 1, 2, 2, 3, 3, 4, 4]]
    """
    lengths = as_lengths(n)
    check_int("window", window)
    check_int("dilation", dilation, 1)
    check_bool("causal", causal)
    longest = max(lengths, default=0)
    window, dilation = min(window, longest), min(dilation, max(longest, 1))  # same keys, no overflow
    check_edges("dilated", sum(dilated_edges(L, window, dilation, causal) for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)
    k_hi = torch.clamp(pos // dilation, max=window)  # largest step back that stays >= 0
    k_lo = torch.zeros_like(pos) if causal else -torch.clamp((length - 1 - pos) // dilation, max=window)
    dst, t = expand_ranges(torch.zeros_like(pos), k_hi - k_lo + 1)  # [E], t = 0, 1, ...
    src_local = pos[dst] - (k_hi[dst] - t) * dilation  # ascending in t
    return wrap_sorted(offset[dst] + src_local, dst, pos.numel())


def dilated_predicate(i: int, j: int, *, window: int, dilation: int = 1, causal: bool = False) -> bool:
    """Predicate twin of :func:`dilated`."""
    d = i - j
    if causal and d < 0:
        return False
    return d % dilation == 0 and abs(d) // dilation <= window
