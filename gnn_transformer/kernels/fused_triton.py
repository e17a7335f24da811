"""The ``fused`` backend on the GPU: Triton kernels over the target-sorted CSR.

Forward: one program per (target ``i``, head ``h``) walks the edges ``rowptr[i]:rowptr[i+1]`` in
blocks of ``BLOCK_E``, gathers ``k_j`` / ``v_j`` by the source ids, and keeps an online softmax
(running max ``m``, running sum ``l``, running weighted sum ``acc``); it writes ``out_i = acc / l`` and
``lse_i = m + log l`` (``-inf`` and zeros for a row without edges).

Backward (``p = exp((s - lse_i) - lse_lo_i)``, ``ds = p ((dO_i . v_j - pivot_i) - delta_i)``, with
``pivot_i = 0`` and ``delta_i = dO_i . O_i - dlse_i`` except on rows of huge log-sum-exp, see
:func:`_csr_bwd_rows`):

- ``dQ`` (and ``dbias = ds``): one program per (target, head) over the CSR, like the forward;
- ``dK`` / ``dV``: one program per (source ``j``, key/value head) over the source-sorted CSC, summing
  the query heads of its group inside the program.

With attention dropout, the kept weights are scaled by ``1 / (1 - p)`` and the dropped ones are
zero in ``out`` and in ``dV``, and ``dp`` is masked the same way; the keep mask is a hash of (seed,
edge, head) recomputed in each kernel (:mod:`._dropout`). Every output element is written by exactly
one program: deterministic, no atomics. Half-precision
inputs accumulate in float32, float64 inputs in float64. Importing this module needs Triton; CPU
tensors run under ``TRITON_INTERPRET=1`` (slowly: tests only).

Targets (and, in ``dK`` / ``dV``, sources) with far more edges than the rest run in pieces over a
second launch of the same kernels, merged exactly afterwards (:mod:`._pieces`).

With grouped-query attention (``G > 1``) the forward and ``dQ`` kernels run one program per (target,
key/value head) instead: the ``G`` query heads form a ``[16+, D]`` tile, scores and weighted sums are
``tl.dot`` products, and each key and value row is gathered once per group rather than ``G`` times.

Notation: ``E`` edges, ``H`` / ``H_kv`` query / key-value heads, ``G = H // H_kv``, ``D`` head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _pieces
from .planner import CSRGraph
from .primitives import Kernel, compute_dtype, kernel_attention
from .triton_common import (
    EXACT_ROWS_LSE,
    acc_type,
    canonical,
    dot,
    empty_outputs,
    is_recording,
    keep,
    launch,
    load_scales,
    row_lse,
    row_lse_pair,
    row_stats,
    row_terms,
    row_terms_at,
    pivot_step,
    scalars,
    softmax_finish,
    softmax_step,
    store_row_terms,
    upcast,
    work,
)


@triton.jit
def _position(EDGE_IDS, e, emask, REMAP: tl.constexpr):
    """The dropout key of edges ``e`` (positions in this graph's target-sorted order): ``e`` itself,
    or with ``REMAP`` their positions in the whole graph (``EDGE_IDS``, split's fused part)."""
    if REMAP:
        return tl.load(EDGE_IDS + e, mask=emask, other=0)
    return e


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csr_fwd(
    Q,
    K,
    V,
    BIAS,
    OUT,
    LSE,
    LSE_LO,
    START,
    END,
    MAP,
    SRC,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_on,
    stride_oh,
    H,
    GROUP,
    D,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    MAPPED: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    i, o, start, end = work(START, END, MAP, MAPPED)
    scale, keep_scale = load_scales(SCALES, ACC)
    h = tl.program_id(1)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + i * stride_qn + h * stride_qh + offs_d, mask=dmask, other=0.0).to(ACC)  # [D]
    m = tl.full([1], float("-inf"), ACC)
    l = tl.zeros([1], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        j = tl.load(SRC + offs_e, mask=emask, other=0)
        kv = j[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]  # [BLOCK_E, D]
        mask2 = emask[:, None] & dmask[None, :]
        k = tl.load(K + kv, mask=mask2, other=0.0).to(ACC)
        s = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_E]
        if HAS_BIAS:
            s += tl.load(BIAS + offs_e * H + h, mask=emask, other=0.0).to(ACC)
        s = tl.where(emask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.exp(m - m_use)
        p = tl.exp(s - m_use)
        l = l * corr + tl.sum(p, axis=0)
        v = tl.load(V + kv, mask=mask2, other=0.0).to(ACC)
        if DROPOUT:  # the normalizer l keeps every weight; the output only the kept ones
            p = tl.where(keep(SEED, _position(EDGE_IDS, offs_e, emask, REMAP), h, THRESH), p * keep_scale, 0.0)
        acc = acc * corr + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    lse, lo, nonempty, l_safe = row_lse(m, l)
    out = acc / l_safe
    tl.store(OUT + o * stride_on + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=dmask)
    tl.store(LSE + o * H + h + tl.arange(0, 1), lse)
    tl.store(LSE_LO + o * H + h + tl.arange(0, 1), lo)


@triton.jit
def _edge_block(
    q,
    do,
    K,
    V,
    BIAS,
    SRC,
    EDGE_IDS,
    SEED,
    THRESH,
    offs_e,
    emask,
    h,
    hk,
    offs_d,
    dmask,
    stride_kn,
    stride_kh,
    H,
    scale,
    keep_scale,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    ACC: tl.constexpr,
):
    """``(s, dp, k)`` of a block of edges ``offs_e`` of one row and head in the per-head backward
    kernels: scores ``s`` (``-inf`` off the edges), ``dp = dO . v`` (times the dropout scale, 0 for
    dropped edges) and the keys ``[BLOCK_E, D]``."""
    j = tl.load(SRC + offs_e, mask=emask, other=0)
    kv = j[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]
    mask2 = emask[:, None] & dmask[None, :]
    k = tl.load(K + kv, mask=mask2, other=0.0).to(ACC)
    v = tl.load(V + kv, mask=mask2, other=0.0).to(ACC)
    s = tl.sum(k * q[None, :], axis=1) * scale
    if HAS_BIAS:
        s += tl.load(BIAS + offs_e * H + h, mask=emask, other=0.0).to(ACC)
    dp = tl.sum(v * do[None, :], axis=1)
    if DROPOUT:
        dp = tl.where(keep(SEED, _position(EDGE_IDS, offs_e, emask, REMAP), h, THRESH), dp * keep_scale, 0.0)
    return tl.where(emask, s, float("-inf")), dp, k


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csr_bwd_rows(
    Q,
    K,
    V,
    BIAS,
    DO,
    OUT,
    DLSE,
    LSE,
    LSE_LO,
    DELTA,
    LSE_B,
    LO_B,
    ROWPTR,
    SRC,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_on,
    stride_oh,
    H,
    GROUP,
    D,
    LIMIT,
    HAS_DLSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """The row terms of the backward pass for target ``i`` and head ``h``: ``(pivot, delta)``, and
    the log-sum-exp ``(LSE_B, LO_B)`` the gradient kernels recompute the weights from. A row whose
    log-sum-exp stays below ``LIMIT`` takes ``pivot = 0``, ``delta_i = dO_i . O_i - dlse_i`` and the
    forward's log-sum-exp. A larger one walks its edges once more with the per-edge scores of the
    per-head gradient kernels and recomputes them all (an online softmax whose ``w`` sums
    ``p (dp - pivot)``, the pivot being ``dp`` at the largest score so far): the weights those
    kernels recompute then sum to 1, a saturated row (one weight 1) gets ``ds = 0`` exactly, and a
    nearly saturated one ``dp_top - delta`` without cancellation (module :mod:`.fused_torch` says
    why)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    scale, keep_scale = load_scales(SCALES, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row = i * stride_qn + h * stride_qh + offs_d
    do = tl.load(DO + row, mask=dmask, other=0.0).to(ACC)
    o = tl.load(OUT + i * stride_on + h * stride_oh + offs_d, mask=dmask, other=0.0).to(ACC)
    lse, lo = row_lse_pair(LSE, LSE_LO, i * H + h, i >= 0, ACC)
    delta = tl.sum(do * o, axis=0)
    pivot = tl.zeros([1], ACC)
    if tl.abs(lse) >= LIMIT:
        q = tl.load(Q + row, mask=dmask, other=0.0).to(ACC)
        start = tl.load(ROWPTR + i)
        end = tl.load(ROWPTR + i + 1)
        m = tl.full([1], float("-inf"), ACC)
        l = tl.zeros([1], ACC)
        w = tl.zeros([1], ACC)  # sum of p (dp - pivot)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            emask = offs_e < end
            s, dp, k = _edge_block(
                q,
                do,
                K,
                V,
                BIAS,
                SRC,
                EDGE_IDS,
                SEED,
                THRESH,
                offs_e,
                emask,
                h,
                hk,
                offs_d,
                dmask,
                stride_kn,
                stride_kh,
                H,
                scale,
                keep_scale,
                HAS_BIAS,
                DROPOUT,
                REMAP,
                ACC,
            )
            pivot_new = pivot_step(m, pivot, s, dp, 0)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            corr = tl.exp(m - m_use)
            p = tl.exp(s - m_use)
            # re-centred on the new pivot: the edges summed so far carry little weight where it moves far
            w = (w + (pivot - pivot_new) * l) * corr + tl.sum(p * (dp - pivot_new), axis=0)
            l = l * corr + tl.sum(p, axis=0)
            m = m_new
            pivot = pivot_new
        l_safe = tl.where(l > 0, l, 1.0)
        delta = tl.sum(w / l_safe, axis=0)
        lse = tl.sum(tl.where(m == float("-inf"), 0.0, m), axis=0)
        lo = tl.sum(tl.log(l_safe), axis=0)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + i * H + h).to(ACC)
    idx = i * H + h + tl.arange(0, 1)
    store_row_terms(DELTA, idx, pivot, delta, idx >= 0)
    tl.store(LSE_B + i * H + h, lse)
    tl.store(LO_B + i * H + h, lo)


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csr_bwd_dq(
    Q,
    K,
    V,
    BIAS,
    DO,
    LSE,
    LSE_LO,
    DELTA,
    DQ,
    DBIAS,
    START,
    END,
    MAP,
    SRC,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    H,
    GROUP,
    D,
    HAS_BIAS: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    MAPPED: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    i, o, start, end = work(START, END, MAP, MAPPED)
    scale, keep_scale = load_scales(SCALES, ACC)
    h = tl.program_id(1)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row = i * stride_qn + h * stride_qh + offs_d  # q, dO and dQ (row o) share one layout
    q = tl.load(Q + row, mask=dmask, other=0.0).to(ACC)
    do = tl.load(DO + row, mask=dmask, other=0.0).to(ACC)
    lse, lo, pivot, delta = row_stats(LSE, LSE_LO, DELTA, i * H + h, i >= 0, ACC)
    dq = tl.zeros([BLOCK_D], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        s, dp, k = _edge_block(
            q,
            do,
            K,
            V,
            BIAS,
            SRC,
            EDGE_IDS,
            SEED,
            THRESH,
            offs_e,
            emask,
            h,
            hk,
            offs_d,
            dmask,
            stride_kn,
            stride_kh,
            H,
            scale,
            keep_scale,
            HAS_BIAS,
            DROPOUT,
            REMAP,
            ACC,
        )
        p = tl.exp((s - lse) - lo)  # padding lanes: exp(-inf) = 0
        ds = p * ((dp - pivot) - delta)  # [BLOCK_E]
        if WRITE_DBIAS:
            tl.store(DBIAS + offs_e * H + h, ds.to(DBIAS.dtype.element_ty), mask=emask)
        dq += tl.sum(ds[:, None] * k, axis=0)
    tl.store(DQ + row + (o - i) * stride_qn, (dq * scale).to(DQ.dtype.element_ty), mask=dmask)


@triton.jit
def _group_rows(i, hk, GROUP, D, stride_qn, stride_qh, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query heads of key/value head ``hk`` at target ``i`` (grouped kernels):
    ``(h [BLOCK_G], gmask, offs_d, dmask, qmask [BLOCK_G, D], rows)``, ``rows`` the offsets of
    ``q``, ``dO``, ``dQ`` and ``out`` (one layout)."""
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < GROUP
    h = hk * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = gmask[:, None] & dmask[None, :]
    return h, gmask, offs_d, dmask, qmask, i * stride_qn + h[:, None] * stride_qh + offs_d[None, :]


@triton.jit
def _group_start(
    SCALES,
    START,
    END,
    MAP,
    GROUP,
    D,
    stride_qn,
    stride_qh,
    MAPPED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """The prologue of the grouped kernels: target ``i`` (output row ``o``, see :func:`work`) and
    key/value head ``hk`` of this program, the scales, the edge range and the group's rows
    (:func:`_group_rows`)."""
    i, o, start, end = work(START, END, MAP, MAPPED)
    hk = tl.program_id(1)
    scale, keep_scale = load_scales(SCALES, ACC)
    h, gmask, offs_d, dmask, qmask, rows = _group_rows(i, hk, GROUP, D, stride_qn, stride_qh, BLOCK_G, BLOCK_D)
    return i, o, hk, scale, keep_scale, start, end, h, gmask, offs_d, dmask, qmask, rows


@triton.jit
def _group_scores(
    q,
    K,
    BIAS,
    SRC,
    offs_e,
    emask,
    hk,
    h,
    gmask,
    offs_d,
    dmask,
    stride_kn,
    stride_kh,
    H,
    scale,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores ``[BLOCK_G, BLOCK_E]`` of the group's query heads against a block of edges, with the
    key block's offsets, mask and keys: ``(s, kv, mask2, k)``; ``-inf`` off the edges."""
    j = tl.load(SRC + offs_e, mask=emask, other=0)
    kv = j[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]  # [BLOCK_E, D]
    mask2 = emask[:, None] & dmask[None, :]
    k = tl.load(K + kv, mask=mask2, other=0.0)
    s = dot(q, tl.trans(k), ACC, UPCAST) * scale
    if HAS_BIAS:
        s += tl.load(BIAS + offs_e[None, :] * H + h[:, None], mask=gmask[:, None] & emask[None, :], other=0.0).to(ACC)
    return tl.where(emask[None, :], s, float("-inf")), kv, mask2, k


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csr_fwd_grouped(
    Q,
    K,
    V,
    BIAS,
    OUT,
    LSE,
    LSE_LO,
    START,
    END,
    MAP,
    SRC,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_on,
    stride_oh,
    H,
    GROUP,
    D,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    MAPPED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_csr_fwd` for the ``GROUP`` query heads of one key/value head at once (grouped-query
    attention): one program per (target, key/value head) gathers each key and value row once for
    the whole group, and scores and weighted sums are ``tl.dot`` products of ``[BLOCK_G, .]``
    tiles (rows beyond ``GROUP`` masked)."""
    i, o, hk, scale, keep_scale, start, end, h, gmask, offs_d, dmask, qmask, rows = _group_start(
        SCALES, START, END, MAP, GROUP, D, stride_qn, stride_qh, MAPPED, BLOCK_G, BLOCK_D, ACC
    )
    q = tl.load(Q + rows, mask=qmask, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), ACC)
    l = tl.zeros([BLOCK_G], ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_D], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        s, kv, mask2, k = _group_scores(
            q,
            K,
            BIAS,
            SRC,
            offs_e,
            emask,
            hk,
            h,
            gmask,
            offs_d,
            dmask,
            stride_kn,
            stride_kh,
            H,
            scale,
            HAS_BIAS,
            ACC,
            UPCAST,
        )
        m, l, corr, p = softmax_step(m, l, s)
        v = tl.load(V + kv, mask=mask2, other=0.0)
        if DROPOUT:  # the normalizer l keeps every weight; the output only the kept ones
            position = _position(EDGE_IDS, offs_e, emask, REMAP)
            p = tl.where(keep(SEED, position[None, :], h[:, None], THRESH), p * keep_scale, 0.0)
        acc = acc * corr[:, None] + dot(p.to(v.dtype), v, ACC, UPCAST)
    out, lse, lo = softmax_finish(m, l, acc)
    tl.store(OUT + o * stride_on + h[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=qmask)
    tl.store(LSE + o * H + h, lse, mask=gmask)
    tl.store(LSE_LO + o * H + h, lo, mask=gmask)


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csr_bwd_dq_grouped(
    Q,
    K,
    V,
    BIAS,
    DO,
    LSE,
    LSE_LO,
    DELTA,
    DQ,
    DBIAS,
    START,
    END,
    MAP,
    SRC,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    H,
    GROUP,
    D,
    HAS_BIAS: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    MAPPED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_csr_bwd_dq` for the query heads of one key/value head at once (see
    :func:`_csr_fwd_grouped`)."""
    i, o, hk, scale, keep_scale, start, end, h, gmask, offs_d, dmask, qmask, rows = _group_start(
        SCALES, START, END, MAP, GROUP, D, stride_qn, stride_qh, MAPPED, BLOCK_G, BLOCK_D, ACC
    )
    q = tl.load(Q + rows, mask=qmask, other=0.0)
    do = tl.load(DO + rows, mask=qmask, other=0.0)
    lse, lo, pivot, delta = row_stats(LSE, LSE_LO, DELTA, i * H + h, gmask, ACC)
    dq = tl.zeros([BLOCK_G, BLOCK_D], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        s, kv, mask2, k = _group_scores(
            q,
            K,
            BIAS,
            SRC,
            offs_e,
            emask,
            hk,
            h,
            gmask,
            offs_d,
            dmask,
            stride_kn,
            stride_kh,
            H,
            scale,
            HAS_BIAS,
            ACC,
            UPCAST,
        )
        v = tl.load(V + kv, mask=mask2, other=0.0)
        cell = gmask[:, None] & emask[None, :]
        p = tl.exp(tl.where(cell, (s - lse[:, None]) - lo[:, None], float("-inf")))  # [BLOCK_G, BLOCK_E]
        dp = dot(do, tl.trans(v), ACC, UPCAST)  # [BLOCK_G, BLOCK_E]
        if DROPOUT:
            position = _position(EDGE_IDS, offs_e, emask, REMAP)
            dp = tl.where(keep(SEED, position[None, :], h[:, None], THRESH), dp * keep_scale, 0.0)
        ds = p * ((dp - pivot[:, None]) - delta[:, None])
        if WRITE_DBIAS:
            tl.store(DBIAS + offs_e[None, :] * H + h[:, None], ds.to(DBIAS.dtype.element_ty), mask=cell)
        dq += dot(ds.to(k.dtype), k, ACC, UPCAST)
    tl.store(DQ + rows + (o - i) * stride_qn, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _csc_bwd_dkdv(
    Q,
    K,
    V,
    BIAS,
    DO,
    LSE,
    LSE_LO,
    DELTA,
    DK,
    DV,
    START,
    END,
    MAP,
    CSC_PERM,
    DST,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    H,
    GROUP,
    D,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    REMAP: tl.constexpr,
    MAPPED: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    j, o, start, end = work(START, END, MAP, MAPPED)  # source j, output row o
    scale, keep_scale = load_scales(SCALES, ACC)
    hk = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col = j * stride_kn + hk * stride_kh + offs_d  # k, v, dK and dV (row o) share one layout
    k = tl.load(K + col, mask=dmask, other=0.0).to(ACC)
    v = tl.load(V + col, mask=dmask, other=0.0).to(ACC)
    dk = tl.zeros([BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_D], ACC)
    for e0 in range(start, end, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        emask = offs < end
        e = tl.load(CSC_PERM + offs, mask=emask, other=0)  # edge ids, target-sorted order
        i = tl.load(DST + e, mask=emask, other=0)
        mask2 = emask[:, None] & dmask[None, :]
        if DROPOUT:
            position = _position(EDGE_IDS, e, emask, REMAP)
        for g in range(GROUP):
            h = hk * GROUP + g
            rows = i[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
            q = tl.load(Q + rows, mask=mask2, other=0.0).to(ACC)  # [BLOCK_E, D]
            do = tl.load(DO + rows, mask=mask2, other=0.0).to(ACC)
            lse, lo = row_lse_pair(LSE, LSE_LO, i * H + h, emask, ACC)
            s = tl.sum(q * k[None, :], axis=1) * scale
            if HAS_BIAS:
                s += tl.load(BIAS + e * H + h, mask=emask, other=0.0).to(ACC)
            p = tl.exp(tl.where(emask, (s - lse) - lo, float("-inf")))
            dp = tl.sum(do * v[None, :], axis=1)
            if DROPOUT:
                kept = keep(SEED, position, h, THRESH)
                dp = tl.where(kept, dp * keep_scale, 0.0)
                pd = tl.where(kept, p * keep_scale, 0.0)
            else:
                pd = p
            pivot, delta = row_terms_at(DELTA, i * H + h, emask, ACC)
            ds = p * ((dp - pivot) - delta)
            dv += tl.sum(pd[:, None] * do, axis=0)
            dk += tl.sum(ds[:, None] * q, axis=0)
    out_col = col + (o - j) * stride_kn
    tl.store(DK + out_col, (dk * scale).to(DK.dtype.element_ty), mask=dmask)
    tl.store(DV + out_col, dv.to(DV.dtype.element_ty), mask=dmask)


BLOCK_E = 32


def _grouped(group: int, dim: int) -> dict | None:
    """Block sizes of the grouped kernels for ``group`` query heads per key/value head (``tl.dot``
    needs at least 16 rows and columns), or ``None`` for plain multi-head attention."""
    if group == 1:
        return None
    return dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(dim)))


def _edge_ids(graph: CSRGraph) -> Tensor:
    """The ``EDGE_IDS`` argument: the graph's positions in a larger graph, or a placeholder (the
    kernels read it only with ``REMAP``)."""
    return graph.edge_ids if graph.edge_ids is not None else graph.rowptr


def _grid_heads(num_heads: int, num_kv: int, dim: int) -> int:
    """Programs per row of the forward and ``dQ`` launches (key/value heads when grouped)."""
    return num_heads if _grouped(num_heads // num_kv, dim) is None else num_kv


def csr_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    graph: CSRGraph,
    scale: float,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [N_dst, H, D], lse [N_dst, H], lse_lo [N_dst, H])`` (see :mod:`.primitives`); ``bias``
    ``[E, H]`` in target-sorted edge order;
    ``dropout = (p, seed)`` drops attention weights (:mod:`._dropout`). Targets with far more edges
    than the rest run in pieces (:mod:`._pieces`)."""
    n_dst, num_heads, dim = q.shape
    group = num_heads // k.size(1)
    out, lse, lse_lo = empty_outputs(q)
    acc_dtype = lse.dtype
    if n_dst == 0:
        return out, lse, lse_lo
    bias_arg = bias.contiguous() if bias is not None else lse  # unused when HAS_BIAS is False
    scales, seed, thresh = scalars(scale, dropout, acc_dtype, q.device)
    pieces = _pieces.cached_pieces(
        graph.extras, "rows", graph.rowptr, "csr", graph.num_edges, _grid_heads(num_heads, k.size(1), dim)
    )

    def run(rows, out, lse, lse_lo, start, end, row_map, mapped):
        args = (
            q,
            k,
            v,
            bias_arg,
            out,
            lse,
            lse_lo,
            start,
            end,
            row_map,
            graph.src,
            scales,
            _edge_ids(graph),
            seed,
            thresh,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            out.stride(0),
            out.stride(1),
            num_heads,
            group,
            dim,
        )
        flags = dict(
            HAS_BIAS=bias is not None,
            DROPOUT=dropout is not None,
            REMAP=graph.edge_ids is not None,
            MAPPED=mapped,
            BLOCK_E=BLOCK_E,
            ACC=acc_type(q.dtype),
        )
        # one program per (target, key/value head): each key and value row gathered once per group
        _launch_heads(
            "forward",
            q,
            rows,
            k.size(1),
            _csr_fwd_grouped,
            _csr_fwd,
            args,
            flags,
            dict(flags, BLOCK_D=triton.next_power_of_2(dim)),
        )

    _pieces.launch_rows(run, graph.rowptr, pieces, (out, lse, lse_lo), acc_dtype, merge=True)
    return out, lse, lse_lo


_PER_HEAD: set = set()  # (pass, device, dtype, head dim, group): the GPU refused the grouped kernel


def _launch_heads(
    what: str,
    q: Tensor,
    rows: int,
    num_kv: int,
    grouped_kernel,
    per_head_kernel,
    args: tuple,
    grouped_flags: dict,
    per_head_flags: dict,
    per_head: bool = False,
) -> None:
    """The grouped kernel (grid ``(rows, H_kv)``) with several query heads per key/value head, else
    the per-head one (grid ``(rows, H)``): also where the GPU refuses the grouped launch for want of
    resources (its ``[BLOCK_G, D]`` tiles need more shared memory than GPUs below an H100 have for
    float64 or head dims from 128); that case is remembered and later calls go per head at once.
    ``per_head`` asks for the per-head kernel."""
    from triton.runtime.errors import OutOfResources

    num_heads, dim = q.shape[1:]
    grouped = _grouped(num_heads // num_kv, dim)
    key = (what, q.device, q.dtype, dim, num_heads // num_kv)
    if grouped is not None and key not in _PER_HEAD and not per_head:
        try:
            launch(grouped_kernel, (rows, num_kv), *args, UPCAST=upcast(q), **dict(grouped_flags, **grouped))
            return
        except OutOfResources:
            _PER_HEAD.add(key)
    launch(per_head_kernel, (rows, num_heads), *args, **per_head_flags)


def _grouped_rows(q: Tensor, k: Tensor, lse: Tensor, scale: float, limit: float) -> tuple[bool, bool]:
    """``(every_row, per_head)`` of a grouped-query backward, in one host read. The grouped forward
    scores with ``tl.dot``, the per-head kernels with per-edge sums, which differ in the last bits:
    ``per_head`` where some row's log-sum-exp reaches ``limit`` (those rows are recomputed from the
    per-head sums, which the grouped dQ kernel would not match); ``every_row`` (and so ``per_head``)
    where, for inputs in the accumulation dtype, a score's terms may reach ``limit``
    (``scale · max |q_i| · max |k_j|``): a cancelling score then differs between the two by a
    rounding of ``|q| |k|``, so every row's log-sum-exp is recomputed. Half-precision inputs round
    by far more than their scores do."""
    checks = [((lse.abs() >= limit) & torch.isfinite(lse)).any()]
    if k.numel() and compute_dtype(q.dtype) == q.dtype:
        bound = torch.linalg.vector_norm(q, dim=-1).amax() * torch.linalg.vector_norm(k, dim=-1).amax()
        checks.append(bound * abs(scale) >= limit)
    huge_lse, *cancel = torch.stack(checks).tolist()
    every_row = bool(cancel and cancel[0])
    return every_row, every_row or bool(huge_lse)


def csr_backward(
    q,
    k,
    v,
    bias,
    graph: CSRGraph,
    scale,
    out,
    lse,
    lse_lo,
    dout,
    dlse,
    need_bias_grad,
    dropout: tuple[float, int] | None = None,
):
    """``(dq, dk, dv, dbias)``; ``dbias`` in target-sorted edge order. Targets and sources with far
    more edges than the rest run in pieces (:mod:`._pieces`)."""
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    group = num_heads // num_kv
    acc_dtype = lse.dtype
    dout, out = dout.contiguous(), out.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.empty(graph.num_edges, num_heads, dtype=bias.dtype, device=q.device) if need_bias_grad else None
    delta = row_terms(n_dst, num_heads, acc_dtype, q.device)  # [N_dst, H, 2]: (pivot, delta)
    bias_arg = bias.contiguous() if bias is not None else delta
    block_d = triton.next_power_of_2(dim)
    scales, seed, thresh = scalars(scale, dropout, acc_dtype, q.device)
    flags = dict(
        HAS_BIAS=bias is not None,
        DROPOUT=dropout is not None,
        REMAP=graph.edge_ids is not None,
        BLOCK_E=BLOCK_E,
        BLOCK_D=block_d,
        ACC=acc_type(q.dtype),
    )
    per_head = False
    if n_dst > 0:
        limit = EXACT_ROWS_LSE[acc_dtype]
        every_row = False
        if group > 1 and not is_recording():  # (recording: no kernel runs, lse is unset)
            every_row, per_head = _grouped_rows(q, k, lse, scale, limit)
        lse_b = torch.empty(n_dst, num_heads, dtype=acc_dtype, device=q.device)  # [N_dst, H]
        lo_b = torch.empty_like(lse_b)
        dlse_arg = dlse.to(acc_dtype).contiguous() if dlse is not None else delta
        launch(
            _csr_bwd_rows,
            (n_dst, num_heads),
            q,
            k,
            v,
            bias_arg,
            dout,
            out,
            dlse_arg,
            lse,
            lse_lo,
            delta,
            lse_b,
            lo_b,
            graph.rowptr,
            graph.src,
            scales,
            _edge_ids(graph),
            seed,
            thresh,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            out.stride(0),
            out.stride(1),
            num_heads,
            group,
            dim,
            0.0 if every_row else limit,
            HAS_DLSE=dlse is not None,
            **flags,
        )
        lse, lse_lo = lse_b, lo_b  # the row kernel's (recomputed rows: from the per-head sums)
    if n_dst > 0:
        pieces = _pieces.cached_pieces(
            graph.extras, "rows", graph.rowptr, "csr", graph.num_edges, _grid_heads(num_heads, num_kv, dim)
        )

        def run_dq(rows, dq, start, end, row_map, mapped):
            args = (
                q,
                k,
                v,
                bias_arg,
                dout,
                lse,
                lse_lo,
                delta,
                dq,
                dbias if dbias is not None else delta,
                start,
                end,
                row_map,
                graph.src,
                scales,
                _edge_ids(graph),
                seed,
                thresh,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                num_heads,
                group,
                dim,
            )
            dq_flags = dict(flags, WRITE_DBIAS=dbias is not None, MAPPED=mapped)
            _launch_heads(
                "backward",
                q,
                rows,
                num_kv,
                _csr_bwd_dq_grouped,
                _csr_bwd_dq,
                args,
                dq_flags,
                dq_flags,
                per_head=per_head,
            )

        _pieces.launch_rows(run_dq, graph.rowptr, pieces, (dq,), acc_dtype)
    if n_src > 0:
        colptr, csc_perm = graph.csc()
        pieces = _pieces.cached_pieces(graph.extras, "columns", colptr, "csr", graph.num_edges, num_kv)

        def run_dkdv(cols, dk, dv, start, end, col_map, mapped):
            launch(
                _csc_bwd_dkdv,
                (cols, num_kv),
                q,
                k,
                v,
                bias_arg,
                dout,
                lse,
                lse_lo,
                delta,
                dk,
                dv,
                start,
                end,
                col_map,
                csc_perm,
                graph.dst,
                scales,
                _edge_ids(graph),
                seed,
                thresh,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                num_heads,
                group,
                dim,
                MAPPED=mapped,
                **flags,
            )

        _pieces.launch_rows(run_dkdv, colptr, pieces, (dk, dv), acc_dtype)
    return dq, dk, dv, dbias


# the source-sorted view (an argsort of E ids) is built in the forward pass, off the backward's peak
TRITON_CSR = Kernel(csr_forward, csr_backward, prepare=lambda graph, **_: graph.csc())


def csr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    graph: CSRGraph,
    scale: float,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``(out, lse, lse_lo)`` of the Triton CSR kernels; ``bias`` in target-sorted order."""
    return kernel_attention(TRITON_CSR, canonical(q), canonical(k), canonical(v), bias, graph, scale, dropout=dropout)
