"""Global tokens (Longformer, Beltagy et al., 2020, arXiv:2004.05150).

The first ``num_global`` tokens of each sequence (``[CLS]``, a question) attend to every token and
are attended by every token; optionally every token also sees a symmetric sliding window.
"""

from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import (
    Lengths,
    as_lengths,
    check_edges,
    check_int,
    coalesce_edges,
    expand_ranges,
    local_positions,
    window_edges,
)


def _edges(L: int, num_global: int, window: int | None) -> int:
    """Edges of one sequence: ``2gL - g^2`` global ones, plus the window among the other tokens."""
    g = min(num_global, L)
    return 2 * g * L - g * g + (window_edges(L - g, window) if window is not None else 0)


def global_tokens(n: Lengths, num_global: int = 1, *, window: int | None = None) -> EdgeIndex:
    r"""Longformer attention: ``j -> i`` iff ``i < g`` or ``j < g`` or ``|i - j| <= window``.

    Edges per sequence of length ``L > g`` without window: ``2 g L - g^2``; with a window, the
    union with :func:`~gnn_transformer.topology.sliding_window`.

    Args:
        n: sequence length, or a list of lengths.
        num_global: global tokens ``g >= 0`` at the start of each sequence (all tokens when
            ``g >= L``).
        window: radius of the sliding window (clamped to the sequence), or ``None`` for global
            edges only.

    Example:
        >>> global_tokens(3, 1).tolist()
        [[0, 1, 2, 0, 0], [0, 0, 0, 1, 2]]
    """
    lengths = as_lengths(n)
    check_int("num_global", num_global)
    if window is not None:
        check_int("window", window)
    longest = max(lengths, default=0)
    num_global = min(num_global, longest)  # sizes beyond the sequence give the same graph
    window = None if window is None else min(window, longest)
    check_edges("global_tokens", sum(_edges(L, num_global, window) for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)  # [N]
    g = torch.clamp(length, max=num_global)  # global tokens of each node's sequence
    # every token <- the global tokens; the global tokens <- every token
    to_all_dst, to_all_src = expand_ranges(offset, g)
    is_global = pos < num_global
    from_all_dst, from_all_src = expand_ranges(offset, torch.where(is_global, length, 0))
    parts_src, parts_dst = [to_all_src, from_all_src], [to_all_dst, from_all_dst]
    if window is not None:
        lo = (pos - window).clamp(min=0)
        hi = torch.minimum(pos + window, length - 1)
        win_dst, win_src = expand_ranges(lo, hi - lo + 1)
        parts_src.append(offset[win_dst] + win_src)
        parts_dst.append(win_dst)
    return coalesce_edges(torch.cat(parts_src), torch.cat(parts_dst), pos.numel())


def global_tokens_predicate(i: int, j: int, *, num_global: int = 1, window: int | None = None) -> bool:
    """Predicate twin of :func:`global_tokens`."""
    return i < num_global or j < num_global or (window is not None and abs(i - j) <= window)
