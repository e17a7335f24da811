"""Attention on token graphs: this project's backends against what a user would otherwise run.

For each topology and size, one run times (median of ``--repeats``) the forward pass and the
forward + backward pass of: ``pyg`` (per-edge messages, the reference path), ``fused``, ``tiled``,
``auto`` (:func:`gnn_transformer.kernels.attend`; its note names the kernel that ran), ``sdpa``
(``scaled_dot_product_attention`` as a user calls it for the graph: ``is_causal``, no mask, per
document, or a dense boolean mask) and ``flex`` (FlexAttention with the fastest of the
``mask_mod`` functions a user would write: :mod:`.baselines`). SDPA and FlexAttention take their own
contiguous ``[B, H, N, D]`` layout, the project ``[N, H, D]``; inputs are laid out once, untimed.
It also reports peak memory (CUDA: allocator peak; CPU: peak growth of live malloc'd bytes, glibc
``mallinfo2`` sampled every millisecond), the largest error against a float32 dense masked softmax
(where that fits), and, separately, the time to build the graph (with the kernels' cached
structures) or the mask.

A per-head spec (``edge_index`` plus ``edge_head``) runs every side per head: the kernels with
``edge_head``, SDPA with a ``[1, H, N, N]`` mask, FlexAttention with ``mask_mod`` functions that read
``h`` (:mod:`.baselines`), the reference with each head's mask. A per-layer spec gives the rows of
each distinct layer graph, then per backend and pass a total over the layers of one cycle.

Command line: ``python benchmarks/bench_attention.py`` (``--quick`` for a CPU run at 4k tokens).
:func:`run_benchmark` returns the rows (dicts); :func:`format_table` / :func:`format_markdown`
render them. Nothing here prints: pass ``log`` to see rows as they come.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels import (
    DROPOUT_COST,
    MERGE_COST,
    ROW_COST,
    TILE_COST,
    attend,
    attend_reference,
    auto_kernel,
    clear_cache,
    default_block_size,
    head_inputs,
    heads_to_nodes,
    merge_partials,
    nodes_to_heads,
)
from ..kernels.flex import FLEX_OPTIONS, out_of_resources
from ..kernels.planner import prepare
from ..kernels.tiling import tile_stats
from ..topology.specs import LayerPattern
from .baselines import FLEX_VARIANTS, Unavailable, bhnd, flex_block_mask, layout_functions, make_sdpa, sdpa_mode

TOPOLOGIES = ("causal", "window", "bigbird", "random", "document")
BACKENDS = ("pyg", "fused", "tiled", "auto", "sdpa", "flex")
LINEAR = ("window", "bigbird", "random")  # edge count linear in N: also run at 256k-1M
# tile sizes the benchmark takes: the powers of two the Triton tiled kernels run (tl.dot needs 16),
# up to tiles whose [B, B] masks and scores stay small beside the graph
BLOCK_SIZES = (16, 32, 64, 128, 256)


def _untimed(base: dict, pass_: str, note: str, build_ms: float | None = None) -> dict:
    """A row of ``base`` for pass ``pass_`` that has no time, saying why in ``note``."""
    return dict(base, **{"pass": pass_}, ms=None, peak_mb=None, max_err=None, build_ms=build_ms, note=note)


def input_memory_budget(device) -> float:
    """Bytes the benchmark lets one run use on ``device`` (``run_benchmark``'s default
    ``memory_budget``): 80% of the GPU's memory, half of the machine's on the CPU."""
    if torch.device(device).type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    from ..experiments.tasks import host_memory_budget

    return host_memory_budget()


def check_block_size(block_size: int | None) -> None:
    """``ValueError`` naming ``block_size`` unless it is ``None`` (the default) or in :data:`BLOCK_SIZES`."""
    if block_size is not None and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
        raise ValueError(f"Expected 'block_size' to be one of {', '.join(map(str, BLOCK_SIZES))} (got {block_size!r})")


# ---------------------------------------------------------------- graphs
def build_graph(topology: str, n: int, seed: int = 0):
    """The benchmark's token graph on ``n`` tokens (an ``EdgeIndex`` sorted by target).

    ``topology`` is one of the benchmark's own graphs (:data:`TOPOLOGIES`: ``causal``, ``window``
    = radius 128, ``bigbird`` = blocks of 64 with 3 window, 2 global and 3 random blocks, ``random``
    = 64 keys per query, ``document`` = documents of ``n // 4`` tokens, causal inside each: 4 of them, and a
    fifth of ``n % 4`` tokens when 4 does not divide ``n``), or
    any topology spec of the command line: a builder with arguments
    (``"dilated:window=256,dilation=4"``), a ``graphs/`` catalogue name (``"longformer"``) or the
    path of a TOML spec. The benchmark's names take precedence over catalogue specs of the same
    name; ``seed`` applies to them only (a spec carries its own).
    """
    from .. import topology as topo

    if topology not in TOPOLOGIES:
        from ..experiments.topologies import topology_fn

        return topology_fn(topology)([n])
    if topology == "causal":
        return topo.causal(n)
    if topology == "document":  # documents of n // 4 tokens, causal inside each
        return topo.document(n, max(n // 4, 1), causal=True)
    if topology == "window":  # |i - j| <= 128: 257 keys per query, a window of 256
        return topo.sliding_window(n, 128)
    if topology == "bigbird":  # BigBird-ITC: blocks of 64, 3 window blocks, 2 global, 3 random
        return topo.bigbird(n, block=64, window=1, num_global=2, num_random=3, seed=seed)
    return topo.random(n, 64, seed=seed)  # random: 64 distinct random keys per query


# ---------------------------------------------------------------- measurement
class _mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _live_bytes_fn() -> Callable[[], int]:
    """Bytes currently allocated by malloc (glibc ``mallinfo2``), else the resident set size."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _mallinfo2

        def live() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        live()
        return live
    except (OSError, AttributeError):

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        return rss


class _PeakHost:
    """Largest growth of live host memory while the block runs (sampled every millisecond): the
    largest rise of a sample over the lowest one before it, so memory that something else frees
    meanwhile (a worker thread, the garbage collector) does not hide the block's allocations."""

    _low: int  # the lowest sample so far

    def __init__(self):
        self.delta = 0
        self._live = _live_bytes_fn()

    def _sample(self) -> None:
        live = self._live()
        self._low = min(self._low, live)
        self.delta = max(self.delta, live - self._low)

    def __enter__(self):
        self._low = self._live()
        self.delta = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    """Give cached blocks back after a failed call (an out-of-memory error leaves them held)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def median_seconds(fn: Callable[[], object], device, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call, synchronized on CUDA."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(fn: Callable[[], object], device, repeats: int) -> tuple[float, float]:
    """``(median seconds, peak bytes)`` of ``fn`` (:func:`median_seconds`). On the CPU the peak is
    sampled every millisecond, and once more while the call's result is still held (so it is at
    least the result's size): a lower bound for the temporaries of calls that take a few ms."""
    median = median_seconds(fn, device, repeats)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakHost() as host:
            result = fn()  # held until the last sample
        del result
        peak = host.delta
    return median, float(peak)


def _head_mask(n: int, num_src: int, src: Tensor, dst: Tensor, edge_head: Tensor | None, head: int) -> Tensor:
    """The dense mask ``[N, N_src]`` of query head ``head`` (of every head without ``edge_head``)."""
    mask = torch.zeros(n, num_src, dtype=torch.bool, device=src.device)
    if edge_head is None:
        mask[dst, src] = True
    else:
        mine = edge_head == head
        mask[dst[mine], src[mine]] = True
    return mask


def _dense_reference(q, k, v, src, dst, scale, edge_head=None):
    """Float32 dense masked softmax ``[N, H, D]``, one head at a time (query head ``h`` reads
    key/value head ``h // (H // H_kv)``; on a per-head graph, ``edge_head``, along its own edges)."""
    n, h, d = q.shape
    group = h // k.size(1)
    mask = _head_mask(n, k.size(0), src, dst, None, 0) if edge_head is None else None
    out = torch.empty(n, h, d, dtype=torch.float32, device=q.device)
    for i in range(h):
        if edge_head is not None:
            mask = _head_mask(n, k.size(0), src, dst, edge_head, i)
        assert mask is not None  # built above for a graph of every head
        s = (q[:, i].float() @ k[:, i // group].float().t()) * scale  # [N, N_src]
        s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[:, i] = w @ v[:, i // group].float()
    return out


def _dense_reference_grads(q, k, v, src, dst, scale, grad_out, edge_head=None) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 ``(dQ, dK, dV)`` of the dense masked softmax for the upstream gradient ``grad_out``,
    one head at a time (the memory of :func:`_dense_reference`)."""
    n, h, d = q.shape
    group = h // k.size(1)
    mask = _head_mask(n, k.size(0), src, dst, None, 0) if edge_head is None else None
    dq = torch.empty(n, h, d, dtype=torch.float32, device=q.device)
    dk, dv = (torch.zeros(k.size(0), k.size(1), d, dtype=torch.float32, device=q.device) for _ in range(2))
    for i in range(h):
        if edge_head is not None:
            mask = _head_mask(n, k.size(0), src, dst, edge_head, i)
        assert mask is not None  # built above for a graph of every head
        qi, ki, vi = (x.float().requires_grad_() for x in (q[:, i], k[:, i // group], v[:, i // group]))
        s = (qi @ ki.t()) * scale
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        gq, gk, gv = torch.autograd.grad(w @ vi, (qi, ki, vi), grad_out[:, i].float())
        dq[:, i] = gq
        dk[:, i // group] += gk
        dv[:, i // group] += gv
    return dq, dk, dv


def _fits(
    n: int, num_edges: int, backend: str, h: int, d: int, budget: float, elem: int, sdpa_mode: str | None = None
) -> str | None:
    """A reason to skip a row that would not fit in ``budget`` bytes, else ``None`` (``sdpa_mode``:
    SDPA's mode for the graph, :func:`.baselines.sdpa_mode`; only ``"mask"`` needs ``N²``)."""
    if backend == "pyg":
        need = 4.0 * num_edges * h * d * elem  # gathered q/k/v per edge and the messages
    elif backend == "sdpa" and sdpa_mode not in (None, "mask"):
        return None
    elif backend == "sdpa":  # fused SDPA kernels: the boolean mask and an additive copy of it
        need = n * n * (1.0 + elem)
    elif backend == "reference":
        need = 3.0 * n * n * 4 + n * n
    elif backend == "reference_grads":  # one head's scores, weights and their gradients, with autograd
        need = 6.0 * n * n * 4 + n * n
    else:
        return None
    if need > budget:
        return f"skipped: needs ~{need / 2**30:.0f} GiB"
    return None


def _if_memory(fn: Callable[[], object], device):
    """``fn()``, or ``None`` when it runs out of memory (the dense reference beside a large edge
    set: the error column is then left empty)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        _free(device)
        return None


def run_benchmark(
    topologies: Sequence[str] = TOPOLOGIES,
    sizes: Sequence[int] = (4096,),
    backends: Sequence[str] = BACKENDS,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    heads: int = 12,
    head_dim: int = 64,
    kv_heads: int | None = None,
    repeats: int = 3,
    backward: bool = True,
    memory_budget: float | None = None,
    flex_block: int = 128,
    block_size: int | None = None,
    seed: int = 0,
    flex_variants: Sequence[str] = FLEX_VARIANTS,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return one row per (topology, N, backend, pass).

    Row keys: ``topology, n, edges, density, backend, pass ("fwd" | "fwd+bwd"), ms, peak_mb,
    max_err, build_ms, note``. ``build_ms`` is the graph / mask construction (not in ``ms``).
    A per-head spec needs ``heads`` equal to its heads (``ValueError`` naming ``heads``); its
    ``density`` is that of one head. A per-layer spec gives rows labelled ``"spec [layers 0-4]"``
    per distinct layer graph, then ``"spec [total, L layers]"`` rows: each graph's ``ms`` times the
    layers of one cycle that use it, summed.
    ``auto``'s note names the kernel that ran (:func:`~gnn_transformer.kernels.auto_kernel`),
    ``sdpa``'s how it was called, ``flex``'s the fastest of ``flex_variants`` (see
    :mod:`.baselines`) and the times or reasons of the others.
    """
    check_block_size(block_size)
    for variant in flex_variants:
        if variant not in FLEX_VARIANTS:
            raise ValueError(f"Expected 'flex_variants' from {FLEX_VARIANTS} (got {variant!r})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"Expected 'kv_heads' to divide heads={heads} (got {kv_heads})")
    if memory_budget is None:
        memory_budget = input_memory_budget(device)
    elem = torch.tensor([], dtype=dtype).element_size()
    scale = 1.0 / math.sqrt(head_dim)
    rows = []

    def emit(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        for row in new_rows:
            if log:
                log(_format_row(row))

    passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
    settings = _Settings(
        backends,
        device,
        dtype,
        heads,
        kv_heads,
        head_dim,
        scale,
        repeats,
        backward,
        memory_budget,
        elem,
        flex_block,
        block_size,
        flex_variants,
        seed,
    )
    for topology in topologies:
        for n in sizes:
            t0 = time.perf_counter()
            try:
                graph = build_graph(topology, n, seed)
            except ValueError as exc:  # a spec that cannot be built at this size: report, go on
                emit(
                    [
                        dict(
                            topology=topology,
                            n=n,
                            edges=None,
                            density=None,
                            backend="-",
                            **{"pass": "-"},
                            ms=None,
                            peak_mb=None,
                            max_err=None,
                            build_ms=None,
                            note=f"not built: {exc}"[:120],
                        )
                    ]
                )
                continue
            t_graph = time.perf_counter() - t0
            if not isinstance(graph, LayerPattern):
                _graph_rows(topology, topology, graph, n, t_graph, settings, emit)
                continue
            layer_rows = []
            for layers, layer_graph in graph.distinct():  # each distinct layer graph once
                label = f"{topology} [{_layer_ranges(layers)}]"
                found: list[dict] = []

                def emit_layer(new: list[dict], found: list[dict] = found) -> None:
                    found.extend(new)
                    emit(new)

                # build_ms: the kernels' structures or the mask of this layer graph; the pattern's
                # construction is in the total
                _graph_rows(label, topology, layer_graph, n, 0.0, settings, emit_layer)
                layer_rows.append((layers, found))
            emit(_total_rows(topology, n, graph.period, layer_rows, passes, 1e3 * t_graph))
    return rows


class _Settings(NamedTuple):
    """What :func:`run_benchmark` was asked for, shared by every graph it times."""

    backends: Sequence[str]
    device: str
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    repeats: int
    backward: bool
    memory_budget: float
    elem: int
    flex_block: int
    block_size: int | None
    flex_variants: Sequence[str]
    seed: int


def _check_graph_heads(graph, topology: str, heads: int) -> None:
    """A ``ValueError`` naming ``heads`` unless a per-head graph's heads are ``0 .. heads - 1``."""
    if isinstance(graph, tuple) and graph[1].numel():
        top = int(graph[1].max()) + 1
        if top != heads:
            raise ValueError(
                f"Expected 'heads' to equal the {top} heads of the per-head topology {topology!r} (got heads={heads})"
            )


def _graph_rows(
    label: str, topology: str, graph, n: int, t_graph: float, settings: _Settings, emit: Callable[[list[dict]], object]
) -> None:
    """The rows of one graph (an edge set for every head, or a per-head pair ``(edge_index,
    edge_head)``) at size ``n``, passed to ``emit`` as they come; ``label`` names it in the rows,
    ``topology`` is its spec (for the predicate twins)."""
    st = settings
    device, heads, head_dim = st.device, st.heads, st.head_dim
    _check_graph_heads(graph, topology, heads)
    edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
    edge_index = edge_index.to(device)
    edge_head = None if edge_head is None else edge_head.to(device)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0], plain[1]
    num_edges = src.numel()
    # a per-head graph: the density of one head (its edges over H), as a graph for every head
    density = num_edges / float(n * n) / (1 if edge_head is None else heads)
    g = torch.Generator(device="cpu").manual_seed(st.seed)
    q, k, v = (
        torch.randn(n, h, head_dim, generator=g).to(device=device, dtype=st.dtype)
        for h in (heads, st.kv_heads, st.kv_heads)
    )
    ref = None
    if _fits(n, num_edges, "reference", heads, head_dim, st.memory_budget, 4) is None:
        ref = _if_memory(functools.partial(_dense_reference, q, k, v, src, dst, st.scale, edge_head), device)
    grad_out = torch.randn(n, heads, head_dim, generator=g).to(device=device, dtype=st.dtype)
    ref_grads = None  # (dQ, dK, dV), computed once for every backend where they fit
    if st.backward and _fits(n, num_edges, "reference_grads", heads, head_dim, st.memory_budget, 4) is None:
        ref_grads = _if_memory(
            functools.partial(_dense_reference_grads, q, k, v, src, dst, st.scale, grad_out, edge_head), device
        )
    mode = None
    if "sdpa" in st.backends:
        mode = ("mask", (0, n)) if edge_head is not None else sdpa_mode(edge_index, n)
    case = _Case(q, k, v, grad_out, ref, ref_grads, device, st.repeats, st.backward)
    passes = ("fwd", "fwd+bwd") if st.backward else ("fwd",)
    for backend in st.backends:
        base = dict(topology=label, n=n, edges=num_edges, density=density, backend=backend)
        if backend == "flex":
            emit(
                _flex_rows(
                    base,
                    case,
                    topology,
                    edge_index,
                    src,
                    dst,
                    n,
                    st.scale,
                    st.flex_block,
                    st.flex_variants,
                    st.memory_budget,
                    t_graph,
                    edge_head,
                )
            )
            continue
        # on a per-head graph: one head per edge (pyg's messages), a dense mask per head (SDPA's)
        per_head = edge_head is not None
        skip = _fits(
            n,
            num_edges,
            backend,
            1 if per_head else heads,
            head_dim,
            st.memory_budget / (heads if per_head and backend == "sdpa" else 1),
            st.elem,
            None if mode is None else mode[0],
        )
        if skip is not None:
            emit([_untimed(base, p, skip) for p in passes])
            continue
        try:
            fn, build_s = _make(backend, edge_index, src, dst, n, q, k, v, st.scale, st.block_size, mode, edge_head)
        except Exception as exc:  # a backend missing on this platform: report, go on
            emit([_untimed(base, p, f"unavailable: {type(exc).__name__}: {exc}"[:120]) for p in passes])
            continue
        build_ms = 1e3 * (build_s + t_graph)  # graph, then the kernels' structures or the mask
        note = ""
        if backend == "auto":
            note = "ran " + _auto_kernel(edge_index, edge_head, q, k, st.block_size)
        emit(case.rows(base, fn, build_ms, note))


def _auto_kernel(edge_index, edge_head, q, k, block_size) -> str:
    """The kernel ``attend(..., backend="auto")`` runs (on a per-head graph: for its (head, token) nodes)."""
    if edge_head is None:
        return auto_kernel(edge_index, q.device, block_size=block_size, dtype=q.dtype, head_dim=q.size(-1))
    index, _ = head_inputs(q, k, edge_index, edge_head)
    return auto_kernel(
        index,
        q.device,
        block_size=block_size,
        dtype=q.dtype,
        head_dim=q.size(-1),
        num_src=k.size(0) * k.size(1),
        num_dst=q.size(0) * q.size(1),
    )


def _layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 4]`` -> ``"layers 0-2, 4"``; one layer: ``"layer 3"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text


def _total_rows(
    topology: str,
    n: int,
    period: int,
    layer_rows: list[tuple[list[int], list[dict]]],
    passes: Sequence[str],
    graph_ms: float,
) -> list[dict]:
    """Per backend and pass, the total over the ``period`` layers of one cycle of a per-layer spec:
    each distinct layer graph's time times the layers that use it, its build once (plus
    ``graph_ms``, the construction of the pattern), the largest peak and error; ``ms`` stays empty
    when a layer graph has none."""
    label = f"{topology} [total, {period} layers]"
    out = []
    backends = dict.fromkeys(r["backend"] for _, rows in layer_rows for r in rows if r["backend"] != "-")
    edges = sum(len(layers) * (rows[0]["edges"] or 0) for layers, rows in layer_rows if rows)
    density = sum(len(layers) * (rows[0]["density"] or 0) for layers, rows in layer_rows if rows) / period
    for backend in backends:
        for p in passes:
            parts = []
            for layers, rows in layer_rows:
                row = next((r for r in rows if r["backend"] == backend and r["pass"] == p), None)
                parts.append((layers, row))
            missing = [_layer_ranges(layers) for layers, row in parts if row is None or row["ms"] is None]
            base = dict(topology=label, n=n, edges=edges, density=density, backend=backend, **{"pass": p})
            if missing:
                out.append(
                    dict(
                        base,
                        ms=None,
                        peak_mb=None,
                        max_err=None,
                        build_ms=None,
                        note="no total: no time for " + "; ".join(missing),
                    )
                )
                continue
            timed = [(layers, row) for layers, row in parts if row is not None]
            errors = [row["max_err"] for _, row in timed if row["max_err"] is not None]
            builds = [row["build_ms"] for _, row in timed if row["build_ms"] is not None]
            out.append(
                dict(
                    base,
                    ms=sum(len(layers) * row["ms"] for layers, row in timed),
                    peak_mb=max(row["peak_mb"] for _, row in timed),
                    max_err=max(errors) if len(errors) == len(timed) else None,
                    build_ms=graph_ms + sum(builds) if len(builds) == len(timed) else None,
                    note="sum over layers: "
                    + " + ".join(f"{len(layers)} x {_layer_ranges(layers)}" for layers, _ in timed),
                )
            )
    return out


class _Case:
    """The inputs, references and timing settings of one graph and size."""

    def __init__(self, q, k, v, grad_out, ref, ref_grads, device, repeats, backward):
        self.q, self.k, self.v, self.grad_out = q, k, v, grad_out
        self.ref, self.ref_grads = ref, ref_grads
        self.device, self.repeats, self.backward = device, repeats, backward

    def rows(self, base: dict, fn, build_ms, note: str = "") -> list[dict]:
        """The ``fwd`` (and ``fwd+bwd``) rows of ``fn``: on inputs laid out once beforehand as
        ``fn.layout`` says (:func:`~.baselines.layout_functions`); ``fn.note`` (after its first
        call) overrides ``note``, ``fn.no_backward`` says why a backward pass cannot run."""
        to, back = layout_functions(fn)
        q, k, v, grad_out = (to(x) for x in (self.q, self.k, self.v, self.grad_out))
        device, repeats = self.device, self.repeats

        def fwd():
            with torch.no_grad():
                return fn(q, k, v)

        passes = ("fwd", "fwd+bwd") if self.backward else ("fwd",)
        try:
            out = fwd()
            err = None if self.ref is None else float((back(out).float() - self.ref).abs().max())
            del out
            t, peak = _measure(fwd, device, repeats)
        except Exception as exc:  # out of memory, a kernel the device refuses: report, go on
            _free(device)
            return [_untimed(base, p, f"failed: {type(exc).__name__}: {exc}"[:120], build_ms=build_ms) for p in passes]
        note = getattr(fn, "note", "") or note
        rows = [
            dict(base, **{"pass": "fwd"}, ms=1e3 * t, peak_mb=peak / 2**20, max_err=err, build_ms=build_ms, note=note)
        ]
        if not self.backward:
            return rows
        reason = getattr(fn, "no_backward", None)
        if reason:
            rows.append(_untimed(base, "fwd+bwd", f"unavailable: {reason}", build_ms=build_ms))
            return rows
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def fwd_bwd():
            out = fn(qg, kg, vg)
            return torch.autograd.grad(out, (qg, kg, vg), grad_out)

        try:
            grad_err = None
            if self.ref_grads is not None:  # the largest error of dQ, dK, dV
                grad_err = max(float((back(g).float() - r).abs().max()) for g, r in zip(fwd_bwd(), self.ref_grads))
            t, peak = _measure(fwd_bwd, device, repeats)
            rows.append(
                dict(
                    base,
                    **{"pass": "fwd+bwd"},
                    ms=1e3 * t,
                    peak_mb=peak / 2**20,
                    max_err=grad_err,
                    build_ms=build_ms,
                    note=note,
                )
            )
        except Exception as exc:
            _free(device)
            rows.append(_untimed(base, "fwd+bwd", f"failed: {type(exc).__name__}: {exc}"[:120], build_ms=build_ms))
        return rows


def _make(backend, edge_index, src, dst, n, q, k, v, scale, block_size=None, mode=None, edge_head=None):
    """``(fn(q, k, v) -> out, build seconds)`` for one backend (``mode``: :func:`.baselines.sdpa_mode`;
    ``edge_head``: a per-head graph)."""
    if backend in ("fused", "tiled", "auto"):
        # one head times the build of a graph for every head; a per-head graph's structures are
        # those of its (head, token) nodes, for every head at once
        hq, hk, hv = (x[:, :1] if edge_head is None else x for x in (q, k, v))
        hq, hk, hv = (x.detach().requires_grad_() for x in (hq, hk, hv))

        def one_head() -> float:  # a forward pass that will be differentiated: it builds the CSC too
            t0 = time.perf_counter()
            attend(hq, hk, hv, edge_index, scale=scale, backend=backend, block_size=block_size, edge_head=edge_head)
            _sync(q.device)
            return time.perf_counter() - t0

        one_head()  # compiles the kernels
        clear_cache()
        # builds and caches the CSR, CSC, tile lists and plan, then the same one-head forward pass
        # on the cached structures is subtracted
        build = one_head()
        build = max(build - one_head(), 0.0)
        return (
            lambda q, k, v: attend(
                q, k, v, edge_index, scale=scale, backend=backend, block_size=block_size, edge_head=edge_head
            )
        ), build
    if backend == "pyg":
        if edge_head is None:
            return (lambda q, k, v: attend_reference(q, k, v, edge_index, scale=scale)), 0.0

        def per_head(q, k, v):  # one head on (head, token) nodes, as the attention layer runs pyg
            index, _ = head_inputs(q, k, edge_index, edge_head)
            out = attend_reference(heads_to_nodes(q), heads_to_nodes(k), heads_to_nodes(v), index, scale=scale)
            return nodes_to_heads(out, q.size(1))

        return per_head, 0.0
    if backend == "sdpa":
        t0 = time.perf_counter()
        fn = make_sdpa(edge_index, src, dst, n, scale, *mode, edge_head=edge_head, num_heads=q.size(1))
        return fn, time.perf_counter() - t0
    raise ValueError(f"Expected 'backend' in {BACKENDS} (got {backend!r})")


def _flex_rows(
    base, case: _Case, topology, edge_index, src, dst, n, scale, flex_block, variants, budget, t_graph, edge_head=None
) -> list[dict]:
    """The ``flex`` rows: each of ``variants`` built, compiled and timed; per pass the fastest, its
    note naming the winner, the others' times and the reasons of those that cannot run."""
    results, reasons = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        try:
            block_mask = flex_block_mask(
                variant,
                topology,
                edge_index,
                src,
                dst,
                n,
                case.q.device,
                flex_block,
                budget / 4,
                edge_head,
                case.q.size(1),
            )
            build_ms = 1e3 * (time.perf_counter() - t0 + t_graph)
            fn = _flex(block_mask, bhnd(case.q), bhnd(case.k), bhnd(case.v), scale, case.backward)
        except Unavailable as exc:
            reasons[variant] = str(exc)
            continue
        except Exception as exc:  # Flex missing or refusing this mask: report, go on
            _free(case.q.device)
            reasons[variant] = f"{type(exc).__name__}: {exc}"[:100]
            continue
        results[variant] = {r["pass"]: r for r in case.rows(base, fn, build_ms)}
        block_mask = fn = None
    rows = []
    for p in ("fwd", "fwd+bwd") if case.backward else ("fwd",):
        timed = {v: r[p] for v, r in results.items() if r[p]["ms"] is not None}
        others = {v: r[p]["note"].removeprefix("unavailable: ") for v, r in results.items() if r[p]["ms"] is None}
        others.update(reasons)
        grouped: dict[str, list[str]] = {}  # variants by reason
        for v, reason in others.items():
            grouped.setdefault(reason, []).append(v)
        why = "; ".join(f"{', '.join(vs)}: {reason}" for reason, vs in grouped.items())
        if not timed:
            rows.append(_untimed(base, p, ("unavailable: " + why) if why else "unavailable"))
            continue
        best = min(timed, key=lambda v: timed[v]["ms"])
        times = ", ".join(f"{v} {_cell('ms', r['ms'])}" for v, r in timed.items())
        extra = timed[best]["note"]
        note = f"{best} fastest ({times})" + (f"; {extra}" if extra else "") + (f"; {why}" if why else "")
        rows.append(dict(timed[best], note=note, variant=best))
    return rows


def _flex(block_mask, q, k, v, scale, backward=True):
    """Compiled FlexAttention ``fn(q, k, v)`` on ``block_mask`` and ``[1, H, N, D]`` inputs, its
    kernels compiled here by one forward pass and, with ``backward`` (on CUDA), one forward +
    backward pass, with the first of :data:`FLEX_OPTIONS` that the GPU can run. ``fn.note`` names
    the options when they are not the defaults; on the CPU ``fn.no_backward`` says that
    FlexAttention has no backward pass there."""
    from torch.nn.attention.flex_attention import flex_attention

    for options in FLEX_OPTIONS:
        torch._dynamo.reset()  # a fresh compile per mask: no silent fallback to eager after recompiles
        compiled = torch.compile(flex_attention)

        def flex(q, k, v, compiled=compiled, options=options):
            return compiled(
                q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1), kernel_options=options
            )

        try:
            with torch.no_grad():
                flex(q, k, v)
            if backward and q.device.type == "cuda":  # no FlexAttention backward on the CPU
                grads = [x.detach().requires_grad_() for x in (q, k, v)]
                flex(*grads).sum().backward()
        except Exception as exc:
            if not out_of_resources(exc):
                raise
            failure = exc
            continue
        flex.note = "" if options is None else f"kernel_options={options}"
        flex.layout = "bhnd"
        if q.device.type != "cuda":
            flex.no_backward = f"FlexAttention has no backward pass on {q.device.type}"
        return flex
    raise failure


# ---------------------------------------------------------------- calibration
CALIBRATION_COLUMNS = (
    "topology",
    "n",
    "pass",
    "edges",
    "tiles",
    "fill",
    "fused_ms",
    "tiled_ms",
    "ns_per_edge",
    "ns_per_cell",
    "ratio",
)


def _calibration_setup(device, dtype, block_size) -> tuple[str, torch.dtype, int]:
    """Defaults of the calibrations: CUDA when there is one, bfloat16 there (float32 on the CPU), the
    tile size ``attend`` takes for that device and dtype."""
    check_block_size(block_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    return device, dtype, block_size or default_block_size(device, dtype)


def _calibration_call(
    topology: str, n: int, device, dtype, block: int, heads: int, head_dim: int, kv_heads: int | None, seed: int
):
    """``(edges, tiles, call)`` for one graph of a calibration: ``call(backend, pass, dropout_p=0)``
    runs ``attend`` on it (``"fwd"`` without gradients, ``"fwd+bwd"`` with the q/k/v gradients)."""
    clear_cache()
    edge_index = build_graph(topology, n, seed).to(device)
    graph = prepare(edge_index, n, n)
    num_edges, num_tiles = graph.num_edges, tile_stats(graph, block, block)[2].numel()
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(n, h, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for h in (heads, kv_heads or heads, kv_heads or heads)
    )
    grad_out = torch.randn(n, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(head_dim)

    def call(backend: str, p: str, dropout_p: float = 0.0) -> None:
        if p == "fwd":
            with torch.no_grad():
                attend(
                    q,
                    k,
                    v,
                    edge_index,
                    scale=scale,
                    backend=backend,
                    block_size=block,
                    dropout_p=dropout_p,
                    dropout_seed=seed,
                )
        else:
            out = attend(
                q,
                k,
                v,
                edge_index,
                scale=scale,
                backend=backend,
                block_size=block,
                dropout_p=dropout_p,
                dropout_seed=seed,
            )
            torch.autograd.grad(out, (q, k, v), grad_out)

    return num_edges, num_tiles, call


def calibrate_tile_cost(
    topologies: Sequence[str] = TOPOLOGIES,
    sizes: Sequence[int] = (4096,),
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    heads: int = 12,
    head_dim: int = 64,
    kv_heads: int | None = None,
    block_size: int | None = None,
    repeats: int = 3,
    backward: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Measure what ``auto``'s cost model (:data:`TILE_COST`) assumes: the time of one tile cell of
    the ``tiled`` backend relative to one edge of the ``fused`` backend.

    For each graph, ``ns_per_edge`` is the ``fused`` time over the edges and ``ns_per_cell`` the
    ``tiled`` time over the cells of its tiles (``tiles · B²``, whatever their fill); ``ratio`` is
    the second over the first. Returns the rows and, per pass (``"fwd"``, ``"fwd+bwd"``), the median
    ratio over the graphs: the value ``TILE_COST`` should hold for this device and dtype.
    """
    device, dtype, block = _calibration_setup(device, dtype, block_size)
    rows = []
    passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
    for topology in topologies:
        for n in sizes:
            num_edges, num_tiles, call = _calibration_call(
                topology, n, device, dtype, block, heads, head_dim, kv_heads, seed
            )
            for p in passes:
                ms = {b: 1e3 * _measure(functools.partial(call, b, p), device, repeats)[0] for b in ("fused", "tiled")}
                cells = num_tiles * block * block
                per_edge, per_cell = 1e6 * ms["fused"] / num_edges, 1e6 * ms["tiled"] / cells
                rows.append(
                    dict(
                        topology=topology,
                        n=n,
                        edges=num_edges,
                        tiles=num_tiles,
                        fill=num_edges / cells,
                        fused_ms=ms["fused"],
                        tiled_ms=ms["tiled"],
                        ns_per_edge=per_edge,
                        ns_per_cell=per_cell,
                        ratio=per_cell / per_edge,
                        **{"pass": p},
                    )
                )
                if log:
                    log(format_table(rows[-1:], CALIBRATION_COLUMNS).splitlines()[-1])
            call = None  # free its inputs
    suggested = {p: statistics.median(r["ratio"] for r in rows if r["pass"] == p) for p in passes}
    return rows, suggested


def calibrate_row_costs(
    rows: Sequence[dict],
    suggested: dict[str, float],
    n: int = 4096,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    heads: int = 12,
    head_dim: int = 64,
    kv_heads: int | None = None,
    block_size: int | None = None,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Measure the fixed costs of ``auto``'s model (:data:`ROW_COST`, :data:`MERGE_COST`), per target
    row in units of one fused edge (the median ``ns_per_edge`` of ``rows``, from
    :func:`calibrate_tile_cost`, whose ``suggested`` ratios price the cells).

    On ``n`` self-loops (one edge per row, ``B`` cells per row in the ``B × B`` diagonal tiles): ``fused``
    costs ``1 + ROW_COST["fused"]`` edges per row, ``tiled`` ``TILE_COST · B + ROW_COST["tiled"]``;
    the merge of two ``[n, heads, head_dim]`` partial results costs ``MERGE_COST``. Returns, per pass
    of ``suggested``, ``{"fused": ..., "tiled": ..., "merge": ...}`` (negative estimates read 0).
    """
    device, dtype, block = _calibration_setup(device, dtype, block_size)
    scale = 1.0 / math.sqrt(head_dim)
    clear_cache()
    loops = torch.arange(n, device=device).repeat(2, 1)  # [2, n]: i -> i
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, grad_out, other = (
        torch.randn(n, h, head_dim, generator=g).to(device=device, dtype=dtype)
        for h in (heads, kv_heads or heads, kv_heads or heads, heads, heads)
    )
    q, k, v, other = (x.requires_grad_() for x in (q, k, v, other))
    lse_a, lse_b = (torch.randn(n, heads, generator=g).to(device).requires_grad_() for _ in range(2))
    out = {}
    for p in suggested:
        backward = p == "fwd+bwd"
        per_edge = 1e-9 * statistics.median(r["ns_per_edge"] for r in rows if r["pass"] == p)

        def call(backend, backward=backward):
            with torch.set_grad_enabled(backward):
                if backend == "merge":
                    o, lse = merge_partials(q, lse_a, other, lse_b)
                    if backward:
                        torch.autograd.grad((o * grad_out).sum() + lse.sum(), (q, other, lse_a, lse_b))
                    return
                o = attend(q, k, v, loops, scale=scale, backend=backend, block_size=block)
                if backward:
                    torch.autograd.grad(o, (q, k, v), grad_out)

        unit = {
            b: _measure(functools.partial(call, b), device, repeats)[0] / (n * per_edge)
            for b in ("fused", "tiled", "merge")
        }
        out[p] = {
            "fused": max(0.0, unit["fused"] - 1.0),
            "tiled": max(0.0, unit["tiled"] - suggested[p] * block),
            "merge": max(0.0, unit["merge"]),
        }
    return out


def calibrate_dropout_cost(
    rows: Sequence[dict],
    *,
    dropout_p: float = 0.1,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    heads: int = 12,
    head_dim: int = 64,
    kv_heads: int | None = None,
    block_size: int | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Measure :data:`DROPOUT_COST`: what attention dropout (``dropout_p``) adds per fused edge and
    per tile cell, in units of one fused edge (the pass's median ``ns_per_edge`` of ``rows``), on the
    graphs of ``rows`` (from :func:`calibrate_tile_cost`, whose times without dropout it reuses).
    Returns, per pass of ``rows``, ``{"fused": ..., "tiled": ...}``: the median over the graphs of
    ``(time with dropout - time without) / (edges or cells · unit)`` (negative estimates read 0)."""
    device, dtype, block = _calibration_setup(device, dtype, block_size)
    extra: dict[str, dict[str, list[float]]] = {}
    units = {
        p: 1e-6 * statistics.median(r["ns_per_edge"] for r in rows if r["pass"] == p)
        for p in dict.fromkeys(r["pass"] for r in rows)
    }  # ms per fused edge
    for topology, n in dict.fromkeys((r["topology"], r["n"]) for r in rows):
        num_edges, num_tiles, call = _calibration_call(
            topology, n, device, dtype, block, heads, head_dim, kv_heads, seed
        )
        for r in (r for r in rows if (r["topology"], r["n"]) == (topology, n)):
            p, per = r["pass"], extra.setdefault(r["pass"], {"fused": [], "tiled": []})
            for backend, items, plain in (
                ("fused", num_edges, r["fused_ms"]),
                ("tiled", num_tiles * block * block, r["tiled_ms"]),
            ):
                ms = 1e3 * _measure(lambda: call(backend, p, dropout_p), device, repeats)[0]
                per[backend].append((ms - plain) / (items * units[p]))
        call = None  # free its inputs
    return {p: {b: max(0.0, statistics.median(values)) for b, values in per.items()} for p, per in extra.items()}


def current_costs(device: str) -> tuple[float, dict[str, float], float, dict[str, float]]:
    """``(TILE_COST, ROW_COST, MERGE_COST, DROPOUT_COST)`` that ``auto`` uses on ``device`` now."""
    kind = torch.device(device).type
    return (
        TILE_COST.get(kind, TILE_COST["cuda"]),
        ROW_COST.get(kind, ROW_COST["cuda"]),
        MERGE_COST.get(kind, MERGE_COST["cuda"]),
        DROPOUT_COST.get(kind, DROPOUT_COST["cuda"]),
    )


# ---------------------------------------------------------------- output
COLUMNS = ("topology", "n", "density", "backend", "pass", "ms", "peak_mb", "max_err", "build_ms", "note")


def ratio_cell(value: float) -> str:
    """A ratio of two times or peaks as the tables print it: ``1.57×``, ``23.2×``."""
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def _cell(key, value):
    if value is None:
        return "—"
    if key in ("density", "fill"):
        return f"{100 * value:.2f}%"
    if key in ("ms", "build_ms", "fused_ms", "tiled_ms", "ns_per_edge", "ns_per_cell"):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"
    if key == "peak_mb":
        return f"{value:.0f}"
    if key == "max_err":
        return f"{value:.1e}"
    if key == "ratio":
        return f"{value:.3f}"
    if key.endswith("_over_auto") or key.endswith("_over_flex"):
        return ratio_cell(value)
    if key in ("auto_ms", "baseline_ms"):
        return _cell("ms", value)
    return str(value)


def _format_row(row: dict, columns: Sequence[str] = COLUMNS, widths: dict[str, int] | None = None) -> str:
    cells = "  ".join(f"{_cell(c, row.get(c)):>{(widths or {}).get(c, 11)}}" for c in columns if c != "note")
    return cells + ("  " + row.get("note", "") if "note" in columns else "")


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """Plain-text table of the rows (columns at least 11 wide, wider for long cells such as
    topology specs)."""
    widths = {c: max([11, len(c)] + [len(_cell(c, r.get(c))) for r in rows]) for c in columns}
    head = "  ".join(f"{c:>{widths[c]}}" for c in columns if c != "note") + ("  note" if "note" in columns else "")
    return "\n".join([head] + [_format_row(r, columns, widths) for r in rows])


BASELINES = ("sdpa", "flex")  # what a user would run instead; the project's own backends are not baselines
AGAINST_COLUMNS = (
    "topology",
    "n",
    "pass",
    "auto_ms",
    "kernel",
    "fastest_baseline",
    "baseline_ms",
    "baseline_over_auto",
    "flex_over_auto",
    "flex_variant",
    "auto_peak_over_flex",
)


def _baseline_name(row: dict) -> str:
    """``"Flex (<variant>)"`` or ``"SDPA (<how it was called>)"``, from a timed baseline row."""
    if row["backend"] == "flex":
        return f"Flex ({row.get('variant') or str(row['note']).split(' fastest')[0]})"
    how = str(row.get("note") or "").split(";")[0].strip()
    return f"SDPA ({how})" if how else "SDPA"


def against_baselines(rows: Sequence[dict]) -> list[dict]:
    """``auto``'s time against the baselines of the same run: per topology, size and pass with a
    timed ``auto`` row, the fastest timed baseline (:data:`BASELINES`: SDPA as a user calls it, the
    fastest FlexAttention variant), named, and the ratios ``baseline ms / auto ms`` (above 1: ``auto``
    is faster), ``Flex ms / auto ms`` (with the variant that won), and ``auto``'s peak memory over
    Flex's. A ratio without the rows it needs is ``None``; the rows' notes say why a baseline did
    not run. The CLI prints it after the rows, and appends it to ``--markdown``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["topology"], row["n"], row["pass"]), []).append(row)
    out = []
    for (topology, n, pass_), group in groups.items():
        auto = next((r for r in group if r["backend"] == "auto" and r.get("ms") is not None), None)
        if auto is None:
            continue
        timed = [r for r in group if r["backend"] in BASELINES and r.get("ms") is not None]
        fastest = min(timed, key=lambda r: r["ms"], default=None)
        flex = next((r for r in timed if r["backend"] == "flex"), None)
        auto_peak, flex_peak = auto.get("peak_mb"), flex.get("peak_mb") if flex else None
        out.append(
            {
                "topology": topology,
                "n": n,
                "pass": pass_,
                "auto_ms": auto["ms"],
                "kernel": note[4:] if (note := str(auto.get("note") or "")).startswith("ran ") else None,
                "fastest_baseline": _baseline_name(fastest) if fastest else "none ran",
                "baseline_ms": fastest["ms"] if fastest else None,
                "baseline_over_auto": fastest["ms"] / auto["ms"] if fastest else None,
                "flex_over_auto": flex["ms"] / auto["ms"] if flex else None,
                "flex_variant": flex.get("variant") if flex else None,
                "auto_peak_over_flex": auto_peak / flex_peak if auto_peak is not None and flex_peak else None,
            }
        )
    return out


def format_markdown(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """Markdown table of the rows."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head] + body)
