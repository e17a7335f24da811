"""Seeded random token graphs, for tests and for random sparse attention."""
from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import coalesce_edges


def erdos_renyi(num_src: int, num_dst: int | None = None, p: float = 0.3, seed: int = 0,
                min_in_degree: int = 0) -> EdgeIndex:
    """Each edge ``j -> i`` present independently with probability ``p`` (seeded).

    ``min_in_degree=1`` adds one random incoming edge to every target that drew none, so that
    no row is empty (needed to compare with ``nn.MultiheadAttention``, which gives NaN there).
    """
    num_dst = num_src if num_dst is None else num_dst
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected 'p' in [0, 1] (got {p})")
    if min_in_degree not in (0, 1):
        raise ValueError(f"Expected 'min_in_degree' to be 0 or 1 (got {min_in_degree})")
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_dst, num_src, generator=g) < p  # [N_dst, N_src], tests only: small
    dst, src = keep.nonzero(as_tuple=True)
    if min_in_degree and num_src > 0:
        empty = (~keep.any(dim=1)).nonzero(as_tuple=True)[0]
        extra = torch.randint(0, num_src, (empty.numel(),), generator=g)
        dst, src = torch.cat([dst, empty]), torch.cat([src, extra])
    return coalesce_edges(src, dst, num_src, num_dst)
