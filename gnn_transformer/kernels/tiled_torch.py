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

from ._autograd import Kernel, kernel_attention, lse_pair
from ._dropout import keep_scales
from .primitives import compute_dtype, finite_or_zero, total_or_one
from .tiling import TileList

DEFAULT_MAX_CELLS = 1 << 21  # score entries per chunk: 8 MiB of float32 (cache-sized temporaries)

# PyTorch's fused CPU attention returns the log-sum-exp the merge and the backward pass need; it is
# used for float32 on CPU when present, the plain matmul path otherwise (and for float64).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


# PyTorch's fused kernel returns the log-sum-exp rounded to float32, without what rounding lost;
# below this magnitude that is under 8e-6 (half its rounding step), above it a chunk runs the
# matmul path, which keeps the remainder (module _autograd).
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


def _chunks(tiles: TileList, num_heads: int, max_cells: int) -> list[tuple[Tensor, Tensor, tuple[int, int] | None]]:
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
    n_dst, num_heads, dim = q.shape
    group = num_heads // k.size(1)
    nqb, nkb = tiles.num_q_blocks, tiles.num_k_blocks
    qB = _blocked(q, tiles.block_q, nqb, cd)  # [H, nqb, Bq, D]
    kB = _blocked(k.repeat_interleave(group, dim=1), tiles.block_k, nkb, cd)  # [H, nkb, Bk, D]
    vB = _blocked(v.repeat_interleave(group, dim=1), tiles.block_k, nkb, cd)  # [H, nkb, Bk, D]
    outB = torch.zeros_like(qB)  # [H, nqb, Bq, D]
    lseB = torch.full(qB.shape[:3], float("-inf"), dtype=cd, device=q.device)  # [H, nqb, Bq]
    loB = torch.zeros(qB.shape[:3], dtype=cd, device=q.device)  # [H, nqb, Bq]
    tb = None if tbias is None else tbias.to(cd)
    flash = _use_flash(q.device, cd) and dropout is None
    for blocks, tids, run in _chunks(tiles, num_heads, max_cells):
        qb = _as_slice(blocks)
        if flash:  # [M, H, Bq, D] / [M, H, c·Bk, D] layout of the fused CPU kernel
            keys = _key_blocks(kB, tiles, tids, run).transpose(0, 1)
            vals = _key_blocks(vB, tiles, tids, run).transpose(0, 1)
            mask, nonempty = _flash_mask(tiles, tb, tids, cd)
            assert _FLASH is not None  # flash: _use_flash
            o, lse_g = _FLASH(qB[:, qb].transpose(0, 1), keys, vals, attn_mask=mask, scale=scale)
            if nonempty is not None:  # rows without an edge: lse = -inf (the kernel says 0)
                lse_g = lse_g.masked_fill(~nonempty, float("-inf"))
            if float(torch.nan_to_num(lse_g, neginf=0.0).abs().max()) < FLASH_LSE_LIMIT:
                outB[:, qb] = o.transpose(0, 1)
                lseB[:, qb] = lse_g.transpose(0, 1)
                continue
        _, _, s = _scores(qB, kB, tiles, tb, qb, tids, run, scale)  # [H, M, Bq, c·Bk]
        top = s.amax(-1, keepdim=True)
        top = finite_or_zero(top)
        e = s.sub_(top).exp_()  # in place: the chunk's temporaries are its largest tensors
        total = e.sum(-1, keepdim=True)  # [H, M, Bq, 1]
        nonempty = total > 0
        safe = torch.where(nonempty, total, torch.ones_like(total))
        vals = _key_blocks(vB, tiles, tids, run)  # [H, M, c·Bk, D]
        prob = e.div_(safe)  # [H, M, Bq, c·Bk]
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
    n_dst, num_heads, dim = q.shape
    n_src, num_kv = k.size(0), k.size(1)
    group = num_heads // num_kv
    nqb, nkb = tiles.num_q_blocks, tiles.num_k_blocks
    tb = None if tbias is None else tbias.to(cd)
    need_bias_grad = need_bias_grad and tb is not None
    flash = _use_flash(q.device, cd) and not need_bias_grad and dropout is None
    # The fused CPU backward computes delta_i = dO_i . O_i itself. A gradient of the lse (the split
    # path's merge) enters as one more channel: dO_i[D] = 1, O_i[D] = -dlse_i and q, k, v[D] = 0
    # give delta_i = dO_i . O_i - dlse_i and leave every other product unchanged.
    extra = 1 if (flash and dlse is not None) else 0
    qB = _blocked(q, tiles.block_q, nqb, cd, extra)
    kB = _blocked(k.repeat_interleave(group, dim=1), tiles.block_k, nkb, cd, extra)
    vB = _blocked(v.repeat_interleave(group, dim=1), tiles.block_k, nkb, cd, extra)
    doB = _blocked(dout, tiles.block_q, nqb, cd, extra)  # [H, nqb, Bq, D (+ 1)]
    lseB = _blocked(lse.unsqueeze(-1), tiles.block_q, nqb, cd)  # [H, nqb, Bq, 1]
    lseB = finite_or_zero(lseB)
    loB = _blocked(lse_lo.unsqueeze(-1), tiles.block_q, nqb, cd)  # [H, nqb, Bq, 1]
    dqB, dkB, dvB = torch.zeros_like(qB), torch.zeros_like(kB), torch.zeros_like(vB)
    dtb = torch.zeros_like(tb) if need_bias_grad and tb is not None else None
    if flash:
        outB = _blocked(out, tiles.block_q, nqb, cd, extra)  # [H, nqb, Bq, D (+ 1)]
        if extra:
            doB[..., dim] = 1.0
            outB[..., dim] = -_blocked(dlse.unsqueeze(-1), tiles.block_q, nqb, cd)[..., 0]
    # chunks off the fused CPU kernel take delta_i as the sum of p (dp) over the row's recomputed
    # tiles, with p normalized per row (module fused_torch's docstring says why)
    dlseB = None if dlse is None else _blocked(dlse.unsqueeze(-1), tiles.block_q, nqb, cd)  # [H, nqb, Bq, 1]
    for blocks, tids, run in _chunks(tiles, num_heads, max_cells):
        qb = _as_slice(blocks)
        g, c = tids.shape
        kb = tiles.k_block[tids].flatten()  # [M·c]
        # chunks whose forward ran the matmul path (huge log-sum-exps) take it here too
        if flash and float(lseB[:, qb].abs().max()) < FLASH_LSE_LIMIT:
            keys = _key_blocks(kB, tiles, tids, run).transpose(0, 1)
            vals = _key_blocks(vB, tiles, tids, run).transpose(0, 1)
            mask, _ = _flash_mask(tiles, tb, tids, cd)
            assert _FLASH_BWD is not None  # flash: _use_flash
            dq, dk, dv = _FLASH_BWD(
                doB[:, qb].transpose(0, 1),
                qB[:, qb].transpose(0, 1),
                keys,
                vals,
                outB[:, qb].transpose(0, 1),
                lseB[:, qb].squeeze(-1).transpose(0, 1),
                0.0,
                False,
                attn_mask=mask,
                scale=scale,
            )
            dqB[:, qb] = dq.transpose(0, 1)
            dkB.index_add_(1, kb, dk.transpose(0, 1).reshape(num_heads, g * c, tiles.block_k, -1))
            dvB.index_add_(1, kb, dv.transpose(0, 1).reshape(num_heads, g * c, tiles.block_k, -1))
            continue
        qg, kg, s = _scores(qB, kB, tiles, tb, qb, tids, run, scale)
        if extra:  # the flash layout's extra channel is zero in q, k and v; leave it out
            qg, kg = qg[..., :dim], kg[..., :dim]
        p = s.sub_(lseB[:, qb]).sub_(loB[:, qb]).exp_()  # [H, M, Bq, c·Bk], in place
        total = p.sum(-1, keepdim=True)  # [H, M, Bq, 1]
        p.div_(total_or_one(total))
        dog = doB[:, qb][..., :dim]  # [H, M, Bq, D]
        vals = _key_blocks(vB, tiles, tids, run)[..., :dim]  # [H, M, c·Bk, D]
        dp = torch.matmul(dog, vals.transpose(-1, -2))  # [H, M, Bq, c·Bk]
        pd = p
        if dropout is not None:
            scales = _keep_scales(tiles, tids, num_heads, dropout, cd)
            dp.mul_(scales)
            pd = p * scales
        delta = (p * dp).sum(-1, keepdim=True)  # [H, M, Bq, 1]
        if dlseB is not None:
            delta -= dlseB[:, qb]
        ds = dp.sub_(delta).mul_(p)  # p (dp - delta)
        dqB[:, qb, :, :dim] = torch.matmul(ds, kg).mul_(scale)
        dk = torch.matmul(ds.transpose(-1, -2), qg).mul_(scale).reshape(num_heads, g * c, tiles.block_k, dim)
        dv = torch.matmul(pd.transpose(-1, -2), dog).reshape(num_heads, g * c, tiles.block_k, dim)
        dkB[..., :dim].index_add_(1, kb, dk)
        dvB[..., :dim].index_add_(1, kb, dv)
        if dtb is not None:
            _bias_grad(tiles, dtb, ds, tids)
    if extra:
        dqB, dkB, dvB = dqB[..., :dim], dkB[..., :dim], dvB[..., :dim]
    dq = _unblocked(dqB, n_dst, q.dtype)
    dk = _unblocked(dkB, n_src, cd).view(n_src, num_kv, group, dim).sum(2).to(k.dtype)
    dv = _unblocked(dvB, n_src, cd).view(n_src, num_kv, group, dim).sum(2).to(v.dtype)
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
