"""Implicit token graphs: a block-structured graph given by its tiles, never by its edges.

A :class:`BlockGraph` cuts the targets into query blocks of at most ``block_q`` tokens and the
sources into key blocks of at most ``block_k`` tokens, and lists the (query block, key block) tiles
that hold edges: a tile is *full* (every cell an edge) or carries a boolean mask ``[Bq, Bk]`` of its
cells (``mask[r, c]``: edge from the ``c``-th token of the key block to the ``r``-th token of the
query block). Masks are shared between tiles (``mask_index``), so the memory of a causal graph of
``N`` tokens is ``O(N / B)`` tile entries plus one mask, where its edge list would be ``N²/2``
edges. With ``tile_head`` a tile belongs to one query head (a per-head graph, as block selection
chooses it). The kernels (:func:`gnn_transformer.kernels.attend`) read the tiles directly; the edge
list exists only where something asks for it (:meth:`BlockGraph.edges`, checked against the edge
budget :func:`~gnn_transformer.topology.max_edges` before anything is allocated).

Blocks are uniform (block ``b`` holds tokens ``b·B ... b·B + B - 1``, the last one shorter) unless
``q_ptr`` / ``k_ptr`` give each block's first token (the blocks of each sequence of a batch, as
block selection cuts them).

Notation: ``T`` tiles, ``P`` distinct masks, ``Bq`` / ``Bk`` block sizes, ``H`` query heads,
``N_dst`` / ``N_src`` target / source tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ._common import (
    Lengths,
    as_lengths,
    check_cells,
    check_edges,
    check_int,
    describe_sizes,
    edge_budget,
    local_positions,
)

DEFAULT_BLOCK_SIZE = 64  # the tile side of the kernels' tiled backend on CPU and GPU
MIN_BLOCK_SIZE = 16  # the smallest tile the GPU kernels take (tl.dot)
MATERIALIZE_CHUNK = 1 << 22  # tile cells expanded at a time by BlockGraph.edges


def _long(name: str, x: object, device: torch.device | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1 or x.is_floating_point() or x.dtype == torch.bool:
        got = f"shape {list(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected '{name}' to be a 1-D integer tensor (got {got})")
    if device is not None and x.device != device:
        raise ValueError(f"Expected '{name}' on the device of 'q_block', {device} (got {x.device})")
    return x.long()


def _check_ptr(name: str, ptr: object, n: int, block: int, device: torch.device) -> Tensor:
    """``ptr [NB + 1]``: 0, increasing by 1 to ``block`` tokens per block, ending at ``n``."""
    p = _long(name, ptr, device)
    if p.numel() < 1 or int(p[0]) != 0 or int(p[-1]) != n:
        raise ValueError(f"Expected '{name}' to run from 0 to the token count {n} (got {p.tolist()[:8]}...)")
    sizes = p.diff()
    if sizes.numel() and (int(sizes.min()) < 1 or int(sizes.max()) > block):
        raise ValueError(
            f"Expected '{name}' to give blocks of 1 to {block} tokens (got sizes from "
            f"{int(sizes.min())} to {int(sizes.max())})"
        )
    return p


@dataclass(eq=False, repr=False)
class BlockGraph:
    """A token graph as tiles: edge ``j -> i`` exists iff the cell of ``(i, j)`` is set in a tile
    (for query head ``tile_head[t]`` only, when given). Immutable once built; see the module
    docstring. Build one with a builder's ``implicit=True`` or :func:`interval_graph`.

    Args:
        num_dst, num_src: target (query) and source (key) tokens.
        block_q, block_k: the most tokens of a query / key block.
        q_block, k_block: ``[T]`` the query and key block of each tile, sorted by (head, query
            block, key block), no tile twice.
        mask_index: ``[T]`` row of ``masks`` of each tile, ``-1`` for a full tile (every cell an
            edge; a tile on a block shorter than ``block_q`` / ``block_k`` needs a mask).
        masks: ``[P, Bq, Bk]`` bool, no cell set beyond the tokens of the tile's blocks.
        tile_head: ``[T]`` the query head of each tile (a per-head graph), or ``None``: every head.
        num_heads: the query heads of a per-head graph (with ``tile_head``).
        q_ptr, k_ptr: ``[NB + 1]`` first token of each block and the token count, or ``None``
            (uniform blocks).
        dense: ``("causal" | "full", bounds)`` when the graph is exactly causal or full attention
            within the documents that start at ``bounds[:-1]`` (``bounds[-1] = N``), else ``None``:
            what lets the kernels run PyTorch's own attention without looking at a single edge.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> g = causal(5, implicit=True, block_size=2)
        >>> g.num_edges(), g.num_tiles
        (15, 6)
        >>> g.edges().tolist() == causal(5).tolist()
        True
    """

    num_dst: int
    num_src: int
    block_q: int
    block_k: int
    q_block: Tensor
    k_block: Tensor
    mask_index: Tensor
    masks: Tensor
    tile_head: Tensor | None = None
    num_heads: int | None = None
    q_ptr: Tensor | None = None
    k_ptr: Tensor | None = None
    dense: tuple[str, tuple[int, ...]] | None = None
    # (lo, hi) of a graph built by interval_graph from them (the intervals property)
    _intervals: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check()

    # -- checks --
    def _check(self) -> None:
        for name in ("num_dst", "num_src"):
            check_int(name, getattr(self, name), 0)
        for name in ("block_q", "block_k"):
            check_int(name, getattr(self, name), 1, 4096)
        if not isinstance(self.q_block, Tensor):
            raise ValueError(f"Expected 'q_block' to be a tensor (got {type(self.q_block).__name__})")
        device = self.q_block.device
        self.q_block = _long("q_block", self.q_block)
        self.k_block = _long("k_block", self.k_block, device)
        self.mask_index = _long("mask_index", self.mask_index, device)
        num_tiles = self.q_block.numel()
        for name in ("k_block", "mask_index"):
            if getattr(self, name).numel() != num_tiles:
                raise ValueError(
                    f"Expected '{name}' of shape [T] = [{num_tiles}] like 'q_block' (got "
                    f"{list(getattr(self, name).shape)})"
                )
        if (
            not isinstance(self.masks, Tensor)
            or self.masks.dtype != torch.bool
            or self.masks.dim() != 3
            or tuple(self.masks.shape[1:]) != (self.block_q, self.block_k)
        ):
            got = (
                f"shape {list(self.masks.shape)}, dtype {self.masks.dtype}"
                if isinstance(self.masks, Tensor)
                else type(self.masks).__name__
            )
            raise ValueError(f"Expected 'masks' to be a bool tensor [P, {self.block_q}, {self.block_k}] (got {got})")
        if self.masks.device != device:
            raise ValueError(f"Expected 'masks' on the device of 'q_block', {device} (got {self.masks.device})")
        if self.q_ptr is not None:
            self.q_ptr = _check_ptr("q_ptr", self.q_ptr, self.num_dst, self.block_q, device)
        if self.k_ptr is not None:
            self.k_ptr = _check_ptr("k_ptr", self.k_ptr, self.num_src, self.block_k, device)
        if (self.tile_head is None) != (self.num_heads is None):
            raise ValueError(f"Expected both 'tile_head' and 'num_heads' or neither (got num_heads={self.num_heads!r})")
        if self.num_heads is not None:
            check_int("num_heads", self.num_heads, 1)
            self.tile_head = _long("tile_head", self.tile_head, device)
            if self.tile_head.numel() != num_tiles:
                raise ValueError(
                    f"Expected 'tile_head' of shape [T] = [{num_tiles}] (got {list(self.tile_head.shape)})"
                )
        if self.dense is not None:
            _dense_intervals(self.dense, self.num_dst, device)  # its form, before the tiles
        if num_tiles == 0:
            return
        ranges: list[tuple[str, Tensor, int]] = [
            ("q_block", self.q_block, self.num_q_blocks),
            ("k_block", self.k_block, self.num_k_blocks),
            ("mask_index", self.mask_index + 1, self.masks.size(0) + 1),
        ]
        if self.tile_head is not None and self.num_heads is not None:
            ranges.append(("tile_head", self.tile_head, self.num_heads))
        stats = torch.stack([torch.stack([x.min(), x.max()]) for _, x, _ in ranges]).tolist()
        for (name, _, size), (lo, hi) in zip(ranges, stats):
            if lo < 0 or hi >= size:
                shift = 1 if name == "mask_index" else 0
                raise ValueError(
                    f"Expected '{name}' in [{-shift}, {size - shift}) (got values from {lo - shift} to {hi - shift})"
                )
        key = self._tile_key()
        if num_tiles > 1 and bool((key[1:] <= key[:-1]).any()):
            raise ValueError(
                "Expected the tiles sorted by (head, query block, key block), no tile twice "
                "('q_block', 'k_block', 'tile_head')"
            )
        self._check_ragged()
        if self.dense is not None:
            self._check_dense()

    def _tile_key(self) -> Tensor:
        key = self.q_block * max(self.num_k_blocks, 1) + self.k_block
        if self.tile_head is not None:
            key = key + self.tile_head * max(self.num_q_blocks, 1) * max(self.num_k_blocks, 1)
        return key

    def _check_ragged(self) -> None:
        """A tile on a short block must carry a mask without cells past the block's tokens."""
        rows, cols = self.tile_sizes()  # [T], [T]
        ragged = ((rows < self.block_q) | (cols < self.block_k)).nonzero().flatten()
        if ragged.numel() == 0:
            return
        mi = self.mask_index[ragged]
        if bool((mi < 0).any()):
            t = int(ragged[mi < 0][0])
            raise ValueError(
                f"Expected a mask for tile {t} ('mask_index' -1): its blocks hold {int(rows[t])} x "
                f"{int(cols[t])} tokens, less than block_q x block_k = {self.block_q} x {self.block_k}"
            )
        for t0 in range(0, ragged.numel(), 1024):
            part = ragged[t0 : t0 + 1024]
            inside = (torch.arange(self.block_q, device=part.device) < rows[part, None])[:, :, None] & (
                torch.arange(self.block_k, device=part.device) < cols[part, None]
            )[:, None, :]
            if bool((self.masks[self.mask_index[part]] & ~inside).any()):
                raise ValueError(
                    "Expected 'masks' without cells past the tokens of a tile's blocks (a short "
                    "last block, or a block of 'q_ptr' / 'k_ptr')"
                )

    def _check_dense(self) -> None:
        """The tiles hold exactly the graph ``dense`` names: the kernels run PyTorch's own
        attention on that claim without reading a tile. Each target's claimed keys are one interval
        ``[lo, hi]``; the tiles' cells must lie inside the intervals and count as many (the tiles
        and their cells are distinct, so the two sets are then equal)."""
        assert self.dense is not None
        kind, bounds = self.dense
        if self.tile_head is not None or self.num_src != self.num_dst:
            raise ValueError(
                f"Expected 'dense' only on a graph shared by every head with as many sources as targets "
                f"(got dense={kind!r}, num_src={self.num_src}, num_dst={self.num_dst}, "
                f"{'per-head tiles' if self.tile_head is not None else 'no tile_head'})"
            )
        n, device = self.num_dst, self.device
        lo, hi = _dense_intervals(self.dense, n, device)
        rows, cols = self.tile_sizes()
        q_ptr, k_ptr = self.block_starts()
        qs, ks = q_ptr[self.q_block], k_ptr[self.k_block]  # [T] first target / source of each tile
        full = self.mask_index < 0
        per_mask = torch.cat([self.masks.sum((1, 2)), rows.new_zeros(1)])  # [P + 1], -1 reads the 0
        cells = torch.where(full, rows * cols, per_mask[self.mask_index])
        # lo and hi are non-decreasing: a full tile lies inside if its last row's lo and its first
        # row's hi allow every column
        outside = full & ((lo[qs + rows - 1] > ks) | (hi[qs] < ks + cols - 1))
        wrong = bool((cells.sum() != (hi - lo + 1).sum()) | outside.any())
        partial = (~full).nonzero().flatten()
        rq, rk = torch.arange(self.block_q, device=device), torch.arange(self.block_k, device=device)
        step = max(1, MASK_CHUNK_CELLS // (self.block_q * self.block_k))
        for a in range(0, partial.numel() if not wrong else 0, step):
            some = partial[a : a + step]
            r = (qs[some, None] + rq).clamp(max=n - 1)  # [p, Bq] (cells past a short block are unset)
            c = ks[some, None] + rk  # [p, Bk]
            allowed = (c[:, None, :] >= lo[r][:, :, None]) & (c[:, None, :] <= hi[r][:, :, None])
            wrong = bool((self.masks[self.mask_index[some]] & ~allowed).any())
            if wrong:
                break
        if wrong:
            raise ValueError(
                f"Expected the tiles to hold {kind} attention within the documents starting at "
                f"{list(bounds[:-1])[:8]}, as 'dense' says (they hold another graph)"
            )

    # -- sizes --
    @property
    def intervals(self) -> tuple[Tensor, Tensor] | None:
        """``(lo [N_dst], hi [N_dst])`` of a graph built by :func:`interval_graph` (target ``i`` hears
        the sources ``lo[i] ... hi[i]``), else ``None``: what lets ``auto`` run FlexAttention on it
        without reading a tile (:func:`gnn_transformer.kernels.auto_kernel`)."""
        return self._intervals

    @property
    def num_tiles(self) -> int:
        return self.q_block.numel()

    @property
    def num_q_blocks(self) -> int:
        return self.q_ptr.numel() - 1 if self.q_ptr is not None else -(-self.num_dst // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return self.k_ptr.numel() - 1 if self.k_ptr is not None else -(-self.num_src // self.block_k)

    @property
    def per_head(self) -> bool:
        return self.tile_head is not None

    @property
    def device(self) -> torch.device:
        return self.q_block.device

    def block_starts(self) -> tuple[Tensor, Tensor]:
        """``(q_ptr [NBq + 1], k_ptr [NBk + 1])``: first token of each block, then the token count."""

        def ptr(given, n, block):
            if given is not None:
                return given
            return torch.cat([torch.arange(0, n, block, device=self.device), torch.tensor([n], device=self.device)])

        return ptr(self.q_ptr, self.num_dst, self.block_q), ptr(self.k_ptr, self.num_src, self.block_k)

    def tile_sizes(self) -> tuple[Tensor, Tensor]:
        """``(rows [T], cols [T])``: tokens of each tile's query and key block."""
        q_ptr, k_ptr = self.block_starts()
        q_sizes, k_sizes = q_ptr.diff(), k_ptr.diff()
        return q_sizes[self.q_block], k_sizes[self.k_block]

    def tile_edges(self) -> Tensor:
        """``[T]`` edges of each tile."""
        per_mask = self.masks.sum((1, 2))  # [P]
        full = torch.full_like(self.q_block, self.block_q * self.block_k)
        return torch.where(
            self.mask_index >= 0, per_mask[self.mask_index.clamp(min=0)] if per_mask.numel() else full, full
        )

    def num_edges(self) -> int:
        """The number of edges, counted from the tiles (nothing per edge is built)."""
        return int(self.tile_edges().sum()) if self.num_tiles else 0

    # -- materialization --
    def edges(self) -> EdgeIndex | tuple[EdgeIndex, Tensor]:
        """The edge list: ``EdgeIndex [2, E]`` sorted by target, then source (a per-head graph:
        ``(edge_index, edge_head [E])`` sorted by (head, target, source), as the selectors return
        them). Counted first and refused past the edge budget
        (:func:`~gnn_transformer.topology.max_edges`) with a ``ValueError`` naming the size."""
        num_edges = self.num_edges()
        check_edges("BlockGraph.edges", num_edges, n=[self.num_dst])
        q_ptr, k_ptr = self.block_starts()
        srcs, dsts, heads = [], [], []
        cells = self.block_q * self.block_k
        # chunks of whole (head, query block) rows of tiles, so that each chunk sorts on its own
        row_key = self.q_block if self.tile_head is None else self.tile_head * self.num_q_blocks + self.q_block
        row_start = torch.ones(self.num_tiles, dtype=torch.bool, device=self.device)
        if self.num_tiles > 1:
            row_start[1:] = row_key[1:] != row_key[:-1]
        starts = row_start.nonzero().flatten().tolist() + [self.num_tiles]
        step = max(1, MATERIALIZE_CHUNK // cells)
        i = 0
        while i < len(starts) - 1:
            j = i + 1
            while j < len(starts) - 1 and starts[j + 1] - starts[i] <= step:
                j += 1
            t0, t1 = starts[i], starts[j]
            full = torch.ones(self.block_q, self.block_k, dtype=torch.bool, device=self.device)
            mi = self.mask_index[t0:t1]
            m = torch.where(
                (mi >= 0)[:, None, None], self.masks[mi.clamp(min=0)] if self.masks.numel() else full, full
            )  # [t, Bq, Bk]
            t, r, c = m.nonzero(as_tuple=True)
            t = t + t0
            dst = q_ptr[self.q_block[t]] + r
            src = k_ptr[self.k_block[t]] + c
            key = dst * max(self.num_src, 1) + src
            if self.tile_head is not None:
                key = key + self.tile_head[t] * max(self.num_dst, 1) * max(self.num_src, 1)
            order = torch.argsort(key)
            srcs.append(src[order])
            dsts.append(dst[order])
            if self.tile_head is not None:
                heads.append(self.tile_head[t][order])
            i = j
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        src = torch.cat(srcs) if srcs else empty
        dst = torch.cat(dsts) if dsts else empty
        edge_index = EdgeIndex(
            torch.stack([src, dst]),
            sparse_size=(self.num_src, self.num_dst),
            sort_order="col" if self.tile_head is None else None,
        )
        if self.tile_head is None:
            return edge_index
        return edge_index, torch.cat(heads) if heads else empty

    def to_dense(self) -> Tensor:
        """The dense twin, built from the tiles: ``[N_dst, N_src]`` bool (``mask[i, j]``: edge ``j ->
        i``), or ``[H, N_dst, N_src]`` for a per-head graph; what ``to_dense_mask`` gives for
        :meth:`edges`."""
        heads = 1 if self.num_heads is None else self.num_heads
        check_cells("BlockGraph.to_dense", (heads, self.num_dst, self.num_src))
        out = torch.zeros(heads, self.num_dst, self.num_src, dtype=torch.bool, device=self.device)
        q_ptr, k_ptr = self.block_starts()
        rows, cols = self.tile_sizes()
        for t in range(self.num_tiles):
            h = 0 if self.tile_head is None else int(self.tile_head[t])
            i0, j0 = int(q_ptr[self.q_block[t]]), int(k_ptr[self.k_block[t]])
            r, c = int(rows[t]), int(cols[t])
            mi = int(self.mask_index[t])
            out[h, i0 : i0 + r, j0 : j0 + c] = True if mi < 0 else self.masks[mi, :r, :c]
        return out if self.num_heads is not None else out[0]

    def to(self, device: torch.device | str) -> BlockGraph:
        """The same graph on ``device``."""

        def move(x):
            return None if x is None else x.to(device)

        moved = BlockGraph(
            self.num_dst,
            self.num_src,
            self.block_q,
            self.block_k,
            move(self.q_block),
            move(self.k_block),
            move(self.mask_index),
            move(self.masks),
            move(self.tile_head),
            self.num_heads,
            move(self.q_ptr),
            move(self.k_ptr),
            self.dense,
        )
        if self._intervals is not None:
            moved._intervals = (move(self._intervals[0]), move(self._intervals[1]))
        return moved

    def __repr__(self) -> str:
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}"
        dense = "" if self.dense is None else f", dense={self.dense[0]!r}"
        return (
            f"BlockGraph(num_dst={self.num_dst}, num_src={self.num_src}, block=({self.block_q}, "
            f"{self.block_k}), tiles={self.num_tiles}, masks={self.masks.size(0)}{heads}{dense})"
        )


def block_size_for(n: int, block_size: int | None) -> int:
    """The block of a builder's ``implicit`` graph: ``block_size``, or by default
    ``DEFAULT_BLOCK_SIZE`` shrunk to the power of two (at least 16) that covers ``n`` tokens."""
    if block_size is None:
        return min(DEFAULT_BLOCK_SIZE, max(MIN_BLOCK_SIZE, 1 << max(n - 1, 0).bit_length()))
    check_int("block_size", block_size, 1, 4096)
    if block_size > max(n, MIN_BLOCK_SIZE):
        raise ValueError(f"Expected 'block_size' <= the token count {n} (or {MIN_BLOCK_SIZE}) (got {block_size})")
    return block_size


def _dense_intervals(dense: object, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(lo [N], hi [N])``: the keys ``lo[i] ... hi[i]`` of each target under the claim ``dense``
    of :class:`BlockGraph`, after checking its form."""
    if (
        not isinstance(dense, tuple)
        or len(dense) != 2
        or dense[0] not in ("causal", "full")
        or not isinstance(dense[1], tuple)
        or len(dense[1]) < 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in dense[1])
        or list(dense[1]) != sorted(set(dense[1]))
        or dense[1][0] != 0
        or dense[1][-1] != n
    ):
        raise ValueError(
            f"Expected 'dense' to be ('causal' | 'full', increasing bounds from 0 ending at {n}) (got {dense!r})"
        )
    kind, bounds = dense
    starts = torch.tensor(bounds, device=device)
    i = torch.arange(n, device=device)
    doc = torch.bucketize(i, starts[1:], right=True)  # bounds[doc] <= i < bounds[doc + 1]
    return starts[doc], (i if kind == "causal" else starts[doc + 1] - 1)


def interval_graph(
    lo: Tensor, hi: Tensor, num_src: int, block_size: int, dense: tuple[str, tuple[int, ...]] | None = None
) -> BlockGraph:
    """The :class:`BlockGraph` of a graph where target ``i`` hears the sources ``lo[i] ... hi[i]``
    (``lo <= hi``, both non-decreasing in ``i``: causal, windows, documents), in uniform blocks of
    ``block_size``; built from the ``[N]`` bounds, never from edges. Full tiles need no mask; the
    others get one each (``O(N / B)`` of them for these graphs)."""
    n, block = lo.numel(), block_size
    device = lo.device
    check_int("block_size", block_size, 1, 4096)
    if hi.shape != lo.shape or lo.dim() != 1:
        raise ValueError(f"Expected 'lo' and 'hi' of one shape [N] (got {list(lo.shape)} and {list(hi.shape)})")
    if n and (bool((lo > hi).any()) or int(lo.min()) < 0 or int(hi.max()) >= num_src):
        raise ValueError(f"Expected 0 <= 'lo' <= 'hi' < num_src = {num_src} for every target")
    if n > 1 and (bool((lo.diff() < 0).any()) or bool((hi.diff() < 0).any())):
        raise ValueError("Expected 'lo' and 'hi' non-decreasing in the target")
    if n == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return BlockGraph(
            0, num_src, block, block, empty, empty, empty, torch.zeros(0, block, block, dtype=torch.bool, device=device)
        )
    nqb = -(-n // block)
    first = torch.arange(nqb, device=device) * block  # [NBq] first row of each query block
    last = torch.clamp(first + block, max=n) - 1  # [NBq]
    kb_lo, kb_hi = lo[first] // block, hi[last] // block  # the union of a block's rows is one run
    count = kb_hi - kb_lo + 1
    q_block = torch.repeat_interleave(torch.arange(nqb, device=device), count)  # [T]
    k_block = torch.repeat_interleave(kb_lo, count) + (
        torch.arange(q_block.numel(), device=device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    )
    j0 = k_block * block
    full = (
        (lo[last[q_block]] <= j0)
        & (hi[first[q_block]] >= j0 + block - 1)
        & (last[q_block] - first[q_block] + 1 == block)
        & (j0 + block <= num_src)
    )
    partial = (~full).nonzero().flatten()  # [P]
    mask_index = torch.full_like(q_block, -1)
    mask_index[partial] = torch.arange(partial.numel(), device=device)
    r = torch.arange(block, device=device)
    masks = torch.empty(partial.numel(), block, block, dtype=torch.bool, device=device)  # [P, Bq, Bk]
    step = max(1, MASK_CHUNK_CELLS // (block * block))
    for a in range(0, partial.numel(), step):  # a chunk of masks at a time: no [P, Bq, Bk] temporaries
        some = partial[a : a + step]
        i = first[q_block[some]][:, None] + r  # [p, Bq]
        j = j0[some][:, None] + r  # [p, Bk]
        inside = i < n
        i = i.clamp(max=n - 1)
        masks[a : a + step] = (
            (j[:, None, :] >= lo[i][:, :, None])
            & (j[:, None, :] <= hi[i][:, :, None])
            & inside[:, :, None]
            & (j < num_src)[:, None, :]
        )
    graph = BlockGraph(n, num_src, block, block, q_block, k_block, mask_index, masks)
    if dense is not None:  # the claim checked on the bounds (O(N)), not on the tiles they were cut from
        claim_lo, claim_hi = _dense_intervals(dense, n, device)
        if num_src != n or not (torch.equal(lo, claim_lo) and torch.equal(hi, claim_hi)):
            raise ValueError(
                f"Expected 'lo' and 'hi' to give {dense[0]} attention within the documents starting at "
                f"{list(dense[1][:-1])[:8]}, as 'dense' says (they give another graph)"
            )
        graph.dense = dense
    graph._intervals = (lo.long(), hi.long())
    return graph


def sequence_bounds(lengths: list[int]) -> tuple[int, ...]:
    """Bounds of :attr:`BlockGraph.dense`: the first token of each non-empty sequence, then ``N``."""
    bounds, offset = [], 0
    for L in lengths:
        if L:
            bounds.append(offset)
        offset += L
    return tuple(bounds) + (offset,)


# bytes an implicit window graph holds per token (its [N] positions, offsets, lengths and bounds)
# and per tile (query block, key block, mask index), besides a B x B mask per partial tile: what
# the edge budget counts for it
IMPLICIT_TOKEN_BYTES = 5 * 8
IMPLICIT_TILE_BYTES = 3 * 8
TILE_COUNT_CHUNK = 1 << 20  # query blocks counted at a time by window_tiles
MASK_CHUNK_CELLS = 1 << 24  # tile mask cells interval_graph fills at a time


def _window_bounds(pos: Tensor, offset: Tensor, length: Tensor, w: int, causal: bool) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``: the first and last source of targets at ``pos`` in sequences at ``offset`` of
    ``length`` tokens, for a window of radius ``w`` (causal: only back)."""
    lo = offset + (pos - w).clamp(min=0)
    return lo, offset + (pos if causal else torch.minimum(pos + w, length - 1))


def window_tiles(lengths: list[int], window: int | None, causal: bool, block: int) -> tuple[int, int]:
    """``(tiles, masks)`` of :func:`implicit_window`'s graph: the tiles :func:`interval_graph` will
    list and those of them that are not full (one mask each), counted from each query block's
    first and last token alone (``O(N / B)`` memory)."""
    total = sum(lengths)
    lens = torch.tensor(lengths, dtype=torch.long)
    ends = lens.cumsum(0)

    def bounds(i: Tensor) -> tuple[Tensor, Tensor]:
        seq = torch.searchsorted(ends, i, right=True)  # the (non-empty) sequence of each token
        offset = ends[seq] - lens[seq]
        return _window_bounds(i - offset, offset, lens[seq], total if window is None else window, causal)

    tiles = full = 0
    for start in range(0, total, block * TILE_COUNT_CHUNK):  # query blocks a chunk at a time
        first = torch.arange(start, min(start + block * TILE_COUNT_CHUNK, total), block)  # [NBq]
        last = (first + block).clamp(max=total) - 1
        (lo_first, hi_first), (lo_last, hi_last) = bounds(first), bounds(last)
        kb_lo, kb_hi = lo_first // block, hi_last // block
        tiles += int((kb_hi - kb_lo + 1).sum())
        # full: every row of a whole query block hears every key of a whole key block
        lowest = torch.maximum(kb_lo, -(-lo_last // block))
        highest = torch.minimum(torch.minimum(kb_hi, (hi_first + 1) // block - 1), torch.tensor(total // block - 1))
        whole = last - first + 1 == block
        full += int(torch.where(whole, (highest - lowest + 1).clamp(min=0), 0).sum())
    return tiles, tiles - full


def implicit_window(
    n: Lengths, window: int | None, causal: bool, block_size: int | None, builder: str, name: str = "n"
) -> BlockGraph:
    """The :class:`BlockGraph` of ``j -> i`` within each sequence of ``n`` for ``0 <= i - j`` (causal)
    or any ``i, j``, and ``|i - j| <= window`` (``None``: no window): what :func:`causal`,
    :func:`full`, :func:`sliding_window` and :func:`document` build with ``implicit=True``.

    Its tiles and tokens are counted first: a graph whose arrays would hold more bytes than the edge
    budget's int64 ``edge_index`` (``16 * max_edges``, see :func:`~gnn_transformer.topology.max_edges`)
    is refused with a ``ValueError`` naming ``builder`` and its sizes (``name=...``)."""
    lengths = as_lengths(n)
    total = sum(lengths)
    block = block_size_for(total, block_size)
    limit = edge_budget()
    if limit is not None:
        # the tokens first: counting the tiles takes a pass over the query blocks
        counted = IMPLICIT_TOKEN_BYTES * total <= 16 * limit
        tiles, masks = window_tiles(lengths, window, causal, block) if counted else (None, 0)
        need = IMPLICIT_TOKEN_BYTES * total + IMPLICIT_TILE_BYTES * (tiles or 0) + block * block * masks
        if need > 16 * limit:
            held = f"{total} tokens" if tiles is None else f"{tiles} tiles of {block}x{block} tokens"
            raise ValueError(
                f"{builder}: {describe_sizes(**{name: lengths})} with implicit=True would hold {held} "
                f"({need / 2**30:.3g} GiB with its masks and per-token bounds), more than the edge "
                f"budget max_edges={limit} allows ({16 * limit / 2**30:.3g} GiB, that of an int64 edge_index); to "
                f"build it anyway, call it inside 'with gnn_transformer.topology.max_edges({-(-need // 16)}):' "
                "(None: no limit)"
            )
    pos, offset, length = local_positions(lengths)  # [N] each
    lo, hi = _window_bounds(pos, offset, length, total if window is None else window, causal)
    spans_all = window is None or window >= max(lengths, default=0) - 1
    dense = ("causal" if causal else "full", sequence_bounds(lengths)) if spans_all and total else None
    return interval_graph(lo, hi, total, block, dense)


def block_selection(
    head: Tensor, q_blocks: Tensor, k_blocks: Tensor, block_ptr: Tensor, block_size: int, num_heads: int, causal: bool
) -> BlockGraph:
    """The per-head :class:`BlockGraph` of block selection: head ``head[p]`` of query block
    ``q_blocks[p]`` hears every token of key block ``k_blocks[p]`` (with ``causal``, only ``j <= i``
    in its own block); blocks given by ``block_ptr [NB + 1]``, pairs sorted by (head, query block,
    key block). Tiles on short blocks and causal own-block tiles share one mask per kind."""
    device = head.device
    n = int(block_ptr[-1])
    sizes = block_ptr.diff()  # [NB]
    rows, cols = sizes[q_blocks], sizes[k_blocks]  # [T]
    diag = (q_blocks == k_blocks) if causal else torch.zeros_like(q_blocks, dtype=torch.bool)
    masked = (rows < block_size) | (cols < block_size) | diag
    kind = (rows * (block_size + 1) + cols) * 2 + diag.long()  # [T] a mask per (rows, cols, diag)
    kinds, inverse = torch.unique(kind[masked], return_inverse=True)  # [P], [T_masked]
    mask_index = torch.full_like(q_blocks, -1)
    mask_index[masked] = inverse
    k_rows, k_cols, k_diag = kinds // 2 // (block_size + 1), kinds // 2 % (block_size + 1), kinds % 2 == 1
    r = torch.arange(block_size, device=device)
    masks = (
        (r[None, :, None] < k_rows[:, None, None])
        & (r[None, None, :] < k_cols[:, None, None])
        & (~k_diag[:, None, None] | (r[None, None, :] <= r[None, :, None]))
    )  # [P, B, B]
    uniform = bool((sizes[:-1] == block_size).all()) if sizes.numel() else True
    ptr = None if uniform else block_ptr
    return BlockGraph(n, n, block_size, block_size, q_blocks, k_blocks, mask_index, masks, head, num_heads, ptr, ptr)
