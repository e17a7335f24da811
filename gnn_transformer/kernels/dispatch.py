"""The entry points: :func:`attend` checks its arguments, picks a backend and an implementation,
and calls one backend file; :func:`edge_weights` recomputes the weights from ``attend``'s ``lse``.
Attention on token graphs is a softmax over each target's incoming edges, never ``[E, H, D]``.

For every target ``i`` with incoming edges ``j -> i``::

    s_ji = scale * q_i . k_j + b_ji,   lse_i = log sum_j exp(s_ji),   out_i = sum_j exp(s_ji - lse_i) v_j

and ``out_i = 0``, ``lse_i = -inf`` for a target without edges. Backends:

- ``"fused"``: over the target-sorted CSR. On the GPU a Triton kernel with online softmax (backward
  from the saved log-sum-exp, ``dK`` / ``dV`` over the source-sorted CSC, no atomics); elsewhere
  sparse CSR products one head and one chunk of rows at a time (:mod:`.fused_triton`,
  :mod:`.fused_torch`).
- ``"tiled"``: the edge set as (query block, key block) tiles with per-tile masks, FlashAttention
  style (:mod:`.tiling`, :mod:`.tiled_triton`, :mod:`.tiled_torch`).
- ``"split"``: the densely filled tiles through ``tiled``, the remaining edges through ``fused``,
  merged exactly through their log-sum-exps (:mod:`.merge`).
- ``"auto"``: one of the above by device and block fill (:func:`.planner.choose_backend`), or, for a
  graph of exactly full or causal attention per sequence or document without edge bias or dropout,
  PyTorch's own ``scaled_dot_product_attention`` kernels (:mod:`.sdpa`), or, on the GPU, for a long
  interval graph (each target hears one run of sources: windows, prefix-LM) compiled
  FlexAttention (:mod:`.flex`); :func:`.planner.auto_kernel` says which.

Under autocast, query, key and value are cast as autocast casts them for
``scaled_dot_product_attention`` (float32 to the autocast dtype); the kernels then run without
autocast, computing half precision in float32 as they always do.

Example:
    >>> import torch
    >>> from gnn_transformer.topology import causal
    >>> q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    >>> out = attend(q, k, v, causal(3), scale=0.5, backend="fused")
    >>> torch.allclose(out[0], v[0])  # token 0 attends only to itself
    True
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch
from torch import Tensor

from ._dropout import threshold
from .flex import flex_interval_attention
from .fused_torch import DEFAULT_MAX_EDGES, chunked_attention
from .heads import head_inputs, heads_to_nodes, nodes_to_heads
from .implicit import block_tiles, from_rows, to_rows
from .merge import merge_partials
from .planner import (
    CSRGraph,
    DensePattern,
    block_intervals,
    check_edge_index,
    check_tiling,
    default_block_size,
    dense_pattern,
    edge_parts,
    interval_pattern,
    is_block_structure,
    planned_backend,
    prepare,
    runs_flex,
    runs_sdpa,
    tile_size,
    unit_costs,
)
from .primitives import autocast_inputs, compute_dtype, no_autocast, plain_tensor
from .sdpa import sdpa_attention
from .tiled_torch import DEFAULT_MAX_CELLS, tiled_attention
from .tiling import TileList, triton_blocks

BACKENDS = ("auto", "fused", "tiled", "split")
IMPLS = (None, "torch", "triton")

# edge_weights renormalizes rows whose log-sum-exp is this large: half its rounding step is above
# 7.6e-6 (float32) or 5.8e-11 (float64) there
HUGE_LSE = {torch.float32: 128.0, torch.float64: 2.0**19}


def triton_available() -> bool:
    """Whether the Triton kernels can run (Triton importable; CPU tensors need ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_interpreter() -> None:
    """Refuse the Triton interpreter where it cannot run these kernels: before Triton 3.7 it turns
    one-element NumPy arrays into Python integers (a loop bound loaded from memory, such as a row's
    edge range), which NumPy 2.4 and later reject."""
    import numpy
    import triton

    if not _interpreter_runs(triton.__version__, numpy.__version__):
        raise RuntimeError(
            f"impl='triton' on CPU tensors runs Triton's interpreter, which in Triton {triton.__version__} "
            f"does not work with NumPy {numpy.__version__} (it converts one-element arrays to Python "
            "integers); install numpy<2.4 or Triton >= 3.7"
        )


@functools.cache
def _interpreter_runs(triton_version: str, numpy_version: str) -> bool:
    from torch.torch_version import TorchVersion  # compares version strings with tuples

    return not (TorchVersion(triton_version) < "3.7" and TorchVersion(numpy_version) >= "2.4")


def _recording() -> bool:
    """Whether Triton launches are being recorded, not run (:func:`.triton_common.recording`)."""
    from .triton_common import is_recording  # needs Triton, which the callers checked

    return is_recording()


def _use_triton(device: torch.device, impl: str | None) -> bool:
    if impl is None:
        return device.type == "cuda" and triton_available()
    if impl == "triton" and not triton_available():
        raise ValueError("impl='triton' needs the 'triton' package (pip install triton)")
    if impl == "triton" and device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            _check_interpreter()
        elif not _recording():
            raise ValueError("impl='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")
    return impl == "triton"


def _check_no_transform() -> None:
    """``RuntimeError`` inside a ``torch.func`` transform: the kernels and the graph caches read
    tensors' memory, which the transforms' wrapped tensors do not have."""
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(
            "attend does not run under torch.func transforms (grad, vmap, jacrev, jvp, ...): its kernels "
            "and graph caches read tensors' memory directly. Take gradients with torch.autograd.grad "
            "instead (with create_graph=True for higher orders)"
        )


def _check_inputs(query, key, value, backend, num_dst, impl):
    _check_no_transform()
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
        raise ValueError(
            f"Expected the query heads ({query.size(1)}) to be a multiple of the key/value heads ({key.size(1)})"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"Expected one dtype for query/key/value (got {query.dtype}, {key.dtype}, {value.dtype})")
    if not query.is_floating_point():
        raise ValueError(f"Expected floating-point query/key/value (got {query.dtype})")
    if query.size(-1) == 0:
        raise ValueError(f"Expected a head dimension of at least 1 (got 'query' {list(query.shape)})")
    if query.device != key.device or key.device != value.device:
        raise ValueError(
            f"Expected query, key and value on one device (got {query.device}, {key.device}, {value.device})"
        )
    if query.device.type == "meta":
        raise ValueError("Expected query, key and value with values to attend over, not on the meta device")
    if backend not in BACKENDS:
        raise ValueError(f"Expected 'backend' to be one of {BACKENDS} (got {backend!r})")
    if impl not in IMPLS:
        raise ValueError(f"Expected 'impl' to be one of {IMPLS} (got {impl!r})")
    if num_dst is not None and (
        isinstance(num_dst, bool) or not isinstance(num_dst, numbers.Integral) or num_dst != query.size(0)
    ):
        raise ValueError(f"Expected 'num_dst' to be the number of rows of 'query', {query.size(0)} (got {num_dst!r})")


def _flex(q, k, v, intervals, scale: float, return_lse: bool) -> Tensor | None:
    """``auto``'s FlexAttention route (:mod:`.flex`) for a graph without edge bias or dropout:
    ``out`` where :func:`.planner.runs_flex` allows it, ``intervals()`` recognizes an interval
    graph and FlexAttention runs here, else ``None``."""
    if not runs_flex(q.size(0), k.size(0), q.device.type, q.dtype, q.size(-1), False, False, return_lse):
        return None
    pattern = intervals()
    return None if pattern is None else flex_interval_attention(q, k, v, pattern, scale)


def _fused(q, k, v, bias, graph: CSRGraph, scale, use_triton, max_edges, dropout=None):
    if use_triton:
        from .fused_triton import csr_attention

        return csr_attention(q, k, v, bias, graph, scale, dropout)
    return chunked_attention(q, k, v, bias, graph, scale, max_edges, dropout)


def _tiled(q, k, v, bias, tiles: TileList, scale, use_triton, max_cells, dropout=None):
    tb = None if bias is None else bias[tiles.edge_ids]  # [E_t, H], read per cell
    if use_triton:
        from .tiled_triton import tiled_triton_attention

        return tiled_triton_attention(q, k, v, tiles, tb, scale, dropout)
    return tiled_attention(q, k, v, tiles, tb, scale, max_cells, dropout)


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    *,
    scale: float,
    edge_bias: Tensor | None = None,
    backend: str = "auto",
    num_dst: int | None = None,
    return_lse: bool = False,
    impl: str | None = None,
    block_size: int | None = None,
    tile_cost: float | None = None,
    max_edges: int = DEFAULT_MAX_EDGES,
    max_cells: int = DEFAULT_MAX_CELLS,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    edge_head: Tensor | None = None,
):
    """Attention over the edges ``j -> i`` of ``edge_index``, without per-edge messages.

    Args:
        query: ``[N_dst, H, D]``.
        key, value: ``[N_src, H_kv, D]``; query head ``h`` uses key/value head ``h // (H // H_kv)``.
        edge_index: ``[2, E]``, row 0 the source ``j``, row 1 the target ``i``: an ``EdgeIndex``
            sorted by column, or any ``LongTensor`` (sorted here; the sort is cached per tensor).
            Or an implicit graph, :class:`gnn_transformer.topology.BlockGraph` (a builder's
            ``implicit=True``, block selection): its tiles run ``tiled`` without an edge list
            (``auto``: SDPA when the graph says it is exactly causal or full per document,
            FlexAttention on the GPU when it carries its bounds, else ``tiled``). ``fused``,
            ``split`` and attention dropout need edges and run on its
            :meth:`~gnn_transformer.topology.BlockGraph.edges`, refused past the edge budget
            (:func:`gnn_transformer.topology.max_edges`); an ``edge_bias`` (aligned to an edge
            order) needs the materialized graph passed instead.
        scale: factor of ``q . k`` (usually ``1 / sqrt(D)``).
        edge_bias: ``[E, H]`` added to the scaled scores, aligned with ``edge_index``'s columns
            (with ``edge_head`` also ``[E]``, one value per edge for its head).
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
        edge_head: ``[E]`` integer, values in ``[0, H)``: a per-head graph, edge ``j -> i`` exists
            for query head ``edge_head[e]`` only (:mod:`.heads`; every backend runs it on (head,
            token) nodes, so its cost follows ``E``, not ``H x`` the union of the heads' graphs).
            ``None`` (default): every head sees every edge. Dropout masks are then keyed by each
            edge's position in the (head, target)-sorted order.

    Returns:
        ``out [N_dst, H, D]`` in ``query``'s dtype (under autocast: autocast's dtype, unless the
        inputs are float64), and ``lse`` when ``return_lse``.
        Differentiable w.r.t. query, key, value and edge_bias, to every order (a gradient taken
        with ``create_graph=True`` is recomputed per edge, :mod:`.higher_order`; where ``auto``
        runs SDPA, PyTorch's fused kernels have no double backward, as for SDPA itself); empty rows
        give zeros.

    Example:
        >>> import torch
        >>> from gnn_transformer.topology import full
        >>> q, k, v = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
        >>> out, lse = attend(q, k, v, full(4), scale=8 ** -0.5, return_lse=True)
        >>> out.shape, lse.shape
        (torch.Size([4, 2, 8]), torch.Size([4, 2]))
    """
    query, key, value = autocast_inputs(query, key, value)
    _check_inputs(query, key, value, backend, num_dst, impl)
    if not isinstance(return_lse, bool):
        raise ValueError(f"Expected 'return_lse' to be a bool (got {return_lse!r})")
    options = dict(
        scale=scale,
        edge_bias=edge_bias,
        backend=backend,
        return_lse=return_lse,
        impl=impl,
        block_size=block_size,
        tile_cost=tile_cost,
        max_edges=max_edges,
        max_cells=max_cells,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        edge_head=edge_head,
    )
    run = _attend_blocks if is_block_structure(edge_index) else _attend
    with no_autocast(query.device.type):
        return run(query, key, value, edge_index, **options)


def attend_dense(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, *, scale: float) -> Tensor | None:
    """``attend(query, key, value, edge_index, scale=scale)`` where ``auto`` runs it through
    PyTorch's attention kernels (a graph recognized as full or causal per sequence or document),
    else ``None``, having run nothing. Under autocast the heads are cast as :func:`attend` casts them.

    The shortest route of the commonest call, for a layer's own heads: ``query``, ``key``,
    ``value`` as a layer projects them (``[N, H, D]``, ``[N, H_kv, D]``, one dtype and device) and
    an ``edge_index`` it has checked on their device. Where the fused CPU kernel's log-sum-exp
    leaves its exact range (see :func:`.sdpa.sdpa_attention`) the call runs the backend ``auto``
    plans for the graph, as :func:`attend` does.
    """
    if not isinstance(edge_index, Tensor):
        return None
    _check_no_transform()
    device_type = query.device.type
    graph = prepare(edge_index, key.size(0), query.size(0))
    pattern = dense_pattern(graph)
    if not runs_sdpa(pattern, device_type, False, False, False):
        return None
    assert pattern is not None  # runs_sdpa answers False for a graph it does not recognize
    query, key, value = autocast_inputs(query, key, value)  # as attend does
    with no_autocast(device_type):
        out = sdpa_attention(query, key, value, pattern, scale)
    if isinstance(out, Tensor):
        return out
    backend = planned_backend(graph, device_type, tile_size(graph, device_type, query.dtype, None), None, False)
    return attend(query, key, value, edge_index, scale=scale, backend=backend)


def _attend(
    query,
    key,
    value,
    edge_index,
    *,
    scale,
    edge_bias,
    backend,
    return_lse,
    impl,
    block_size,
    tile_cost,
    max_edges,
    max_cells,
    dropout_p,
    dropout_seed,
    edge_head,
):
    """:func:`attend` on an edge set (not an implicit graph) after its tensor checks, without
    autocast."""
    if edge_head is not None:
        options = dict(
            scale=scale,
            backend=backend,
            return_lse=return_lse,
            impl=impl,
            block_size=block_size,
            tile_cost=tile_cost,
            max_edges=max_edges,
            max_cells=max_cells,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
        )
        return _attend_per_head(query, key, value, edge_index, edge_head, edge_bias, options)
    check_tiling(block_size, tile_cost)
    scale, dropout_p, max_edges, max_cells = _check_numbers(scale, dropout_p, max_edges, max_cells)
    if isinstance(edge_index, Tensor) and edge_index.device != query.device:
        if edge_index.numel():
            raise ValueError(
                f"Expected 'edge_index' on the device of query/key/value (got {edge_index.device} and {query.device})"
            )
        # no edges, no data on the wrong device (an empty EdgeIndex's .to(device) stays put in some
        # PyG versions): checked as given, then replaced by an empty edge set on the queries' device
        check_edge_index(edge_index, key.size(0), query.size(0))
        edge_index = torch.empty(2, 0, dtype=torch.long, device=query.device)
    graph = prepare(edge_index, key.size(0), query.size(0))
    device_type = query.device.type
    if backend == "auto" and edge_bias is None and not dropout_p and impl != "triton":
        pattern = dense_pattern(graph)
        if runs_sdpa(pattern, device_type, False, False, return_lse):
            result = sdpa_attention(query, key, value, pattern, scale, return_lse)
            if result is not None:
                return result
        out = _flex(query, key, value, lambda: interval_pattern(graph), scale, return_lse)
        if out is not None:
            return out
    bias = None
    if edge_bias is not None:
        if not isinstance(edge_bias, Tensor) or not edge_bias.is_floating_point():
            got = edge_bias.dtype if isinstance(edge_bias, Tensor) else type(edge_bias).__name__
            raise ValueError(f"Expected 'edge_bias' to be a floating-point tensor (got {got})")
        if edge_bias.shape != (graph.num_edges, query.size(1)):
            raise ValueError(
                f"Expected 'edge_bias' of shape [E, H] = [{graph.num_edges}, {query.size(1)}] "
                f"(got {list(edge_bias.shape)})"
            )
        if edge_bias.device != query.device:
            raise ValueError(
                f"Expected 'edge_bias' on the device of query/key/value (got {edge_bias.device} and {query.device})"
            )
        bias = edge_bias if graph.perm is None else edge_bias[graph.perm]  # [E, H], target-sorted
    use_triton = _use_triton(query.device, impl)
    dropout = None
    if dropout_p:
        threshold(dropout_p)  # validates
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_seed is None else dropout_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"Expected 'dropout_seed' to be an int in [0, 2**31) (got {dropout_seed!r})")
        dropout = (float(dropout_p), seed)
    block = tile_size(graph, device_type, query.dtype, block_size)
    # tiles of a size the Triton kernels do not take run through the PyTorch tiled path, unless
    # Triton was asked for by name (then its ValueError says why)
    tiles_triton = use_triton and (impl == "triton" or triton_blocks(block, block))
    if backend == "auto":
        backend = planned_backend(graph, device_type, block, tile_cost, dropout is not None)
    if backend == "fused":
        out, lse, _ = _fused(query, key, value, bias, graph, scale, use_triton, max_edges, dropout)
    else:  # tiled, split: tiles, and the remaining edges (repeated copies, sparse tiles) fused
        ratio = None
        if backend == "split":
            cell, edge = unit_costs(device_type, tile_cost, dropout is not None)
            ratio = cell / edge
        tiles, rest_ids, rest = edge_parts(graph, block, ratio)
        # dropout: both parts key each edge's mask by its position in the whole graph
        out, lse, lo = _tiled(query, key, value, bias, tiles, scale, tiles_triton, max_cells, dropout)
        if rest is not None:
            out_f, lse_f, lo_f = _fused(
                query, key, value, None if bias is None else bias[rest_ids], rest, scale, use_triton, max_edges, dropout
            )
            out, lse, _ = merge_partials(out, lse, out_f, lse_f, (lo, lo_f))
    out = out.to(query.dtype)
    if not return_lse:
        return out
    return out, lse.to(compute_dtype(query.dtype))


def check_implicit_options(edge_bias: object, edge_head: object) -> None:
    """``ValueError`` for what an implicit graph (a ``BlockGraph``) cannot take: an ``edge_head``
    (a per-head BlockGraph carries the head of each tile) or an ``edge_bias`` (it has no edge order)."""
    if edge_head is not None:
        raise ValueError(
            "Expected no 'edge_head' with an implicit graph (a BlockGraph): a per-head BlockGraph "
            "carries the head of each tile itself"
        )
    if edge_bias is not None:
        raise ValueError(
            "Expected no 'edge_bias' with an implicit graph (a BlockGraph): a bias is aligned "
            "with an edge order; pass the materialized graph, graph.edges(), instead"
        )


def _check_block_graph(query, key, graph, edge_bias, edge_head) -> None:
    check_implicit_options(edge_bias, edge_head)
    if (graph.num_dst, graph.num_src) != (query.size(0), key.size(0)):
        raise ValueError(
            f"The BlockGraph has {graph.num_dst} targets and {graph.num_src} sources but 'query' "
            f"has {query.size(0)} rows and 'key' {key.size(0)}"
        )
    if graph.num_heads is not None and graph.num_heads != query.size(1):
        raise ValueError(
            f"The per-head BlockGraph has num_heads={graph.num_heads} but 'query' has {query.size(1)} heads"
        )
    if graph.q_block.device != query.device:
        raise ValueError(
            f"Expected the BlockGraph on the device of query/key/value (got {graph.q_block.device} and {query.device})"
        )


def _graph_block(graph, device_type: str, dtype: torch.dtype, block_size: int | None) -> int:
    """The tile side for an implicit graph: ``block_size`` (equal to its blocks, or a divisor of
    them: sub-tiles), by default the device's when that divides its blocks, else its own."""
    bq, bk = graph.block_q, graph.block_k
    if block_size is None:
        want = default_block_size(device_type, dtype)
        return want if want < min(bq, bk) and bq % want == 0 and bk % want == 0 else min(bq, bk)
    if bq % block_size or bk % block_size:
        raise ValueError(f"Expected 'block_size' to divide the BlockGraph's blocks {bq} x {bk} (got {block_size})")
    return block_size


def _check_numbers(scale, dropout_p, max_edges, max_cells) -> tuple[float, float, int, int]:
    """``scale``, ``dropout_p`` and the chunk bounds checked, as Python numbers (a Fraction, NumPy
    scalar or one-element tensor reaches the kernels as a float or int)."""
    if (
        type(scale) is float
        and type(dropout_p) is float
        and type(max_edges) is int
        and type(max_cells) is int
        and math.isfinite(scale)
        and 0.0 <= dropout_p < 1.0
        and max_edges >= 1
        and max_cells >= 1
    ):  # the common call, as the layers make it
        return scale, dropout_p, max_edges, max_cells
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point() or scale.requires_grad:
            raise ValueError(
                f"Expected 'scale' to be a finite number or a one-element floating-point tensor without "
                f"gradient (got a tensor of shape {list(scale.shape)}, dtype {scale.dtype}, "
                f"requires_grad={scale.requires_grad}: the kernels take the scale as a constant)"
            )
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"Expected 'scale' to be a finite number (got {scale!r})")
    if isinstance(dropout_p, Tensor) and dropout_p.numel() == 1 and dropout_p.is_floating_point():
        dropout_p = float(dropout_p)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= float(dropout_p) < 1:
        raise ValueError(f"Expected 'dropout_p' in [0, 1) (got {dropout_p!r})")
    for name, chunk in (("max_edges", max_edges), ("max_cells", max_cells)):
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"Expected '{name}' to be a positive int (got {chunk!r})")
    return float(scale), float(dropout_p), int(max_edges), int(max_cells)


def _attend_blocks(
    query,
    key,
    value,
    graph,
    *,
    scale,
    edge_bias,
    backend,
    return_lse,
    impl,
    block_size,
    tile_cost,
    max_edges,
    max_cells,
    dropout_p,
    dropout_seed,
    edge_head,
):
    """:func:`attend` on an implicit graph: its tiles, SDPA for an exactly causal / full one, or
    (``fused``, ``split``, dropout) its materialized edges."""
    _check_block_graph(query, key, graph, edge_bias, edge_head)
    check_tiling(block_size, tile_cost)
    scale, dropout_p, max_edges, max_cells = _check_numbers(scale, dropout_p, max_edges, max_cells)
    if backend in ("fused", "split") or dropout_p:
        edges = graph.edges()  # refused past the edge budget, before anything is allocated
        edge_index, heads = edges if isinstance(edges, tuple) else (edges, None)
        return _attend(
            query,
            key,
            value,
            edge_index,
            scale=scale,
            edge_bias=None,
            backend=backend,
            return_lse=return_lse,
            impl=impl,
            block_size=block_size,
            tile_cost=tile_cost,
            max_edges=max_edges,
            max_cells=max_cells,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            edge_head=heads,
        )
    use_triton = _use_triton(query.device, impl)
    device_type = query.device.type
    block = _graph_block(graph, device_type, query.dtype, block_size)
    if backend == "auto" and graph.dense is not None and impl != "triton":
        pattern = DensePattern(*graph.dense)
        if runs_sdpa(pattern, device_type, False, False, return_lse):
            result = sdpa_attention(query, key, value, pattern, scale, return_lse)
            if result is not None:
                return result
    if backend == "auto" and impl != "triton":
        out = _flex(query, key, value, lambda: block_intervals(graph), scale, return_lse)
        if out is not None:
            return out
    tiles, q_rows, k_rows = block_tiles(graph, block, query.size(1), key.size(1))
    per_head = graph.num_heads is not None
    q = to_rows(query, q_rows, tiles.num_dst, per_head)
    k, v = (to_rows(x, k_rows, tiles.num_src, per_head) for x in (key, value))
    tiles_triton = use_triton and (impl == "triton" or triton_blocks(block, block))
    out, lse, _ = _tiled(q, k, v, None, tiles, scale, tiles_triton, max_cells)
    out = from_rows(out, q_rows, query.size(1), per_head).to(query.dtype)
    if not return_lse:
        return out
    return out, from_rows(lse, q_rows, query.size(1), per_head).to(compute_dtype(query.dtype))


def _attend_per_head(query, key, value, edge_index, edge_head, edge_bias, options):
    """:func:`attend` on a per-head graph: one head on (head, token) nodes, then back to ``[N, H, ...]``."""
    index, bias = head_inputs(query, key, edge_index, edge_head, edge_bias)
    heads = query.size(1)
    result = attend(heads_to_nodes(query), heads_to_nodes(key), heads_to_nodes(value), index, edge_bias=bias, **options)
    if not options["return_lse"]:
        return nodes_to_heads(result, heads)  # [N_dst, H, D]
    out, lse = result
    return nodes_to_heads(out, heads), nodes_to_heads(lse, heads)  # [N_dst, H, D], [N_dst, H]


def edge_weights(
    query: Tensor,
    key: Tensor,
    edge_index: Tensor,
    lse: Tensor,
    *,
    scale: float,
    edge_bias: Tensor | None = None,
    chunk: int = 1 << 16,
    edge_head: Tensor | None = None,
) -> Tensor:
    """Attention weights ``alpha [E, H] = exp(scale * q_i . k_j + b_ji - lse_i)`` of every edge, in
    ``edge_index``'s column order, from the ``lse`` of :func:`attend` (chunks of ``chunk`` edges).
    With ``edge_head`` (a per-head graph) the weights are ``[E]``, each edge's at its head."""
    if edge_head is not None:
        index, bias = head_inputs(query, key, edge_index, edge_head, edge_bias)
        return edge_weights(
            heads_to_nodes(query),
            heads_to_nodes(key),
            index,
            lse.t().reshape(-1, 1),
            scale=scale,
            edge_bias=bias,
            chunk=chunk,
        )[:, 0]  # [E]
    plain = plain_tensor(edge_index)
    src, dst = plain[0].long(), plain[1].long()  # [E], [E]
    group = query.size(1) // key.size(1)
    cd = compute_dtype(query.dtype)
    chunks = []
    for e0 in range(0, src.numel(), chunk):
        s, d = src[e0 : e0 + chunk], dst[e0 : e0 + chunk]
        k_j = key[s].repeat_interleave(group, dim=1).to(cd)  # [C, H, D]
        score = (query[d].to(cd) * k_j).sum(-1) * scale  # [C, H]
        if edge_bias is not None:
            score = score + edge_bias[e0 : e0 + chunk].to(cd)
        top = lse[d].to(cd)  # [C, H]; -inf: the row's edges all have a -inf bias, weights 0
        chunks.append(torch.where(torch.isneginf(top), 0.0, torch.exp(score - top)))
    if not chunks:
        return query.new_zeros(0, query.size(1))
    weights = torch.cat(chunks)  # [E, H]
    # A log-sum-exp so large that log(sum exp(s - max)) is below its rounding step (every score of
    # the row near -1e9, say) lost that part: there, normalize the row's weights by their sum.
    huge = torch.isfinite(lse) & (lse.abs() >= HUGE_LSE[cd])  # [N_dst, H]
    if bool(huge.any()):
        sums = torch.zeros(lse.shape, dtype=cd, device=weights.device).index_add_(0, dst, weights)
        weights = torch.where(huge[dst], weights / torch.where(huge, sums, 1.0)[dst], weights)
    return weights.to(query.dtype)
