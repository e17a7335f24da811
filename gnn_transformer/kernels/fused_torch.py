"""The ``fused`` backend off the GPU: bounded memory through sparse CSR products, one head and one
chunk of target rows at a time.

For one head ``h`` and one chunk of target rows (at most ``max_edges`` edges, whole rows), the scores
of the chunk's edges are a sampled dense-dense product (``torch.sparse.sampled_addmm``: ``q k^T`` only
at the edges, plus ``edge_bias``), the softmax runs over CSR segments, and the weighted sum of values
is a sparse-dense product ``P @ V``. Nothing of size ``[E, H, D]`` or ``[E, H]`` ever exists: the
working set is ``O(N·H·D + chunk)``. The backward pass recomputes the scores from the saved
log-sum-exp (FlashAttention's recipe):

    p_e = exp(s_e - lse_i),  dp_e = dO_i . v_j,  ds_e = p_e (dp_e - delta_i),  delta_i = dO_i . O_i - dlse_i
    dQ = scale · DS @ K (over targets),  dK = scale · DS^T @ Q,  dV = P^T @ dO (over sources),  dbias = DS

where the transposed products walk each chunk's edges sorted by source. The backward pass takes
``delta_i`` as the sum of ``p_e dp_e`` over the row's own recomputed edges, and normalizes each
row's ``p`` to sum to 1, rather than ``dO_i . O_i`` from the saved output: where the scores are
huge and a row's softmax is saturated (one weight 1, the rest 0), the true ``ds`` is 0, and only
a ``delta`` made of the same ``p`` and ``dp`` gives 0 (``dO_i . O_i`` differs from ``dp_e`` by a
rounding of ``|dO| |v|``, which ``dQ`` then multiplies by ``|K|``). ``dp`` is first centred on its
value at the row's largest score (``ds`` does not change: the ``p`` sum to 1), so that a nearly
saturated row's ``dp_top - delta_i``, a tiny difference of two large numbers, is computed from
the other edges' terms alone, without cancellation. Every product is a
deterministic CSR kernel; half-precision inputs are computed in float32. With attention dropout,
``P`` is multiplied by the keep scales ``m_e`` of :mod:`._dropout` (regenerated in the backward pass):
``out = (P∘M) V``, ``dp_e = m_e dO_i . v_j``, ``dV = (P∘M)^T dO``; ``delta`` and ``lse`` are unchanged.

Notation: ``E`` edges, ``R`` target rows of a chunk, ``H`` / ``H_kv`` query / key-value heads, ``D``
head dimension; ``T`` marks head-major copies ``[H, N, D]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ._dropout import keep_scale
from .planner import CSRGraph
from .primitives import Kernel, compute_dtype, finite_or_zero, kernel_attention, lse_pair, total_or_one

DEFAULT_MAX_EDGES = 1 << 19  # edges per chunk and head: 2 MiB of float32 scores (cache-sized)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


@dataclass(eq=False)
class RowChunk:
    """Whole target rows ``r0:r1`` holding the edges ``e0:e1`` of the target-sorted order."""

    r0: int
    r1: int
    e0: int
    e1: int
    crow: Tensor  # [R + 1] local row pointers
    col: Tensor  # [Ec] sources
    row: Tensor  # [Ec] local target of each edge

    def transposed(self, graph: CSRGraph) -> tuple[Tensor, Tensor, Tensor]:
        """``(t_crow [N_src + 1], t_col [Ec], t_perm [Ec])``: the chunk's edges sorted by source
        (pointers, local target of each, position in the chunk), which the backward pass walks for
        dK / dV. Built on first use (the forward pass asks when a gradient will be needed: see
        :data:`CHUNKED`), never for inference; cached."""
        if not hasattr(self, "_transposed"):
            if self.e0 == 0 and self.e1 == graph.num_edges:
                t_crow, t_perm = graph.csc()  # the whole graph: its (cached) source-sorted view
            else:
                t_perm = torch.argsort(self.col, stable=True)  # [Ec]
                t_crow = torch.zeros(graph.num_src + 1, dtype=torch.long, device=self.col.device)
                t_crow[1:] = torch.bincount(self.col, minlength=graph.num_src).cumsum(0)
            self._transposed = (t_crow, self.row[t_perm], t_perm)
        return self._transposed


def row_chunks(graph: CSRGraph, max_edges: int = DEFAULT_MAX_EDGES) -> list[RowChunk]:
    """Split the targets into runs of whole rows with at most ``max_edges`` edges (a single row with
    more edges is a chunk of its own); cached on the graph."""
    cache_key = ("row_chunks", max_edges)
    if cache_key in graph.extras:
        return graph.extras[cache_key]
    rowptr_cpu = graph.rowptr.cpu()
    n, e_total = graph.num_dst, graph.num_edges
    bounds = []
    r0 = 0
    while r0 < n:
        e0 = int(rowptr_cpu[r0])
        if e_total - e0 <= max_edges:
            r1 = n
        else:
            r1 = int(torch.searchsorted(rowptr_cpu, e0 + max_edges, right=True)) - 1
            r1 = max(r1, r0 + 1)
        bounds.append((r0, r1))
        r0 = r1
    chunks = []
    for r0, r1 in bounds:
        e0, e1 = int(rowptr_cpu[r0]), int(rowptr_cpu[r1])
        crow = graph.rowptr[r0 : r1 + 1] - e0  # [R + 1]
        col = graph.src[e0:e1].clone() if len(bounds) > 1 else graph.src  # [Ec], own storage
        row = graph.dst[e0:e1] - r0  # [Ec]
        chunks.append(RowChunk(r0, r1, e0, e1, crow, col, row))
    graph.extras[cache_key] = chunks
    return chunks


def _sampled(c: RowChunk, a: Tensor, b: Tensor, values: Tensor | None, alpha: float) -> Tensor:
    """``alpha * a_i . b_j (+ values_e)`` at the chunk's edges, ``[Ec]`` (a sampled matmul)."""
    n_src = b.size(0)
    if c.col.numel() > (c.r1 - c.r0) * n_src:
        # more parallel edges than cells (a multigraph): sampled_addmm refuses, gather instead
        out = (a[c.row] * b[c.col]).sum(-1) * alpha  # [Ec, D] per head only
        return out if values is None else out + values.to(out.dtype)
    if values is None:
        values = torch.zeros(c.col.numel(), dtype=a.dtype, device=a.device)
    sparse = _csr(c.crow, c.col, values.to(a.dtype).contiguous(), (c.r1 - c.r0, n_src))
    return torch.sparse.sampled_addmm(sparse, a, b.t(), beta=1.0, alpha=alpha).values()


def _scores(c: RowChunk, qT_h: Tensor, kT_h: Tensor, bias_h: Tensor | None, scale: float) -> Tensor:
    """``s_e = scale * q_i . k_j + b_e`` for the chunk's edges, ``[Ec]``."""
    return _sampled(c, qT_h, kT_h, bias_h, scale)


def _pivot(c: RowChunk, s: Tensor, dp: Tensor) -> Tensor:
    """``[Ec]``: each edge's row's ``dp`` at the row's largest score (the largest such ``dp`` on ties)."""
    top = torch.segment_reduce(s, "max", offsets=c.crow)  # [R]
    at_top = dp.masked_fill(s != top[c.row], float("-inf"))  # [Ec]
    return torch.segment_reduce(at_top, "max", offsets=c.crow)[c.row]


def _row_sums(c: RowChunk, p: Tensor) -> Tensor:
    """Each edge's row total of ``p [Ec]``, ``[Ec]`` (1 where a row's total is 0)."""
    total = torch.segment_reduce(p, "sum", offsets=c.crow)  # [R]
    return total_or_one(total)[c.row]


def _head_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).transpose(0, 1).contiguous()  # [N, H, D] -> [H, N, D]


def _keep(c: RowChunk, graph: CSRGraph, dropout: tuple[float, int] | None, h: int, dtype: torch.dtype) -> Tensor | None:
    """The chunk's dropout scales ``[Ec]`` of head ``h`` (``None`` without dropout), keyed by each
    edge's position in the target-sorted order (of the whole graph, for a part of one)."""
    if dropout is None:
        return None
    p, seed = dropout
    if graph.edge_ids is None:
        edges = torch.arange(c.e0, c.e1, device=c.col.device)
    else:
        edges = graph.edge_ids[c.e0 : c.e1]
    return keep_scale(seed, edges, h, p, dtype)


def chunked_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    graph: CSRGraph,
    scale: float,
    max_edges: int = DEFAULT_MAX_EDGES,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [N_dst, H, D] in q's dtype, lse [N_dst, H], lse_lo [N_dst, H])``; bias in target-sorted
    edge order. ``dropout = (p, seed)`` drops attention weights (``lse`` stays that of the softmax)."""
    cd = compute_dtype(q.dtype)
    n_dst, num_heads, dim = q.shape
    group = num_heads // k.size(1)
    outT = torch.zeros(num_heads, n_dst, dim, dtype=cd, device=q.device)  # [H, N_dst, D]
    lseT = torch.full((num_heads, n_dst), float("-inf"), dtype=cd, device=q.device)  # [H, N_dst]
    loT = torch.zeros(num_heads, n_dst, dtype=cd, device=q.device)  # [H, N_dst]
    if graph.num_edges > 0:
        qT, kT, vT = _head_major(q, cd), _head_major(k, cd), _head_major(v, cd)
        for c in row_chunks(graph, max_edges):
            for h in range(num_heads):
                hk = h // group
                bias_h = None if bias is None else bias[c.e0 : c.e1, h]
                s = _scores(c, qT[h, c.r0 : c.r1], kT[hk], bias_h, scale)  # [Ec]
                top = torch.segment_reduce(s, "max", offsets=c.crow)  # [R], -inf on empty rows
                top = finite_or_zero(top)
                e = torch.exp(s - top[c.row])  # [Ec]
                total = torch.segment_reduce(e, "sum", offsets=c.crow)  # [R]
                nonempty = total > 0
                safe = torch.where(nonempty, total, torch.ones_like(total))
                p = e / safe[c.row]  # [Ec]
                keep = _keep(c, graph, dropout, h, cd)
                pd = p if keep is None else p * keep  # [Ec]
                outT[h, c.r0 : c.r1] = _csr(c.crow, c.col, pd, (c.r1 - c.r0, graph.num_src)) @ vT[hk]
                lseT[h, c.r0 : c.r1], loT[h, c.r0 : c.r1] = lse_pair(top, total)
    # [N_dst, H, D] dense, [N_dst, H], [N_dst, H]
    return outT.transpose(0, 1).to(q.dtype).contiguous(), lseT.t().contiguous(), loT.t().contiguous()


def chunked_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    graph: CSRGraph,
    scale: float,
    out: Tensor,
    lse: Tensor,
    lse_lo: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    need_bias_grad: bool,
    max_edges: int = DEFAULT_MAX_EDGES,
    dropout: tuple[float, int] | None = None,
):
    """``(dq, dk, dv, dbias)`` from the saved ``out`` and ``lse`` (with ``lse_lo``); ``dbias`` in
    sorted edge order."""
    cd = compute_dtype(q.dtype)
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    group = num_heads // num_kv
    dqT = torch.zeros(num_heads, n_dst, dim, dtype=cd, device=q.device)  # [H, N_dst, D]
    dkT = torch.zeros(num_kv, n_src, dim, dtype=cd, device=q.device)  # [H_kv, N_src, D]
    dvT = torch.zeros(num_kv, n_src, dim, dtype=cd, device=q.device)  # [H_kv, N_src, D]
    dbias = None
    if need_bias_grad:
        dbias = torch.zeros(graph.num_edges, num_heads, dtype=cd, device=q.device)  # [E, H]
    if graph.num_edges > 0:
        qT, kT, vT, doT = (_head_major(x, cd) for x in (q, k, v, dout))
        dlseT = None if dlse is None else dlse.to(cd).t()  # [H, N_dst]
        lse_safe = lse.to(cd).t()  # [H, N_dst]
        lse_safe = finite_or_zero(lse_safe)
        loT = lse_lo.to(cd).t()  # [H, N_dst]: what rounding lse lost (module primitives)
        for c in row_chunks(graph, max_edges):
            size, size_t = (c.r1 - c.r0, n_src), (n_src, c.r1 - c.r0)
            for h in range(num_heads):
                hk = h // group
                bias_h = None if bias is None else bias[c.e0 : c.e1, h]
                s = _scores(c, qT[h, c.r0 : c.r1], kT[hk], bias_h, scale)  # [Ec]
                p = torch.exp((s - lse_safe[h, c.r0 : c.r1][c.row]) - loT[h, c.r0 : c.r1][c.row])  # [Ec]
                p = p / _row_sums(c, p)  # exactly normalized rows (module docstring)
                keep = _keep(c, graph, dropout, h, cd)  # once per head and chunk: dp and dV share it
                dp = _sampled(c, doT[h, c.r0 : c.r1], vT[hk], None, 1.0)  # [Ec]
                pd = p
                if keep is not None:
                    dp, pd = dp * keep, p * keep
                dp = dp - _pivot(c, s, dp)  # centred on the row's largest score (module docstring)
                delta = torch.segment_reduce(p * dp, "sum", offsets=c.crow)  # [R]
                if dlseT is not None:
                    delta = delta - dlseT[h, c.r0 : c.r1]
                ds = p * (dp - delta[c.row])  # [Ec]
                if dbias is not None:
                    dbias[c.e0 : c.e1, h] = ds
                dqT[h, c.r0 : c.r1] = (_csr(c.crow, c.col, ds, size) @ kT[hk]) * scale
                t_crow, t_col, t_perm = c.transposed(graph)
                ds_t, p_t = ds[t_perm], pd[t_perm]  # [Ec] in source order
                dkT[hk] += (_csr(t_crow, t_col, ds_t, size_t) @ qT[h, c.r0 : c.r1]) * scale
                dvT[hk] += _csr(t_crow, t_col, p_t, size_t) @ doT[h, c.r0 : c.r1]
    dq = dqT.transpose(0, 1).to(q.dtype)
    dk = dkT.transpose(0, 1).to(k.dtype)
    dv = dvT.transpose(0, 1).to(v.dtype)
    if dbias is not None:
        assert bias is not None  # a bias gradient is asked for only with a bias (module primitives)
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias


def _prepare(graph: CSRGraph, max_edges: int = DEFAULT_MAX_EDGES, **_) -> None:
    """The chunks' source-sorted views, built by a forward pass that will be differentiated."""
    for c in row_chunks(graph, max_edges):
        c.transposed(graph)


CHUNKED = Kernel(chunked_forward, chunked_backward, prepare=_prepare)


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    graph: CSRGraph,
    scale: float,
    max_edges: int = DEFAULT_MAX_EDGES,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``(out, lse, lse_lo)`` of the chunked path; ``bias`` in target-sorted edge order."""
    return kernel_attention(CHUNKED, q, k, v, bias, graph, scale, max_edges=max_edges, dropout=dropout)
