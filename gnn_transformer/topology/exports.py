"""Exports of a token graph: a networkx ``DiGraph``, and FlexAttention's ``mask_mod`` and
``BlockMask`` (``torch.nn.attention.flex_attention``) built from the same edge set.

The ``BlockMask`` is built from the edges, block by block (empty, partial or full), never from an
``N × N`` mask. The ``mask_mod`` looks each ``(q_idx, kv_idx)`` pair up in a packed bitmap of the
edge set (``N^2 / 8`` bytes), in bitmaps of the partially filled blocks only, or in the sorted edge
keys (``O(E)``, eager only). A batch (disjoint union) is one long FlexAttention sequence of ``N``
tokens; the ``BlockMask`` skips the blocks between sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import networkx as nx
import torch
from torch import Tensor

from .masks import _check_edge_index, _check_range, _default_sizes

# FlexAttention's mask_mod(b, h, q_idx, kv_idx) -> bool
MaskMod: TypeAlias = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def to_networkx(
    edge_index: Tensor, num_src: int | None = None, num_dst: int | None = None, *, bipartite: bool | None = None
) -> nx.DiGraph:
    """``networkx.DiGraph`` with an arc ``j -> i`` per edge (information flows along arcs).

    A self-attention graph has nodes ``0..N-1``. A bipartite one (cross attention; by default
    when ``num_src != num_dst``) has nodes ``("k", j)`` for sources and ``("q", i)`` for
    targets, with a ``bipartite`` node attribute 0 / 1.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> sorted(to_networkx(causal(2)).edges())
        [(0, 0), (0, 1), (1, 1)]
    """
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    g = nx.DiGraph()
    if not (num_src != num_dst if bipartite is None else bipartite):
        g.add_nodes_from(range(max(num_src, num_dst)))
        g.add_edges_from(zip(src.tolist(), dst.tolist()))
        return g
    g.add_nodes_from((("k", j) for j in range(num_src)), bipartite=0)
    g.add_nodes_from((("q", i) for i in range(num_dst)), bipartite=1)
    g.add_edges_from((("k", j), ("q", i)) for j, i in zip(src.tolist(), dst.tolist()))
    return g


def flex_attention_available() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` can be imported."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _require_flex() -> None:
    if not flex_attention_available():
        raise RuntimeError(
            f"FlexAttention (torch.nn.attention.flex_attention) is not available in "
            f"torch {torch.__version__}; it needs torch >= 2.5"
        )


LOOKUPS = ("bits", "blocks", "search")


class _Blocks:
    """The edge set cut into ``block × block`` blocks: which blocks are empty, full or partial, and a
    bitmap of each partial block. ``O(E + P·block²/8 + (N/block)²)`` memory for ``P`` partial
    blocks, never ``N²``."""

    def __init__(self, src: Tensor, dst: Tensor, num_src: int, num_dst: int, block: int):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"Expected 'block_size' to be a positive int (got {block!r})")
        self.block = block
        self.num_q_blocks = max(-(-num_dst // block), 1)
        self.num_kv_blocks = max(-(-num_src // block), 1)
        device = src.device
        stride = max(num_src, 1)
        keys = torch.unique(dst * stride + src)  # [E'] distinct edges, sorted
        s, d = keys % stride, keys // stride
        bkey = (d // block) * self.num_kv_blocks + s // block  # [E']
        blocks, inverse, counts = torch.unique(bkey, return_inverse=True, return_counts=True)  # [T]
        full = counts == block * block  # a boundary block is never full: its padding has no edges
        # table [Q_blocks, KV_blocks]: -1 empty, -2 full, else the row of the partial block's bitmap
        self.table = torch.full((self.num_q_blocks * self.num_kv_blocks,), -1, dtype=torch.int32, device=device)
        self.table[blocks[full]] = -2
        partial = ~full
        self.table[blocks[partial]] = torch.arange(int(partial.sum()), dtype=torch.int32, device=device)
        self.table = self.table.view(self.num_q_blocks, self.num_kv_blocks)
        self.words = -(-block // 8)
        self.bits = torch.zeros(int(partial.sum()), block, self.words, dtype=torch.uint8, device=device)
        in_partial = partial[inverse]  # [E']
        row = self.table.view(-1)[bkey[in_partial]].long()
        r, c = d[in_partial] % block, s[in_partial] % block
        one = torch.ones(1, dtype=torch.uint8, device=device)
        # distinct edges set distinct bits, so a scatter-add of the bit values is their bitwise or
        flat = (row * block + r) * self.words + (c >> 3)
        self.bits.view(-1).index_add_(0, flat, one << (c & 7).to(torch.uint8))
        self._lists = {}
        for name, sel in (("partial", partial), ("full", full)):
            qb, kb = blocks[sel] // self.num_kv_blocks, blocks[sel] % self.num_kv_blocks  # sorted by (qb, kb)
            num = torch.bincount(qb, minlength=self.num_q_blocks)  # [Q_blocks]
            start = torch.cumsum(num, 0) - num
            idx = torch.zeros(self.num_q_blocks, self.num_kv_blocks, dtype=torch.int32, device=device)
            idx[qb, torch.arange(qb.numel(), device=device) - start[qb]] = kb.to(torch.int32)
            self._lists[name] = (num.to(torch.int32)[None, None], idx[None, None])  # [1, 1, Qb], [1, 1, Qb, KVb]

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        block, table, bits = self.block, self.table, self.bits
        qb = (q_idx // block).clamp(0, table.size(0) - 1)
        kb = (kv_idx // block).clamp(0, table.size(1) - 1)
        entry = table[qb, kb]
        col = kv_idx % block
        if bits.numel() == 0:  # no partial block: only empty and full ones
            return entry == -2
        word = bits[entry.clamp(min=0), q_idx % block, col >> 3]
        bit = ((word >> (col & 7).to(torch.uint8)) & 1).bool()
        return torch.where(entry >= 0, bit, entry == -2)


def _bits_mask_mod(src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> MaskMod:
    """The ``mask_mod`` of lookup ``"bits"``: a packed bitmap ``[N_dst, ceil(N_src / 8)]``."""
    words = (num_src + 7) // 8
    bits = torch.zeros(num_dst, words, dtype=torch.uint8, device=src.device)  # [N_dst, W]
    one = torch.ones(1, dtype=torch.uint8, device=src.device)
    # distinct edges set distinct bits, so a scatter-add of the bit values is their bitwise or
    keys = torch.unique(dst * max(num_src, 1) + src)
    s, d = keys % max(num_src, 1), keys // max(num_src, 1)
    bits.view(-1).index_add_(0, d * words + (s >> 3), (one << (s & 7).to(torch.uint8)))

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ((bits[q_idx, kv_idx >> 3] >> (kv_idx & 7).to(torch.uint8)) & 1).bool()

    return mask_mod


def _search_mask_mod(src: Tensor, dst: Tensor, num_src: int) -> MaskMod:
    """The ``mask_mod`` of lookup ``"search"``: binary search in the sorted edge keys."""
    stride = max(num_src, 1)
    keys = torch.unique(dst * stride + src)  # [E'] sorted
    if keys.numel() == 0:
        keys = torch.full((1,), -1, dtype=torch.long, device=src.device)  # matches nothing

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        k = q_idx.long() * stride + kv_idx.long()
        pos = torch.searchsorted(keys, k).clamp(max=keys.numel() - 1)
        return keys[pos] == k

    return mask_mod


def to_flex_mask_mod(
    edge_index: Tensor,
    num_src: int | None = None,
    num_dst: int | None = None,
    *,
    lookup: str = "bits",
    block_size: int = 128,
) -> MaskMod:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True iff edge ``kv_idx -> q_idx``.

    Args:
        edge_index: the token graph.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size).
        lookup: ``"bits"``: a packed bitmap ``[N_dst, ceil(N_src / 8)]`` of ``uint8`` (``N^2 / 8``
            bytes); ``"blocks"``: a table of the ``block_size`` blocks (empty, full, or the row of a
            bitmap of the block) and bitmaps of the partially filled blocks only (``(N / B)^2``
            ints plus ``B^2 / 8`` bytes per partial block: what a sparse graph of a million tokens
            fits in); ``"search"``: binary search in the ``E`` sorted edge keys (``O(E)`` memory;
            eager mode only, inductor cannot lower ``searchsorted`` inside a mask). ``"bits"`` and
            ``"blocks"`` work under ``torch.compile``, which fused FlexAttention needs.
        block_size: the block of ``"blocks"`` (use the ``BlockMask``'s).

    Example:
        >>> from gnn_transformer.topology import causal
        >>> mm = to_flex_mask_mod(causal(3))
        >>> z = torch.tensor(0)
        >>> bool(mm(z, z, torch.tensor(2), torch.tensor(1))), bool(mm(z, z, torch.tensor(1), torch.tensor(2)))
        (True, False)
    """
    if lookup not in LOOKUPS:
        raise ValueError(f"Expected 'lookup' in {LOOKUPS} (got {lookup!r})")
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    if lookup == "blocks":
        return _Blocks(src, dst, num_src, num_dst, block_size).mask_mod
    if lookup == "bits":
        return _bits_mask_mod(src, dst, num_src, num_dst)
    return _search_mask_mod(src, dst, num_src)


def to_block_mask(
    edge_index: Tensor,
    num_src: int | None = None,
    num_dst: int | None = None,
    *,
    block_size: int = 128,
    device: str | torch.device | None = None,
    lookup: str = "blocks",
):
    """FlexAttention ``BlockMask`` of the graph (``B = H = None``: shared by batch and heads).

    The blocks come from the edges (``BlockMask.from_kv_blocks``): a block holding every one of its
    ``block_size²`` pairs is *full* (FlexAttention skips its ``mask_mod``), one holding some is
    partial, and no ``N × N`` mask is ever built, so a sparse graph of a million tokens fits.

    Args:
        edge_index: the token graph.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size).
        block_size: FlexAttention block size (128 by default; smaller for tiny graphs).
        device: where the mask lives (default: the device of ``edge_index``).
        lookup: the ``mask_mod``'s lookup, see :func:`to_flex_mask_mod` (``"blocks"`` by default:
            it shares the block structure built here).

    Raises:
        RuntimeError: where FlexAttention is unavailable.
    """
    _require_flex()
    from torch.nn.attention.flex_attention import BlockMask

    if lookup not in LOOKUPS:
        raise ValueError(f"Expected 'lookup' in {LOOKUPS} (got {lookup!r})")
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    device = src.device if device is None else torch.device(device)
    src, dst = src.to(device), dst.to(device)
    blocks = _Blocks(src, dst, num_src, num_dst, block_size)
    mask_mod: MaskMod
    if lookup == "blocks":
        mask_mod = blocks.mask_mod
    else:
        mask_mod = to_flex_mask_mod(torch.stack([src, dst]), num_src, num_dst, lookup=lookup)
    (num, idx), (full_num, full_idx) = blocks._lists["partial"], blocks._lists["full"]
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(num_dst, num_src)
    )
