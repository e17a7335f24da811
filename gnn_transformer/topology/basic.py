"""Full and causal attention as token graphs.

``full(n)``: every token attends to every token of its sequence, ``j -> i`` for all ``i, j``.
``causal(n)``: token ``i`` attends to ``j <= i`` (GPT-style decoder).
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_bool, check_edges, local_positions, wrap_sorted
from .implicit import BlockGraph, implicit_window


@overload
def full(n: Lengths, *, implicit: Literal[False] = ..., block_size: int | None = ...) -> EdgeIndex: ...
@overload
def full(n: Lengths, *, implicit: Literal[True], block_size: int | None = ...) -> BlockGraph: ...
@overload
def full(n: Lengths, *, implicit: bool, block_size: int | None = ...) -> EdgeIndex | BlockGraph: ...


def full(n: Lengths, *, implicit: bool = False, block_size: int | None = None) -> EdgeIndex | BlockGraph:
    """All pairs within each sequence, ``sum(L^2)`` edges.

    A graph of more edges than the budget (:func:`~gnn_transformer.topology.max_edges`, ``2**32``
    by default) is refused with a ``ValueError`` before anything is allocated, as by every builder.
    With ``implicit=True`` the graph is a :class:`~gnn_transformer.topology.BlockGraph` of tiles of
    ``block_size`` (default 64, less for fewer tokens) that the kernels read without an edge list
    (its :meth:`~gnn_transformer.topology.BlockGraph.edges` are this builder's edges).

    Example:
        >>> full(2).tolist()
        [[0, 1, 0, 1], [0, 0, 1, 1]]
    """
    lengths = as_lengths(n)
    if check_bool("implicit", implicit):
        return implicit_window(lengths, None, False, block_size, "full")
    check_edges("full", sum(L * L for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)  # [N] each
    dst = torch.repeat_interleave(torch.arange(pos.numel()), length)  # each target repeated L times
    # the e-th edge's source: e minus its target's first edge, plus the target's sequence offset
    src = torch.arange(dst.numel()).sub_(torch.repeat_interleave(length.cumsum(0) - length - offset, length))
    return wrap_sorted(src, dst, pos.numel())  # built in target, then source, order


def full_predicate(i: int, j: int) -> bool:
    """Predicate twin of :func:`full` on one sequence."""
    return True


@overload
def causal(n: Lengths, *, implicit: Literal[False] = ..., block_size: int | None = ...) -> EdgeIndex: ...
@overload
def causal(n: Lengths, *, implicit: Literal[True], block_size: int | None = ...) -> BlockGraph: ...
@overload
def causal(n: Lengths, *, implicit: bool, block_size: int | None = ...) -> EdgeIndex | BlockGraph: ...


def causal(n: Lengths, *, implicit: bool = False, block_size: int | None = None) -> EdgeIndex | BlockGraph:
    """``j -> i`` for ``j <= i`` within each sequence, ``sum(L(L+1)/2)`` edges.

    ``implicit=True``: the same graph as a :class:`~gnn_transformer.topology.BlockGraph` of tiles
    of ``block_size`` (see :func:`full`): a causal graph of 131072 tokens holds ``2.1e6`` tiles
    and ``2048`` diagonal masks instead of ``8.6e9`` edges.

    Example:
        >>> causal(3).tolist()
        [[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]]
    """
    lengths = as_lengths(n)
    if check_bool("implicit", implicit):
        return implicit_window(lengths, None, True, block_size, "causal")
    check_edges("causal", sum(L * (L + 1) // 2 for L in lengths), n=lengths)
    pos, offset, _ = local_positions(lengths)
    count = pos + 1  # in-degree of each node
    dst = torch.repeat_interleave(torch.arange(pos.numel()), count)
    # the e-th edge's source: e minus its target's first edge, plus the target's sequence offset
    src = torch.arange(dst.numel()).sub_(torch.repeat_interleave(count.cumsum(0) - count - offset, count))
    return wrap_sorted(src, dst, pos.numel())  # built in target, then source, order


def causal_predicate(i: int, j: int) -> bool:
    """Predicate twin of :func:`causal`."""
    return j <= i
