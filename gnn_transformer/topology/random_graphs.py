"""Seeded random token graphs: Erdős–Rényi (tests), and ``k`` random keys per query.

Random patterns have no closed-form predicate; their predicate twin is the drawn edge set itself
(:func:`edge_set_predicate`), and tests check their structure (degrees, ranges, no duplicates)
and that a seed always gives the same graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_edges, check_int, check_seed, coalesce_edges, finalize, local_positions


def erdos_renyi(
    num_src: int, num_dst: int | None = None, p: float = 0.3, seed: int = 0, min_in_degree: int = 0
) -> EdgeIndex:
    """Each edge ``j -> i`` present independently with probability ``p`` (seeded).

    ``min_in_degree=1`` adds one random incoming edge to every target that drew none, so that
    no row is empty (needed to compare with ``nn.MultiheadAttention``, which gives NaN there).
    It draws a dense ``[num_dst, num_src]`` matrix (tests only: small graphs), so the
    ``num_dst * num_src`` pairs count against the edge budget (``topology.max_edges``).
    ``seed`` is an int in ``[0, 2**63 - 1]``.
    """
    check_int("num_src", num_src)
    num_dst = num_src if num_dst is None else check_int("num_dst", num_dst)
    check_seed("seed", seed)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected 'p' in [0, 1] (got {p})")
    if min_in_degree not in (0, 1):
        raise ValueError(f"Expected 'min_in_degree' to be 0 or 1 (got {min_in_degree})")
    check_edges("erdos_renyi", num_src * num_dst, num_src=[num_src], num_dst=[num_dst])
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_dst, num_src, generator=g) < p  # [N_dst, N_src], tests only: small
    dst, src = keep.nonzero(as_tuple=True)
    if min_in_degree and num_src > 0:
        empty = (~keep.any(dim=1)).nonzero(as_tuple=True)[0]
        extra = torch.randint(0, num_src, (empty.numel(),), generator=g)
        dst, src = torch.cat([dst, empty]), torch.cat([src, extra])
    return coalesce_edges(src, dst, num_src, num_dst)


def sample_distinct(m: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """For each row ``r``: ``min(k, m[r])`` distinct values drawn uniformly from ``[0, m[r])``.

    Floyd's algorithm, vectorized over rows (the loop runs over the ``k`` draws, not the rows).
    Returns ``(row, value)`` pairs, ``k`` or fewer per row.
    """
    m = m.to(torch.long)
    # no row has more than max(m) values: later draws would select nothing (and the generator is
    # the caller's private one, so stopping early changes no graph)
    k = min(k, int(m.max()) if m.numel() else 0)
    k_eff = torch.clamp(m, max=k)  # [R]
    chosen = torch.full((m.numel(), k), -1, dtype=torch.long)  # [R, k]
    for s in range(k):
        top = m - k_eff + s  # Floyd: draw in [0, top], take top if already chosen
        active = s < k_eff
        x = (torch.rand(m.numel(), generator=generator) * (top + 1).clamp(min=1)).long()
        x = torch.minimum(x, top.clamp(min=0))
        taken = (chosen[:, :s] == x[:, None]).any(dim=1)
        chosen[:, s] = torch.where(active, torch.where(taken, top, x), -1)
    row, col = (chosen >= 0).nonzero(as_tuple=True)
    return row, chosen[row, col]


def random(n: Lengths, k: int, *, seed: int = 0) -> EdgeIndex:
    r"""``k`` distinct random keys per query, drawn uniformly from its own sequence (itself
    included), seeded: ``k L`` edges per sequence of length ``L``.

    The twin predicate is the drawn set (:func:`edge_set_predicate`): there is no rule to compare
    with, so tests check that every query has exactly ``k`` distinct keys in its sequence and that
    the seed fixes the graph.

    Args:
        n: sequence length, or a list of lengths.
        k: keys per query, ``0 <= k <= L`` for every non-empty sequence.
        seed: seed of a private ``torch.Generator`` (global RNG state is untouched), an int in
            ``[0, 2**63 - 1]``.

    Example:
        >>> g = random([3, 4], 2, seed=0)
        >>> g.size(1), bool(torch.equal(g, random([3, 4], 2, seed=0)))
        (14, True)
    """
    lengths = as_lengths(n)
    check_int("k", k)
    short = [L for L in lengths if 0 < L < k]
    if short:
        raise ValueError(f"Expected 'k' <= every sequence length (got k={k} and length {short[0]})")
    check_seed("seed", seed)
    check_edges("random", k * sum(lengths), n=lengths)  # every non-empty sequence has L >= k
    pos, offset, length = local_positions(lengths)
    g = torch.Generator().manual_seed(seed)
    dst, src_local = sample_distinct(length, k, g)
    return finalize(offset[dst] + src_local, dst, pos.numel())


def edge_set_predicate(edge_index: Tensor) -> Callable[[int, int], bool]:
    """Predicate twin of a drawn (random) graph: ``(i, j) -> (j -> i) in edge_index``.

    Indices are those of the graph itself (global node ids of a batch).
    """
    plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    edges = set(zip(plain[1].tolist(), plain[0].tolist()))
    return lambda i, j: (i, j) in edges
