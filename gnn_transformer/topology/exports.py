"""Exports of a token graph: a networkx ``DiGraph``, and FlexAttention's ``mask_mod`` and
``BlockMask`` (``torch.nn.attention.flex_attention``) built from the same edge set.

The ``mask_mod`` looks each ``(q_idx, kv_idx)`` pair up in a packed bitmap of the edge set
(``N^2 / 8`` bytes, compiles), or in the sorted edge keys (``O(E)``, eager only). A batch (disjoint
union) is one long FlexAttention sequence of ``N`` tokens; the ``BlockMask`` skips the blocks
between sequences.
"""
from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from .masks import _check_edge_index, _check_range, _default_sizes


def to_networkx(edge_index: Tensor, num_src: int | None = None, num_dst: int | None = None, *,
                bipartite: bool | None = None) -> nx.DiGraph:
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
        raise RuntimeError(f"FlexAttention (torch.nn.attention.flex_attention) is not available in "
                           f"torch {torch.__version__}; it needs torch >= 2.5")


def to_flex_mask_mod(edge_index: Tensor, num_src: int | None = None, num_dst: int | None = None, *,
                     lookup: str = "bits") -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True iff edge ``kv_idx -> q_idx``.

    Args:
        edge_index: the token graph.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size).
        lookup: ``"bits"``: a packed bitmap ``[N_dst, ceil(N_src / 8)]`` of ``uint8`` (``N^2 / 8``
            bytes; works under ``torch.compile``, which fused FlexAttention needs); ``"search"``:
            binary search in the ``E`` sorted edge keys (``O(E)`` memory; eager mode only, inductor
            cannot lower ``searchsorted`` inside a mask).

    Example:
        >>> from gnn_transformer.topology import causal
        >>> mm = to_flex_mask_mod(causal(3))
        >>> z = torch.tensor(0)
        >>> bool(mm(z, z, torch.tensor(2), torch.tensor(1))), bool(mm(z, z, torch.tensor(1), torch.tensor(2)))
        (True, False)
    """
    if lookup not in ("bits", "search"):
        raise ValueError(f"Expected 'lookup' to be 'bits' or 'search' (got {lookup!r})")
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    if lookup == "bits":
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

    stride = max(num_src, 1)
    keys = torch.unique(dst * stride + src)  # [E'] sorted
    if keys.numel() == 0:
        keys = torch.full((1,), -1, dtype=torch.long, device=src.device)  # matches nothing

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        k = q_idx.long() * stride + kv_idx.long()
        pos = torch.searchsorted(keys, k).clamp(max=keys.numel() - 1)
        return keys[pos] == k

    return mask_mod


def to_block_mask(edge_index: Tensor, num_src: int | None = None, num_dst: int | None = None, *,
                  block_size: int = 128, device: str | torch.device | None = None,
                  lookup: str = "bits"):
    """FlexAttention ``BlockMask`` of the graph (``B = H = None``: shared by batch and heads).

    Args:
        edge_index: the token graph.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size).
        block_size: FlexAttention block size (128 by default; smaller for tiny graphs).
        device: where the mask lives (default: the device of ``edge_index``).
        lookup: see :func:`to_flex_mask_mod`.

    Raises:
        RuntimeError: where FlexAttention is unavailable.
    """
    _require_flex()
    from torch.nn.attention.flex_attention import create_block_mask

    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    device = src.device if device is None else torch.device(device)
    plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    mask_mod = to_flex_mask_mod(plain.to(device), num_src, num_dst, lookup=lookup)
    return create_block_mask(mask_mod, None, None, num_dst, num_src, device=device, BLOCK_SIZE=block_size)
