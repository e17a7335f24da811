"""Dense boolean masks <-> token graphs.

Polarity (the boolean meaning of ``torch.nn.functional.scaled_dot_product_attention``):
``mask[i, j] == True`` <=> edge ``j -> i`` <=> query ``i`` may attend to key ``j``.
``nn.MultiheadAttention``'s ``attn_mask`` uses the opposite polarity: pass ``~mask`` there.

Notation: ``N_src`` / ``N_dst`` nodes of the (batched) graph, ``B`` sequences, ``T`` the longest one.

``to_dense_mask`` is for tests, references and pictures: it materializes ``N_dst x N_src`` (or
``B x T x T``) booleans, which the graph path never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ._common import as_lengths, check_cells, finalize


def _check_edge_index(edge_index: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a ``[2, E]`` integer tensor and return ``(src, dst)`` as plain long tensors."""
    if not isinstance(edge_index, Tensor):
        raise ValueError(f"Expected 'edge_index' to be a tensor (got {type(edge_index).__name__})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"Expected 'edge_index' of shape [2, E] (got {list(edge_index.shape)})")
    if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
        raise ValueError(f"Expected 'edge_index' to hold integers (got {edge_index.dtype})")
    plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    plain = plain.to(torch.long)
    return plain[0], plain[1]


def _default_sizes(
    edge_index: Tensor, src: Tensor, dst: Tensor, num_src: int | None, num_dst: int | None
) -> tuple[int, int]:
    """Node counts: explicit arguments, else the ``EdgeIndex`` sparse size, else ``max + 1``."""
    if isinstance(edge_index, EdgeIndex):
        s, d = edge_index.sparse_size()
        num_src = s if num_src is None else num_src
        num_dst = d if num_dst is None else num_dst
    if num_src is None:
        num_src = int(src.max()) + 1 if src.numel() else 0
    if num_dst is None:
        num_dst = int(dst.max()) + 1 if dst.numel() else 0
    for name, v in (("num_src", num_src), ("num_dst", num_dst)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"Expected '{name}' to be a non-negative int (got {v!r})")
    return num_src, num_dst


def _check_range(src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> None:
    if src.numel() and (int(src.min()) < 0 or int(src.max()) >= num_src):
        raise ValueError(
            f"Expected sources in [0, {num_src}) for 'num_src'={num_src} "
            f"(got range [{int(src.min())}, {int(src.max())}])"
        )
    if dst.numel() and (int(dst.min()) < 0 or int(dst.max()) >= num_dst):
        raise ValueError(
            f"Expected targets in [0, {num_dst}) for 'num_dst'={num_dst} "
            f"(got range [{int(dst.min())}, {int(dst.max())}])"
        )


def _lengths_from(batch: Tensor | None, lengths: Sequence[int] | Tensor | int | None, name: str) -> list[int] | None:
    """Lengths from either a sorted PyG ``batch`` vector or a list of lengths."""
    if batch is not None and lengths is not None:
        raise ValueError(f"Give either 'batch' or '{name}', not both")
    if batch is None:
        return None if lengths is None else as_lengths(lengths, name)
    if not isinstance(batch, Tensor) or batch.dim() != 1 or batch.is_floating_point():
        raise ValueError(f"Expected 'batch' to be a 1-D integer tensor (got {batch!r})")
    if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("Expected 'batch' to be sorted (nodes of a sequence contiguous)")
    if batch.numel() and int(batch.min()) < 0:
        raise ValueError(f"Expected 'batch' to be non-negative (got min {int(batch.min())})")
    return torch.bincount(batch.to(torch.long)).tolist() if batch.numel() else []


def _check_edge_head(edge_head: Tensor, num_edges: int, num_heads: object) -> tuple[Tensor, int]:
    """``(edge_head as a long tensor, num_heads)``, checked against the edges and each other."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"Expected 'num_heads' to be a positive int with 'edge_head' (got {num_heads!r})")
    if not isinstance(edge_head, Tensor) or edge_head.dim() != 1 or edge_head.size(0) != num_edges:
        got = list(edge_head.shape) if isinstance(edge_head, Tensor) else type(edge_head).__name__
        raise ValueError(f"Expected 'edge_head' of shape [E] = [{num_edges}] (got {got})")
    if edge_head.is_floating_point() or edge_head.is_complex() or edge_head.dtype == torch.bool:
        raise ValueError(f"Expected 'edge_head' to hold integers (got dtype {edge_head.dtype})")
    head = edge_head.to(torch.long)
    if head.numel() and (int(head.min()) < 0 or int(head.max()) >= num_heads):
        raise ValueError(
            f"Expected 'edge_head' in [0, {num_heads}) for num_heads={num_heads} "
            f"(got range [{int(head.min())}, {int(head.max())}])"
        )
    return head, num_heads


def _mask_lengths(
    batch: Tensor | None, lengths: Sequence[int] | Tensor | int | None, src_lengths: Sequence[int] | Tensor | int | None
) -> tuple[list[int], list[int]] | None:
    """``(target lengths, source lengths)`` of a padded mask; ``None`` for one mask of the whole graph."""
    dst_lengths = _lengths_from(batch, lengths, "lengths")
    if src_lengths is None:
        return None if dst_lengths is None else (dst_lengths, dst_lengths)
    if dst_lengths is None:
        raise ValueError("'src_lengths' needs 'lengths' or 'batch' for the targets")
    s_lengths = as_lengths(src_lengths, "src_lengths")
    if len(s_lengths) != len(dst_lengths):
        raise ValueError(
            f"Expected 'src_lengths' to have {len(dst_lengths)} entries like 'lengths' (got {len(s_lengths)})"
        )
    return dst_lengths, s_lengths


def is_multigraph(edge_index: Tensor, num_src: int | None = None, *, edge_head: Tensor | None = None) -> bool:
    """Whether some edge ``j -> i`` appears more than once (for one head, with ``edge_head``)."""
    src, dst = _check_edge_index(edge_index)
    if src.numel() < 2:
        return False
    s = (int(src.max()) + 1) if num_src is None else max(num_src, 1)
    cell = dst * s + src  # [E]
    if edge_head is not None:
        head = edge_head.to(device=cell.device, dtype=torch.long)
        cell = head * (int(dst.max()) + 1) * s + cell
    return torch.unique(cell).numel() != src.numel()


def to_dense_mask(
    edge_index: Tensor,
    num_src: int | None = None,
    num_dst: int | None = None,
    *,
    batch: Tensor | None = None,
    lengths: Sequence[int] | Tensor | int | None = None,
    src_lengths: Sequence[int] | Tensor | int | None = None,
    coalesce: bool = False,
    edge_head: Tensor | None = None,
    num_heads: int | None = None,
) -> Tensor:
    """Dense boolean mask of a token graph: ``mask[i, j] = (j -> i) in E``.

    Without ``batch``/``lengths`` the result is ``[N_dst, N_src]`` over the whole (disjoint-union)
    graph. With ``lengths`` (or the PyG ``batch`` vector of the targets) it is padded per sequence,
    ``[B, T_dst, T_src]`` with ``mask[b, i, j]`` for local positions ``i, j``; the sources use
    ``src_lengths`` when given (cross attention), else the same lengths. Padding entries are False.
    A per-head graph (``edge_head`` with ``num_heads``) gives one mask per head:
    ``[H, N_dst, N_src]``, or ``[B, H, T_dst, T_src]`` per sequence (the layout of
    ``scaled_dot_product_attention``'s mask). A mask of more cells than the edge budget
    (:func:`max_edges`) is refused with a ``ValueError`` before it is allocated.

    Args:
        edge_index: ``[2, E]`` integer tensor (or ``EdgeIndex``), row 0 source, row 1 target.
        num_src, num_dst: node counts; default to the ``EdgeIndex`` sparse size, else ``max + 1``.
        batch: sorted sequence id of every target node (alternative to ``lengths``).
        lengths: lengths of the sequences of targets (and of sources, unless ``src_lengths``).
        src_lengths: lengths of the source sequences, for bipartite (cross) graphs.
        coalesce: merge duplicated edges instead of raising ``ValueError``.
        edge_head: ``[E]`` query head of each edge (a per-head graph); needs ``num_heads``.
        num_heads: the number of heads ``H`` of a per-head mask.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> to_dense_mask(causal(3)).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        >>> to_dense_mask(causal([2, 1]), lengths=[2, 1]).int().tolist()
        [[[1, 0], [1, 1]], [[1, 0], [0, 0]]]
        >>> head = torch.tensor([0, 1, 1])  # causal(2)'s edges 0->0, 0->1, 1->1
        >>> to_dense_mask(causal(2), edge_head=head, num_heads=2).int().tolist()
        [[[1, 0], [0, 0]], [[0, 0], [1, 1]]]
    """
    src, dst = _check_edge_index(edge_index)
    if edge_head is None and num_heads is not None:
        raise ValueError(f"'num_heads' ({num_heads!r}) needs 'edge_head' (a per-head graph)")
    head, heads = None, 0
    if edge_head is not None:
        head, heads = _check_edge_head(edge_head, src.numel(), num_heads)
        head = head.to(src.device)
    padded = _mask_lengths(batch, lengths, src_lengths)
    if padded is not None:  # the lengths give the sizes an EdgeIndex does not
        dst_lengths, s_lengths = padded
        known = edge_index.sparse_size() if isinstance(edge_index, EdgeIndex) else (None, None)
        if num_dst is None and known[1] is None:
            num_dst = sum(dst_lengths)
        if num_src is None and known[0] is None:
            num_src = sum(s_lengths)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    if not coalesce and is_multigraph(edge_index, num_src, edge_head=head):
        raise ValueError(
            "Expected a graph without duplicated edges in 'edge_index' (a duplicated "
            "edge is two messages and has no dense-mask equivalent); pass "
            "coalesce=True to merge them"
        )

    if padded is None:
        check_cells("to_dense_mask", (heads, num_dst, num_src) if head is not None else (num_dst, num_src))
        if head is not None:
            mask = torch.zeros(heads, num_dst, num_src, dtype=torch.bool, device=src.device)
            mask[head, dst, src] = True
            return mask
        mask = torch.zeros(num_dst, num_src, dtype=torch.bool, device=src.device)
        mask[dst, src] = True
        return mask

    dst_lengths, s_lengths = padded
    if sum(dst_lengths) != num_dst:
        raise ValueError(f"Expected 'lengths' to sum to num_dst={num_dst} (got {sum(dst_lengths)})")
    if sum(s_lengths) != num_src:
        raise ValueError(f"Expected source lengths to sum to num_src={num_src} (got {sum(s_lengths)})")
    B = len(dst_lengths)
    t_dst, t_src = max(dst_lengths, default=0), max(s_lengths, default=0)
    check_cells("to_dense_mask", (B, heads, t_dst, t_src) if head is not None else (B, t_dst, t_src))
    d_len = torch.tensor(dst_lengths, dtype=torch.long, device=src.device)
    s_len = torch.tensor(s_lengths, dtype=torch.long, device=src.device)
    d_batch = torch.repeat_interleave(torch.arange(B, device=src.device), d_len)  # [N_dst]
    s_batch = torch.repeat_interleave(torch.arange(B, device=src.device), s_len)  # [N_src]
    d_ptr = torch.cat([d_len.new_zeros(1), d_len.cumsum(0)])
    s_ptr = torch.cat([s_len.new_zeros(1), s_len.cumsum(0)])
    b = d_batch[dst]  # [E]
    if bool((s_batch[src] != b).any()):
        raise ValueError(
            "Expected every edge to stay within one sequence for a padded mask "
            "(an edge of 'edge_index' joins two sequences of 'lengths')"
        )
    if head is not None:
        mask = torch.zeros(B, heads, t_dst, t_src, dtype=torch.bool, device=src.device)
        mask[b, head, dst - d_ptr[b], src - s_ptr[b]] = True
        return mask
    mask = torch.zeros(B, t_dst, t_src, dtype=torch.bool, device=src.device)
    mask[b, dst - d_ptr[b], src - s_ptr[b]] = True
    return mask


def from_dense_mask(
    mask: Tensor,
    lengths: Sequence[int] | Tensor | int | None = None,
    *,
    src_lengths: Sequence[int] | Tensor | int | None = None,
) -> EdgeIndex:
    """Token graph of a dense boolean mask (inverse of :func:`to_dense_mask`).

    ``[T_q, T_k]`` gives a graph with ``T_k`` sources and ``T_q`` targets. ``[B, T_q, T_k]`` gives
    the disjoint union of the ``B`` sequences, each cut to its length (``lengths`` for queries,
    ``src_lengths`` for keys, defaulting to ``lengths``, then to the full ``T``); entries in the
    padding are ignored.

    Example:
        >>> m = torch.tensor([[True, False], [True, True]])
        >>> from_dense_mask(m).tolist()
        [[0, 0, 1], [0, 1, 1]]
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"Expected 'mask' to be a bool tensor (got "
            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__})"
        )
    if mask.dim() == 2:
        if lengths is not None or src_lengths is not None:
            raise ValueError("'lengths' only applies to a batched mask [B, T_q, T_k]")
        dst, src = mask.nonzero(as_tuple=True)
        return finalize(src, dst, mask.size(1), mask.size(0))
    if mask.dim() != 3:
        raise ValueError(f"Expected 'mask' of shape [T_q, T_k] or [B, T_q, T_k] (got {list(mask.shape)})")
    B, t_q, t_k = mask.shape
    q_len = [t_q] * B if lengths is None else as_lengths(lengths, "lengths")
    if src_lengths is not None:
        k_len = as_lengths(src_lengths, "src_lengths")
    elif lengths is not None and t_q == t_k:
        k_len = q_len  # self-attention: keys are the queries
    else:
        k_len = [t_k] * B
    for name, ls, t in (("lengths", q_len, t_q), ("src_lengths", k_len, t_k)):
        if len(ls) != B:
            raise ValueError(f"Expected '{name}' to have B={B} entries (got {len(ls)})")
        if any(v > t for v in ls):
            raise ValueError(f"Expected '{name}' at most {t} (got {ls})")
    ql = torch.tensor(q_len, dtype=torch.long, device=mask.device)
    kl = torch.tensor(k_len, dtype=torch.long, device=mask.device)
    valid = (torch.arange(t_q, device=mask.device)[None, :, None] < ql[:, None, None]) & (
        torch.arange(t_k, device=mask.device)[None, None, :] < kl[:, None, None]
    )
    b, i, j = (mask & valid).nonzero(as_tuple=True)
    q_ptr = torch.cat([ql.new_zeros(1), ql.cumsum(0)])
    k_ptr = torch.cat([kl.new_zeros(1), kl.cumsum(0)])
    return finalize(k_ptr[b] + j, q_ptr[b] + i, int(kl.sum()), int(ql.sum()))
