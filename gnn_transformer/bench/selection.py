"""Graphs chosen from the data, timed end to end: selection plus attention, the graph rebuilt on
every call, against what a user of the baselines must run for the same selection.

Rows, one forward call each (the median of ``repeats`` calls after a warm-up):

- ``select``: the selector alone (:mod:`gnn_transformer.topology.dynamic`), as ``auto`` runs it.
- ``auto``: the selector, then :func:`gnn_transformer.kernels.attend` on the per-head graph
  (``edge_head``); with ``backward``, also the backward pass of the attention. ``block_topk``
  selects an implicit graph (a per-head ``BlockGraph``: tiles, no edge list) that the tiled kernels
  read directly, as a layer with ``select=BlockTopK(...)`` does.
- ``flex``: the selector, then FlexAttention (compiled once) on a ``BlockMask`` built for this
  call. Variants, each its own row: ``lookup`` (a dense boolean ``[H, N, N]`` lookup scattered from
  the edges and ``create_block_mask`` over it, compiled once as well, what a user of an
  unstructured selection writes) and,
  for ``block_topk``, ``block table`` (``BlockMask.from_kv_blocks`` from the selected key blocks,
  with the causal rule inside the query's own block as ``mask_mod``).
- ``sdpa``: the selector, then ``scaled_dot_product_attention`` with the selection as a dense
  boolean mask ``[1, H, N, N]``.

Each side gets its own layout (the project ``[N, H, D]``, Flex and SDPA contiguous ``[1, H, N, D]``,
made outside the timed call). ``max_err`` is each row's largest difference from ``auto``'s output
on the same selection. FlexAttention runs no backward pass on the CPU.

Usage:
    python -m gnn_transformer.bench.selection --sizes 4096 --selectors topk block_topk
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import kernels
from ..topology import dynamic
from .benchmark import median_seconds, ratio_cell

SELECTIONS: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "topk": lambda q, k: dynamic.topk(q, k, 64, causal=True),
    "block_topk": lambda q, k: dynamic.block_topk(q, k, 64, 8, causal=True),
}
# selectors whose `auto` rows select an implicit graph (topology.BlockGraph) instead of edges
IMPLICIT: dict[str, Callable[[Tensor, Tensor], object]] = {
    "block_topk": lambda q, k: dynamic.block_topk(q, k, 64, 8, causal=True, implicit=True)
}
DESCRIPTIONS = {
    "topk": "top-64 keys per query and head, causal",
    "block_topk": "MoBA: blocks of 64, top 8 key blocks + own, causal",
}
COLUMNS = ("selector", "n", "edges", "row", "pass", "ms", "max_err", "note")


def _dense_mask(edge_index: Tensor, edge_head: Tensor, num_heads: int, n: int) -> Tensor:
    """The selection as a boolean ``[H, N, N]`` (query, key) lookup, scattered from the edges."""
    mask = torch.zeros(num_heads, n, n, dtype=torch.bool, device=edge_index.device)
    mask[edge_head, edge_index[1], edge_index[0]] = True
    return mask


def _block_table(q: Tensor, k: Tensor, block: int, num_blocks: int) -> tuple[Tensor, Tensor]:
    """MoBA's selection as Flex's block table: ``(kv_num_blocks [1, H, Q], kv_indices [1, H, Q, K])``
    (``K`` the key blocks, the first ``kv_num_blocks`` entries of a row valid),
    the own block and the ``num_blocks`` best earlier key blocks of each query block and head by
    ``<mean q, mean k>`` (ties to the lower block), as a Flex user computes it."""
    n, heads, dim = q.shape
    group = heads // k.size(1)
    blocks = n // block
    qm = q.float().view(blocks, block, heads, dim).mean(1)  # [Q, H, D]
    km = k.float().view(blocks, block, k.size(1), dim).mean(1).repeat_interleave(group, 1)  # [K, H, D]
    score = torch.einsum("qhd,khd->hqk", qm, km)  # [H, Q, K]
    qi = torch.arange(blocks, device=q.device)
    earlier = qi[None, :, None] > qi[None, None, :]  # strictly earlier key blocks
    score = score.masked_fill(~earlier, -math.inf)
    take = min(num_blocks, max(blocks - 1, 0))
    best = torch.topk(score, take, dim=-1, sorted=True).indices if take else score.new_zeros(heads, blocks, 0).long()
    valid = torch.gather(earlier.expand(heads, -1, -1), 2, best)  # [H, Q, take]
    own = qi.view(1, blocks, 1).expand(heads, -1, 1)
    indices = torch.cat([own, torch.where(valid, best, own)], -1)  # [H, Q, take + 1]
    counts = 1 + valid.sum(-1)  # [H, Q]
    order = torch.sort(
        torch.where(torch.arange(take + 1, device=q.device) < counts[..., None], indices, blocks), dim=-1
    ).values  # valid first, ascending
    table = torch.zeros(heads, blocks, blocks, dtype=torch.long, device=q.device)  # one column per key block
    table[..., : take + 1] = order.clamp(max=blocks - 1)
    return counts[None].int(), table[None].int()


def run_selection_benchmark(
    selectors: Sequence[str] = tuple(SELECTIONS),
    sizes: Sequence[int] = (4096,),
    *,
    heads: int = 12,
    kv_heads: int | None = None,
    head_dim: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    backward: bool = True,
    baselines: Sequence[str] = ("flex", "sdpa"),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """The rows of the module docstring, as dicts with the keys of :data:`COLUMNS`; ``log`` receives
    each row as a line of text once it is measured."""
    import torch.nn.functional as F

    device = torch.device(device)
    kv_heads = heads if kv_heads is None else kv_heads
    rows: list[dict] = []
    flex = block_mask_of = None
    for name in selectors:
        select = SELECTIONS[name]
        for n in sizes:
            g = torch.Generator(device="cpu").manual_seed(seed)
            q = torch.randn(n, heads, head_dim, generator=g).to(device, dtype)
            k = torch.randn(n, kv_heads, head_dim, generator=g).to(device, dtype)
            v = torch.randn(n, kv_heads, head_dim, generator=g).to(device, dtype)
            scale = head_dim**-0.5
            edge_index, edge_head = select(q, k)
            ref = kernels.attend(q, k, v, edge_index, scale=scale, edge_head=edge_head).float()

            def row(label, note, fn, pas="fwd", out=None, edges=edge_index.size(1)):
                ms = 1e3 * median_seconds(fn, device, repeats)
                err = None if out is None else float((out.float() - ref).abs().max())
                rows.append(
                    dict(selector=name, n=n, edges=edges, row=label, **{"pass": pas}, ms=ms, max_err=err, note=note)
                )
                if log is not None:
                    log("  ".join(_cell(c, rows[-1].get(c)) for c in COLUMNS))

            implicit = IMPLICIT.get(name)
            row("select", DESCRIPTIONS[name], lambda: (select if implicit is None else implicit)(q, k))

            def ours():
                if implicit is not None:
                    return kernels.attend(q, k, v, implicit(q, k), scale=scale)
                ei, eh = select(q, k)
                return kernels.attend(q, k, v, ei, scale=scale, edge_head=eh)

            what = "select (BlockGraph, no edge list) + attend" if implicit is not None else "select + attend"
            row("auto", f"{what}, graph rebuilt per call", ours, out=ours())
            if backward:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                grad = torch.randn(q.shape, generator=g).to(device, dtype)

                def ours_backward():
                    if implicit is not None:
                        out = kernels.attend(qg, kg, vg, implicit(qg.detach(), kg.detach()), scale=scale)
                    else:
                        ei, eh = select(qg.detach(), kg.detach())
                        out = kernels.attend(qg, kg, vg, ei, scale=scale, edge_head=eh)
                    torch.autograd.grad(out, (qg, kg, vg), grad)

                row("auto", f"{what} + backward", ours_backward, pas="fwd+bwd")
            qb, kb, vb = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))  # [1, H, N, D]
            gqa = kv_heads != heads
            if "sdpa" in baselines:

                def sdpa():
                    ei, eh = select(q, k)
                    mask = _dense_mask(ei, eh, heads, n)[None]  # [1, H, N, N]
                    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)

                out = sdpa()[0].transpose(0, 1)
                row("sdpa", "select + dense bool mask [1, H, N, N]", sdpa, out=out)
            if "flex" in baselines:
                from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

                if flex is None:  # both compiled once, as attention-gym builds masks that change per call
                    flex, block_mask_of = torch.compile(flex_attention), torch.compile(create_block_mask)

                def flex_lookup():
                    ei, eh = select(q, k)
                    lookup = _dense_mask(ei, eh, heads, n)

                    def mask_mod(b, h, q_idx, kv_idx):
                        return lookup[h, q_idx, kv_idx]

                    block_mask = block_mask_of(mask_mod, 1, heads, n, n, device=device)
                    return flex(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=gqa)

                out = flex_lookup()[0].transpose(0, 1)
                row("flex", "select + dense lookup + compiled create_block_mask per call", flex_lookup, out=out)
                if name == "block_topk" and n % 64 == 0:

                    def causal(b, h, q_idx, kv_idx):
                        return q_idx >= kv_idx

                    def flex_table():
                        counts, indices = _block_table(q, k, 64, 8)
                        block_mask = BlockMask.from_kv_blocks(
                            counts, indices, BLOCK_SIZE=64, mask_mod=causal, seq_lengths=(n, n)
                        )
                        return flex(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=gqa)

                    out = flex_table()[0].transpose(0, 1)
                    row("flex", "own block table (from_kv_blocks) per call", flex_table, out=out)
    return rows


AGAINST_COLUMNS = ("selector", "n", "baseline", "baseline_ms", "auto_ms", "baseline_over_auto", "fastest")


def against_baselines(rows: Sequence[dict]) -> list[dict]:
    """The forward rows of each baseline (SDPA, FlexAttention as a user builds its mask) against the
    ``auto`` forward row of the same selector and size, selection included on both sides: the
    baseline (its row and note), both times, ``baseline ms / auto ms`` (above 1: ``auto`` is faster),
    and ``fastest`` marking the fastest baseline of the selector and size."""
    out: list[dict] = []
    keys = dict.fromkeys((r["selector"], r["n"]) for r in rows)
    for selector, n in keys:
        mine = [r for r in rows if (r["selector"], r["n"], r["pass"]) == (selector, n, "fwd")]
        auto = next((r for r in mine if r["row"] == "auto" and r.get("ms") is not None), None)
        baselines = [r for r in mine if r["row"] in ("sdpa", "flex") and r.get("ms") is not None]
        if auto is None or not baselines:
            continue
        fastest = min(baselines, key=lambda r: r["ms"])
        for r in baselines:
            out.append(
                {
                    "selector": selector,
                    "n": n,
                    "baseline": f"{'SDPA' if r['row'] == 'sdpa' else 'Flex'} ({r['note']})",
                    "baseline_ms": r["ms"],
                    "auto_ms": auto["ms"],
                    "baseline_over_auto": r["ms"] / auto["ms"],
                    "fastest": "yes" if r is fastest else "",
                }
            )
    return out


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("ms", "baseline_ms", "auto_ms"):
        return f"{value:.1f}"
    if key == "baseline_over_auto":
        return ratio_cell(value)
    if key == "max_err":
        return f"{value:.1e}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selectors", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--baselines", nargs="*", default=["flex", "sdpa"], choices=["flex", "sdpa"])
    args = parser.parse_args(argv)
    rows = run_selection_benchmark(
        args.selectors,
        args.sizes,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        backward=not args.no_backward,
        baselines=args.baselines,
        log=print,
    )
    print(format_table(rows))  # a tool beside the library: it prints its table
    return rows


if __name__ == "__main__":
    main()
