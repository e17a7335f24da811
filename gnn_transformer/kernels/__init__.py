"""Fast attention on token graphs: softmax over each target's incoming edges, never ``[E, H, D]``.

For every target ``i`` with incoming edges ``j -> i``::

    s_ji = scale * q_i . k_j + b_ji,   lse_i = log sum_j exp(s_ji),   out_i = sum_j exp(s_ji - lse_i) v_j

and ``out_i = 0``, ``lse_i = -inf`` for a target without edges. Backends:

- ``"fused"``: over the target-sorted CSR. On the GPU a Triton kernel with online softmax (backward
  from the saved log-sum-exp, ``dK`` / ``dV`` over the source-sorted CSC, no atomics); elsewhere
  sparse CSR products one head and one chunk of rows at a time (:mod:`.chunked`).
- ``"tiled"``: the edge set as (query block, key block) tiles with per-tile masks, FlashAttention
  style (:mod:`.tiling`, :mod:`.tiled_torch`, :mod:`.triton_tiled`).
- ``"split"``: the densely filled tiles through ``tiled``, the remaining edges through ``fused``,
  merged exactly through their log-sum-exps (:mod:`.merge`).
- ``"auto"``: one of the above by device and block fill (:func:`choose_backend`).

Example:
    >>> import torch
    >>> from gnn_transformer.topology import causal
    >>> q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    >>> out = attend(q, k, v, causal(3), scale=0.5, backend="fused")
    >>> torch.allclose(out[0], v[0])  # token 0 attends only to itself
    True
"""
from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

from . import _launch
from ._dropout import threshold
from ._graph import CSRGraph, _check as _check_graph, cached_sizes, clear_cache, prepare
from .chunked import DEFAULT_MAX_EDGES, chunked_attention
from .merge import merge_partials
from .reference import attend_reference
from .tiled_torch import DEFAULT_MAX_CELLS, tiled_attention
from .tiling import TileList, build_tiles, sorted_unique, tile_stats, triton_blocks

BACKENDS = ("auto", "fused", "tiled", "split")
IMPLS = (None, "torch", "triton")

# auto's cost model, in units of one edge of the fused path (per head and channel); measured with
# `gnn-transformer bench --calibrate` (see docs/kernels.md); the CUDA values are still estimates.
# TILE_COST: one tile cell, whatever the tile's fill (a tile filled to at least this ratio is
# cheaper tiled). ROW_COST: the fixed work per target row of one call of a backend (the chunked CPU
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
# of 64 their Triton kernels spill (sm_90: 20 KB per thread in the float32 dK/dV kernel), in
# blocks of 32 they do not (docs/kernels.md, compile_check). Half precision keeps BLOCK_SIZE.
CUDA_CORE_BLOCK_SIZE = 32
# edge_weights renormalizes rows whose log-sum-exp is this large: half its rounding step is above
# 7.6e-6 (float32) or 5.8e-11 (float64) there
# The largest tile side accepted: a partial tile's mask holds block_size² cells
MAX_BLOCK_SIZE = 4096
HUGE_LSE = {torch.float32: 128.0, torch.float64: 2.0 ** 19}


def triton_available() -> bool:
    """Whether the Triton kernels can run (Triton importable; CPU tensors need ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def _ratio(device_type: str, tile_cost: float | None) -> float:
    return TILE_COST.get(device_type, TILE_COST["cuda"]) if tile_cost is None else float(tile_cost)


def _check_tiling(block_size, tile_cost) -> None:
    """Clear errors for the tiling arguments of :func:`attend`, :func:`choose_backend` and
    :func:`plan_costs` (a block of 0 would divide by zero, a negative cost tile everything, a
    block of ``B`` makes masks of ``B²`` cells per tile)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or not 1 <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(f"Expected 'block_size' to be an int in [1, {MAX_BLOCK_SIZE}] (got {block_size!r})")
    if tile_cost is not None and not (isinstance(tile_cost, (int, float)) and not isinstance(tile_cost, bool)
                                      and 0 < tile_cost < float("inf")):
        raise ValueError(f"Expected 'tile_cost' to be a positive finite number (got {tile_cost!r})")


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"Expected 'device' to be a torch.device or a device string such as 'cpu' or "
                         f"'cuda' (got {device!r})") from None


def _block(graph: CSRGraph, device_type: str, dtype: torch.dtype | None, block_size: int | None) -> int:
    """The tile size: ``block_size`` or the device's default, no larger than the power of two
    (at least 16) that covers the graph's longer side: a larger tile only adds empty cells."""
    block = default_block_size(device_type, dtype) if block_size is None else block_size
    return min(block, max(16, 1 << (max(graph.num_src, graph.num_dst, 1) - 1).bit_length()))


def _use_triton(device: torch.device, impl: str | None) -> bool:
    if impl is None:
        return device.type == "cuda" and triton_available()
    if impl == "triton" and not triton_available():
        raise ValueError("impl='triton' needs the 'triton' package (pip install triton)")
    if (impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
            and not _launch.is_recording()):
        raise ValueError("impl='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")
    return impl == "triton"


def _sizes(edge_index: Tensor, num_src: int | None, num_dst: int | None) -> tuple[int, int]:
    """Node counts for a plan: the arguments, else ``edge_index``'s sparse size, else those its
    cached graph was built for (by :func:`attend`: the rows of key and query), else ``max + 1``."""
    for name, v in (("num_src", num_src), ("num_dst", num_dst)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"Expected '{name}' to be a non-negative int or None (got {v!r})")
    size = edge_index.sparse_size() if callable(getattr(edge_index, "sparse_size", None)) else (None, None)
    cached = cached_sizes(edge_index) if isinstance(edge_index, Tensor) else None
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
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


def _parts(graph: CSRGraph, block: int, ratio: float | None) -> tuple[TileList, Tensor | None, CSRGraph | None]:
    """``(tiles, rest_ids, rest)``: the tile list of ``tiled`` (``ratio`` ``None``: every tile) or of
    ``split`` (the tiles of :func:`_dense_tiles`), without repeated copies; the positions of the other
    edges and those edges as a graph of their own (``None`` when there are none). Cached."""
    cache_key = ("parts", block, ratio)
    if cache_key not in graph.extras:
        copies = _copies(graph)
        on_tiles = torch.ones(graph.num_edges, dtype=torch.bool, device=graph.src.device) if copies is None \
            else ~copies  # [E]
        if ratio is not None:
            on_tiles &= _dense_tiles(graph, block, ratio)[tile_stats(graph, block, block)[1]]
        # the copies are off the tiles (_copies): build_tiles need not look for repeats again
        if bool(on_tiles.all()):
            parts = (build_tiles(graph, block, block, distinct=True), None, None)
        else:
            rest_ids = (~on_tiles).nonzero().flatten()
            parts = (build_tiles(graph, block, block, on_tiles.nonzero().flatten(), distinct=True), rest_ids,
                     _sub_graph(graph, rest_ids))
        graph.extras[cache_key] = parts
    return graph.extras[cache_key]


def _unit_costs(device_type: str, tile_cost: float | None, dropout: bool) -> tuple[float, float]:
    """``(cost of a tile cell, cost of a fused edge)``: ``(TILE_COST, 1)``, plus ``DROPOUT_COST``
    under attention dropout. ``split`` tiles the tiles filled to at least their ratio."""
    cell, edge = _ratio(device_type, tile_cost), 1.0
    if dropout:
        extra = DROPOUT_COST.get(device_type, DROPOUT_COST["cuda"])
        cell, edge = cell + extra["tiled"], edge + extra["fused"]
    return cell, edge


def _plan(graph: CSRGraph, device_type: str, block: int, tile_cost: float | None = None,
          dropout: bool = False) -> str:
    """``auto``'s backend by the cost model (``TILE_COST``, ``ROW_COST``, ``MERGE_COST`` and, under
    attention ``dropout``, ``DROPOUT_COST``); cached."""
    cell, edge = _unit_costs(device_type, tile_cost, dropout)
    rows = ROW_COST.get(device_type, ROW_COST["cuda"])
    # every constant in the key: changing a cost at run time re-plans instead of reusing a stale plan
    cache_key = ("plan", block, cell, edge, rows["fused"], rows["tiled"],
                 MERGE_COST.get(device_type, MERGE_COST["cuda"]))
    if cache_key not in graph.extras:
        graph.extras[cache_key] = _cheapest(graph, device_type, block, cell, edge)
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
        tiled=(distinct.numel() * cells * cell + copies * edge + rows["tiled"] * n
               + ((rows["fused"] + merge) * n if copies else 0)),
        split=(n_dense * cells * cell + (num_edges - edges_dense) * edge
               + (rows["fused"] + rows["tiled"] + merge) * n),
        edges=num_edges, tiles=distinct.numel(), dense_tiles=n_dense, dense_edges=edges_dense)


def _cheapest(graph: CSRGraph, device_type: str, block: int, cell: float, edge: float) -> str:
    if graph.num_edges == 0:
        return "fused"
    c = _costs(graph, device_type, block, cell, edge)
    best = min(c["fused"], c["tiled"], c["split"])
    if best == c["fused"]:
        return "fused"
    if best == c["tiled"] or c["dense_tiles"] == c["tiles"]:  # split of every tile: tiled
        return "tiled"
    return "split"  # some tiles dense (with none, split would cost more than fused)


def plan_costs(edge_index: Tensor, device, *, block_size: int | None = None, tile_cost: float | None = None,
               dropout: bool = False, num_src: int | None = None, num_dst: int | None = None,
               dtype: torch.dtype | None = None) -> dict:
    """What :func:`choose_backend` weighs, for tuning and for curiosity: the estimated cost of
    ``"fused"``, ``"tiled"`` and ``"split"`` in edge-equivalents (one edge of the fused path), the
    number of edges, tiles, dense tiles (those ``split`` tiles) and edges in them, and ``"chosen"``.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> costs = plan_costs(causal(256), "cpu")
        >>> costs["chosen"], costs["tiles"], costs["fused"] > costs["tiled"]
        ('tiled', 10, True)
    """
    _check_tiling(block_size, tile_cost)
    graph = prepare(edge_index, *_sizes(edge_index, num_src, num_dst))
    device_type = _device_type(device)
    block = _block(graph, device_type, dtype, block_size)
    cell, edge = _unit_costs(device_type, tile_cost, dropout)
    return dict(_costs(graph, device_type, block, cell, edge),
                chosen=_plan(graph, device_type, block, tile_cost, dropout))


def choose_backend(edge_index: Tensor, device, *, block_size: int | None = None,
                   tile_cost: float | None = None, dropout: bool = False, num_src: int | None = None,
                   num_dst: int | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend ``"auto"`` runs for this graph on ``device``: ``"fused"``, ``"tiled"`` or ``"split"``.

    A tile of ``B × B`` cells costs ``tile_cost · B²`` edge-equivalents whatever its fill; the
    choice minimizes the total over: all edges fused, all tiles tiled, or dense tiles tiled plus
    the remaining edges fused (plus a merge); see docs/kernels.md. Cached on the graph. With
    ``dropout`` (attention dropout) the costs include hashing the mask (``DROPOUT_COST``).
    ``num_src`` / ``num_dst`` (the rows of key and query) default to the graph's sparse size, else
    to the sizes of its last :func:`attend`, else to the largest ids plus one. ``dtype`` (of the
    inputs) picks the default ``block_size`` (:func:`default_block_size`).
    """
    _check_tiling(block_size, tile_cost)
    graph = prepare(edge_index, *_sizes(edge_index, num_src, num_dst))
    device_type = _device_type(device)
    return _plan(graph, device_type, _block(graph, device_type, dtype, block_size), tile_cost, dropout)


def _check_inputs(query, key, value, backend, num_dst, impl):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected '{name}' of shape [N, H, D] (got {shape})")
    if key.shape != value.shape:
        raise ValueError(f"Expected 'key' and 'value' of one shape (got {list(key.shape)} and {list(value.shape)})")
    if key.size(-1) != query.size(-1):
        raise ValueError(f"Expected one head dimension for 'query' and 'key' (got {query.size(-1)} and {key.size(-1)})")
    if query.size(1) == 0:
        raise ValueError(f"Expected at least one head (got 'query' {list(query.shape)})")
    if key.size(1) == 0 or query.size(1) % key.size(1) != 0:
        raise ValueError(f"Expected the query heads ({query.size(1)}) to be a multiple of the key/value heads ({key.size(1)})")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"Expected one dtype for query/key/value (got {query.dtype}, {key.dtype}, {value.dtype})")
    if not query.is_floating_point():
        raise ValueError(f"Expected floating-point query/key/value (got {query.dtype})")
    if query.size(-1) == 0:
        raise ValueError(f"Expected a head dimension of at least 1 (got 'query' {list(query.shape)})")
    if query.device != key.device or key.device != value.device:
        raise ValueError(f"Expected query, key and value on one device (got {query.device}, {key.device}, "
                         f"{value.device})")
    if backend not in BACKENDS:
        raise ValueError(f"Expected 'backend' to be one of {BACKENDS} (got {backend!r})")
    if impl not in IMPLS:
        raise ValueError(f"Expected 'impl' to be one of {IMPLS} (got {impl!r})")
    if num_dst is not None and num_dst != query.size(0):
        raise ValueError(f"'num_dst' is {num_dst} but 'query' has {query.size(0)} rows")


def _sub_graph(graph: CSRGraph, edge_ids: Tensor) -> CSRGraph:
    """The edges ``edge_ids`` (sorted positions) as a graph of their own, still target-sorted."""
    src, dst = graph.src[edge_ids], graph.dst[edge_ids]
    rowptr = torch.zeros(graph.num_dst + 1, dtype=torch.long, device=src.device)
    rowptr[1:] = torch.bincount(dst, minlength=graph.num_dst).cumsum(0)
    return CSRGraph(graph.num_src, graph.num_dst, src, dst, rowptr, None, edge_ids=edge_ids)


def _fused(q, k, v, bias, graph: CSRGraph, scale, use_triton, max_edges, dropout=None):
    if use_triton:
        from .triton_csr import csr_attention
        return csr_attention(q, k, v, bias, graph, scale, dropout)
    return chunked_attention(q, k, v, bias, graph, scale, max_edges, dropout)


def _tiled(q, k, v, bias, tiles: TileList, scale, use_triton, max_cells, dropout=None):
    tb = None if bias is None else bias[tiles.edge_ids]  # [E_t, H], read per cell
    if use_triton:
        from .triton_tiled import tiled_triton_attention
        return tiled_triton_attention(q, k, v, tiles, tb, scale, dropout)
    return tiled_attention(q, k, v, tiles, tb, scale, max_cells, dropout)


def attend(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, *, scale: float,
           edge_bias: Tensor | None = None, backend: str = "auto", num_dst: int | None = None,
           return_lse: bool = False, impl: str | None = None, block_size: int | None = None,
           tile_cost: float | None = None, max_edges: int = DEFAULT_MAX_EDGES,
           max_cells: int = DEFAULT_MAX_CELLS, dropout_p: float = 0.0, dropout_seed: int | None = None):
    """Attention over the edges ``j -> i`` of ``edge_index``, without per-edge messages.

    Args:
        query: ``[N_dst, H, D]``.
        key, value: ``[N_src, H_kv, D]``; query head ``h`` uses key/value head ``h // (H // H_kv)``.
        edge_index: ``[2, E]``, row 0 the source ``j``, row 1 the target ``i``: an ``EdgeIndex``
            sorted by column, or any ``LongTensor`` (sorted here; the sort is cached per tensor).
        scale: factor of ``q . k`` (usually ``1 / sqrt(D)``).
        edge_bias: ``[E, H]`` added to the scaled scores, aligned with ``edge_index``'s columns.
        backend: ``"auto"`` (default), ``"fused"``, ``"tiled"`` or ``"split"``.
        num_dst: number of targets, if given it must equal ``query.size(0)``.
        return_lse: also return the log-sum-exp ``[N_dst, H]`` (float32, float64 for float64
            inputs; ``-inf`` on empty rows).
        impl: ``None`` (Triton on CUDA when installed, PyTorch otherwise), ``"torch"``, or
            ``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``, for tests).
        block_size: tile size of ``tiled`` / ``split`` (default by device and dtype:
            :func:`default_block_size`).
        tile_cost: cost of a tile cell relative to an edge (default by device: ``TILE_COST``);
            ``split`` tiles the tiles filled to at least this ratio (with dropout:
            ``(tile_cost + DROPOUT_COST["tiled"]) / (1 + DROPOUT_COST["fused"])``).
        max_edges, max_cells: memory bounds of one chunk of the PyTorch paths.
        dropout_p: attention dropout: each weight ``(edge, head)`` is zeroed with probability
            ``dropout_p`` and the others scaled by ``1 / (1 - dropout_p)`` (``lse`` stays that of the
            softmax). Runs on every backend; the mask is a hash of ``(dropout_seed, edge,
            head)`` with the edge's position in the target-sorted order, recomputed in the
            backward pass, the same on every backend and device.
        dropout_seed: seed of the mask (default: drawn from torch's global generator).

    Returns:
        ``out [N_dst, H, D]`` in ``query``'s dtype, and ``lse`` when ``return_lse``.
        Differentiable w.r.t. query, key, value and edge_bias; empty rows give zeros.

    Example:
        >>> import torch
        >>> from gnn_transformer.topology import full
        >>> q, k, v = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
        >>> out, lse = attend(q, k, v, full(4), scale=8 ** -0.5, return_lse=True)
        >>> out.shape, lse.shape
        (torch.Size([4, 2, 8]), torch.Size([4, 2]))
    """
    _check_inputs(query, key, value, backend, num_dst, impl)
    _check_tiling(block_size, tile_cost)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"Expected 'scale' to be a finite number (got {scale!r})")
    scale = float(scale)  # a Fraction or NumPy scalar reaches the kernels as a Python float
    if isinstance(dropout_p, Tensor) and dropout_p.numel() == 1 and dropout_p.is_floating_point():
        dropout_p = float(dropout_p)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"Expected 'dropout_p' in [0, 1) (got {dropout_p!r})")
    for name, chunk in (("max_edges", max_edges), ("max_cells", max_cells)):
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"Expected '{name}' to be a positive int (got {chunk!r})")
    max_edges, max_cells = int(max_edges), int(max_cells)  # a NumPy integer too
    if isinstance(edge_index, Tensor) and edge_index.device != query.device:
        if edge_index.numel():
            raise ValueError(f"Expected 'edge_index' on the device of query/key/value (got {edge_index.device} "
                             f"and {query.device})")
        # no edges, no data on the wrong device (an empty EdgeIndex's .to(device) stays put in some
        # PyG versions): checked as given, then replaced by an empty edge set on the queries' device
        _check_graph(edge_index, key.size(0), query.size(0))
        edge_index = torch.empty(2, 0, dtype=torch.long, device=query.device)
    graph = prepare(edge_index, key.size(0), query.size(0))
    bias = None
    if edge_bias is not None:
        if not isinstance(edge_bias, Tensor) or not edge_bias.is_floating_point():
            got = edge_bias.dtype if isinstance(edge_bias, Tensor) else type(edge_bias).__name__
            raise ValueError(f"Expected 'edge_bias' to be a floating-point tensor (got {got})")
        if edge_bias.shape != (graph.num_edges, query.size(1)):
            raise ValueError(f"Expected 'edge_bias' of shape [E, H] = [{graph.num_edges}, {query.size(1)}] "
                             f"(got {list(edge_bias.shape)})")
        if edge_bias.device != query.device:
            raise ValueError(f"Expected 'edge_bias' on the device of query/key/value (got {edge_bias.device} "
                             f"and {query.device})")
        bias = edge_bias if graph.perm is None else edge_bias[graph.perm]  # [E, H], target-sorted
    use_triton = _use_triton(query.device, impl)
    dropout = None
    if dropout_p:
        threshold(dropout_p)  # validates
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item()) if dropout_seed is None else dropout_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
            raise ValueError(f"Expected 'dropout_seed' to be an int in [0, 2**31) (got {dropout_seed!r})")
        dropout = (float(dropout_p), seed)
    device_type = query.device.type
    block = _block(graph, device_type, query.dtype, block_size)
    # tiles of a size the Triton kernels do not take run through the PyTorch tiled path, unless
    # Triton was asked for by name (then its ValueError says why)
    tiles_triton = use_triton and (impl == "triton" or triton_blocks(block, block))
    if backend == "auto":
        backend = _plan(graph, device_type, block, tile_cost, dropout is not None)
    if backend == "fused":
        out, lse, _ = _fused(query, key, value, bias, graph, scale, use_triton, max_edges, dropout)
    else:  # tiled, split: tiles, and the remaining edges (repeated copies, sparse tiles) fused
        ratio = None
        if backend == "split":
            cell, edge = _unit_costs(device_type, tile_cost, dropout is not None)
            ratio = cell / edge
        tiles, rest_ids, rest = _parts(graph, block, ratio)
        # dropout: both parts key each edge's mask by its position in the whole graph
        out, lse, lo = _tiled(query, key, value, bias, tiles, scale, tiles_triton, max_cells, dropout)
        if rest is not None:
            out_f, lse_f, lo_f = _fused(query, key, value, None if bias is None else bias[rest_ids], rest,
                                        scale, use_triton, max_edges, dropout)
            out, lse, _ = merge_partials(out, lse, out_f, lse_f, (lo, lo_f))
    out = out.to(query.dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if query.dtype == torch.float64 else torch.float32)


def edge_weights(query: Tensor, key: Tensor, edge_index: Tensor, lse: Tensor, *, scale: float,
                 edge_bias: Tensor | None = None, chunk: int = 1 << 16) -> Tensor:
    """Attention weights ``alpha [E, H] = exp(scale * q_i . k_j + b_ji - lse_i)`` of every edge, in
    ``edge_index``'s column order, from the ``lse`` of :func:`attend` (chunks of ``chunk`` edges)."""
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0].long(), plain[1].long()  # [E], [E]
    group = query.size(1) // key.size(1)
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    parts = []
    for e0 in range(0, src.numel(), chunk):
        s, d = src[e0:e0 + chunk], dst[e0:e0 + chunk]
        k_j = key[s].repeat_interleave(group, dim=1).to(cd)  # [C, H, D]
        score = (query[d].to(cd) * k_j).sum(-1) * scale  # [C, H]
        if edge_bias is not None:
            score = score + edge_bias[e0:e0 + chunk].to(cd)
        top = lse[d].to(cd)  # [C, H]; -inf: the row's edges all have a -inf bias, weights 0
        parts.append(torch.where(torch.isneginf(top), 0.0, torch.exp(score - top)))
    if not parts:
        return query.new_zeros(0, query.size(1))
    weights = torch.cat(parts)  # [E, H]
    # A log-sum-exp so large that log(sum exp(s - max)) is below its rounding step (every score of
    # the row near -1e9, say) lost that part: there, normalize the row's weights by their sum.
    huge = torch.isfinite(lse) & (lse.abs() >= HUGE_LSE[cd])  # [N_dst, H]
    if bool(huge.any()):
        sums = torch.zeros(lse.shape, dtype=cd, device=weights.device).index_add_(0, dst, weights)
        weights = torch.where(huge[dst], weights / torch.where(huge, sums, 1.0)[dst], weights)
    return weights.to(query.dtype)


__all__ = [
    "attend", "edge_weights", "choose_backend", "plan_costs", "attend_reference", "merge_partials",
    "triton_available", "clear_cache", "BACKENDS", "TILE_COST", "ROW_COST", "MERGE_COST", "DROPOUT_COST",
    "BLOCK_SIZE", "CUDA_CORE_BLOCK_SIZE", "default_block_size",
]
