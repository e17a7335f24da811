"""The ``tiled`` backend on the GPU: FlashAttention over a tile list, with per-tile masks.

Forward: one program per (query block, head) walks its tiles (``tile_ptr``), loads the key / value
block of each, computes the ``[Bq, Bk]`` scores with ``tl.dot`` (tensor cores for half precision),
masks them only when the tile is partial (or adds the edge bias of each cell), and keeps an online
softmax;
it writes the output block and the log-sum-exp.

Backward: ``dQ`` (and the edge-bias gradient) with one program per (query block, head) over the same
tiles; ``dK`` / ``dV`` with one program per (key block, key/value head) over the tiles sorted by key
block (:meth:`TileList.by_key`), summing its group's query heads inside the program. Query and key
blocks with far more tiles than the rest (global blocks) run in pieces, merged exactly afterwards
(:mod:`._pieces`). Deterministic, no atomics. Importing this module needs Triton; CPU tensors run
under ``TRITON_INTERPRET=1``.

Notation: ``Bq`` / ``Bk`` block sizes, ``H`` / ``H_kv`` query / key-value heads, ``D`` head dimension,
``E_t`` tiled edges.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _pieces
from .primitives import Kernel, kernel_attention
from .tiled_torch import tiled_backward, tiled_forward
from .tiling import TileList, triton_blocks
from .triton_common import (
    EXACT_ROWS_LSE,
    acc_type,
    canonical,
    dot,
    empty_outputs,
    keep,
    launch,
    load_scales,
    pivot_step,
    row_lse_pair,
    row_stats,
    row_terms,
    row_terms_at,
    store_row_terms,
    scalars,
    softmax_finish,
    softmax_step,
    upcast,
    work,
)


@triton.jit
def _tile_scores(
    q,
    k,
    TBIAS,
    MASKS,
    MASK_INDEX,
    CELL_EDGE,
    t,
    h,
    scale,
    H,
    BIAS: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores ``[Bq, Bk]`` of tile ``t`` for head ``h``: ``-inf`` where the tile has no edge.
    Without ``BIAS`` the tile's boolean mask (none for a full tile); with it, the edge bias ``[E_t,
    H]`` read through the edge of each cell (``CELL_EDGE [T, Bq, Bk]``, -1 where none)."""
    s = dot(q, tl.trans(k), ACC, UPCAST) * scale
    cells = tl.arange(0, BQ)[:, None] * BK + tl.arange(0, BK)[None, :]
    if BIAS:
        edge = tl.load(CELL_EDGE + t * BQ * BK + cells).to(tl.int64)
        s += tl.load(TBIAS + edge * H + h, mask=edge >= 0, other=float("-inf")).to(s.dtype)
    else:
        mi = tl.load(MASK_INDEX + t)  # a partial tile's mask; -1: a full tile, whose load is masked off
        # (predicated, not branched around: fewer registers, and no spills in float32)
        keep = tl.load(MASKS + tl.maximum(mi, 0) * BQ * BK + cells, mask=cells < tl.where(mi >= 0, BQ * BK, 0), other=1)
        s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def _key_block(K_BLOCK, t, hk, offs_d, N_SRC, D, stride_kn, stride_kh, BK: tl.constexpr):
    """``(offsets [Bk, D], mask)`` of the key / value rows of tile ``t``'s key block, head ``hk``."""
    offs_n = tl.load(K_BLOCK + t) * BK + tl.arange(0, BK)
    mask = (offs_n[:, None] < N_SRC) & (offs_d[None, :] < D)
    return offs_n[:, None] * stride_kn + hk * stride_kh + offs_d[None, :], mask


@triton.jit
def _keep_scales(CELL_EDGE, EDGE_IDS, t, h, SEED, THRESH, keep_scale, BQ: tl.constexpr, BK: tl.constexpr):
    """Dropout scales ``[Bq, Bk]`` of tile ``t``, head ``h``: ``keep_scale`` where the cell's edge
    (its position in the graph's target-sorted order) survives, else 0 (also where there is none)."""
    cells = tl.arange(0, BQ)[:, None] * BK + tl.arange(0, BK)[None, :]
    edge = tl.load(CELL_EDGE + t * BQ * BK + cells).to(tl.int64)
    position = tl.load(EDGE_IDS + tl.maximum(edge, 0)).to(tl.int64)
    kept = (edge >= 0) & keep(SEED, position, h, THRESH)
    return tl.where(kept, keep_scale, 0.0)


@triton.jit(do_not_specialize=["SEED", "THRESH"])  # a seed of 1 is not a constant
def _tiled_fwd(
    Q,
    K,
    V,
    TBIAS,
    MASKS,
    CELL_EDGE,
    OUT,
    LSE,
    LSE_LO,
    START,
    END,
    MAP,
    K_BLOCK,
    MASK_INDEX,
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
    N_DST,
    N_SRC,
    H,
    GROUP,
    D,
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    MAPPED: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qb, ob, t0, t1 = work(START, END, MAP, MAPPED)  # query block qb, output block ob
    scale, keep_scale = load_scales(SCALES, ACC)
    h = tl.program_id(1)
    hk = h // GROUP
    offs_m = qb * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = (offs_m[:, None] < N_DST) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=mmask, other=0.0)
    m_i = tl.full([BQ], float("-inf"), ACC)
    l_i = tl.zeros([BQ], ACC)
    acc = tl.zeros([BQ, BLOCK_D], ACC)
    for t in range(t0, t1):
        kv, nmask = _key_block(K_BLOCK, t, hk, offs_d, N_SRC, D, stride_kn, stride_kh, BK)
        k = tl.load(K + kv, mask=nmask, other=0.0)
        s = _tile_scores(q, k, TBIAS, MASKS, MASK_INDEX, CELL_EDGE, t, h, scale, H, BIAS, BQ, BK, ACC, UPCAST)
        m_i, l_i, corr, p = softmax_step(m_i, l_i, s)
        v = tl.load(V + kv, mask=nmask, other=0.0)
        if DROPOUT:  # the normalizer keeps every weight; the output only the kept ones
            p = p * _keep_scales(CELL_EDGE, EDGE_IDS, t, h, SEED, THRESH, keep_scale, BQ, BK)
        acc = acc * corr[:, None] + dot(p.to(v.dtype), v, ACC, UPCAST)
    out, lse, lo = softmax_finish(m_i, l_i, acc)
    offs_o = ob * BQ + tl.arange(0, BQ)
    tl.store(
        OUT + offs_o[:, None] * stride_on + h * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mmask
    )
    tl.store(LSE + offs_o * H + h, lse, mask=offs_m < N_DST)
    tl.store(LSE_LO + offs_o * H + h, lo, mask=offs_m < N_DST)


@triton.jit
def _tile_block(
    q,
    do,
    K,
    V,
    TBIAS,
    MASKS,
    MASK_INDEX,
    CELL_EDGE,
    K_BLOCK,
    EDGE_IDS,
    SEED,
    THRESH,
    t,
    h,
    hk,
    offs_d,
    N_SRC,
    D,
    stride_kn,
    stride_kh,
    H,
    scale,
    keep_scale,
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``(s, dp, k)`` of tile ``t`` for head ``h`` in the backward kernels over query blocks:
    scores ``[Bq, Bk]`` (``-inf`` off the edges), ``dp = dO v^T`` (times the dropout scales) and
    the key block."""
    kv, nmask = _key_block(K_BLOCK, t, hk, offs_d, N_SRC, D, stride_kn, stride_kh, BK)
    k = tl.load(K + kv, mask=nmask, other=0.0)
    v = tl.load(V + kv, mask=nmask, other=0.0)
    s = _tile_scores(q, k, TBIAS, MASKS, MASK_INDEX, CELL_EDGE, t, h, scale, H, BIAS, BQ, BK, ACC, UPCAST)
    dp = dot(do, tl.trans(v), ACC, UPCAST)
    if DROPOUT:
        dp = dp * _keep_scales(CELL_EDGE, EDGE_IDS, t, h, SEED, THRESH, keep_scale, BQ, BK)
    return s, dp, k


@triton.jit(do_not_specialize=["SEED", "THRESH"])
def _tiled_bwd_rows(
    Q,
    K,
    V,
    TBIAS,
    MASKS,
    CELL_EDGE,
    DO,
    OUT,
    DLSE,
    LSE,
    LSE_LO,
    DELTA,
    LSE_B,
    LO_B,
    TILE_PTR,
    K_BLOCK,
    MASK_INDEX,
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
    N_DST,
    N_SRC,
    H,
    GROUP,
    D,
    LIMIT,
    HAS_DLSE: tl.constexpr,
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The row terms of the backward pass for query block ``qb`` and head ``h``: ``(pivot, delta)``,
    and the log-sum-exp ``(LSE_B, LO_B)`` the gradient kernels recompute the weights from. A block
    whose log-sum-exps stay below ``LIMIT`` takes ``pivot = 0``, ``delta_i = dO_i . O_i - dlse_i``
    and the forward's log-sum-exp. A block with a larger one walks its tiles once more and
    recomputes them all from the scores the gradient kernels compute (an online softmax whose ``w``
    sums ``p (dp - pivot)``, the pivot being ``dp`` at each row's largest score so far): their
    weights then sum to 1, a saturated row (one weight 1) gets ``ds = 0`` exactly, and a nearly
    saturated one ``dp_top - delta`` without cancellation (module :mod:`.fused_torch` says why)."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    scale, keep_scale = load_scales(SCALES, ACC)
    offs_m = qb * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_m < N_DST
    mmask = rmask[:, None] & (offs_d[None, :] < D)
    rows = offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
    do = tl.load(DO + rows, mask=mmask, other=0.0)
    o = tl.load(OUT + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :], mask=mmask, other=0.0)
    lse, lo = row_lse_pair(LSE, LSE_LO, offs_m * H + h, rmask, ACC)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    pivot = tl.zeros([BQ], ACC)
    if tl.max(tl.where(rmask, tl.abs(lse), 0.0), axis=0) >= LIMIT:
        q = tl.load(Q + rows, mask=mmask, other=0.0)
        m_i = tl.full([BQ], float("-inf"), ACC)
        l_i = tl.zeros([BQ], ACC)
        w_i = tl.zeros([BQ], ACC)  # sum of p (dp - pivot)
        t0 = tl.load(TILE_PTR + qb)
        t1 = tl.load(TILE_PTR + qb + 1)
        for t in range(t0, t1):
            s, dp, k = _tile_block(
                q,
                do,
                K,
                V,
                TBIAS,
                MASKS,
                MASK_INDEX,
                CELL_EDGE,
                K_BLOCK,
                EDGE_IDS,
                SEED,
                THRESH,
                t,
                h,
                hk,
                offs_d,
                N_SRC,
                D,
                stride_kn,
                stride_kh,
                H,
                scale,
                keep_scale,
                BIAS,
                DROPOUT,
                BQ,
                BK,
                ACC,
                UPCAST,
            )
            pivot_new = pivot_step(m_i, pivot, s, dp, 1)
            m_i, l_new, corr, p = softmax_step(m_i, l_i, s)
            # re-centred on the new pivot: the edges summed so far carry little weight where it moves far
            w_i = (w_i + (pivot - pivot_new) * l_i) * corr + tl.sum(p * (dp - pivot_new[:, None]), axis=1)
            l_i = l_new
            pivot = pivot_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        delta = w_i / l_safe
        lse = tl.where(m_i == float("-inf"), 0.0, m_i)
        lo = tl.log(l_safe)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + offs_m * H + h, mask=rmask, other=0.0).to(ACC)
    store_row_terms(DELTA, offs_m * H + h, pivot, delta, rmask)
    tl.store(LSE_B + offs_m * H + h, lse, mask=rmask)
    tl.store(LO_B + offs_m * H + h, lo, mask=rmask)


@triton.jit(do_not_specialize=["SEED", "THRESH"])
def _tiled_bwd_dq(
    Q,
    K,
    V,
    TBIAS,
    MASKS,
    CELL_EDGE,
    DO,
    LSE,
    LSE_LO,
    DELTA,
    DQ,
    DTBIAS,
    START,
    END,
    MAP,
    K_BLOCK,
    MASK_INDEX,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    N_DST,
    N_SRC,
    H,
    GROUP,
    D,
    BIAS: tl.constexpr,
    WRITE_DTBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    MAPPED: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qb, ob, t0, t1 = work(START, END, MAP, MAPPED)  # query block qb, output block ob
    scale, keep_scale = load_scales(SCALES, ACC)
    h = tl.program_id(1)
    hk = h // GROUP
    offs_m = qb * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_m < N_DST
    mmask = rmask[:, None] & (offs_d[None, :] < D)
    rows = offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :]  # q, dO and dQ (block ob): one layout
    q = tl.load(Q + rows, mask=mmask, other=0.0)
    do = tl.load(DO + rows, mask=mmask, other=0.0)
    lse, lo, pivot, delta = row_stats(LSE, LSE_LO, DELTA, offs_m * H + h, rmask, ACC)
    dq = tl.zeros([BQ, BLOCK_D], ACC)
    cells = tl.arange(0, BQ)[:, None] * BK + tl.arange(0, BK)[None, :]
    for t in range(t0, t1):
        s, dp, k = _tile_block(
            q,
            do,
            K,
            V,
            TBIAS,
            MASKS,
            MASK_INDEX,
            CELL_EDGE,
            K_BLOCK,
            EDGE_IDS,
            SEED,
            THRESH,
            t,
            h,
            hk,
            offs_d,
            N_SRC,
            D,
            stride_kn,
            stride_kh,
            H,
            scale,
            keep_scale,
            BIAS,
            DROPOUT,
            BQ,
            BK,
            ACC,
            UPCAST,
        )
        p = tl.exp((s - lse[:, None]) - lo[:, None])  # [Bq, Bk], 0 where masked
        ds = p * ((dp - pivot[:, None]) - delta[:, None])
        if WRITE_DTBIAS:
            # each edge owns one cell: its gradient is written once, no atomics
            edge = tl.load(CELL_EDGE + t * BQ * BK + cells).to(tl.int64)
            tl.store(DTBIAS + edge * H + h, ds.to(DTBIAS.dtype.element_ty), mask=edge >= 0)
        dq += dot(ds.to(k.dtype), k, ACC, UPCAST)
    tl.store(DQ + rows + (ob - qb) * BQ * stride_qn, (dq * scale).to(DQ.dtype.element_ty), mask=mmask)


@triton.jit(do_not_specialize=["SEED", "THRESH"])
def _tiled_bwd_dkdv(
    Q,
    K,
    V,
    TBIAS,
    MASKS,
    CELL_EDGE,
    DO,
    LSE,
    LSE_LO,
    DELTA,
    DK,
    DV,
    START,
    END,
    MAP,
    ORDER,
    Q_BLOCK,
    MASK_INDEX,
    SCALES,
    EDGE_IDS,
    SEED,
    THRESH,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    N_DST,
    N_SRC,
    H,
    GROUP,
    D,
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    MAPPED: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kb, ob, i0, i1 = work(START, END, MAP, MAPPED)  # key block kb, output block ob
    scale, keep_scale = load_scales(SCALES, ACC)
    hk = tl.program_id(1)
    offs_n = kb * BK + tl.arange(0, BK)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = (offs_n[:, None] < N_SRC) & (offs_d[None, :] < D)
    cols = offs_n[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]  # k, v, dK and dV (block ob)
    k = tl.load(K + cols, mask=nmask, other=0.0)
    v = tl.load(V + cols, mask=nmask, other=0.0)
    dk = tl.zeros([BK, BLOCK_D], ACC)
    dv = tl.zeros([BK, BLOCK_D], ACC)
    for idx in range(i0, i1):
        t = tl.load(ORDER + idx)
        qb = tl.load(Q_BLOCK + t)
        offs_m = qb * BQ + tl.arange(0, BQ)
        rmask = offs_m < N_DST
        mmask = rmask[:, None] & (offs_d[None, :] < D)
        for g in range(GROUP):
            h = hk * GROUP + g
            rows = offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
            q = tl.load(Q + rows, mask=mmask, other=0.0)
            do = tl.load(DO + rows, mask=mmask, other=0.0)
            lse, lo = row_lse_pair(LSE, LSE_LO, offs_m * H + h, rmask, ACC)
            s = _tile_scores(q, k, TBIAS, MASKS, MASK_INDEX, CELL_EDGE, t, h, scale, H, BIAS, BQ, BK, ACC, UPCAST)
            p = tl.exp((s - lse[:, None]) - lo[:, None])  # [Bq, Bk]
            dp = dot(do, tl.trans(v), ACC, UPCAST)
            pd = p
            if DROPOUT:
                scales = _keep_scales(CELL_EDGE, EDGE_IDS, t, h, SEED, THRESH, keep_scale, BQ, BK)
                dp = dp * scales
                pd = p * scales
            pivot, delta = row_terms_at(DELTA, offs_m * H + h, rmask, ACC)
            ds = p * ((dp - pivot[:, None]) - delta[:, None])
            dv += dot(tl.trans(pd.to(do.dtype)), do, ACC, UPCAST)
            dk += dot(tl.trans(ds.to(q.dtype)), q, ACC, UPCAST)
    out_cols = cols + (ob - kb) * BK * stride_kn
    tl.store(DK + out_cols, (dk * scale).to(DK.dtype.element_ty), mask=nmask)
    tl.store(DV + out_cols, dv.to(DV.dtype.element_ty), mask=nmask)


def _options(dtype: torch.dtype, head_dim: int, lean: bool = False) -> dict:
    """Launch options by dtype and head dimension. Half precision runs on tensor cores with Triton's
    default pipelining, in 4 warps up to a head dimension of 64 and in 8 up to 128 (fewer spills in
    the ``dK``/``dV`` kernel with an edge bias); beyond, in 8 warps and one stage (about half the
    shared memory). Float32 (IEEE products, no TF32) and float64 run on CUDA cores, by default in
    tiles of 32 (``CUDA_CORE_BLOCK_SIZE``: tiles of 64 spill), in 8 warps and one stage (with
    pipelining, float64 needs more shared memory than an H100 has). ``lean`` asks for 8 warps and
    one stage everywhere (GPUs with less shared memory; see :func:`_falling_back`). ``python -m
    gnn_transformer.bench.compile_check`` prints what each specialization needs; docs/kernels.md
    has its table."""
    if dtype in (torch.float16, torch.bfloat16) and head_dim <= 128 and not lean:
        return dict(num_warps=4 if head_dim <= 64 else 8)
    return dict(num_warps=8, num_stages=1)


def _check_blocks(tiles: TileList) -> None:
    if not triton_blocks(tiles.block_q, tiles.block_k):
        raise ValueError(
            f"The Triton tiled kernels need power-of-two blocks of at least 16 (got "
            f"block_q={tiles.block_q}, block_k={tiles.block_k}); impl=None runs other "
            "block sizes through the PyTorch tiled path"
        )


def _common(tiles: TileList, tbias: Tensor | None, dim: int, dropout: tuple[float, int] | None):
    """``(masks, cell edges, head-dim block)`` of a launch."""
    masks = (
        tiles.masks.view(torch.uint8)
        if tiles.masks.numel()
        else torch.ones(1, dtype=torch.uint8, device=tiles.masks.device)
    )
    need_cells = tbias is not None or dropout is not None
    cell_edge = tiles.cell_edge() if need_cells else masks  # unused unless needed
    return masks, cell_edge, max(16, triton.next_power_of_2(dim))


def _scalar_args(
    tiles: TileList, scale: float, dropout: tuple[float, int] | None, dtype: torch.dtype, device: torch.device
) -> tuple:
    """``(scales, edge ids, seed, threshold)`` kernel arguments (see :func:`.triton_common.scalars`)."""
    values, seed, thresh = scalars(scale, dropout, dtype, device)
    return values, tiles.edge_ids, seed, thresh


def tiled_triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: TileList,
    tbias: Tensor | None,
    scale: float,
    lean: bool = False,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [N_dst, H, D], lse [N_dst, H], lse_lo [N_dst, H])`` over the tiles (see
    :mod:`.primitives`); ``tbias`` is the edge bias ``[E_t, H]`` of the tiled edges, or ``None``."""
    _check_blocks(tiles)
    n_dst, num_heads, dim = q.shape
    out, lse, lse_lo = empty_outputs(q)
    acc_dtype = lse.dtype
    if n_dst == 0:
        return out, lse, lse_lo
    masks, cell_edge, block_d = _common(tiles, tbias, dim, dropout)
    drop = _scalar_args(tiles, scale, dropout, acc_dtype, q.device)
    pieces = _pieces.cached_pieces(tiles.launch_cache, "q_blocks", tiles.tile_ptr, "tiles", tiles.num_tiles, num_heads)
    tb_arg = tbias if tbias is not None else lse  # unused without a bias

    def run(blocks, out, lse, lse_lo, start, end, block_map, mapped):
        launch(
            _tiled_fwd,
            (blocks, num_heads),
            q,
            k,
            v,
            tb_arg,
            masks,
            cell_edge,
            out,
            lse,
            lse_lo,
            start,
            end,
            block_map,
            tiles.k_block,
            tiles.mask_index,
            *drop,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            out.stride(0),
            out.stride(1),
            n_dst,
            k.size(0),
            num_heads,
            num_heads // k.size(1),
            dim,
            BIAS=tbias is not None,
            DROPOUT=dropout is not None,
            MAPPED=mapped,
            BQ=tiles.block_q,
            BK=tiles.block_k,
            BLOCK_D=block_d,
            ACC=acc_type(q.dtype),
            UPCAST=upcast(q),
            **_options(q.dtype, dim, lean),
        )

    _pieces.launch_rows(run, tiles.tile_ptr, pieces, (out, lse, lse_lo), acc_dtype, tiles.block_q, merge=True)
    return out, lse, lse_lo


def tiled_triton_backward(
    q,
    k,
    v,
    tiles: TileList,
    tbias,
    scale,
    out,
    lse,
    lse_lo,
    dout,
    dlse,
    need_bias_grad,
    lean: bool = False,
    dropout: tuple[float, int] | None = None,
):
    """``(dq, dk, dv, dbias)``, ``dbias`` of ``tbias``'s shape ``[E_t, H]``."""
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    acc_dtype = lse.dtype
    dout, out = dout.contiguous(), out.contiguous()
    masks, cell_edge, block_d = _common(tiles, tbias, dim, dropout)
    drop = _scalar_args(tiles, scale, dropout, acc_dtype, q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dtb = torch.zeros_like(tbias) if need_bias_grad else None
    delta = row_terms(n_dst, num_heads, acc_dtype, q.device)  # [N_dst, H, 2]: (pivot, delta)
    tb_arg = tbias if tbias is not None else delta
    common = dict(
        BIAS=tbias is not None,
        DROPOUT=dropout is not None,
        BQ=tiles.block_q,
        BK=tiles.block_k,
        BLOCK_D=block_d,
        ACC=acc_type(q.dtype),
        UPCAST=upcast(q),
        **_options(q.dtype, dim, lean),
    )
    if n_dst > 0:
        lse_b = torch.empty(n_dst, num_heads, dtype=acc_dtype, device=q.device)  # [N_dst, H]
        lo_b = torch.empty_like(lse_b)
        dlse_arg = dlse.to(acc_dtype).contiguous() if dlse is not None else delta
        launch(
            _tiled_bwd_rows,
            (tiles.num_q_blocks, num_heads),
            q,
            k,
            v,
            tb_arg,
            masks,
            cell_edge,
            dout,
            out,
            dlse_arg,
            lse,
            lse_lo,
            delta,
            lse_b,
            lo_b,
            tiles.tile_ptr,
            tiles.k_block,
            tiles.mask_index,
            *drop,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            out.stride(0),
            out.stride(1),
            n_dst,
            n_src,
            num_heads,
            num_heads // num_kv,
            dim,
            EXACT_ROWS_LSE[acc_dtype],
            HAS_DLSE=dlse is not None,
            **common,
        )
        lse, lse_lo = lse_b, lo_b
    if n_dst > 0:
        pieces = _pieces.cached_pieces(
            tiles.launch_cache, "q_blocks", tiles.tile_ptr, "tiles", tiles.num_tiles, num_heads
        )

        def run_dq(blocks, dq, start, end, block_map, mapped):
            launch(
                _tiled_bwd_dq,
                (blocks, num_heads),
                q,
                k,
                v,
                tb_arg,
                masks,
                cell_edge,
                dout,
                lse,
                lse_lo,
                delta,
                dq,
                dtb if dtb is not None else delta,
                start,
                end,
                block_map,
                tiles.k_block,
                tiles.mask_index,
                *drop,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                n_dst,
                n_src,
                num_heads,
                num_heads // num_kv,
                dim,
                WRITE_DTBIAS=dtb is not None,
                MAPPED=mapped,
                **common,
            )

        _pieces.launch_rows(run_dq, tiles.tile_ptr, pieces, (dq,), acc_dtype, tiles.block_q)
    if n_src > 0:
        order, k_ptr = tiles.by_key()
        pieces = _pieces.cached_pieces(tiles.launch_cache, "k_blocks", k_ptr, "tiles", tiles.num_tiles, num_kv)

        def run_dkdv(blocks, dk, dv, start, end, block_map, mapped):
            launch(
                _tiled_bwd_dkdv,
                (blocks, num_kv),
                q,
                k,
                v,
                tb_arg,
                masks,
                cell_edge,
                dout,
                lse,
                lse_lo,
                delta,
                dk,
                dv,
                start,
                end,
                block_map,
                order,
                tiles.q_block,
                tiles.mask_index,
                *drop,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                n_dst,
                n_src,
                num_heads,
                num_heads // num_kv,
                dim,
                MAPPED=mapped,
                **common,
            )

        _pieces.launch_rows(run_dkdv, k_ptr, pieces, (dk, dv), acc_dtype, tiles.block_k)
    return dq, dk, dv, dtb


_LEVEL: dict = {}  # (pass, device, dtype, head dim, bias form, dropout, blocks) -> 0 default, 1 lean, 2 PyTorch


def _falling_back(triton_fn, torch_fn, what: str):
    """``triton_fn`` with the default launch options, else with lean ones (8 warps, one stage: less
    shared memory), else ``torch_fn`` (the PyTorch tiled path, same arguments), as far as the GPU
    refuses launches for want of resources: shared memory grows with the head dimension and GPUs
    differ (227 KB per block on an H100, 99 KB on an RTX 4090). A kernel that Triton fails to
    compile (``PassManager::run failed``: Triton 3.6 on an H100 rejects the float64 kernels without
    an edge bias, "fp64 don't support largeK MMA") goes to ``torch_fn`` at once. The level that
    works is remembered per case; falling back to PyTorch warns once."""
    from triton.runtime.errors import OutOfResources

    def run(q, k, v, tiles, tbias, *rest, dropout=None):
        key = (
            what,
            q.device,
            q.dtype,
            q.size(-1),
            tbias is None,
            dropout is None,
            tiles.block_q,
            tiles.block_k,
        )  # shared memory grows with the blocks
        for level in range(_LEVEL.get(key, 0), 2):
            try:
                result = triton_fn(q, k, v, tiles, tbias, *rest, lean=level == 1, dropout=dropout)
            except OutOfResources as err:
                reason = f"need more {err.name} than this GPU has"
                detail = err
                continue
            except RuntimeError as err:  # the same code would fail again with lean options
                if "PassManager::run failed" not in str(err):
                    raise
                reason, detail = "do not compile on this GPU", err
                break
            _LEVEL[key] = level
            return result
        if _LEVEL.get(key) != 2:
            _LEVEL[key] = 2
            warnings.warn(
                f"The Triton tiled {what} kernels {reason} for head dim {q.size(-1)} in {q.dtype} "
                f"({detail}); running the PyTorch tiled path instead",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch_fn(q, k, v, tiles, tbias, *rest, dropout=dropout)

    return run


_forward = _falling_back(tiled_triton_forward, tiled_forward, "forward")
_backward = _falling_back(tiled_triton_backward, tiled_backward, "backward")

# the edge bias comes before the tile list in the shared kernel signature
TRITON_TILED = Kernel(
    lambda q, k, v, tb, tiles, scale, **o: _forward(q, k, v, tiles, tb, scale, **o),
    lambda q, k, v, tb, tiles, scale, *rest, **o: _backward(q, k, v, tiles, tb, scale, *rest, **o),
)


def tiled_triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: TileList,
    tbias: Tensor | None,
    scale: float,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``(out, lse, lse_lo)`` of the Triton tiled kernels, ``dropout = (p, seed)``."""
    tb = None if tbias is None else tbias.contiguous()
    return kernel_attention(TRITON_TILED, canonical(q), canonical(k), canonical(v), tb, tiles, scale, dropout=dropout)
