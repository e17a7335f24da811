"""The Sparse Transformer's factorized patterns (Child et al., 2019, arXiv:1904.10509).

``strided``: a local band of ``stride`` keys plus every ``stride``-th key before it (good for data
with a period, like image rows). ``fixed``: the query's own block plus the last ``num_summary``
"summary" positions of every block (good for text). Both are the union of the paper's two heads
``A(1) ∪ A(2)`` in one head, causal by default as in the paper's autoregressive models.
"""

from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import (
    Lengths,
    as_lengths,
    check_bool,
    check_edges,
    check_int,
    coalesce_edges,
    expand_ranges,
    local_positions,
    window_edges,
)
from .windows import dilated, dilated_edges, sliding_window


def strided(n: Lengths, stride: int, *, causal: bool = True) -> EdgeIndex:
    r"""Strided pattern: ``j -> i`` iff ``|i - j| < stride`` or ``(i - j) mod stride = 0``
    (with ``j <= i`` when ``causal``).

    Per query ``i >= stride`` (causal): ``stride + floor(i / stride)`` keys, so
    ``O(L sqrt L)`` edges for ``stride ~ sqrt L``.

    Args:
        n: sequence length, or a list of lengths.
        stride: ``l >= 1``; the paper uses ``l ~ sqrt(L)`` (128 for its image models); ``l >= L``
            is full (or causal) attention.
        causal: only look back (the paper's setting).

    Example:
        >>> strided(5, 2).tolist()
        [[0, 0, 1, 0, 1, 2, 1, 2, 3, 0, 2, 3, 4], [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]]
    """
    lengths = as_lengths(n)
    check_int("stride", stride, 1)
    check_bool("causal", causal)
    longest = max(lengths, default=0)
    stride = min(stride, max(longest, 1))  # a band of at least L keys is the whole sequence
    # the band and the periodic keys are built, then merged: both count against the budget
    check_edges(
        "strided",
        sum(window_edges(L, stride - 1, causal) + dilated_edges(L, longest, stride, causal) for L in lengths),
        n=lengths,
    )
    local = sliding_window(lengths, stride - 1, causal=causal)
    periodic = dilated(lengths, longest, stride, causal=causal)
    src = torch.cat([local.as_tensor()[0], periodic.as_tensor()[0]])
    dst = torch.cat([local.as_tensor()[1], periodic.as_tensor()[1]])
    return coalesce_edges(src, dst, sum(lengths))


def strided_predicate(i: int, j: int, *, stride: int, causal: bool = True) -> bool:
    """Predicate twin of :func:`strided`."""
    if causal and j > i:
        return False
    return abs(i - j) < stride or (i - j) % stride == 0


def _fixed_edges(L: int, block: int, num_summary: int, causal: bool) -> int:
    """Upper bound of the edges of one sequence: each query's own block plus the summary positions
    it sees (the parts the builder merges; some summaries are in the query's own block)."""
    full_blocks, rest = divmod(L, block)
    first = block - num_summary  # first summary position of a block
    last = max(rest - first, 0)  # summaries of the short last block
    count = full_blocks * num_summary + last
    if not causal:
        return full_blocks * block * block + rest * rest + L * count
    own = full_blocks * block * (block + 1) // 2 + rest * (rest + 1) // 2
    # summary j is seen by the L - j queries i >= j: sum (L - j) over the summary positions j
    total = (
        num_summary * block * full_blocks * (full_blocks - 1) // 2
        + full_blocks * num_summary * (first + block - 1) // 2
        + last * full_blocks * block
        + last * (first + rest - 1) // 2
    )
    return own + count * L - total


def fixed(n: Lengths, block: int, num_summary: int = 1, *, causal: bool = True) -> EdgeIndex:
    r"""Fixed pattern: ``j -> i`` iff ``floor(j / l) = floor(i / l)`` or ``j mod l >= l - c``
    (with ``j <= i`` when ``causal``), for block ``l`` and ``c = num_summary``.

    Per query: its block (up to ``l`` keys) plus ``c`` summary keys per block; ``O(L^2 c / l)``
    edges, a constant fraction ``c / l`` of full attention plus the blocks.

    Args:
        n: sequence length, or a list of lengths.
        block: block length ``l >= 1`` (the paper uses 128 for text); ``l >= L`` makes the whole
            sequence one block.
        num_summary: summary positions ``0 <= c <= l`` at the end of each block (the paper: c in
            {8, 16, 32}).
        causal: only look back.

    Example:
        >>> fixed(5, 2).tolist()
        [[0, 0, 1, 1, 2, 1, 2, 3, 1, 3, 4], [0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4]]
    """
    lengths = as_lengths(n)
    check_int("block", block, 1)
    check_int("num_summary", num_summary, 0, block)
    check_bool("causal", causal)
    longest = max(max(lengths, default=0), 1)
    if block > longest:  # one block per sequence; keep the summaries at the same positions
        num_summary, block = max(num_summary - (block - longest), 0), longest
    check_edges("fixed", sum(_fixed_edges(L, block, num_summary, causal) for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)  # [N]
    # A(1): the query's own block
    start = (pos // block) * block
    end = pos if causal else torch.minimum(start + block, length) - 1
    own_dst, own_src = expand_ranges(start, end - start + 1)
    own_src = offset[own_dst] + own_src
    # A(2): summary positions of the sequence (those <= i when causal), as a slice of the sorted list S
    is_summary = (pos % block) >= block - num_summary  # [N]
    summary = is_summary.nonzero().flatten()  # [S] global indices, sorted
    before = torch.cat([pos.new_zeros(1), is_summary.long().cumsum(0)])  # summaries before node k
    node = torch.arange(pos.numel())
    first = before[offset]  # index in S of the sequence's first summary
    count = before[node + 1] - first if causal else before[offset + length] - first
    sum_dst, idx = expand_ranges(first, count)
    src = torch.cat([own_src, summary[idx]])
    dst = torch.cat([own_dst, sum_dst])
    return coalesce_edges(src, dst, pos.numel())


def fixed_predicate(i: int, j: int, *, block: int, num_summary: int = 1, causal: bool = True) -> bool:
    """Predicate twin of :func:`fixed`."""
    if causal and j > i:
        return False
    return i // block == j // block or j % block >= block - num_summary
