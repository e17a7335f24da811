"""The ``tiled`` backend in plain PyTorch: FlashAttention's tiling of a block-structured graph.

Query blocks with the same number of tiles are processed together: their key blocks are gathered
into ``[H, M, c·Bk, D]``, scores are one batched matmul ``[H, M, Bq, c·Bk]``, partial tiles are
masked (full tiles are not), and the softmax runs over each row of the gathered blocks. Work is
chunked so that one chunk's scores stay below ``max_cells`` entries. The backward pass recomputes
the scores from the saved log-sum-exp; ``dK`` / ``dV`` of a chunk are added to their key blocks.
The same tile list drives the Triton kernels (:mod:`.tiled_triton`) on the GPU.

Notation: ``M`` query blocks of a chunk, ``c`` tiles per query block, ``Bq`` / ``Bk`` block sizes,
``H`` heads (key / value heads are repeated to ``H`` here), ``D`` head dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dropout import keep_scales
from .primitives import Kernel, compute_dtype, finite_or_zero, kernel_attention, lse_pair, repeat_heads, total_or_one
from .tiling import TileList

DEFAULT_MAX_CELLS = 1 << 21  # score entries per chunk: 8 MiB of float32 (cache-sized temporaries)

# PyTorch's fused CPU attention returns the log-sum-exp the merge and the backward pass need; it is
# used for float32 on CPU when present, the plain matmul path otherwise (and for float64).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


# PyTorch's fused kernel returns the log-sum-exp rounded to float32, without what rounding lost;
# below this magnitude that is under 8e-6 (half its rounding step), above it a chunk runs the
# matmul path, which keeps the remainder (module primitives).
FLASH_LSE_LIMIT = 128.0


def _use_flash(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused CPU kernel runs: float32 computation (``dtype``) on the CPU."""
    return _FLASH is not None and _FLASH_BWD is not None and device.type == "cpu" and dtype == torch.float32


def _flash_mask(tiles: TileList, tb: Tensor | None, tids: Tensor, dtype) -> tuple[Tensor | None, Tensor | None]:
    """Additive mask ``[M, H_b, Bq, c·Bk]`` (or ``None``) and the non-empty rows ``[M, H_b, Bq]``
    (``H_b``: ``H`` with an edge bias, else 1; ``M`` is 1, broadcast, when every query block of the
    chunk has the same masks in the same places)."""
    if tb is not None:
        mask = _bias(tiles, tb, tids).transpose(0, 1)  # [M, H, Bq, c·Bk]
        return mask, torch.isfinite(mask).any(-1)
    mi = tiles.mask_index[tids]  # [M, c]
    if not bool((mi >= 0).any()):
        return None, None
    g, c = tids.shape
    pool = _mask_pool(tiles, dtype)
    if pool is not None:  # few distinct masks: one gather, straight into the layout of the scores
        additive, rows = pool  # [Bq, P + 1, Bk], [P + 1, Bq]
        idx = torch.where(mi >= 0, mi, rows.size(0) - 1)  # [M, c], the last entry a full tile's
        if g > 1 and bool((idx == idx[:1]).all()):  # one pattern for every query block: broadcast it
            idx, g = idx[:1], 1
        mask = additive[:, idx].permute(1, 0, 2, 3).reshape(g, tiles.block_q, c * tiles.block_k)
        return mask.unsqueeze(1), rows[idx].any(1).unsqueeze(1)
    keep = _mask(tiles, tids)  # [M, Bq, c·Bk]
    assert keep is not None
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return mask.unsqueeze(1), keep.any(-1).unsqueeze(1)


# a chunk: its query blocks [M], tile ids [M, c] and run of consecutive key blocks (_chunks)
Chunk = tuple[Tensor, Tensor, tuple[int, int] | None]

# the largest mask pool (cells) of _mask_pool: tile lists with more distinct masks build each chunk's
MAX_POOL_CELLS = 1 << 22


def _mask_pool(tiles: TileList, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """``(additive [Bq, P + 1, Bk], rows [P + 1, Bq])``: the masks as additive masks (0 or -inf,
    the last one a full tile's) in the layout a chunk gathers, and their non-empty rows; cached per
    dtype, ``None`` past ``MAX_POOL_CELLS`` cells (the tile lists of implicit graphs share a few masks)."""
    cache = tiles.__dict__.setdefault("_mask_pool", {})
    if dtype not in cache:
        p = tiles.masks.size(0)
        if (p + 1) * tiles.block_q * tiles.block_k > MAX_POOL_CELLS:
            cache[dtype] = None
        else:
            full = torch.ones(1, tiles.block_q, tiles.block_k, dtype=torch.bool, device=tiles.masks.device)
            keep = torch.cat([tiles.masks, full])  # [P + 1, Bq, Bk]
            additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
            cache[dtype] = (additive.transpose(0, 1).contiguous(), keep.any(-1))
    return cache[dtype]


def _chunks(tiles: TileList, num_heads: int, max_cells: int) -> list[Chunk]:
    """``[(query blocks [M], tile ids [M, c], run)]``: query blocks with ``c`` tiles each, chunked.
    ``run = (first, step)`` when query block ``g`` of the chunk reads the consecutive key blocks
    ``first + g * step ...`` (causal and window chunks): then :func:`_key_blocks` reads them in
    place instead of gathering a copy; ``None`` otherwise."""
    cache_key = ("chunks", num_heads, max_cells)
    cache = tiles.__dict__.setdefault("_chunks", {})
    if cache_key in cache:
        return cache[cache_key]
    per_block = (tiles.tile_ptr[1:] - tiles.tile_ptr[:-1]).cpu()  # [num_q_blocks]
    k_block = tiles.k_block.cpu()
    out = []
    for c in torch.unique(per_block).tolist():
        if c == 0:
            continue
        blocks = (per_block == c).nonzero().flatten()  # [G_all]
        step = max(1, max_cells // (num_heads * tiles.block_q * tiles.block_k * c))
        for g0 in range(0, blocks.numel(), step):
            qb = blocks[g0 : g0 + step]
            tids = tiles.tile_ptr[qb.to(tiles.tile_ptr.device)].unsqueeze(1) + torch.arange(
                c, device=tiles.tile_ptr.device
            )  # [M, c]
            out.append((qb.to(tiles.q_block.device), tids, _run(k_block[tids.cpu()])))
    cache[cache_key] = out
    return out


def _as_slice(qb: Tensor) -> Tensor | slice:
    """The query blocks ``qb [M]`` of a chunk as a slice when they are consecutive (a view where an
    index would copy, and a plain copy where an index would scatter), else as given."""
    if qb.numel() > 1 and qb.device.type == "cpu":
        first, last = int(qb[0]), int(qb[-1])
        if last - first + 1 == qb.numel() and bool((qb.diff() == 1).all()):
            return slice(first, last + 1)
    return qb


def _run(kb: Tensor) -> tuple[int, int] | None:
    """``(first, step)`` if the key blocks ``kb [M, c]`` are ``first + g * step + j``, else ``None``."""
    g, c = kb.shape
    first = int(kb[0, 0])
    step = int(kb[1, 0]) - first if g > 1 else 0
    want = first + step * torch.arange(g).unsqueeze(1) + torch.arange(c)  # [M, c]
    return (first, step) if step >= 0 and torch.equal(kb, want) else None


def _key_blocks(xB: Tensor, tiles: TileList, tids: Tensor, run: tuple[int, int] | None) -> Tensor:
    """The key blocks of a chunk's tiles, ``[H, M, c·Bk, D]`` from ``xB [H, nkb, Bk, D]``
    (contiguous): a strided view of ``xB`` for a ``run`` of consecutive blocks, else a gathered copy."""
    h, _, bk, d = xB.shape
    g, c = tids.shape
    if run is None:
        return xB[:, tiles.k_block[tids].flatten()].reshape(h, g, c * bk, d)
    first, step = run
    return xB.as_strided((h, g, c * bk, d), (xB.stride(0), step * bk * d, d, 1), xB.storage_offset() + first * bk * d)


def _mask(tiles: TileList, tids: Tensor) -> Tensor | None:
    """Boolean mask ``[M, Bq, c·Bk]`` of a chunk, or ``None`` when every tile is full."""
    mi = tiles.mask_index[tids]  # [M, c]
    if not bool((mi >= 0).any()):
        return None
    g, c = tids.shape
    m = torch.ones(g, c, tiles.block_q, tiles.block_k, dtype=torch.bool, device=tids.device)
    masked = mi >= 0  # [M, c]: the partial tiles
    m[masked] = tiles.masks[mi[masked]]
    return m.permute(0, 2, 1, 3).reshape(g, tiles.block_q, c * tiles.block_k)


def _bias(tiles: TileList, tbias: Tensor, tids: Tensor) -> Tensor:
    """Additive biases ``[H, M, Bq, c·Bk]`` of a chunk, from an edge bias ``[E_t, H]`` of the tiled
    edges read through the cells' edges (``-inf`` where none)."""
    g, c = tids.shape
    ce = tiles.cell_edge()[tids].long()  # [M, c, Bq, Bk]
    b = tbias[ce.clamp(min=0)].masked_fill((ce < 0).unsqueeze(-1), float("-inf"))  # [M, c, Bq, Bk, H]
    return b.permute(4, 0, 2, 1, 3).reshape(b.size(4), g, tiles.block_q, c * tiles.block_k)


def _bias_grad(tiles: TileList, dtb: Tensor, ds: Tensor, tids: Tensor) -> None:
    """Write the chunk's score gradients ``ds [H, M, Bq, c·Bk]`` into the edge bias gradient ``dtb
    [E_t, H]`` (each edge owns one cell: no sums, no atomics)."""
    h, g = ds.shape[:2]
    c = tids.size(1)
    d = ds.reshape(h, g, tiles.block_q, c, tiles.block_k)
    ce = tiles.cell_edge()[tids].long()  # [M, c, Bq, Bk]
    keep = ce >= 0
    dtb[ce[keep]] = d.permute(1, 3, 2, 4, 0)[keep].to(dtb.dtype)  # [M, c, Bq, Bk, H] at the edges


def _blocked(x: Tensor, block: int, num_blocks: int, cd: torch.dtype, extra: int = 0) -> Tensor:
    """``[N, H, D]`` -> zero-padded ``[H, num_blocks, block, D + extra]`` in ``cd`` (``extra`` zero
    channels after the ``D`` of ``x``)."""
    n, h, d = x.shape
    out = torch.zeros(h, num_blocks * block, d + extra, dtype=cd, device=x.device)
    out[:, :n, :d] = x.transpose(0, 1).to(cd)
    return out.view(h, num_blocks, block, d + extra)


def _unblocked(x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``[H, num_blocks, block, D]`` -> contiguous ``[N, H, D]``."""
    h, _, _, d = x.shape
    return x.reshape(h, -1, d)[:, :n].transpose(0, 1).to(dtype).contiguous()


def _keep_scales(
    tiles: TileList, tids: Tensor, num_heads: int, dropout: tuple[float, int], dtype: torch.dtype
) -> Tensor:
    """Dropout scales ``[H, M, Bq, c·Bk]`` of a chunk's cells: the hash of each cell's edge (its
    position in the graph's target-sorted order, as on the fused path), ``0`` where there is none."""
    p, seed = dropout
    g, c = tids.shape
    ce = tiles.cell_edge()[tids].long()  # [M, c, Bq, Bk]
    edge = tiles.edge_ids[ce.clamp(min=0)]  # graph positions
    scales = keep_scales(seed, edge, num_heads, p, dtype)  # [H, M, c, Bq, Bk]
    scales = scales.masked_fill((ce < 0).unsqueeze(0), 0.0)
    return scales.permute(0, 1, 3, 2, 4).reshape(num_heads, g, tiles.block_q, c * tiles.block_k)


def _scores(qB, kB, tiles, tbias, qb, tids, run, scale):
    q = qB[:, qb]  # [H, M, Bq, D]
    k = _key_blocks(kB, tiles, tids, run)  # [H, M, c·Bk, D]
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [H, M, Bq, c·Bk]
    if tbias is not None:
        s += _bias(tiles, tbias, tids)
    else:
        mask = _mask(tiles, tids)
        if mask is not None:
            s.masked_fill_(~mask, float("-inf"))
    return q, k, s


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: TileList,
    tbias: Tensor | None,
    scale: float,
    max_cells: int = DEFAULT_MAX_CELLS,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [N_dst, H, D], lse [N_dst, H], lse_lo [N_dst, H])`` over the tiles; ``tbias`` is the
    edge bias ``[E_t, H]`` of the tiled edges (``tiles.edge_ids``) or ``None``."""
    cd = compute_dtype(q.dtype)
    tb = None if tbias is None else tbias.to(cd)
    chunks = _chunks(tiles, q.size(1), max_cells)
    if _use_flash(q.device, cd) and dropout is None:
        out, lse, lse_lo, rest = _flash_forward(q, k, v, tiles, tb, scale, chunks)
        if rest:  # chunks whose log-sum-exp the fused kernel cannot keep exactly
            out_m, lse_m, lo_m = _matmul_forward(q, k, v, tiles, tb, scale, rest, None)
            rows = torch.cat([_block_rows(blocks, tiles.block_q, q.size(0)) for blocks, _, _ in rest])
            out[rows], lse[rows], lse_lo[rows] = out_m[rows], lse_m[rows], lo_m[rows]
        return out, lse, lse_lo
    return _matmul_forward(q, k, v, tiles, tb, scale, chunks, dropout)


def _block_rows(blocks: Tensor, block: int, n: int) -> Tensor:
    """The rows (below ``n``) of query blocks ``blocks [M]``."""
    rows = (blocks.unsqueeze(1) * block + torch.arange(block, device=blocks.device)).flatten()
    return rows[rows < n]


def _query_rows(shape, chunks: list[Chunk], num_q_blocks: int, dtype, device, zero: bool = False) -> Tensor:
    """A buffer of query rows the chunks fill: uninitialized when they write every query block
    (and ``zero`` is not asked for), else zeros (rows of query blocks without a tile stay 0)."""
    covered = sum(blocks.numel() for blocks, _, _ in chunks) == num_q_blocks
    return (torch.empty if covered and not zero else torch.zeros)(shape, dtype=dtype, device=device)


def _token_blocks(x: Tensor, block: int, num_blocks: int, cd: torch.dtype, group: int = 1, extra: int = 0) -> Tensor:
    """``x [N, H, D]`` as ``[num_blocks, block, H·group, D + extra]`` in ``cd`` (each head repeated
    ``group`` times, ``extra`` zero channels after ``D``): a view of ``x`` when nothing changes,
    else a zero-padded copy."""
    x = repeat_heads(x, group)
    n, h, d = x.shape
    if n == num_blocks * block and not extra and x.dtype == cd and x.is_contiguous():
        return x.view(num_blocks, block, h, d)
    out = torch.zeros(num_blocks * block, h, d + extra, dtype=cd, device=x.device)
    out[:n, :, :d] = x
    return out.view(num_blocks, block, h, d + extra)


def _token_key_blocks(xT: Tensor, tiles: TileList, tids: Tensor, run: tuple[int, int] | None) -> Tensor:
    """The key blocks of a chunk's tiles, ``[M, H, c·Bk, D]`` from ``xT [nkb, Bk, H, D]`` (contiguous):
    a strided view for a ``run`` of consecutive blocks, else a gathered copy."""
    _, bk, h, d = xT.shape
    g, c = tids.shape
    if run is None:
        return xT[tiles.k_block[tids].flatten()].view(g, c * bk, h, d).transpose(1, 2)
    first, step = run
    view = xT.as_strided((g, c * bk, h, d), (step * bk * h * d, h * d, d, 1), xT.storage_offset() + first * bk * h * d)
    return view.transpose(1, 2)


def _flash_forward(q, k, v, tiles: TileList, tb: Tensor | None, scale: float, chunks):
    """``(out, lse, lse_lo, rest)`` by PyTorch's fused CPU kernel, one call per chunk, in the
    tokens' own layout (``[N, H, D]`` viewed as query and key blocks, the kernel's native layout:
    no transposed copies); ``rest`` the chunks whose log-sum-exp reaches ``FLASH_LSE_LIMIT``,
    left for the matmul path."""
    n_dst, num_heads, dim = q.shape
    cd = torch.float32
    bq, nqb = tiles.block_q, tiles.num_q_blocks
    qT = _token_blocks(q, bq, nqb, cd)  # [nqb, Bq, H, D]
    group = num_heads // k.size(1)
    kT = _token_blocks(k, tiles.block_k, tiles.num_k_blocks, cd, group)  # [nkb, Bk, H, D]
    vT = _token_blocks(v, tiles.block_k, tiles.num_k_blocks, cd, group)  # [nkb, Bk, H, D]
    out = _query_rows((nqb * bq, num_heads, dim), chunks, nqb, cd, q.device)
    lse = torch.full((nqb * bq, num_heads), float("-inf"), dtype=cd, device=q.device)
    lse_lo = torch.zeros(n_dst, num_heads, dtype=cd, device=q.device)
    outT, lseT = out.view(nqb, bq, num_heads, dim), lse.view(nqb, bq, num_heads)
    rest: list[Chunk] = []
    assert _FLASH is not None  # _use_flash
    for blocks, tids, run in chunks:
        qb = _as_slice(blocks)
        mask, nonempty = _flash_mask(tiles, tb, tids, cd)
        keys, vals = _token_key_blocks(kT, tiles, tids, run), _token_key_blocks(vT, tiles, tids, run)
        o, lse_g = _FLASH(qT[qb].transpose(1, 2), keys, vals, attn_mask=mask, scale=scale)  # [M, H, Bq, D], [M, H, Bq]
        if nonempty is not None:  # rows without an edge: lse = -inf (the kernel says 0)
            lse_g = lse_g.masked_fill(~nonempty, float("-inf"))
        if float(torch.nan_to_num(lse_g, neginf=0.0).abs().max()) >= FLASH_LSE_LIMIT:
            rest.append((blocks, tids, run))
            continue
        outT[qb] = o.transpose(1, 2)
        lseT[qb] = lse_g.transpose(1, 2)
    out = out[:n_dst] if out.dtype == q.dtype else out[:n_dst].to(q.dtype)
    return out, lse[:n_dst], lse_lo, rest


def _matmul_forward(q, k, v, tiles: TileList, tb: Tensor | None, scale: float, chunks, dropout):
    """``(out, lse, lse_lo)`` of ``chunks`` by batched matmuls and an explicit softmax (rows of the
    query blocks of other chunks: no edges)."""
    cd = compute_dtype(q.dtype)
    n_dst, num_heads, dim = q.shape
    group = num_heads // k.size(1)
    nqb, nkb = tiles.num_q_blocks, tiles.num_k_blocks
    qB = _blocked(q, tiles.block_q, nqb, cd)  # [H, nqb, Bq, D]
    kB = _blocked(repeat_heads(k, group), tiles.block_k, nkb, cd)  # [H, nkb, Bk, D]
    vB = _blocked(repeat_heads(v, group), tiles.block_k, nkb, cd)  # [H, nkb, Bk, D]
    outB = torch.zeros_like(qB)  # [H, nqb, Bq, D]
    lseB = torch.full(qB.shape[:3], float("-inf"), dtype=cd, device=q.device)  # [H, nqb, Bq]
    loB = torch.zeros(qB.shape[:3], dtype=cd, device=q.device)  # [H, nqb, Bq]
    for blocks, tids, run in chunks:
        qb = _as_slice(blocks)
        _, _, s = _scores(qB, kB, tiles, tb, qb, tids, run, scale)  # [H, M, Bq, c·Bk]
        top = s.amax(-1, keepdim=True)
        top = finite_or_zero(top)
        e = s.sub_(top).exp_()  # in place: the chunk's temporaries are its largest tensors
        total = e.sum(-1, keepdim=True)  # [H, M, Bq, 1]
        vals = _key_blocks(vB, tiles, tids, run)  # [H, M, c·Bk, D]
        prob = e.div_(total_or_one(total))  # [H, M, Bq, c·Bk]
        if dropout is not None:
            prob.mul_(_keep_scales(tiles, tids, num_heads, dropout, cd))
        outB[:, qb] = torch.matmul(prob, vals)  # [H, M, Bq, D]
        lse, lo = lse_pair(top, total)
        lseB[:, qb], loB[:, qb] = lse.squeeze(-1), lo.squeeze(-1)
    lse = lseB.reshape(num_heads, -1)[:, :n_dst].t().contiguous()  # [N_dst, H]
    lse_lo = loB.reshape(num_heads, -1)[:, :n_dst].t().contiguous()  # [N_dst, H]
    return _unblocked(outB, n_dst, q.dtype), lse, lse_lo


def tiled_backward(
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
    need_bias_grad: bool,
    max_cells: int = DEFAULT_MAX_CELLS,
    dropout: tuple[float, int] | None = None,
):
    """``(dq, dk, dv, dbias)`` from the saved ``out`` and ``lse`` (with ``lse_lo``); ``dbias`` has
    ``tbias``'s shape ``[E_t, H]``."""
    cd = compute_dtype(q.dtype)
    tb = None if tbias is None else tbias.to(cd)
    need_bias_grad = need_bias_grad and tb is not None
    chunks = _chunks(tiles, q.size(1), max_cells)
    if not (_use_flash(q.device, cd) and not need_bias_grad and dropout is None):
        return _matmul_backward(
            q, k, v, tiles, tb, tbias, scale, lse, lse_lo, dout, dlse, need_bias_grad, chunks, dropout
        )
    # chunks whose forward ran the matmul path (huge log-sum-exps) take it here too
    top = finite_or_zero(lse).abs()  # [N_dst, H]
    flash: list[Chunk] = []
    rest: list[Chunk] = []
    for chunk in chunks:
        rows = _block_rows(chunk[0], tiles.block_q, q.size(0))
        (flash if rows.numel() == 0 or float(top[rows].max()) < FLASH_LSE_LIMIT else rest).append(chunk)
    dq, dk, dv = _flash_backward(q, k, v, tiles, tb, scale, out, lse, dout, dlse, flash, zero_rows=bool(rest))
    if rest:
        dq_m, dk_m, dv_m, _ = _matmul_backward(
            q, k, v, tiles, tb, tbias, scale, lse, lse_lo, dout, dlse, False, rest, None
        )
        dq, dk, dv = dq + dq_m, dk + dk_m, dv + dv_m
    return dq, dk, dv, None


def _flash_backward(q, k, v, tiles: TileList, tb, scale, out, lse, dout, dlse, chunks, zero_rows: bool):
    """``(dq, dk, dv)`` of ``chunks`` by PyTorch's fused CPU backward kernel, in the tokens' own layout
    (rows of query blocks of other chunks: 0 when ``zero_rows`` or when a query block has no tile).

    The kernel computes ``delta_i = dO_i . O_i`` itself. A gradient of the log-sum-exp (the split
    path's merge) enters as one more channel: ``dO_i[D] = 1``, ``O_i[D] = -dlse_i`` and ``q``, ``k``,
    ``v[D] = 0`` give ``delta_i = dO_i . O_i - dlse_i`` and leave every other product unchanged."""
    cd = torch.float32
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    group = num_heads // num_kv
    bq, bk, nqb, nkb = tiles.block_q, tiles.block_k, tiles.num_q_blocks, tiles.num_k_blocks
    extra = 0 if dlse is None else 1
    qT = _token_blocks(q, bq, nqb, cd, extra=extra)  # [nqb, Bq, H, D (+ 1)]
    kT = _token_blocks(k, bk, nkb, cd, group, extra)  # [nkb, Bk, H, D (+ 1)]
    vT = _token_blocks(v, bk, nkb, cd, group, extra)
    doT = _token_blocks(dout, bq, nqb, cd, extra=extra)
    oT = _token_blocks(out, bq, nqb, cd, extra=extra)
    if extra:
        doT[..., dim] = 1.0
        oT.view(-1, num_heads, dim + 1)[:n_dst, :, dim] = -dlse.to(cd)
    lseT = torch.zeros(nqb * bq, num_heads, dtype=cd, device=q.device)
    lseT[:n_dst] = finite_or_zero(lse.to(cd))
    lseT = lseT.view(nqb, bq, num_heads)
    dqT = _query_rows(qT.shape, chunks, nqb, cd, q.device, zero=zero_rows)
    dkT, dvT = torch.zeros_like(kT), torch.zeros_like(vT)
    assert _FLASH_BWD is not None  # _use_flash
    for blocks, tids, run in chunks:
        qb = _as_slice(blocks)
        g, c = tids.shape
        mask, _ = _flash_mask(tiles, tb, tids, cd)
        dq, dk, dv = _FLASH_BWD(
            doT[qb].transpose(1, 2),
            qT[qb].transpose(1, 2),
            _token_key_blocks(kT, tiles, tids, run),
            _token_key_blocks(vT, tiles, tids, run),
            oT[qb].transpose(1, 2),
            lseT[qb].transpose(1, 2),
            0.0,
            False,
            attn_mask=mask,
            scale=scale,
        )  # [M, H, Bq, D (+ 1)], [M, H, c·Bk, D (+ 1)] twice
        dqT[qb] = dq.transpose(1, 2)
        kb = tiles.k_block[tids].flatten()  # [M·c]
        dkT.index_add_(0, kb, dk.transpose(1, 2).reshape(g * c, bk, num_heads, -1))
        dvT.index_add_(0, kb, dv.transpose(1, 2).reshape(g * c, bk, num_heads, -1))
    dq = dqT.view(-1, num_heads, dim + extra)[:n_dst, :, :dim].to(q.dtype)
    dk = _group_sum(dkT.view(-1, num_heads, dim + extra)[:n_src, :, :dim], num_kv).to(k.dtype)
    dv = _group_sum(dvT.view(-1, num_heads, dim + extra)[:n_src, :, :dim], num_kv).to(v.dtype)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _group_sum(x: Tensor, num_kv: int) -> Tensor:
    """Gradients ``[N, H, D]`` of the repeated key / value heads summed per key / value head,
    ``[N, H_kv, D]`` (``x`` itself when every head has its own)."""
    n, h, d = x.shape
    return x if h == num_kv else x.reshape(n, num_kv, h // num_kv, d).sum(2)


def _matmul_backward(
    q, k, v, tiles: TileList, tb, tbias, scale, lse, lse_lo, dout, dlse, need_bias_grad, chunks, dropout
):
    """``(dq, dk, dv, dbias)`` of ``chunks`` by batched matmuls, recomputing the scores: ``delta_i``
    is the sum of ``p · dp`` over the row's recomputed tiles, with ``p`` normalized per row and
    ``dp`` centred on its value at the row's largest score (module fused_torch's docstring says why)."""
    cd = compute_dtype(q.dtype)
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    group = num_heads // num_kv
    nqb, nkb = tiles.num_q_blocks, tiles.num_k_blocks
    qB = _blocked(q, tiles.block_q, nqb, cd)
    kB = _blocked(repeat_heads(k, group), tiles.block_k, nkb, cd)
    vB = _blocked(repeat_heads(v, group), tiles.block_k, nkb, cd)
    doB = _blocked(dout, tiles.block_q, nqb, cd)  # [H, nqb, Bq, D]
    lseB = finite_or_zero(_blocked(lse.unsqueeze(-1), tiles.block_q, nqb, cd))  # [H, nqb, Bq, 1]
    loB = _blocked(lse_lo.unsqueeze(-1), tiles.block_q, nqb, cd)  # [H, nqb, Bq, 1]
    dlseB = None if dlse is None else _blocked(dlse.unsqueeze(-1), tiles.block_q, nqb, cd)  # [H, nqb, Bq, 1]
    dqB, dkB, dvB = torch.zeros_like(qB), torch.zeros_like(kB), torch.zeros_like(vB)
    dtb = torch.zeros_like(tb) if need_bias_grad and tb is not None else None
    for blocks, tids, run in chunks:
        qb = _as_slice(blocks)
        g, c = tids.shape
        kb = tiles.k_block[tids].flatten()  # [M·c]
        qg, kg, s = _scores(qB, kB, tiles, tb, qb, tids, run, scale)
        top = s.argmax(-1, keepdim=True)  # [H, M, Bq, 1]: each row's largest score
        p = s.sub_(lseB[:, qb]).sub_(loB[:, qb]).exp_()  # [H, M, Bq, c·Bk], in place
        total = p.sum(-1, keepdim=True)  # [H, M, Bq, 1]
        p.div_(total_or_one(total))
        dog = doB[:, qb]  # [H, M, Bq, D]
        vals = _key_blocks(vB, tiles, tids, run)  # [H, M, c·Bk, D]
        dp = torch.matmul(dog, vals.transpose(-1, -2))  # [H, M, Bq, c·Bk]
        pd = p
        if dropout is not None:
            scales = _keep_scales(tiles, tids, num_heads, dropout, cd)
            dp.mul_(scales)
            pd = p * scales
        dp.sub_(dp.gather(-1, top))  # centred on the largest score: no cancellation in dp - delta
        delta = (p * dp).sum(-1, keepdim=True)  # [H, M, Bq, 1]
        if dlseB is not None:
            delta -= dlseB[:, qb]
        ds = dp.sub_(delta).mul_(p)  # p (dp - delta)
        dqB[:, qb] = torch.matmul(ds, kg).mul_(scale)
        dk = torch.matmul(ds.transpose(-1, -2), qg).mul_(scale).reshape(num_heads, g * c, tiles.block_k, dim)
        dv = torch.matmul(pd.transpose(-1, -2), dog).reshape(num_heads, g * c, tiles.block_k, dim)
        dkB.index_add_(1, kb, dk)
        dvB.index_add_(1, kb, dv)
        if dtb is not None:
            _bias_grad(tiles, dtb, ds, tids)
    dq = _unblocked(dqB, n_dst, q.dtype)
    dk = _group_sum(_unblocked(dkB, n_src, cd), num_kv).to(k.dtype)
    dv = _group_sum(_unblocked(dvB, n_src, cd), num_kv).to(v.dtype)
    if dtb is not None:
        dtb = dtb.to(tbias.dtype)
    return dq, dk, dv, dtb


# the edge bias comes before the tile list in the shared kernel signature
TILED = Kernel(
    lambda q, k, v, tbias, tiles, scale, **o: tiled_forward(q, k, v, tiles, tbias, scale, **o),
    lambda q, k, v, tbias, tiles, scale, *rest, **o: tiled_backward(q, k, v, tiles, tbias, scale, *rest, **o),
)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: TileList,
    tbias: Tensor | None,
    scale: float,
    max_cells: int = DEFAULT_MAX_CELLS,
    dropout: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``(out, lse, lse_lo)`` of the plain-torch tiled path, ``dropout = (p, seed)``."""
    return kernel_attention(TILED, q, k, v, tbias, tiles, scale, max_cells=max_cells, dropout=dropout)
