"""Star-Transformer (Guo et al., 2019, arXiv:1902.09113): a ring of satellites and one relay.

The relay is the first token of each sequence (position 0, like ``[CLS]``); positions ``1..L-1``
are satellites. A satellite attends to itself, its two ring neighbours and the relay; the relay
attends to everything. Any two tokens are two hops apart, with ``O(L)`` edges.
"""

from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_bool, check_edges, coalesce_edges, expand_ranges, local_positions


def star(n: Lengths, *, ring: bool = True) -> EdgeIndex:
    r"""Star-Transformer graph: relay ``0`` <- all; satellite ``i`` <- ``{i - 1, i, i + 1, 0}``.

    Satellite neighbours wrap around (``ring``: the first and last satellites are adjacent, as in
    the paper) or stop at the ends. Edges per sequence with ``L >= 5`` tokens: ``L + 4 (L - 1)``
    (``ring``) or ``L + 4 (L - 1) - 2``.

    Args:
        n: sequence length (relay included), or a list of lengths.
        ring: close the chain of satellites into a ring.

    Example:
        >>> star(4).tolist()
        [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]]
    """
    lengths = as_lengths(n)
    check_bool("ring", ring)
    # the relay sees L keys, a satellite at most 4: itself, its neighbours, the relay
    check_edges("star", sum(L * L if L < 4 else 5 * L - 4 for L in lengths), n=lengths)
    pos, offset, length = local_positions(lengths)  # [N]
    relay_dst, relay_src = expand_ranges(offset, torch.where(pos == 0, length, 0))
    sat = (pos > 0).nonzero().flatten()  # satellites
    m = length[sat] - 1  # satellites in the sequence
    s = pos[sat] - 1  # index on the ring
    prev, nxt = s - 1, s + 1
    if ring:
        prev, nxt = prev % m, nxt % m
    cand = torch.stack([s, prev, nxt], dim=1)  # [S, 3] satellite indices
    keep = (cand >= 0) & (cand < m[:, None])
    sat_dst = sat[:, None].expand_as(cand)[keep]
    sat_src = (offset[sat][:, None] + 1 + cand)[keep]
    src = torch.cat([relay_src, sat_src, offset[sat]])
    dst = torch.cat([relay_dst, sat_dst, sat])
    return coalesce_edges(src, dst, pos.numel())


def star_predicate(i: int, j: int, n: int, *, ring: bool = True) -> bool:
    """Predicate twin of :func:`star` on a sequence of length ``n``."""
    if i == 0 or j == 0 or i == j:
        return True
    m = n - 1
    d = abs(i - j)
    return d == 1 or (ring and d == m - 1)
