"""From an edge list to a plan: the graph a call runs on, what it is, and which backend runs it.

- **The graph** (:class:`CSRGraph`, :func:`prepare`): the edge list sorted by target (the CSR over
  targets that forward passes and ``dQ`` walk) and, lazily, the source-sorted permutation (the CSC
  that ``dK`` / ``dV`` walk), plus a dictionary for backend-specific structures (row chunks, tile
  lists). :func:`prepare` returns the cached object for an ``edge_index`` tensor; the cache is keyed
  by the tensor's identity and version, and an entry disappears with its tensor.
- **What it is**: an implicit graph (:class:`BlockStructure`, a ``topology.BlockGraph``: tiles
  without an edge list), or a graph of exactly full or causal attention per sequence or document
  (:func:`dense_pattern`), which ``auto`` runs through PyTorch's own attention kernels
  (:mod:`.sdpa`) where nothing they lack is asked for (:func:`runs_sdpa`), or an interval graph
  (:func:`interval_pattern`), which ``auto`` runs through FlexAttention on the GPU (:mod:`.flex`,
  :func:`runs_flex`).
- **The plan of ``auto``** for the others: a cost model in edge-equivalents, the tile size, and the
  parts of a graph that ``tiled`` and ``split`` run (cached on the graph). A tile of ``B x B`` cells
  costs ``TILE_COST * B²`` whatever its fill, an edge of the fused path costs 1, each call of a
  backend adds ``ROW_COST`` per target row and ``split``'s merge ``MERGE_COST`` per row
  (``DROPOUT_COST`` under attention dropout); :func:`choose_backend` takes the cheapest of all edges
  fused, all tiles tiled, or the dense tiles tiled and the rest fused.

Notation: ``E`` edges, ``N_src`` source (key / value) nodes, ``N_dst`` target (query) nodes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeGuard, runtime_checkable

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from .primitives import forgetter, plain_tensor, versions
from .flex import BLOCK as FLEX_BLOCK
from .flex import failed, flex_available, runs_compiled
from .sdpa import has_cpu_flash
from .tiling import TileList, build_tiles, sorted_unique, tile_stats

# ---------------------------------------------------------------- the graph a call runs on

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
    # the edge_index that src / dst are views of, and an EdgeIndex's data (weak: the cache must not
    # keep them alive)
    sources: tuple[weakref.ref[Tensor], ...] = ()

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    def guards(self) -> tuple[Tensor, ...]:
        """The caller's ``edge_index`` (and an ``EdgeIndex``'s data) when ``src`` / ``dst`` share
        its memory: a kernel saves them for backward, so that writing either in place before the
        backward pass raises PyTorch's "modified by an inplace operation" error instead of giving
        wrong gradients."""
        alive = (ref() for ref in self.sources)
        return tuple(t for t in alive if t is not None)

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
_CACHE: dict[int, tuple[weakref.ref[Tensor], tuple[int, int] | Tensor, tuple[Any, ...], CSRGraph]] = {}
# Re-entrant: a weakref callback (:func:`.primitives.forgetter`) can run inside a locked section when garbage
# collection frees another edge_index there.
_LOCK = threading.RLock()


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
    if edge_index.device.type == "meta" and edge_index.numel():  # no edges hold no data: allowed
        raise ValueError("Expected 'edge_index' with values to check, not on the meta device")


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
            data = plain_tensor(edge_index)
            graph.sources = (weakref.ref(edge_index),) + ((weakref.ref(data),) if data is not edge_index else ())
        except TypeError:  # not weak-referenceable: unguarded, as it is not cached either
            pass
    if perm is None and isinstance(edge_index, EdgeIndex) and edge_index.sparse_size() == (num_src, num_dst):
        # csc() asks PyG for the source-sorted view, only when a backward pass needs it (tiled
        # never does); weak: the cache must not keep the edge_index alive
        graph.extras["edge_index"] = weakref.ref(edge_index)
    return graph


def _version(edge_index: Tensor) -> tuple[int, int] | Tensor:
    """What tells a later call that ``edge_index`` still holds the same edges: its version
    counters (:func:`.primitives.versions`), or for an inference tensor (which has none) a copy of
    its values."""
    if edge_index.is_inference():
        plain = plain_tensor(edge_index)
        return plain.clone()
    return versions(edge_index)


def _same(old: tuple[int, int] | Tensor, edge_index: Tensor) -> bool:
    if isinstance(old, tuple):
        return not edge_index.is_inference() and old == versions(edge_index)
    plain = plain_tensor(edge_index)
    return edge_index.is_inference() and torch.equal(old, plain)


def _lookup(edge_index: Tensor) -> tuple[tuple[Any, ...], CSRGraph] | None:
    """``(stamp, graph)`` of the valid cache entry of ``edge_index``, if any."""
    hit = _CACHE.get(id(edge_index))  # one dict read is atomic: the lock guards the writes
    if hit is None:
        return None
    ref, version, stamp, graph = hit
    if ref() is not edge_index or not _same(version, edge_index) or stamp[:3] != _stamp(edge_index):
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
    hit = _lookup(edge_index)  # this very tensor, unchanged since it was checked and cached
    if hit is not None and hit[0][3:] == (num_src, num_dst):
        return hit[1]
    check_edge_index(edge_index, num_src, num_dst)
    stamp = (*_stamp(edge_index), num_src, num_dst)
    graph = _build(edge_index, num_src, num_dst)
    key = id(edge_index)
    try:
        ref = weakref.ref(edge_index, forgetter(_CACHE, _LOCK, key))
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


# ---------------------------------------------------------------- what the graph is


@runtime_checkable
class BlockStructure(Protocol):
    """What the kernels read of an implicit graph (see :class:`gnn_transformer.topology.BlockGraph`)."""

    num_dst: int
    num_src: int
    block_q: int
    block_k: int
    q_block: Tensor  # [T] sorted by (head, query block, key block)
    k_block: Tensor  # [T]
    mask_index: Tensor  # [T] -1 for a full tile
    masks: Tensor  # [P, Bq, Bk] bool
    tile_head: Tensor | None  # [T] or None
    num_heads: int | None
    q_ptr: Tensor | None  # [NBq + 1] or None (uniform blocks)
    k_ptr: Tensor | None
    dense: tuple[str, tuple[int, ...]] | None

    @property
    def num_q_blocks(self) -> int: ...

    @property
    def num_k_blocks(self) -> int: ...

    def edges(self) -> Tensor | tuple[Tensor, Tensor]: ...


def is_block_structure(graph: object) -> TypeGuard[BlockStructure]:
    """Whether ``graph`` is an implicit graph (a :class:`BlockStructure`, not an edge list)."""
    return not isinstance(graph, Tensor) and isinstance(graph, BlockStructure)


# Documents of unequal lengths run one call each: beyond this many, the tiled backend is cheaper
MAX_DOCUMENTS = 64
# Edges per chunk of the recognition's edge-by-edge comparison
CHECK_CHUNK = 1 << 24


@dataclass(frozen=True)
class DensePattern:
    """A graph SDPA runs without a mask: ``kind`` ``"full"`` or ``"causal"`` within each document,
    ``bounds`` the documents' first tokens and the token count (one sequence: ``(0, N)``; a full
    bipartite graph, ``N_src != N_dst``: ``(0, N_dst)`` with every key)."""

    kind: str
    bounds: tuple[int, ...]

    @functools.cached_property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    @functools.cached_property
    def equal_lengths(self) -> bool:
        """Whether every document has one length (one batched SDPA call runs them all)."""
        return len(set(self.lengths)) == 1


def dense_pattern(graph: CSRGraph) -> DensePattern | None:
    """The :class:`DensePattern` of ``graph``, or ``None`` (cached). Linear checks on the rows'
    first sources and counts come first; only a graph that passes them has its edges compared
    with the pattern's, one by one."""
    if "dense_pattern" not in graph.extras:
        graph.extras["dense_pattern"] = _recognize(graph)
    return graph.extras["dense_pattern"]


def _recognize(graph: CSRGraph) -> DensePattern | None:
    n, n_src, num_edges = graph.num_dst, graph.num_src, graph.num_edges
    if n == 0 or num_edges == 0:
        return None
    counts = graph.rowptr.diff()  # [N]
    if bool((counts == 0).any()):  # an empty row: not full, not causal
        return None
    lo = graph.src[graph.rowptr[:-1]]  # [N] first source of each row
    hi = lo + counts  # [N] one past the last source, if the row is a run lo, lo + 1, ...
    pattern = None
    if n_src != n:  # bipartite: every query sees every key
        if bool((lo == 0).all()) and bool((hi == n_src).all()):
            pattern = DensePattern("full", (0, n))
    else:
        i = torch.arange(n, device=lo.device)
        first = lo == i  # [N] the first token of a document sees itself first
        docs = first.cumsum(0) - 1  # [N] document of each token
        starts = i[first]  # [B]
        ends = torch.cat([starts[1:], starts.new_tensor([n])])  # [B]
        if bool(first[0]) and bool((lo == starts[docs]).all()):
            if bool((hi == i + 1).all()):
                pattern = DensePattern("causal", tuple(starts.tolist()) + (n,))
            elif bool((hi == ends[docs]).all()):
                pattern = DensePattern("full", tuple(starts.tolist()) + (n,))
    if pattern is None or not _rows_are_runs(graph, lo):
        return None
    return pattern


def _rows_are_runs(graph: CSRGraph, lo: Tensor) -> bool:
    """Whether each row's sources are exactly the run ``lo[i], lo[i] + 1, ...`` (sorted, no
    repeats), compared in chunks of edges, so that the check adds no per-edge array of the whole
    graph."""
    first = lo - graph.rowptr[:-1]  # [N] source of the row's edge e is first[i] + e
    for e0 in range(0, graph.num_edges, CHECK_CHUNK):
        e1 = min(e0 + CHECK_CHUNK, graph.num_edges)
        dst = graph.dst[e0:e1]
        if not torch.equal(graph.src[e0:e1], first[dst] + torch.arange(e0, e1, device=lo.device)):
            return False
    return True


@dataclass(eq=False)
class IntervalPattern:
    """A graph shared by every head where each target ``i`` hears exactly the sources ``lo[i] ...
    hi[i]`` (none where ``hi[i] < lo[i]``): sliding windows, prefix-LM, windows within documents.
    FlexAttention runs it with the ``mask_mod`` ``lo[q] <= kv <= hi[q]`` (:mod:`.flex`, which keeps
    its ``BlockMask`` in ``extras``)."""

    lo: Tensor  # [N_dst] int64
    hi: Tensor  # [N_dst] int64, inclusive
    num_src: int
    extras: Extras = field(default_factory=dict)


def interval_pattern(graph: CSRGraph) -> IntervalPattern | None:
    """The :class:`IntervalPattern` of ``graph``, or ``None`` (cached; a graph without edges has
    none). A linear check of each row's first and last source against its count comes first; only
    a graph that passes it has its edges compared with the runs, one by one."""
    if "intervals" not in graph.extras:
        graph.extras["intervals"] = _intervals(graph)
    return graph.extras["intervals"]


def _intervals(graph: CSRGraph) -> IntervalPattern | None:
    if graph.num_edges == 0:
        return None
    counts = graph.rowptr.diff()  # [N]
    some = counts > 0
    last = graph.num_edges - 1
    lo = torch.where(some, graph.src[graph.rowptr[:-1].clamp(max=last)], 0)  # [N]
    hi = torch.where(some, graph.src[(graph.rowptr[1:] - 1).clamp(min=0)], -1)  # [N]
    if not bool((hi - lo + 1 == counts).all()) or not _rows_are_runs(graph, lo):
        return None
    return IntervalPattern(lo, hi, graph.num_src)


def block_intervals(graph: BlockStructure) -> IntervalPattern | None:
    """The :class:`IntervalPattern` of an implicit graph that carries its bounds (``intervals``: a
    ``topology.BlockGraph`` built by ``topology.interval_graph``, shared by every head), or
    ``None``; cached per graph."""
    bounds = getattr(graph, "intervals", None)
    if bounds is None or getattr(graph, "tile_head", None) is not None:
        return None
    with _LOCK:
        pattern = _BLOCK_INTERVALS.get(graph)
        if pattern is None:
            pattern = _BLOCK_INTERVALS[graph] = IntervalPattern(bounds[0], bounds[1], graph.num_src)
    return pattern


# implicit graph -> its IntervalPattern (and so its FlexAttention BlockMask)
_BLOCK_INTERVALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runs_sdpa(pattern: DensePattern | None, device_type: str, bias: bool, dropout: bool, lse: bool) -> bool:
    """Whether ``auto`` runs ``pattern`` through SDPA: a recognized graph, no edge bias, no attention
    dropout, few enough documents of unequal lengths, and on devices other than the CPU no
    log-sum-exp (the public SDPA does not return it). On the CPU only with PyTorch's fused CPU
    kernel, and while it is enabled (``torch.nn.attention.sdpa_kernel`` without
    ``SDPBackend.FLASH_ATTENTION`` turns it off, for SDPA and for ``auto`` alike: the project's
    kernels then run, which have higher-order gradients, see :mod:`.higher_order`)."""
    if pattern is None or bias or dropout:
        return False
    if device_type == "cpu" and not (has_cpu_flash() and torch.backends.cuda.flash_sdp_enabled()):
        return False
    if device_type != "cpu" and lse:
        return False
    return pattern.equal_lengths or len(pattern.lengths) <= MAX_DOCUMENTS


# Devices where auto runs interval graphs through FlexAttention, and from how many targets: below
# that a graph is small enough for the project's kernels, and compiling FlexAttention's kernels for
# one more shape would cost more than the call. Not the CPU: the project's CPU kernels are faster
# than compiled FlexAttention there, which has no CPU backward pass (docs/benchmarks.md).
FLEX_DEVICES: tuple[str, ...] = ("cuda",)
FLEX_MIN_TARGETS = 4096
# FlexAttention's BlockMask lists key blocks per query block in [NBq, NBk] tables (four of them,
# int32): up to this many entries (1M tokens in blocks of 128), beyond it the project's kernels,
# whose memory follows the tiles that exist
FLEX_MAX_BLOCKS = 1 << 26
# what FlexAttention's GPU kernels take: these dtypes, head dimensions of at least 16 (tl.dot)
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLEX_MIN_HEAD_DIM = 16


def _flex_runs(device, dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether no earlier call found that FlexAttention cannot run such heads on this device."""
    return not failed(_device_type(device), dtype, head_dim)


def runs_flex(
    num_dst: int,
    num_src: int,
    device_type: str,
    dtype: torch.dtype | None,
    head_dim: int | None,
    bias: bool,
    dropout: bool,
    lse: bool,
) -> bool:
    """Whether ``auto`` runs an interval graph (:class:`IntervalPattern`) of ``num_dst`` targets
    and ``num_src`` sources through FlexAttention (:mod:`.flex`): on a device of
    :data:`FLEX_DEVICES`, from :data:`FLEX_MIN_TARGETS` targets, up to :data:`FLEX_MAX_BLOCKS`
    (query block, key block) pairs, inputs of :data:`FLEX_DTYPES` with heads of at least
    :data:`FLEX_MIN_HEAD_DIM` (``None``: not checked), no edge bias, no attention dropout, no
    log-sum-exp, FlexAttention and Triton installed, and ``torch.compile`` enabled (without it
    FlexAttention runs uncompiled, every score materialized). Checked before the graph is
    recognized."""
    if bias or dropout or lse or device_type not in FLEX_DEVICES or num_dst < FLEX_MIN_TARGETS:
        return False
    if -(-num_dst // FLEX_BLOCK) * -(-num_src // FLEX_BLOCK) > FLEX_MAX_BLOCKS:
        return False
    if (dtype is not None and dtype not in FLEX_DTYPES) or (head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM):
        return False
    return flex_available() and runs_compiled(device_type)


# ---------------------------------------------------------------- the plan of auto

# auto's cost model, in units of one edge of the fused path (per head and channel); measured with
# `gnn-transformer bench --calibrate` (see docs/kernels.md); the CUDA values are still estimates.
# TILE_COST: one tile cell, whatever the tile's fill (a tile filled to at least this ratio is
# cheaper tiled). ROW_COST: the fixed work per target row of one call of a backend (the PyTorch fused
# path loops over heads with per-row segment reductions; the tiled path pads and copies blocks).
# MERGE_COST: split's merge of its two partial results, per target row. DROPOUT_COST: what attention
# dropout adds per fused edge and per tile cell (hashing the keep mask, forward and backward; on the
# CPU the tiled path also leaves PyTorch's fused attention kernel).
TILE_COST = {"cpu": 0.25, "cuda": 0.06}
ROW_COST = {"cpu": {"fused": 7.0, "tiled": 10.0}, "cuda": {"fused": 1.0, "tiled": 1.0}}
MERGE_COST = {"cpu": 2.0, "cuda": 4.0}
DROPOUT_COST = {"cpu": {"fused": 0.2, "tiled": 0.25}, "cuda": {"fused": 0.0, "tiled": 0.0}}
BLOCK_SIZE = {"cpu": 64, "cuda": 64}
# Float32 and float64 tiles on CUDA run on CUDA cores (IEEE products, no tensor cores): in blocks
# of 64 their Triton kernels spill, in blocks of 32 they do not (docs/kernels.md, compile_check).
# Half precision keeps BLOCK_SIZE.
CUDA_CORE_BLOCK_SIZE = 32
# The largest tile side accepted: a partial tile's mask holds block_size² cells
MAX_BLOCK_SIZE = 4096


def default_block_size(device, dtype: torch.dtype | None = None) -> int:
    """The tile size ``tiled`` / ``split`` / ``auto`` use on ``device`` for inputs of ``dtype``
    when no ``block_size`` is given: ``BLOCK_SIZE`` of the device, or ``CUDA_CORE_BLOCK_SIZE`` for
    float32 and float64 on CUDA (``dtype`` ``None``: half precision).

    Example:
        >>> default_block_size("cpu", torch.float32), default_block_size("cuda", torch.bfloat16)
        (64, 64)
        >>> default_block_size("cuda", torch.float32)
        32
    """
    device_type = _device_type(device)
    if device_type == "cuda" and dtype in (torch.float32, torch.float64):
        return CUDA_CORE_BLOCK_SIZE
    return BLOCK_SIZE.get(device_type, BLOCK_SIZE["cuda"])


def _tile_cost(device_type: str, tile_cost: float | None) -> float:
    return TILE_COST.get(device_type, TILE_COST["cuda"]) if tile_cost is None else float(tile_cost)


def check_tiling(block_size, tile_cost) -> None:
    """Clear errors for the tiling arguments of :func:`attend`, :func:`choose_backend` and
    :func:`plan_costs` (a block of 0 would divide by zero, a negative cost tile everything, a
    block of ``B`` makes masks of ``B²`` cells per tile)."""
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE
    ):
        raise ValueError(f"Expected 'block_size' to be an int in [1, {MAX_BLOCK_SIZE}] (got {block_size!r})")
    if tile_cost is not None and not (
        isinstance(tile_cost, (int, float)) and not isinstance(tile_cost, bool) and 0 < tile_cost < float("inf")
    ):
        raise ValueError(f"Expected 'tile_cost' to be a positive finite number (got {tile_cost!r})")


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Expected 'device' to be a torch.device or a device string such as 'cpu' or 'cuda' (got {device!r})"
        ) from None


def tile_size(graph: CSRGraph, device_type: str, dtype: torch.dtype | None, block_size: int | None) -> int:
    """The tile size: ``block_size`` or the device's default, no larger than the power of two
    (at least 16) that covers the graph's longer side: a larger tile only adds empty cells."""
    block = default_block_size(device_type, dtype) if block_size is None else block_size
    return min(block, max(16, 1 << (max(graph.num_src, graph.num_dst, 1) - 1).bit_length()))


def _sizes(edge_index: Tensor, num_src: int | None, num_dst: int | None) -> tuple[int, int]:
    """Node counts for a plan: the arguments, else ``edge_index``'s sparse size, else those its
    cached graph was built for (by :func:`attend`: the rows of key and query), else ``max + 1``."""
    for name, v in (("num_src", num_src), ("num_dst", num_dst)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"Expected '{name}' to be a non-negative int or None (got {v!r})")
    sparse_size = getattr(edge_index, "sparse_size", None)  # an EdgeIndex's
    size = sparse_size() if callable(sparse_size) else (None, None)
    cached = cached_sizes(edge_index) if isinstance(edge_index, Tensor) else None
    plain = plain_tensor(edge_index)
    out = []
    for given, known, row in ((num_src, size[0], 0), (num_dst, size[1], 1)):
        if given is None:
            given = known
        if given is None and cached is not None:
            given = cached[row]
        if given is None:
            given = int(plain[row].max()) + 1 if plain.numel() else 0
        out.append(given)
    return out[0], out[1]


def _copies(graph: CSRGraph) -> Tensor | None:
    """``[E]`` flags of the edges that repeat an earlier edge ``j -> i`` (in target-sorted order), or
    ``None`` when the graph repeats none (cached). A tile cell holds one edge: ``tiled`` and ``split``
    tile the first copy and run the others fused, so every copy stays a message of its own."""
    if "copies" not in graph.extras and sorted_unique(graph.src, graph.dst):  # linear-time answer
        graph.extras["copies"] = None
    if "copies" not in graph.extras:
        key = graph.dst * max(graph.num_src, 1) + graph.src  # [E]
        order = torch.argsort(key, stable=True)
        ordered = key[order]
        repeat = torch.zeros_like(key, dtype=torch.bool)
        repeat[order[1:]] = ordered[1:] == ordered[:-1]
        graph.extras["copies"] = repeat if bool(repeat.any()) else None
    return graph.extras["copies"]


def _dense_tiles(graph: CSRGraph, block: int, ratio: float) -> Tensor:
    """``[T]`` flags of the tiles (of :func:`tile_stats`) that ``split`` tiles: those whose distinct
    edges fill at least ``ratio`` of their cells. Cached: the plan and the split share it."""
    cache_key = ("dense_tiles", block, ratio)
    if cache_key not in graph.extras:
        graph.extras[cache_key] = _tile_edges(graph, block).double() >= ratio * float(block * block)
    return graph.extras[cache_key]


def _tile_edges(graph: CSRGraph, block: int) -> Tensor:
    """``[T]`` distinct edges (cells) of each tile of :func:`tile_stats`."""
    _, inverse, count = tile_stats(graph, block, block)  # [T], [E], [T]
    copies = _copies(graph)
    if copies is None:
        return count
    return torch.bincount(inverse[~copies], minlength=count.numel())


def edge_parts(graph: CSRGraph, block: int, ratio: float | None) -> tuple[TileList, Tensor | None, CSRGraph | None]:
    """``(tiles, rest_ids, rest)``: the tile list of ``tiled`` (``ratio`` ``None``: every tile) or of
    ``split`` (the tiles of :func:`_dense_tiles`), without repeated copies; the positions of the other
    edges and those edges as a graph of their own (``None`` when there are none). Cached."""
    cache_key = ("parts", block, ratio)
    if cache_key not in graph.extras:
        copies = _copies(graph)
        on_tiles = (
            torch.ones(graph.num_edges, dtype=torch.bool, device=graph.src.device) if copies is None else ~copies
        )  # [E]
        if ratio is not None:
            on_tiles &= _dense_tiles(graph, block, ratio)[tile_stats(graph, block, block)[1]]
        # the copies are off the tiles (_copies): build_tiles need not look for repeats again
        parts: tuple[TileList, Tensor | None, CSRGraph | None]
        if bool(on_tiles.all()):
            parts = (build_tiles(graph, block, block, distinct=True), None, None)
        else:
            rest_ids = (~on_tiles).nonzero().flatten()
            parts = (
                build_tiles(graph, block, block, on_tiles.nonzero().flatten(), distinct=True),
                rest_ids,
                sub_graph(graph, rest_ids),
            )
        graph.extras[cache_key] = parts
    return graph.extras[cache_key]


def unit_costs(device_type: str, tile_cost: float | None, dropout: bool) -> tuple[float, float]:
    """``(cost of a tile cell, cost of a fused edge)``: ``(TILE_COST, 1)``, plus ``DROPOUT_COST``
    under attention dropout. ``split`` tiles the tiles filled to at least their ratio."""
    cell, edge = _tile_cost(device_type, tile_cost), 1.0
    if dropout:
        extra = DROPOUT_COST.get(device_type, DROPOUT_COST["cuda"])
        cell, edge = cell + extra["tiled"], edge + extra["fused"]
    return cell, edge


def planned_backend(
    graph: CSRGraph, device_type: str, block: int, tile_cost: float | None = None, dropout: bool = False
) -> str:
    """``auto``'s backend by the cost model (``TILE_COST``, ``ROW_COST``, ``MERGE_COST`` and, under
    attention ``dropout``, ``DROPOUT_COST``); cached."""
    cell, edge = unit_costs(device_type, tile_cost, dropout)
    rows = ROW_COST.get(device_type, ROW_COST["cuda"])
    # every constant in the key: changing a cost at run time re-plans instead of reusing a stale plan
    cache_key = (
        "plan",
        block,
        cell,
        edge,
        rows["fused"],
        rows["tiled"],
        MERGE_COST.get(device_type, MERGE_COST["cuda"]),
    )
    if cache_key not in graph.extras:
        graph.extras[cache_key] = _cheapest_backend(graph, device_type, block, cell, edge)
    return graph.extras[cache_key]


def _costs(graph: CSRGraph, device_type: str, block: int, cell: float, edge: float) -> dict:
    """The cost model's estimates (edge-equivalents) of each plan, and the split's dense tiles. A
    graph that repeats an edge runs the copies fused next to ``tiled`` (plus a merge)."""
    rows = ROW_COST.get(device_type, ROW_COST["cuda"])
    merge = MERGE_COST.get(device_type, MERGE_COST["cuda"])
    distinct = _tile_edges(graph, block)  # [T]
    cells = float(block * block)
    dense = _dense_tiles(graph, block, cell / edge)  # [T]
    n_dense = int(dense.sum())
    edges_dense = int(distinct[dense].sum()) if n_dense else 0
    n, num_edges = graph.num_dst, graph.num_edges
    copies = num_edges - int(distinct.sum())
    return dict(
        fused=num_edges * edge + rows["fused"] * n,
        tiled=(
            distinct.numel() * cells * cell
            + copies * edge
            + rows["tiled"] * n
            + ((rows["fused"] + merge) * n if copies else 0)
        ),
        split=(n_dense * cells * cell + (num_edges - edges_dense) * edge + (rows["fused"] + rows["tiled"] + merge) * n),
        edges=num_edges,
        tiles=distinct.numel(),
        dense_tiles=n_dense,
        dense_edges=edges_dense,
    )


def _cheapest_backend(graph: CSRGraph, device_type: str, block: int, cell: float, edge: float) -> str:
    if graph.num_edges == 0:
        return "fused"
    c = _costs(graph, device_type, block, cell, edge)
    best = min(c["fused"], c["tiled"], c["split"])
    if best == c["fused"]:
        return "fused"
    if best == c["tiled"] or c["dense_tiles"] == c["tiles"]:  # split of every tile: tiled
        return "tiled"
    return "split"  # some tiles dense (with none, split would cost more than fused)


def plan_costs(
    edge_index: Tensor,
    device,
    *,
    block_size: int | None = None,
    tile_cost: float | None = None,
    dropout: bool = False,
    num_src: int | None = None,
    num_dst: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """What :func:`choose_backend` weighs, for tuning and for curiosity: the estimated cost of
    ``"fused"``, ``"tiled"`` and ``"split"`` in edge-equivalents (one edge of the fused path), the
    number of edges, tiles, dense tiles (those ``split`` tiles) and edges in them, and ``"chosen"``.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> costs = plan_costs(causal(256), "cpu")
        >>> costs["chosen"], costs["tiles"], costs["fused"] > costs["tiled"]
        ('tiled', 10, True)
    """
    check_tiling(block_size, tile_cost)
    graph = prepare(edge_index, *_sizes(edge_index, num_src, num_dst))
    device_type = _device_type(device)
    block = tile_size(graph, device_type, dtype, block_size)
    cell, edge = unit_costs(device_type, tile_cost, dropout)
    return dict(
        _costs(graph, device_type, block, cell, edge),
        chosen=planned_backend(graph, device_type, block, tile_cost, dropout),
    )


def choose_backend(
    edge_index: Tensor,
    device,
    *,
    block_size: int | None = None,
    tile_cost: float | None = None,
    dropout: bool = False,
    num_src: int | None = None,
    num_dst: int | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The backend ``"auto"`` runs for this graph on ``device``: ``"fused"``, ``"tiled"`` or ``"split"``.

    A tile of ``B × B`` cells costs ``tile_cost · B²`` edge-equivalents whatever its fill; the
    choice minimizes the total over: all edges fused, all tiles tiled, or dense tiles tiled plus
    the remaining edges fused (plus a merge); see docs/kernels.md. Cached on the graph. With
    ``dropout`` (attention dropout) the costs include hashing the mask (``DROPOUT_COST``).
    ``num_src`` / ``num_dst`` (the rows of key and query) default to the graph's sparse size, else
    to the sizes of its last :func:`attend`, else to the largest ids plus one. ``dtype`` (of the
    inputs) picks the default ``block_size`` (:func:`default_block_size`).
    """
    check_tiling(block_size, tile_cost)
    graph = prepare(edge_index, *_sizes(edge_index, num_src, num_dst))
    device_type = _device_type(device)
    return planned_backend(graph, device_type, tile_size(graph, device_type, dtype, block_size), tile_cost, dropout)


def auto_kernel(
    edge_index: Tensor,
    device,
    *,
    edge_bias: bool = False,
    dropout: bool = False,
    return_lse: bool = False,
    impl: str | None = None,
    block_size: int | None = None,
    tile_cost: float | None = None,
    num_src: int | None = None,
    num_dst: int | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """The kernel ``attend(..., backend="auto")`` runs for this graph on ``device``: ``"sdpa"``
    (PyTorch's ``scaled_dot_product_attention`` kernels, for a graph of exactly full or causal
    attention per sequence or document, when ``edge_bias``, attention ``dropout``, ``impl="triton"``
    and, off the CPU, ``return_lse`` are all absent), ``"flex"`` (FlexAttention, for an interval
    graph such as a sliding window under :func:`runs_flex`'s conditions, with ``dtype`` and
    ``head_dim`` those of the heads), else :func:`choose_backend`'s answer. On the CPU a call whose
    log-sum-exp reaches ``sdpa.LSE_LIMIT`` and is returned or reaches a gradient runs
    :func:`choose_backend`'s backend; where FlexAttention turned out not to run for such heads on
    the GPU (:func:`.flex.failure`), so does an interval graph.
    For an implicit graph (a ``topology.BlockGraph``): ``"sdpa"`` when it says it is exactly causal
    or full per document (same conditions), ``"flex"`` when it carries its bounds (same
    conditions), else ``"tiled"``; with ``dropout`` the answer for its materialized edges, on which
    attention dropout runs (a per-head graph's on (head, token) nodes, one key/value head per query
    head).

    Example:
        >>> from gnn_transformer.topology import causal
        >>> auto_kernel(causal(256), "cpu"), auto_kernel(causal(256), "cpu", dropout=True)
        ('sdpa', 'tiled')
    """
    check_tiling(block_size, tile_cost)
    if is_block_structure(edge_index):
        device_type = _device_type(device)
        if dropout:
            edges = edge_index.edges()
            n_src, n_dst = edge_index.num_src, edge_index.num_dst
            if isinstance(edges, tuple):  # per-head: the (head, token) graph the kernels run
                from .heads import head_graph  # heads imports this module

                heads = edge_index.num_heads or 1
                edges = head_graph(edges[0], edges[1], n_src, n_dst, heads, heads)
                n_src, n_dst = n_src * heads, n_dst * heads
            return auto_kernel(
                edges,
                device,
                edge_bias=edge_bias,
                dropout=dropout,
                return_lse=return_lse,
                impl=impl,
                block_size=block_size,
                tile_cost=tile_cost,
                num_src=n_src,
                num_dst=n_dst,
                dtype=dtype,
            )
        dense = getattr(edge_index, "dense", None)
        pattern = None if dense is None else DensePattern(*dense)
        if impl != "triton" and runs_sdpa(pattern, device_type, edge_bias, dropout, return_lse):
            return "sdpa"
        flex = impl != "triton" and runs_flex(
            edge_index.num_dst, edge_index.num_src, device_type, dtype, head_dim, edge_bias, False, return_lse
        )
        if flex and block_intervals(edge_index) is not None:
            return "flex" if _flex_runs(device, dtype, head_dim) else "tiled"
        return "tiled"
    graph = prepare(edge_index, *_sizes(edge_index, num_src, num_dst))
    device_type = _device_type(device)
    if impl != "triton" and runs_sdpa(dense_pattern(graph), device_type, edge_bias, dropout, return_lse):
        return "sdpa"
    flex = impl != "triton" and runs_flex(
        graph.num_dst, graph.num_src, device_type, dtype, head_dim, edge_bias, dropout, return_lse
    )
    if flex and interval_pattern(graph) is not None and _flex_runs(device, dtype, head_dim):
        return "flex"
    return planned_backend(graph, device_type, tile_size(graph, device_type, dtype, block_size), tile_cost, dropout)
