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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from .primitives import plain_tensor

# Backend-specific structures cached on a graph or a tile list, keyed by a name or a tuple of the
# name and the parameters they were built for (``("row_chunks", max_edges)``)
Extras: TypeAlias = dict[str | tuple[Any, ...], Any]


@dataclass(eq=False)
class CSRGraph:
    """Target-sorted edge list with CSR pointers, and a lazily built source-sorted view."""

    num_src: int
    num_dst: int
    src: Tensor  # [E] source j of each edge, edges sorted by target
    dst: Tensor  # [E] target i of each edge, non-decreasing
    rowptr: Tensor  # [N_dst + 1] edges of target i are rowptr[i]:rowptr[i + 1]
    perm: Tensor | None  # [E] sorted position -> column of the edge_index as given (None: identity)
    extras: Extras = field(default_factory=dict)  # row chunks, tile lists, CSC view, ...
    # [E] for a part of a larger graph (split's fused part): each edge's position in that graph's
    # target-sorted order, the key of its dropout mask; None: the positions 0..E-1 of this graph
    edge_ids: Tensor | None = None
    # the edge_index that src / dst are views of (weak: the cache must not keep it alive)
    source: weakref.ref[Tensor] | None = None

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    def guards(self) -> tuple[Tensor, ...]:
        """The caller's ``edge_index`` when ``src`` / ``dst`` share its memory: a kernel saves it
        for backward, so that writing it in place before the backward pass raises PyTorch's
        "modified by an inplace operation" error instead of giving wrong gradients."""
        source = None if self.source is None else self.source()
        return () if source is None else (source,)

    def csc(self) -> tuple[Tensor, Tensor]:
        """``(colptr [N_src + 1], csc_perm [E])``: edges sorted by source (stable), as positions
        in the target-sorted order."""
        if "csc" not in self.extras:
            index = self.extras.pop("edge_index", lambda: None)()
            if index is not None:  # PyG caches the source-sorted view on the EdgeIndex itself: reuse it
                (colptr, _), csc_perm = index.get_csr()  # pointers over sources, perm to columns
                if csc_perm is None:
                    csc_perm = torch.arange(self.num_edges, device=self.src.device)
                self.extras["csc"] = (colptr.to(torch.long), csc_perm.to(torch.long))
            else:
                csc_perm = torch.argsort(self.src, stable=True)  # [E]
                counts = torch.bincount(self.src, minlength=self.num_src)  # [N_src]
                colptr = torch.zeros(self.num_src + 1, dtype=torch.long, device=self.src.device)
                colptr[1:] = counts.cumsum(0)
                self.extras["csc"] = (colptr, csc_perm)
        return self.extras["csc"]


# id(edge_index) -> (weak reference, version (:func:`_version`), stamp, graph)
_CACHE: dict[int, tuple[weakref.ref[Tensor], int | Tensor, tuple[Any, ...], CSRGraph]] = {}
# Re-entrant: a weakref callback (``_drop``) can run inside a locked section when garbage
# collection frees another edge_index there.
_LOCK = threading.RLock()


def _drop(key: int) -> None:
    with _LOCK:
        _CACHE.pop(key, None)


def _dropper(key: int) -> Callable[[weakref.ref[Tensor]], None]:
    """The weak reference callback that forgets the cache entry ``key`` when its tensor dies."""
    return lambda _ref: _drop(key)


def check_edge_index(edge_index: Tensor, num_src: int, num_dst: int) -> None:
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
    # an alias of the same memory: views of it do not hold the caller's tensor object, so the cache
    # entry keyed by that tensor's weak reference goes when the caller drops it
    plain = plain_tensor(edge_index).detach()
    # Views of a long edge_index (no copy); a backward pass that uses them checks they were not
    # written in place since (CSRGraph.guards). An inference tensor cannot be saved for backward:
    # copied.
    copy = edge_index.is_inference()
    src, dst = plain[0].to(torch.long, copy=copy), plain[1].to(torch.long, copy=copy)  # [E], [E]
    if src.numel() > 0:
        lo = min(int(src.min()), int(dst.min()))
        if lo < 0:
            raise ValueError(f"Expected 'edge_index' to hold non-negative node ids (got {lo})")
        if int(src.max()) >= num_src:
            raise ValueError(f"'edge_index' names source {int(src.max())} but 'key' has {num_src} rows")
        if int(dst.max()) >= num_dst:
            raise ValueError(f"'edge_index' names target {int(dst.max())} but 'query' has {num_dst} rows")
    perm = None
    if src.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
        if getattr(edge_index, "is_sorted_by_col", False) is True:
            raise ValueError(
                "Expected 'edge_index' flagged sort_order='col' to have its targets "
                "(row 1) in ascending order (they are not): build the EdgeIndex "
                "without sort_order, or sort it with .sort_by('col')"
            )
        perm = torch.argsort(dst, stable=True)  # [E]
        src, dst = src[perm], dst[perm]
    counts = torch.bincount(dst, minlength=num_dst)  # [N_dst]
    rowptr = torch.zeros(num_dst + 1, dtype=torch.long, device=dst.device)
    rowptr[1:] = counts.cumsum(0)
    graph = CSRGraph(num_src, num_dst, src.contiguous(), dst.contiguous(), rowptr, perm)
    if src.numel() and (graph.src.data_ptr() == plain.data_ptr() or graph.dst.data_ptr() == plain[1].data_ptr()):
        try:
            graph.source = weakref.ref(edge_index)
        except TypeError:  # not weak-referenceable: unguarded, as it is not cached either
            pass
    if perm is None and isinstance(edge_index, EdgeIndex) and edge_index.sparse_size() == (num_src, num_dst):
        # csc() asks PyG for the source-sorted view, only when a backward pass needs it (tiled
        # never does); weak: the cache must not keep the edge_index alive
        graph.extras["edge_index"] = weakref.ref(edge_index)
    return graph


def _version(edge_index: Tensor) -> int | Tensor:
    """What tells a later call that ``edge_index`` still holds the same edges: its version
    counter, or for an inference tensor (which has none) a copy of its values."""
    if edge_index.is_inference():
        plain = plain_tensor(edge_index)
        return plain.clone()
    return edge_index._version


def _same(old: int | Tensor, edge_index: Tensor) -> bool:
    if isinstance(old, int):
        return not edge_index.is_inference() and old == edge_index._version
    plain = plain_tensor(edge_index)
    return edge_index.is_inference() and torch.equal(old, plain)


def _lookup(edge_index: Tensor) -> tuple[tuple[Any, ...], CSRGraph] | None:
    """``(stamp, graph)`` of the valid cache entry of ``edge_index``, if any."""
    with _LOCK:
        hit = _CACHE.get(id(edge_index))
    if hit is None:
        return None
    ref, version, stamp, graph = hit
    if ref() is not edge_index or stamp[:3] != _stamp(edge_index) or not _same(version, edge_index):
        return None
    return stamp, graph


def _stamp(edge_index: Tensor) -> tuple:
    return edge_index.data_ptr(), tuple(edge_index.shape), edge_index.device


def cached_sizes(edge_index: Tensor) -> tuple[int, int] | None:
    """``(num_src, num_dst)`` that ``edge_index``'s cached graph was built for, if it has one."""
    hit = _lookup(edge_index)
    return None if hit is None else hit[0][3:]


def prepare(edge_index: Tensor, num_src: int, num_dst: int) -> CSRGraph:
    """The cached :class:`CSRGraph` of ``edge_index`` (built and validated on first use).

    The cache sees in-place writes through PyTorch (the tensor's version counter; for an inference
    tensor, its values), not writes that bypass it (``.data``, a NumPy view): after those, call
    :func:`clear_cache`.
    """
    check_edge_index(edge_index, num_src, num_dst)
    stamp = (*_stamp(edge_index), num_src, num_dst)
    hit = _lookup(edge_index)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    graph = _build(edge_index, num_src, num_dst)
    key = id(edge_index)
    try:
        ref = weakref.ref(edge_index, _dropper(key))
    except TypeError:  # not weak-referenceable: do not cache
        return graph
    with _LOCK:
        _CACHE[key] = (ref, _version(edge_index), stamp, graph)
    return graph


def clear_cache() -> None:
    """Forget every cached graph structure."""
    with _LOCK:
        _CACHE.clear()


def sub_graph(graph: CSRGraph, edge_ids: Tensor) -> CSRGraph:
    """The edges ``edge_ids`` (sorted positions) as a graph of their own, still target-sorted."""
    src, dst = graph.src[edge_ids], graph.dst[edge_ids]
    rowptr = torch.zeros(graph.num_dst + 1, dtype=torch.long, device=src.device)
    rowptr[1:] = torch.bincount(dst, minlength=graph.num_dst).cumsum(0)
    return CSRGraph(graph.num_src, graph.num_dst, src, dst, rowptr, None, edge_ids=edge_ids)
