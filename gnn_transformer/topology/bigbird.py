"""BigBird attention (Zaheer et al., 2020, arXiv:2007.14062): window + global + random.

Built on blocks of ``block`` tokens, like BigBird's block-sparse "ITC" implementation: query block
``a`` attends to key block ``b`` when ``|a - b| <= window``, when either is a global block, or when
``b`` is one of ``num_random`` blocks drawn (seeded, without replacement) for ``a`` among the
blocks it does not already see. Every query token of block ``a`` then attends to every key token
of block ``b``. ``block=1`` is the token-level pattern.

The ``num_global`` global blocks are the first ones (``global_at="start"``), or, as in the
reference implementation, split between both ends of the sequence (``global_at="ends"``: the first
``ceil(g / 2)`` and the last ``floor(g / 2)`` blocks; ``g = 2`` is the first and the last block).
One difference remains: the reference draws random blocks per head and layer, here one draw per
call, fixed by ``seed``.
"""

from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import (
    Lengths,
    as_lengths,
    check_edges,
    check_int,
    check_seed,
    expand_ranges,
    local_positions,
    wrap_sorted,
)
from .random_graphs import sample_distinct


def _block_edges(
    lengths: list[int], block: int, window: int, num_global: int, num_random: int, seed: int, global_at: str = "start"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block graph: (src block, dst block) global block ids, plus block start and size ``[NB]``."""
    nb = [-(-L // block) for L in lengths]  # blocks per sequence (last one may be short)
    bpos, boff, blen = local_positions(nb)  # [NB]: block index in its sequence, offset, count
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(nb, dtype=torch.long))
    seq_len = torch.tensor(lengths, dtype=torch.long)[seq] if lengths else torch.zeros(0, dtype=torch.long)
    tok_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long).cumsum(0)])
    start = tok_ptr[seq] + bpos * block  # [NB] first token of each block
    size = torch.minimum(seq_len - bpos * block, torch.full_like(bpos, block))  # [NB]
    head, tail = (num_global, 0) if global_at == "start" else (-(-num_global // 2), num_global // 2)
    g = torch.clamp(blen, max=head)  # [NB] global blocks at the start of each block's sequence
    gt = torch.minimum(torch.clamp(blen - g, min=0), torch.full_like(blen, tail))  # ... at the end
    is_global = (bpos < g) | (bpos >= blen - gt)  # [NB]
    # window
    lo = (bpos - window).clamp(min=0)
    hi = torch.minimum(bpos + window, blen - 1)
    w_dst, w_src = expand_ranges(lo, hi - lo + 1)
    w_src = boff[w_dst] + w_src
    # global: everyone <- global blocks (first g, last gt), global blocks <- everyone
    g1_dst, g1_src = expand_ranges(boff, g)
    g3_dst, g3_src = expand_ranges(boff + blen - gt, gt)
    g2_dst, g2_src = expand_ranges(boff, torch.where(is_global, blen, 0))
    # random: among non-global blocks outside the window (a contiguous range of ranks
    # [g, blen - gt), with the window's part [lo', hi'] cut out)
    parts_src, parts_dst = [w_src, g1_src, g3_src, g2_src], [w_dst, g1_dst, g3_dst, g2_dst]
    if num_random > 0:
        lo_c = torch.maximum(lo, g)  # window part inside the non-global range
        hi_c = torch.minimum(hi, blen - gt - 1)
        cut = (hi_c - lo_c + 1).clamp(min=0)
        m = (blen - g - gt - cut).clamp(min=0)
        m = torch.where(is_global, 0, m)  # global blocks already see everything
        gen = torch.Generator().manual_seed(seed)
        r_dst, rank = sample_distinct(m, num_random, gen)
        local = g[r_dst] + rank
        local = torch.where(local >= lo_c[r_dst], local + cut[r_dst], local)
        parts_src.append(boff[r_dst] + local)
        parts_dst.append(r_dst)
    bsrc, bdst = torch.cat(parts_src), torch.cat(parts_dst)
    return bsrc, bdst, start, size


def _max_edges(L: int, block: int, window: int, num_global: int, num_random: int) -> int:
    """Upper bound of the edges of one sequence of ``L`` tokens: a non-global query block sees at most
    ``2w + 1`` window, ``g`` global and ``r`` random key blocks; a global one sees all ``L`` keys."""
    nb = -(-L // block)
    key_blocks = min(nb, 2 * window + 1 + min(num_global, nb) + num_random)
    global_queries = min(L, num_global * block)
    return min(L * L, L * min(L, key_blocks * block) + global_queries * L)


def bigbird(
    n: Lengths,
    *,
    block: int = 1,
    window: int = 1,
    num_global: int = 1,
    num_random: int = 1,
    seed: int = 0,
    global_at: str = "start",
) -> EdgeIndex:
    r"""BigBird: sliding window of blocks ∪ global blocks ∪ random blocks (seeded).

    Edge count (``block = 1``, ``L`` large): about ``L (2w + 1 + 2g + r)``; each query block gets
    ``min(r, m)`` random key blocks, ``m`` the blocks it would not see otherwise.

    Args:
        n: sequence length, or a list of lengths.
        block: tokens per block (BigBird-ITC: 64).
        window: radius in blocks (BigBird-ITC: 3 sliding blocks, radius 1).
        num_global: global blocks at the start of each sequence (BigBird-ITC: 2).
        num_random: random key blocks per query block (BigBird-ITC: 3).
        seed: seed of a private generator, an int in ``[0, 2**63 - 1]``.
        global_at: ``"start"`` (the first ``num_global`` blocks are global) or ``"ends"`` (the first
            ``ceil(num_global / 2)`` and the last ``floor(num_global / 2)``, as in BigBird-ITC).

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
    check_seed("seed", seed)
    if global_at not in ("start", "ends"):
        raise ValueError(f"Expected 'global_at' to be 'start' or 'ends' (got {global_at!r})")
    # sizes beyond the sequence give the same graph: clamp them before any int64 arithmetic (a
    # block of at least L is the whole sequence; window and global blocks of at least its block
    # count cover all blocks, at either end)
    longest = max(lengths, default=0)
    block = min(block, max(longest, 1))
    most_blocks = -(-longest // block)
    window, num_global = min(window, most_blocks), min(num_global, most_blocks)
    check_edges("bigbird", sum(_max_edges(L, block, window, num_global, num_random) for L in lengths), n=lengths)
    bsrc, bdst, start, size = _block_edges(lengths, block, window, num_global, num_random, seed, global_at)
    # Distinct block pairs, sorted by query block, then key block (the window, global and random
    # parts overlap): blocks are disjoint ranges of tokens in order, so their token pairs, expanded
    # query token by query token, are distinct and sorted by target, then source, with no sort of
    # the E token edges.
    nb = max(start.numel(), 1)
    pairs = torch.unique(bdst * nb + bsrc)  # [P] sorted
    p_dst, p_src = pairs // nb, pairs % nb
    ptr = torch.zeros(start.numel() + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(p_dst, minlength=start.numel()).cumsum(0)
    block_of = torch.repeat_interleave(torch.arange(start.numel()), size)  # [N] block of each token
    qi, p = expand_ranges(ptr[block_of], (ptr[1:] - ptr[:-1])[block_of])  # (query token, block pair)
    kb = p_src[p]  # key block of each (query token, block pair)
    pair, kj = expand_ranges(start[kb], size[kb])
    return wrap_sorted(kj, qi[pair], sum(lengths))


def bigbird_predicate(
    i: int,
    j: int,
    L: int | None = None,
    *,
    block: int = 1,
    window: int = 1,
    num_global: int = 1,
    global_at: str = "start",
) -> bool:
    """Predicate twin of the deterministic part of :func:`bigbird` (window and global blocks).

    ``L`` (the sequence length) is needed only for ``global_at="ends"``. The random blocks have no
    rule: compare them with :func:`~gnn_transformer.topology.edge_set_predicate` of the drawn graph.
    """
    a, b = i // block, j // block
    if global_at == "start":
        head, tail, nb = num_global, 0, 0
    else:
        if L is None:
            raise ValueError(f"Expected 'L' (the sequence length) with global_at={global_at!r} (got None)")
        head, tail, nb = -(-num_global // 2), num_global // 2, -(-L // block)

    def is_global(x: int) -> bool:
        return x < head or (tail > 0 and x >= nb - tail)

    return abs(a - b) <= window or is_global(a) or is_global(b)
