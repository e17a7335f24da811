"""Expander graphs (Exphormer, Shirzad et al., 2023, arXiv:2303.06147).

A random ``d``-regular graph is, with high probability, a good expander: sparse (``d L`` edges)
yet every token reaches every other in ``O(log L)`` hops, and its spectrum approximates full
attention's. Drawn with ``networkx.random_regular_graph``, one graph per sequence, both directions.
"""

from __future__ import annotations

import random as _random

import networkx as nx
import torch
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_bool, check_edges, check_int, check_seed, coalesce_edges, full_pairs


def expander(n: Lengths, degree: int, *, seed: int = 0, self_loops: bool = False) -> EdgeIndex:
    r"""Random ``degree``-regular undirected graph per sequence, as edges in both directions.

    Edges per sequence: ``d L`` (plus ``L`` self-loops). A sequence with ``L <= d`` gets the
    complete graph (degree ``L - 1``, the densest simple graph). ``d L`` must be even.

    Args:
        n: sequence length, or a list of lengths.
        degree: ``d >= 0``; Exphormer uses small degrees (3 to 6).
        seed: seed of the draws (sequence ``b`` uses a seed derived from it), an int in
            ``[0, 2**63 - 1]``.
        self_loops: also let every token attend to itself.

    Example:
        >>> g = expander(6, 3, seed=0)
        >>> g.size(1), torch.bincount(g[1]).tolist()
        (18, [3, 3, 3, 3, 3, 3])
    """
    lengths = as_lengths(n)
    check_int("degree", degree)
    check_seed("seed", seed)
    check_bool("self_loops", self_loops)
    odd = [L for L in lengths if L > degree and (L * degree) % 2]
    if odd:
        raise ValueError(
            f"Expected 'degree' * length to be even for a regular graph (got "
            f"degree={degree} and length {odd[0]}); use an even degree"
        )
    check_edges(
        "expander",
        sum((L * (L - 1) if L <= degree else L * degree) + (L if self_loops else 0) for L in lengths),
        n=lengths,
    )
    rng = _random.Random(seed)
    src, dst, offset = [], [], 0
    for L in lengths:  # one networkx draw per sequence (not per token)
        if L <= degree:
            s, d = full_pairs(L)
            keep = s != d
            s, d = s[keep], d[keep]
        else:
            g = nx.random_regular_graph(degree, L, seed=rng.randrange(2**31))
            e = torch.tensor(list(g.edges()), dtype=torch.long).reshape(-1, 2)
            s, d = torch.cat([e[:, 0], e[:, 1]]), torch.cat([e[:, 1], e[:, 0]])
        if self_loops:
            s, d = torch.cat([s, torch.arange(L)]), torch.cat([d, torch.arange(L)])
        src.append(s + offset)
        dst.append(d + offset)
        offset += L
    empty = torch.zeros(0, dtype=torch.long)
    return coalesce_edges(torch.cat(src) if src else empty, torch.cat(dst) if dst else empty, offset)
