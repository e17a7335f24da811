"""Derived structures of one token graph, built once and reused by every layer of a model.

A :class:`CSRGraph` holds the edge list sorted by target (the CSR over targets that forward passes
and ``dQ`` walk) and, lazily, the source-sorted permutation (the CSC that ``dK`` / ``dV`` walk), plus
a dictionary for backend-specific structures (row chunks, tile lists). :func:`prepare` returns the
cached object for an ``edge_index`` tensor; the cache is keyed by the tensor's identity and version,
and an entry disappears with its tensor.

Notation: ``E`` edges, ``N_src`` source (key / value) nodes, ``N_dst`` target (query) nodes.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch_geometric import EdgeIndex


@dataclass(eq=False)
class CSRGraph:
    """Target-sorted edge list with CSR pointers, and a lazily built source-sorted view."""

    num_src: int
    num_dst: int
    src: Tensor  # [E] source j of each edge, edges sorted by target
    dst: Tensor  # [E] target i of each edge, non-decreasing
    rowptr: Tensor  # [N_dst + 1] edges of target i are rowptr[i]:rowptr[i + 1]
    perm: Tensor | None  # [E] sorted position -> column of the edge_index as given (None: identity)
    extras: dict[str, Any] = field(default_factory=dict)  # row chunks, tile lists, CSC view, ...
    # [E] for a part of a larger graph (split's fused part): each edge's position in that graph's
    # target-sorted order, the key of its dropout mask; None: the positions 0..E-1 of this graph
    edge_ids: Tensor | None = None

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    def csc(self) -> tuple[Tensor, Tensor]:
        """``(colptr [N_src + 1], csc_perm [E])``: edges sorted by source (stable), as positions
        in the target-sorted order."""
        if "csc" not in self.extras:
            csc_perm = torch.argsort(self.src, stable=True)  # [E]
            counts = torch.bincount(self.src, minlength=self.num_src)  # [N_src]
            colptr = torch.zeros(self.num_src + 1, dtype=torch.long, device=self.src.device)
            colptr[1:] = counts.cumsum(0)
            self.extras["csc"] = (colptr, csc_perm)
        return self.extras["csc"]


_CACHE: dict[int, tuple[weakref.ref, int, tuple, CSRGraph]] = {}
# Re-entrant: a weakref callback (``_drop``) can run inside a locked section when garbage
# collection frees another edge_index there.
_LOCK = threading.RLock()


def _drop(key: int) -> None:
    with _LOCK:
        _CACHE.pop(key, None)


def _check(edge_index: Tensor, num_src: int, num_dst: int) -> None:
    if not isinstance(edge_index, Tensor):
        raise ValueError(f"Expected 'edge_index' to be a tensor (got {type(edge_index).__name__})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"Expected 'edge_index' of shape [2, E] (got {list(edge_index.shape)})")
    if edge_index.dtype not in (torch.long, torch.int32):
        raise ValueError(f"Expected 'edge_index' to hold integers (got {edge_index.dtype})")
    sparse_size = getattr(edge_index, "sparse_size", None)
    if callable(sparse_size):
        s_src, s_dst = sparse_size()
        if s_src is not None and s_src != num_src:
            raise ValueError(f"'edge_index' has {s_src} source nodes but 'key' has {num_src} rows")
        if s_dst is not None and s_dst != num_dst:
            raise ValueError(f"'edge_index' has {s_dst} target nodes but 'query' has {num_dst} rows")


def _build(edge_index: Tensor, num_src: int, num_dst: int) -> CSRGraph:
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0].to(torch.long), plain[1].to(torch.long)  # [E], [E]
    if src.numel() > 0:
        lo = min(int(src.min()), int(dst.min()))
        if lo < 0:
            raise ValueError(f"Expected 'edge_index' to hold non-negative node ids (got {lo})")
        if int(src.max()) >= num_src:
            raise ValueError(f"'edge_index' names source {int(src.max())} but 'key' has {num_src} rows")
        if int(dst.max()) >= num_dst:
            raise ValueError(f"'edge_index' names target {int(dst.max())} but 'query' has {num_dst} rows")
    perm = None
    if getattr(edge_index, "is_sorted_by_col", False) is not True and src.numel() > 1:
        if bool((dst[1:] < dst[:-1]).any()):
            perm = torch.argsort(dst, stable=True)  # [E]
            src, dst = src[perm], dst[perm]
    counts = torch.bincount(dst, minlength=num_dst)  # [N_dst]
    rowptr = torch.zeros(num_dst + 1, dtype=torch.long, device=dst.device)
    rowptr[1:] = counts.cumsum(0)
    graph = CSRGraph(num_src, num_dst, src.contiguous(), dst.contiguous(), rowptr, perm)
    if perm is None and isinstance(edge_index, EdgeIndex) and edge_index.sparse_size() == (num_src, num_dst):
        # PyG caches the source-sorted view on the EdgeIndex itself: reuse it.
        (colptr, _), csc_perm = edge_index.get_csr()  # pointers over sources, perm to columns
        if csc_perm is None:
            csc_perm = torch.arange(src.numel(), device=src.device)
        graph.extras["csc"] = (colptr.to(torch.long), csc_perm.to(torch.long))
    return graph


def prepare(edge_index: Tensor, num_src: int, num_dst: int) -> CSRGraph:
    """The cached :class:`CSRGraph` of ``edge_index`` (built and validated on first use)."""
    _check(edge_index, num_src, num_dst)
    key = id(edge_index)
    stamp = (edge_index.data_ptr(), tuple(edge_index.shape), edge_index.device, num_src, num_dst)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        ref, version, old_stamp, graph = hit
        if ref() is edge_index and version == edge_index._version and old_stamp == stamp:
            return graph
    graph = _build(edge_index, num_src, num_dst)
    try:
        ref = weakref.ref(edge_index, lambda _r, k=key: _drop(k))
    except TypeError:  # not weak-referenceable: do not cache
        return graph
    with _LOCK:
        _CACHE[key] = (ref, edge_index._version, stamp, graph)
    return graph


def clear_cache() -> None:
    """Forget every cached graph structure."""
    with _LOCK:
        _CACHE.clear()
