"""Block structure of a token graph: the edge set as a list of (query block, key block) tiles.

Targets are cut into blocks of ``block_q`` rows, sources into blocks of ``block_k`` columns. Every
pair of blocks holding at least one edge is a tile. A tile with all ``block_q × block_k`` edges
(each once) is *full* and needs no mask; any other tile carries a boolean mask ``[Bq, Bk]``. With an
``edge_bias``, kernels read the bias of each cell through :meth:`TileList.cell_edge` (the edge of
every cell). A cell holds one edge: a graph that repeats an edge ``j -> i`` tiles one copy and
leaves the others to the fused path (see :func:`gnn_transformer.kernels.attend`), so every copy
stays a message of its own, with its own bias and dropout mask.

Notation: ``T`` tiles, ``P`` partial tiles, ``E`` edges, ``Bq`` / ``Bk`` block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .planner import CSRGraph, Extras


@dataclass(eq=False)
class TileList:
    """Tiles sorted by query block, then key block."""

    block_q: int
    block_k: int
    num_src: int
    num_dst: int
    q_block: Tensor  # [T]
    k_block: Tensor  # [T]
    tile_ptr: Tensor  # [num_q_blocks + 1] tiles of query block b: tile_ptr[b]:tile_ptr[b + 1]
    count: Tensor  # [T] edges per tile
    mask_index: Tensor  # [T] row of `masks` for a partial tile, -1 for a full one
    masks: Tensor  # [P, Bq, Bk] bool
    edge_ids: Tensor  # [E_t] positions (in the graph's target-sorted order) of the tiled edges
    edge_cell: Tensor  # [E_t] flat cell tile * Bq * Bk + r * Bk + c of each tiled edge
    # launch structures of the Triton kernels (the pieces of long query / key blocks)
    launch_cache: Extras = field(default_factory=dict, init=False, repr=False)

    @property
    def num_tiles(self) -> int:
        return self.q_block.numel()

    @property
    def num_q_blocks(self) -> int:
        return -(-self.num_dst // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.num_src // self.block_k)

    def cell_edge(self) -> Tensor:
        """``[T, Bq, Bk]`` int32 (int64 past ``2**31 - 1`` edges): the tiled edge (its row in
        ``edge_ids``) of every cell, ``-1`` where there is none. With it, kernels read an
        ``edge_bias`` ``[E_t, H]`` per cell and write its gradient per edge, instead of building
        ``[T, H, Bq, Bk]`` bias tiles (``H`` times larger)."""
        if not hasattr(self, "_cell_edge"):
            # int32 halves the memory; past 2**31 - 1 tiled edges the ids need int64
            ids = torch.int32 if self.edge_cell.numel() < 2**31 else torch.int64
            flat = torch.full(
                (self.num_tiles * self.block_q * self.block_k,), -1, dtype=ids, device=self.edge_cell.device
            )
            flat[self.edge_cell] = torch.arange(self.edge_cell.numel(), dtype=ids, device=flat.device)
            self._cell_edge = flat.view(self.num_tiles, self.block_q, self.block_k)
        return self._cell_edge

    def by_key(self) -> tuple[Tensor, Tensor]:
        """``(order [T], k_ptr [num_k_blocks + 1])``: tile ids sorted by key block, then query
        block, for passes that walk the columns (dK / dV)."""
        if not hasattr(self, "_by_key"):
            order = torch.argsort(self.k_block * max(self.num_q_blocks, 1) + self.q_block, stable=True)
            k_ptr = torch.zeros(self.num_k_blocks + 1, dtype=torch.long, device=self.q_block.device)
            k_ptr[1:] = torch.bincount(self.k_block, minlength=self.num_k_blocks).cumsum(0)
            self._by_key = (order, k_ptr)
        return self._by_key


def sorted_unique(src: Tensor, dst: Tensor) -> bool:
    """Whether the edges ``src[e] -> dst[e]`` come sorted by target, then source, with no edge
    twice: a linear-time proof that no edge repeats (topology builders emit this order)."""
    if src.numel() < 2:
        return True
    step = dst[1:] - dst[:-1]
    return bool(((step > 0) | ((step == 0) & (src[1:] > src[:-1]))).all())


def unique_keys(key: Tensor, num_keys: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(key, return_inverse=True, return_counts=True)`` for keys in
    ``[0, num_keys)``: counted in linear time by ``bincount`` when ``num_keys`` is at most twice the
    number of keys (the tile keys of block-structured graphs), else sorted."""
    if num_keys > 2 * key.numel():
        return torch.unique(key, return_inverse=True, return_counts=True)
    counts = torch.bincount(key, minlength=num_keys)  # [num_keys]
    present = counts > 0
    uniq = present.nonzero().flatten()  # [T]
    rank = present.cumsum(0) - 1  # [num_keys] position of each present key in uniq
    return uniq, rank[key], counts[uniq]


def _tile_keys(src: Tensor, dst: Tensor, block_q: int, block_k: int, num_k_blocks: int) -> Tensor:
    """``[E]`` tile key ``q_block * num_k_blocks + k_block`` of each edge (in place: one temporary)."""
    return (dst // block_q).mul_(num_k_blocks).add_(src // block_k)


def tile_stats(graph: CSRGraph, block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(key [T], inverse [E], count [T])`` of the tiles of the whole graph (cached):
    ``key = q_block * num_k_blocks + k_block``, ``inverse`` the tile of each edge."""
    cache_key = ("tile_stats", block_q, block_k)
    if cache_key not in graph.extras:
        num_k_blocks = max(-(-graph.num_src // block_k), 1)
        num_q_blocks = -(-graph.num_dst // block_q)
        key = _tile_keys(graph.src, graph.dst, block_q, block_k, num_k_blocks)  # [E]
        graph.extras[cache_key] = unique_keys(key, num_q_blocks * num_k_blocks)
    return graph.extras[cache_key]


def build_tiles(
    graph: CSRGraph, block_q: int, block_k: int, edge_ids: Tensor | None = None, *, distinct: bool = False
) -> TileList:
    """The tile list of the edges ``edge_ids`` (all edges if ``None``) of ``graph``; they must not
    repeat an edge ``j -> i`` (a cell holds one edge), which is checked unless the caller already
    knows it (``distinct``: ``attend``'s parts leave the copies out)."""
    device = graph.src.device
    num_k_blocks = max(-(-graph.num_src // block_k), 1)
    num_q_blocks = -(-graph.num_dst // block_q)
    cells = block_q * block_k
    if edge_ids is None:  # every edge: the graph's tiles
        edge_ids = torch.arange(graph.num_edges, device=device)
        src, dst = graph.src, graph.dst  # [E_t]
        uniq, tile, count = tile_stats(graph, block_q, block_k)  # [T], [E_t], [T]
    else:
        src, dst = graph.src[edge_ids], graph.dst[edge_ids]  # [E_t]
        key = _tile_keys(src, dst, block_q, block_k, num_k_blocks)  # [E_t]
        uniq, tile, count = unique_keys(key, num_q_blocks * num_k_blocks)  # [T], [E_t], [T]
    q_block, k_block = uniq // num_k_blocks, uniq % num_k_blocks
    edge_cell = (tile * cells).add_((dst % block_q).mul_(block_k)).add_(src % block_k)  # [E_t]
    if not distinct and not sorted_unique(src, dst) and torch.unique(edge_cell).numel() < edge_cell.numel():
        raise ValueError(
            "build_tiles: 'edge_ids' repeat an edge j -> i; a tile cell holds one edge "
            "(tile one copy, run the others fused)"
        )
    full = count == cells  # [T]
    mask_index = torch.full_like(uniq, -1)
    partial = (~full).nonzero().flatten()  # [P]
    mask_index[partial] = torch.arange(partial.numel(), device=device)
    masks = torch.zeros(partial.numel() * cells, dtype=torch.bool, device=device)
    in_partial = mask_index[tile] >= 0  # [E_t]
    masks[mask_index[tile[in_partial]] * cells + edge_cell[in_partial] % cells] = True
    tile_ptr = torch.zeros(num_q_blocks + 1, dtype=torch.long, device=device)
    tile_ptr[1:] = torch.bincount(q_block, minlength=num_q_blocks).cumsum(0)
    return TileList(
        block_q,
        block_k,
        graph.num_src,
        graph.num_dst,
        q_block,
        k_block,
        tile_ptr,
        count,
        mask_index,
        masks.view(-1, block_q, block_k),
        edge_ids,
        edge_cell,
    )


def triton_blocks(block_q: int, block_k: int) -> bool:
    """Whether the Triton tiled kernels take these blocks: powers of two of at least 16 (``tl.dot``
    needs 16; ``tl.arange`` powers of two). The PyTorch tiled path takes any size."""
    return all(b >= 16 and not b & (b - 1) for b in (block_q, block_k))
