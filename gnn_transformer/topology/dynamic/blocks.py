"""Block selection (MoBA, Lu et al., 2025, arXiv:2502.13189): query blocks pick their best key blocks."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from .._common import Lengths, check_bool, check_edges, check_int, expand_ranges
from ..implicit import BlockGraph, block_selection
from ._common import check_qk, detached_scores_dtype, no_edges, sequence_pairs, token_layout
from .topk import dense_topk


BLOCK_CHUNK = 1024  # query blocks scored at a time by block_topk


@overload
def block_topk(
    q: Tensor,
    k: Tensor,
    block_size: int,
    num_blocks: int,
    *,
    causal: bool = ...,
    batch: Tensor | None = ...,
    lengths: Lengths | None = ...,
    implicit: Literal[False] = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def block_topk(
    q: Tensor,
    k: Tensor,
    block_size: int,
    num_blocks: int,
    *,
    causal: bool = ...,
    batch: Tensor | None = ...,
    lengths: Lengths | None = ...,
    implicit: Literal[True],
) -> BlockGraph: ...
@overload
def block_topk(
    q: Tensor,
    k: Tensor,
    block_size: int,
    num_blocks: int,
    *,
    causal: bool = ...,
    batch: Tensor | None = ...,
    lengths: Lengths | None = ...,
    implicit: bool,
) -> tuple[Tensor, Tensor] | BlockGraph: ...


@torch.no_grad()
def block_topk(
    q: Tensor,
    k: Tensor,
    block_size: int,
    num_blocks: int,
    *,
    causal: bool = False,
    batch: Tensor | None = None,
    lengths: Lengths | None = None,
    implicit: bool = False,
) -> tuple[Tensor, Tensor] | BlockGraph:
    r"""Block selection (MoBA, Lu et al. 2025): each query block keeps its best key blocks.

    Each sequence is cut into blocks of ``block_size`` positions (the last one possibly shorter);
    query block :math:`b` and key block :math:`b` cover the same positions. Keys and queries are
    mean-pooled over the real tokens of a block, :math:`\bar k_c = \frac{1}{|c|}\sum_{j \in c} k_j`,
    :math:`\bar q_b = \frac{1}{|b|}\sum_{i \in b} q_i`, and head :math:`h` of query block :math:`b`
    keeps

    .. math::
        K_h(b) = \{b\} \cup \operatorname{top}_{\mathrm{num\_blocks}}
        \{ \langle \bar q_b^h, \bar k_c^{\lfloor h/g \rfloor} \rangle : c \ne b \}

    (ties to the lower block index; ties of the scores as computed, so two blocks whose exact
    scores tie can rank by the rounding of their means; with ``causal`` only blocks :math:`c < b`
    compete). The own
    block is always kept and does not count toward ``num_blocks``, so ``num_blocks = 0`` is local
    block attention. The edges are all ``j -> i`` with ``j`` in a kept block of ``i``'s block (with
    ``causal``, only ``j <= i`` inside the own block). The gate is per query block (MoBA's is per
    query token), so every query of a block reads the same key blocks. Self-attention only.

    Args:
        q: queries ``[N, H, D]``.
        k: keys ``[N, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        block_size: positions per block, ``>= 1`` and at most the longest sequence.
        num_blocks: key blocks kept besides the own block, ``>= 0`` (more than there are: all).
        causal: only blocks at or before the query's, and ``j <= i`` inside its own.
        batch: sorted sequence id of every token; or
        lengths: the sequence lengths (at most one of the two; neither: one sequence).
        implicit: return the kept blocks as a per-head :class:`~gnn_transformer.topology.BlockGraph`
            (one tile per kept (head, query block, key block), masks shared per kind: a short block,
            the causal own block) instead of edges; its ``edges()`` are the edges returned otherwise.

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source); with ``implicit``
        a :class:`~gnn_transformer.topology.BlockGraph`.

    Example:
        >>> q = k = torch.ones(6, 1, 2)  # all blocks tie: the lower block index wins
        >>> edge_index, edge_head = block_topk(q, k, 2, 1, causal=True)
        >>> edge_index.tolist()
        [[0, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 4, 0, 1, 4, 5], [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5]]
    """
    H, _ = check_qk(q, k)
    check_int("block_size", block_size, 1)
    check_int("num_blocks", num_blocks, 0)
    check_bool("causal", causal)
    check_bool("implicit", implicit)
    lens, _ = sequence_pairs("block_topk", q, k, batch, lengths)
    longest = max(lens, default=0)
    if longest and block_size > longest:
        raise ValueError(f"Expected 'block_size' <= the longest sequence ({longest}) (got {block_size})")
    device, n = q.device, q.size(0)
    if n == 0:
        if implicit:
            none = torch.empty(0, dtype=torch.long, device=device)
            return block_selection(
                none, none, none, torch.zeros(1, dtype=torch.long, device=device), block_size, H, causal
            )
        return no_edges(device)
    q, k = detached_scores_dtype(q), detached_scores_dtype(k)
    per_seq = [-(-L // block_size) for L in lens]  # blocks per sequence
    NB = sum(per_seq)
    seq, pos, _, _ = token_layout(lens, device)
    block_offset = torch.tensor([0] + per_seq[:-1], dtype=torch.long).cumsum(0).to(device)
    block = block_offset[seq] + pos // block_size  # [N] block of each token
    size = torch.bincount(block, minlength=NB)  # [NB] real tokens per block
    start = size.cumsum(0) - size  # [NB] first token of each block
    q_mean = torch.zeros(NB, *q.shape[1:], dtype=q.dtype, device=device).index_add_(0, block, q)
    k_mean = torch.zeros(NB, *k.shape[1:], dtype=k.dtype, device=device).index_add_(0, block, k)
    q_mean, k_mean = q_mean / size[:, None, None], k_mean / size[:, None, None]  # [NB, H, D], [NB, H_kv, D]
    # -- the kept blocks: the best others, then the own block --
    hb, qb, kb = dense_topk(
        q_mean,
        k_mean,
        min(num_blocks, max(per_seq)),
        per_seq,
        per_seq,
        causal=causal,
        exclude_self=True,
        chunk=BLOCK_CHUNK,
    )
    own = torch.arange(NB, device=device).repeat(H)
    hb = torch.cat([hb, torch.arange(H, device=device).repeat_interleave(NB)])
    qb, kb = torch.cat([qb, own]), torch.cat([kb, own])
    order = torch.argsort((hb * NB + qb) * NB + kb)
    hb, qb, kb = hb[order], qb[order], kb[order]  # [P] sorted by (head, query block, key block)
    if implicit:
        return block_selection(hb, qb, kb, torch.cat([start, start.new_tensor([n])]), block_size, H, causal)
    pair_edges = size[qb] * size[kb]
    if causal:
        pair_edges = torch.where(qb == kb, size[qb] * (size[qb] + 1) // 2, pair_edges)
    check_edges("block_topk", int(pair_edges.sum()), n=lens)
    # -- expand: rows (head, query), then kept blocks, then the keys of each --
    counts = torch.bincount(hb * NB + qb, minlength=H * NB)  # kept blocks per (head, query block)
    first = counts.cumsum(0) - counts
    row_seg = (torch.arange(H, device=device)[:, None] * NB + block[None]).reshape(-1)  # [H * N]
    row, p = expand_ranges(first[row_seg], counts[row_seg])  # one entry per (row, kept block)
    i, kept = row % n, kb[p]
    count = size[kept]
    if causal:
        count = torch.where(kept == block[i], i - start[kept] + 1, count)
    entry, j = expand_ranges(start[kept], count)
    row = row[entry]
    return torch.stack([j, row % n]), row // n
