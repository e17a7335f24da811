"""Higher-order gradients: a backward pass that autograd can differentiate again.

The kernels' backward passes compute ``dQ``, ``dK``, ``dV`` as numbers (CSR products, tiles, Triton,
PyTorch's fused CPU attention), not as operations autograd records. A gradient taken with
``create_graph=True`` (a gradient penalty, a Hessian-vector product, meta-learning) is differentiated
again, and needs them as operations. Such a backward pass runs with gradient mode on; then
:class:`.primitives.KernelAttention` hands it here. The part of attention the kernel ran is
recomputed from the same inputs in plain PyTorch operations and differentiated by autograd, which
records the gradients it returns:

- per edge (:func:`.reference.edge_attention`, PyG's ``softmax`` and ``scatter``) for a CSR graph and
  for a tile list (its tiles' cells are its edges), with the kernel's edge bias and attention-dropout
  keep scales;
- per document, as a dense masked softmax, for a graph PyTorch's fused attention ran (full or causal
  attention per document).

Exact to every order. The price is the per-edge path's memory (``[E, H, D]`` messages, held for the
next backward pass), refused before anything is allocated where it does not fit (half of the host's
memory, the GPU's free memory).

Notation: ``E`` edges, ``N`` tokens, ``H`` / ``H_kv`` query / key-value heads, ``D`` head dimension,
``T`` tiles of ``Bq x Bk`` cells.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._dropout import keep_scales
from .planner import CSRGraph, DensePattern
from .primitives import compute_dtype, device_memory, finite_or_zero, repeat_heads, total_or_one
from .reference import edge_attention
from .tiling import TileList

# tensors of [E, H, D] the per-edge recomputation holds for the next backward pass: the gathered
# query, key and value, their product and the weighted messages, and one more at its peak
EDGE_TENSORS = 6
# tensors of [H, L, L] scores per document of the dense recomputation: scores, their exponentials,
# the weights, the mask, and one more at its peak
DENSE_TENSORS = 5


class EdgeForm(NamedTuple):
    """The edges a kernel ran, in the order of its edge bias rows."""

    src: Tensor  # [E] source j
    dst: Tensor  # [E] target i
    bias_rows: Tensor | None  # [E] the row of the kernel's bias [E_b, H] of each edge (None: row e)
    positions: Tensor | None  # [E] the key of each edge's dropout mask (None: 0..E-1)


def _tile_edges(tiles: TileList) -> EdgeForm:
    """The cells of ``tiles`` that are edges: those of its edge list (``edge_cell``) where it has
    one, else (an implicit graph) every cell of a full tile and the set cells of a partial one."""
    bq, bk = tiles.block_q, tiles.block_k
    if tiles.edge_cell.numel():
        cell = tiles.edge_cell.long()  # [E_t], the order of the bias rows
        rows = None
        positions = tiles.edge_ids
    else:
        full = torch.ones(1, bq, bk, dtype=torch.bool, device=tiles.q_block.device)
        pool = torch.cat([tiles.masks, full])  # [P + 1, Bq, Bk]
        mi = torch.where(tiles.mask_index >= 0, tiles.mask_index, tiles.masks.size(0))  # [T]
        cell = pool[mi].flatten().nonzero().squeeze(1)  # [E] flat cells t·Bq·Bk + r·Bk + c
        rows = positions = None
    t = torch.div(cell, bq * bk, rounding_mode="floor")
    r = torch.div(cell, bk, rounding_mode="floor") % bq
    c = cell % bk
    dst, src = tiles.q_block[t] * bq + r, tiles.k_block[t] * bk + c  # [E]
    inside = (dst < tiles.num_dst) & (src < tiles.num_src)  # a short last block's cells past the tokens
    if not bool(inside.all()):
        keep = inside.nonzero().squeeze(1)
        src, dst = src[keep], dst[keep]
        rows = keep if rows is None else rows[keep]
        positions = None if positions is None else positions[keep]
    return EdgeForm(src, dst, rows, positions)


def edge_form(structure: CSRGraph | TileList) -> EdgeForm:
    """The edges of a kernel's structure (a CSR graph or a tile list)."""
    if isinstance(structure, CSRGraph):
        return EdgeForm(structure.src, structure.dst, None, structure.edge_ids)
    return _tile_edges(structure)


def _check_fits(values: int, q: Tensor, what: str) -> None:
    """``RuntimeError`` where a recomputation that holds ``values`` numbers of the accumulation
    dtype does not fit on ``q``'s device (``what`` says what they are)."""
    need = values * (torch.finfo(compute_dtype(q.dtype)).bits // 8)
    have = device_memory(q.device)
    if have is not None and need > have:
        raise RuntimeError(
            f"A higher-order gradient of attention (create_graph=True) recomputes {what}: about "
            f"{need / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB available on {q.device} "
            "(take it on fewer edges or tokens)"
        )


def _num_edges(structure: CSRGraph | TileList) -> int:
    """The edges of a kernel's structure, counted without listing them."""
    if isinstance(structure, CSRGraph):
        return structure.num_edges
    return int(structure.count.sum()) if structure.num_tiles else 0


def _per_edge(q, k, v, bias, structure, scale, dropout) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a CSR graph's or a tile list's edges, per edge, in the accumulation dtype."""
    num_edges, heads, dim = _num_edges(structure), q.size(1), q.size(2)
    _check_fits(EDGE_TENSORS * num_edges * heads * dim, q, f"{num_edges} edges x {heads} heads x {dim} channels")
    form = edge_form(structure)
    cd = compute_dtype(q.dtype)
    edge_bias = None
    if bias is not None:
        edge_bias = (bias if form.bias_rows is None else bias[form.bias_rows]).to(cd)  # [E, H]
    edge_scale = None
    if dropout is not None:
        p, seed = dropout
        positions = form.positions
        if positions is None:
            positions = torch.arange(form.src.numel(), device=form.src.device)
        edge_scale = keep_scales(seed, positions, q.size(1), p, cd).transpose(0, 1)  # [E, H]
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    out, lse = edge_attention(
        q, k, v, form.src, form.dst, scale=scale, edge_bias=edge_bias, edge_scale=edge_scale, return_lse=True
    )
    return out, lse


def _dense(q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of full or causal attention per document of ``pattern``, a dense masked softmax."""
    cd = compute_dtype(q.dtype)
    group = q.size(1) // k.size(1)
    bipartite = len(pattern.bounds) == 2  # one sequence: every key (also of a full bipartite graph)
    cells = q.size(1) * (q.size(0) * k.size(0) if bipartite else sum(n * n for n in pattern.lengths))
    _check_fits(DENSE_TENSORS * cells, q, f"{cells} scores of {q.size(1)} heads, dense per document")
    outs, lses = [], []
    for a, b in zip(pattern.bounds[:-1], pattern.bounds[1:]):
        keys = slice(None) if bipartite else slice(a, b)
        qd = q[a:b].to(cd).transpose(0, 1)  # [H, L, D]
        kd = repeat_heads(k[keys].to(cd), group).transpose(0, 1)  # [H, L_k, D]
        vd = repeat_heads(v[keys].to(cd), group).transpose(0, 1)  # [H, L_k, D]
        s = qd @ kd.transpose(1, 2) * scale  # [H, L, L_k]
        if pattern.kind == "causal":
            s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
        top = finite_or_zero(s.detach().amax(-1, keepdim=True))  # [H, L, 1]
        e = torch.exp(s - top)
        total = e.sum(-1, keepdim=True)  # [H, L, 1]
        outs.append(((e / total_or_one(total)) @ vd).transpose(0, 1))  # [L, H, D]
        lse = torch.where(total > 0, top + torch.log(total_or_one(total)), float("-inf"))
        lses.append(lse.squeeze(-1).transpose(0, 1))  # [L, H]
    return torch.cat(outs), torch.cat(lses)


def differentiable_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    structure: Any,
    scale: float,
    dropout: tuple[float, int] | None,
    out_dtype: torch.dtype,
    dout: Tensor | None,
    dlse: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv, dbias)`` of a kernel's ``(out, lse)`` for ``(dout, dlse)``, as operations
    autograd records (module docstring); ``None`` where ``needs`` (``ctx.needs_input_grad``) says
    no gradient is wanted. ``dropout``: the kernel's ``(p, seed)``; ``out_dtype``: that of its
    output. Called inside a backward pass run with ``create_graph=True``."""
    with torch.enable_grad():
        # views of their own: with q, k, v one tensor (attend(x, x, x)) a gradient in it would
        # otherwise be the sum of all three in each slot
        q, k, v = (x.view_as(x) for x in (q, k, v))
        bias = None if bias is None else bias.view_as(bias)
        inputs = [(i, x) for i, (x, need) in enumerate(zip((q, k, v, bias), needs)) if need and x is not None]
        if isinstance(structure, DensePattern):
            out_r, lse_r = _dense(q, k, v, structure, scale)
        else:
            out_r, lse_r = _per_edge(q, k, v, bias, structure, scale, dropout)
        # the results that carry a gradient and depend on an input that wants one
        pairs = [(y, g) for y, g in ((out_r.to(out_dtype), dout), (lse_r, dlse)) if g is not None and y.requires_grad]
        grads: tuple[Tensor | None, ...] = (None,) * len(inputs)
        if pairs and inputs:
            grads = torch.autograd.grad(
                [y for y, _ in pairs],
                [x for _, x in inputs],
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
    result: list[Tensor | None] = [None] * 4
    for (i, x), g in zip(inputs, grads):
        result[i] = torch.zeros_like(x) if g is None else g
    return tuple(result)
