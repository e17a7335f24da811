"""Implicit graphs in the kernels: the tile list of a block structure, without an edge list.

A block structure (:class:`BlockStructure`; :class:`gnn_transformer.topology.BlockGraph` is one)
lists the (query block, key block) tiles of a graph with a mask per partial tile, optionally a query
head per tile. :func:`block_tiles` turns it into the :class:`.tiling.TileList` that the ``tiled``
kernels run, reading only the tiles (its ``edge_ids`` / ``edge_cell``, which only an edge bias and
dropout read, stay empty):

- **layout**: blocks of a structure may hold fewer tokens than the block size (``q_ptr`` /
  ``k_ptr``: the blocks of each sequence of a batch); the kernels then run on *padded rows*, block
  ``b`` at rows ``b·B ...``, token ``i`` at row ``pad[i]``, and the padding cells are off every mask.
- **per-head**: tile ``(h, qb, kb)`` becomes one tile of a one-head graph on (head, padded row)
  nodes, query block ``h·NBq + qb`` and key block ``(h // group)·NBk + kb`` (as :mod:`.heads`
  relabels edges), so the work follows the tiles that exist, never ``H x`` their union.
- **sub-tiles**: a block size that divides the structure's cuts each tile into sub-tiles (empty
  ones dropped, full ones unmasked): the CUDA-core tiles of float32 on the GPU.

Notation: ``T`` tiles, ``Bq`` / ``Bk`` block sizes, ``NBq`` / ``NBk`` query / key blocks, ``H`` /
``H_kv`` query / key-value heads, ``D`` head dimension, ``R`` padded rows.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .planner import BlockStructure
from .tiling import TileList


# tile lists of block structures: structure -> {(block, heads, kv heads, device): (tiles, layout)}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _padded_rows(ptr: Tensor | None, n: int, block: int) -> Tensor | None:
    """``[N]`` padded row of each token (``None``: the blocks are uniform, row = token)."""
    if ptr is None:
        return None
    sizes = ptr.diff()  # [NB]
    owner = torch.repeat_interleave(torch.arange(sizes.numel(), device=ptr.device), sizes)  # [N]
    return owner * block + (torch.arange(n, device=ptr.device) - ptr[owner])


def _sub_tiles(graph: BlockStructure, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(q_block, k_block, mask_index, masks, tile_head)`` in blocks of ``block`` (dividing both
    block sizes), in padded rows; sorted by (head, query block, key block)."""
    bq, bk = graph.block_q, graph.block_k
    if bq == block and bk == block:
        return graph.q_block, graph.k_block, graph.mask_index, graph.masks, graph.tile_head
    sq, sk = bq // block, bk // block
    device = graph.q_block.device
    full = torch.ones(1, bq, bk, dtype=torch.bool, device=device)
    pool = torch.cat([graph.masks, full])  # [P + 1, Bq, Bk], the last one a full tile's
    mi = torch.where(graph.mask_index >= 0, graph.mask_index, graph.masks.size(0))  # [T]
    parts = pool.view(-1, sq, block, sk, block).permute(0, 1, 3, 2, 4)  # [P + 1, sq, sk, b, b]
    count = parts.sum((3, 4))  # [P + 1, sq, sk]
    cells = count[mi]  # [T, sq, sk]
    t, a, c = (cells > 0).nonzero(as_tuple=True)  # sub-tiles with edges, in (tile, row, col) order
    q_block = graph.q_block[t] * sq + a
    k_block = graph.k_block[t] * sk + c
    head = None if graph.tile_head is None else graph.tile_head[t]
    # sort by (head, query sub-block, key sub-block): tiles of one query block interleave their rows
    nq, nk = graph.num_q_blocks * sq, graph.num_k_blocks * sk
    key = q_block * nk + k_block
    if head is not None:
        key = key + head * nq * nk
    order = torch.argsort(key)
    t, a, c, q_block, k_block = t[order], a[order], c[order], q_block[order], k_block[order]
    head = None if head is None else head[order]
    partial = cells[t, a, c] < block * block  # [T']
    # one mask per distinct (mask, row, col) of the structure
    source = (mi[t] * sq + a) * sk + c  # [T']
    uniq, inverse = torch.unique(source[partial], return_inverse=True)
    masks = parts.reshape(-1, block, block)[uniq].contiguous()  # [P', b, b]
    mask_index = torch.full_like(q_block, -1)
    mask_index[partial] = inverse
    return q_block, k_block, mask_index, masks, head


def block_tiles(
    graph: BlockStructure, block: int, num_heads: int, num_kv_heads: int
) -> tuple[TileList, Tensor | None, Tensor | None]:
    """``(tiles, q_rows, k_rows)``: the tile list of ``graph`` in blocks of ``block`` (a divisor of
    its block sizes), and the padded row of each query / key token (``None``: row = token). For a
    per-head structure the tiles are on (head, padded row) nodes (module docstring). Cached per
    structure."""
    per_graph = _CACHE.setdefault(graph, {})
    cache_key = (block, num_heads, num_kv_heads)
    if cache_key in per_graph:
        return per_graph[cache_key]
    q_rows = _padded_rows(graph.q_ptr, graph.num_dst, graph.block_q)
    k_rows = _padded_rows(graph.k_ptr, graph.num_src, graph.block_k)
    q_block, k_block, mask_index, masks, head = _sub_tiles(graph, block)
    nqb = graph.num_q_blocks * (graph.block_q // block)  # query blocks of one head
    nkb = graph.num_k_blocks * (graph.block_k // block)
    n_dst = graph.num_dst if q_rows is None else nqb * block
    n_src = graph.num_src if k_rows is None else nkb * block
    if head is not None:  # one head on (head, padded row) nodes; a short last block pads each head's rows
        # (the structure's last block, which sub-tiles do not change: 40 tokens in blocks of 16 pad
        # each head to 48 rows even in sub-tiles of 8)
        if q_rows is None and graph.num_dst != nqb * block:
            q_rows = torch.arange(graph.num_dst, device=q_block.device)
        if k_rows is None and graph.num_src != nkb * block:
            k_rows = torch.arange(graph.num_src, device=q_block.device)
        group = num_heads // num_kv_heads
        q_block = head * nqb + q_block
        k_block = torch.div(head, group, rounding_mode="floor") * nkb + k_block
        n_dst, n_src = num_heads * nqb * block, num_kv_heads * nkb * block
    nqb = -(-n_dst // block)  # the tile list's query blocks (sub-tiles past the tokens are empty, dropped)
    tile_ptr = torch.zeros(nqb + 1, dtype=torch.long, device=q_block.device)
    tile_ptr[1:] = torch.bincount(q_block, minlength=nqb).cumsum(0)
    cells = masks.sum((1, 2))  # [P]
    count = torch.where(mask_index >= 0, cells[mask_index.clamp(min=0)] if cells.numel() else 0, block * block)
    none = torch.empty(0, dtype=torch.long, device=q_block.device)
    tiles = TileList(
        block, block, n_src, n_dst, q_block, k_block, tile_ptr, count, mask_index, masks.contiguous(), none, none
    )
    per_graph[cache_key] = (tiles, q_rows, k_rows)
    return per_graph[cache_key]


def to_rows(x: Tensor, rows: Tensor | None, num_rows: int, per_head: bool) -> Tensor:
    """``x [N, H, D]`` on the padded rows of :func:`block_tiles`: ``[R, H, D]`` (zeros off the
    tokens), or ``[H * R, 1, D]`` for a per-head structure; ``x`` itself when nothing moves."""
    n, h, d = x.shape
    if not per_head:
        if rows is None:
            return x
        out = x.new_zeros(num_rows, h, d)
        out[rows] = x
        return out  # [R, H, D]
    if rows is None:  # each head's rows are its tokens
        return x.transpose(0, 1).reshape(h * n, 1, d)  # [H N, 1, D]
    per = num_rows // h  # padded rows of one head
    out = x.new_zeros(h, per, d)
    out[:, rows] = x.transpose(0, 1)
    return out.view(h * per, 1, d)  # [H R, 1, D]


def from_rows(y: Tensor, rows: Tensor | None, num_heads: int, per_head: bool) -> Tensor:
    """The tokens' rows of a result ``y`` on padded rows (``[R, H, ...]`` or ``[H * R, 1, ...]``):
    ``[N, H, ...]``, the inverse of :func:`to_rows`."""
    if not per_head:
        return y if rows is None else y[rows]
    y = y.reshape(num_heads, -1, *y.shape[2:])  # [H, R, ...]
    if rows is not None:
        y = y[:, rows]
    return y.transpose(0, 1)  # [N, H, ...]
