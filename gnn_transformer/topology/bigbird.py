"""BigBird attention (Zaheer et al., 2020, arXiv:2007.14062): window + global + random.

Built on blocks of ``block`` tokens, like BigBird's block-sparse "ITC" implementation: query block
``a`` attends to key block ``b`` when ``|a - b| <= window``, when either is one of the first
``num_global`` blocks, or when ``b`` is one of ``num_random`` blocks drawn (seeded, without
replacement) for ``a`` among the blocks it does not already see. Every query token of block ``a``
then attends to every key token of block ``b``. ``block=1`` is the token-level pattern.

Differences from the reference implementation: its global blocks are the first and the last
block (here: the first ``num_global``); its random blocks are drawn per head and layer (here: one
draw per call, fixed by ``seed``).
"""
from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_int, coalesce_edges, expand_ranges, local_positions
from .random_graphs import sample_distinct


def _block_edges(lengths: list[int], block: int, window: int, num_global: int, num_random: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block graph: (src block, dst block) global block ids, plus block start and size ``[NB]``."""
    nb = [-(-L // block) for L in lengths]  # blocks per sequence (last one may be short)
    bpos, boff, blen = local_positions(nb)  # [NB]: block index in its sequence, offset, count
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(nb, dtype=torch.long))
    seq_len = torch.tensor(lengths, dtype=torch.long)[seq] if lengths else torch.zeros(0, dtype=torch.long)
    tok_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long).cumsum(0)])
    start = tok_ptr[seq] + bpos * block  # [NB] first token of each block
    size = torch.minimum(seq_len - bpos * block, torch.full_like(bpos, block))  # [NB]
    g = torch.clamp(blen, max=num_global)
    # window
    lo = (bpos - window).clamp(min=0)
    hi = torch.minimum(bpos + window, blen - 1)
    w_dst, w_src = expand_ranges(lo, hi - lo + 1)
    w_src = boff[w_dst] + w_src
    # global: everyone <- global blocks, global blocks <- everyone
    g1_dst, g1_src = expand_ranges(boff, g)
    g2_dst, g2_src = expand_ranges(boff, torch.where(bpos < num_global, blen, 0))
    # random: among non-global blocks outside the window (a contiguous range of ranks, with the
    # window's part [lo', hi'] cut out)
    parts_src, parts_dst = [w_src, g1_src, g2_src], [w_dst, g1_dst, g2_dst]
    if num_random > 0:
        lo_c = torch.maximum(lo, g)  # window part inside the non-global range
        cut = (hi - lo_c + 1).clamp(min=0)
        m = (blen - g - cut).clamp(min=0)
        m = torch.where(bpos < num_global, 0, m)  # global blocks already see everything
        gen = torch.Generator().manual_seed(seed)
        r_dst, rank = sample_distinct(m, num_random, gen)
        local = g[r_dst] + rank
        local = torch.where(local >= lo_c[r_dst], local + cut[r_dst], local)
        parts_src.append(boff[r_dst] + local)
        parts_dst.append(r_dst)
    bsrc, bdst = torch.cat(parts_src), torch.cat(parts_dst)
    return bsrc, bdst, start, size


def bigbird(n: Lengths, *, block: int = 1, window: int = 1, num_global: int = 1, num_random: int = 1,
            seed: int = 0) -> EdgeIndex:
    r"""BigBird: sliding window of blocks ∪ global blocks ∪ random blocks (seeded).

    Edge count (``block = 1``, ``L`` large): about ``L (2w + 1 + 2g + r)``; each query block gets
    ``min(r, m)`` random key blocks, ``m`` the blocks it would not see otherwise.

    Args:
        n: sequence length, or a list of lengths.
        block: tokens per block (BigBird-ITC: 64).
        window: radius in blocks (BigBird-ITC: 3 sliding blocks, radius 1).
        num_global: global blocks at the start of each sequence (BigBird-ITC: 2).
        num_random: random key blocks per query block (BigBird-ITC: 3).
        seed: seed of a private generator.

    Example:
        >>> g = bigbird(8, window=1, num_global=1, num_random=1, seed=0)
        >>> g.size(1), bool(torch.equal(g, bigbird(8, seed=0)))
        (41, True)
    """
    lengths = as_lengths(n)
    check_int("block", block, 1)
    check_int("window", window)
    check_int("num_global", num_global)
    check_int("num_random", num_random)
    check_int("seed", seed, None)
    bsrc, bdst, start, size = _block_edges(lengths, block, window, num_global, num_random, seed)
    # expand each block edge to all its token pairs: first the query tokens, then the key tokens
    e, qi = expand_ranges(start[bdst], size[bdst])
    pair, kj = expand_ranges(start[bsrc[e]], size[bsrc[e]])
    return coalesce_edges(kj, qi[pair], sum(lengths))


def bigbird_predicate(i: int, j: int, *, block: int = 1, window: int = 1, num_global: int = 1) -> bool:
    """Predicate twin of the deterministic part of :func:`bigbird` (window and global blocks).

    The random blocks have no rule: compare them with
    :func:`~gnn_transformer.topology.edge_set_predicate` of the drawn graph.
    """
    a, b = i // block, j // block
    return abs(a - b) <= window or a < num_global or b < num_global
