"""``gnn-transformer bench``: the attention backends timed against SDPA and FlexAttention."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ._common import EXIT_OK, EXIT_USAGE, Given, UsageError, error, check_out_file, check_device

# the options each kind of run reads (the others are refused when given, never for their defaults)
_TABLE = {"topologies", "sizes", "backends", "flex_variants", "device", "dtype", "heads", "kv_heads", "head_dim"}
_TABLE |= {"repeats", "no_backward", "threads", "quick", "markdown", "block_size"}
_READS = {
    None: _TABLE,
    "calibrate": _TABLE - {"backends", "flex_variants"},
    "selectors": _TABLE - {"topologies", "flex_variants", "block_size"},
    "train_step": {"batch_size", "device", "dtype", "repeats", "threads", "quick", "markdown"},
}
_MODES = ("calibrate", "selectors", "train_step")
_WITH_DEFAULTS = ("topologies", "backends", "flex_variants", "batch_size", "head_dim")  # given: see Given


def add_parser(sub) -> None:
    from ..bench.baselines import FLEX_VARIANTS
    from ..bench.benchmark import BACKENDS, TOPOLOGIES
    from ..bench.selection import DESCRIPTIONS, SELECTIONS

    p = sub.add_parser(
        "bench",
        help="benchmark the attention backends against dense SDPA and FlexAttention",
        description="Time forward and forward+backward of each attention backend (pyg, fused, "
        "tiled, auto), dense scaled_dot_product_attention with a boolean mask and FlexAttention "
        "with a BlockMask, on the same edge sets; median time, peak memory, max error against a "
        "float32 dense reference. Graph and mask construction are timed separately.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--topologies",
        nargs="+",
        default=list(TOPOLOGIES),
        action=Given,
        metavar="SPEC",
        help="the benchmark's graphs (causal; window: radius 128; bigbird: blocks of 64, "
        "3 window, 2 global, 3 random; random: 64 keys per query) or any topology "
        "spec: a builder with arguments ('dilated:window=256,dilation=4'), a "
        "catalogue name ('longformer') or a .toml path; a per-head spec ('duo_attention') "
        "is timed with its edge_head against FlexAttention reading the head and SDPA with "
        "a [1, H, N, N] mask, a per-layer spec ('gemma3') per distinct layer graph plus a "
        "total over the layers of one cycle",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=None,
        help="token counts (unset: 4096 16384 65536, plus 262144 1048576 for the "
        "linear-size topologies on CUDA; 4096 with --quick)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(BACKENDS),
        action=Given,
        choices=BACKENDS,
        help="auto's note names the kernel that ran; sdpa is scaled_dot_product_attention as a user "
        "calls it for the graph (is_causal, no mask, per document, else a dense boolean mask); "
        "flex is FlexAttention with the fastest of --flex-variants",
    )
    p.add_argument(
        "--flex-variants",
        nargs="+",
        default=list(FLEX_VARIANTS),
        action=Given,
        choices=FLEX_VARIANTS,
        help="the mask_mods flex tries (its note names the fastest): predicate (the topology's "
        "predicate twin), lookup (a dense boolean [N, N] lookup where it fits), blocks (a table of "
        "whole blocks, for block-structured graphs), bitmap (topology.to_block_mask's lookup)",
    )
    p.add_argument(
        "--train-step",
        nargs="*",
        type=int,
        default=None,
        metavar="CONTEXT",
        help="instead, time a GraphLM training step on causal graphs against a plain PyTorch GPT "
        "(SDPA is_causal) of the same size: nanoGPT's CPU configuration (4 layers, 4 heads, "
        "width 128, batch 12, vocabulary 65, no bias) at these contexts (default 64 256)",
    )
    p.add_argument(
        "--batch-size", type=int, default=12, action=Given, help="sequences per training step of --train-step"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (unset: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="unset: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--heads", type=int, default=None, help="query heads (unset: those of the per-head --topologies specs, else 12)"
    )
    p.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="key/value heads (grouped-query attention; must divide --heads; unset: --heads)",
    )
    p.add_argument("--head-dim", type=int, default=64, action=Given)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions, median reported (default 5; 3 with --quick or --calibrate)",
    )
    p.add_argument("--no-backward", action="store_true", help="forward passes only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's)")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 4096 tokens, 3 repeats")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as markdown to FILE")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="instead, measure auto's cost model for this device and dtype: TILE_COST (the "
        "time of a tile cell of 'tiled' over that of an edge of 'fused'), ROW_COST and "
        "MERGE_COST (fixed costs per target row, in edges), DROPOUT_COST (what attention "
        "dropout adds per edge and per cell); sizes default to 4096",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tile size of tiled, auto and --calibrate, a power of two from 16 to 256 (unset: "
        "by device and dtype, 64, or 32 for float32 on CUDA; FlexAttention keeps blocks "
        "of 128)",
    )
    p.add_argument(
        "--selectors",
        nargs="+",
        default=None,
        choices=list(SELECTIONS),
        help="instead, time graphs chosen from the data, end to end with the graph rebuilt on "
        "every call: selection + attention against FlexAttention with a BlockMask built per "
        "call and SDPA with a dense boolean mask ("
        + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
        + "); sizes default to 4096",
    )
    p.set_defaults(func=run)


def _calibrate(args, device, dtype) -> int:
    import torch

    from ..bench.benchmark import (
        CALIBRATION_COLUMNS,
        calibrate_dropout_cost,
        calibrate_row_costs,
        calibrate_tile_cost,
        current_costs,
        format_markdown,
        format_table,
    )

    sizes = args.sizes or [4096]
    common = dict(
        device=device,
        dtype=dtype,
        heads=args.heads,
        head_dim=args.head_dim,
        kv_heads=args.kv_heads,
        block_size=args.block_size,
        repeats=args.repeats or 3,
    )
    rows, suggested = calibrate_tile_cost(args.topologies, sizes, backward=not args.no_backward, log=print, **common)
    fixed = calibrate_row_costs(rows, suggested, max(sizes), **common)
    dropout = calibrate_dropout_cost(rows, **common)
    tile_cost, row_cost, merge_cost, dropout_cost = current_costs(device)
    kind = torch.device(device).type
    lines = [
        "TILE_COST measured (median ratio over the graphs): "
        + ", ".join(f"{p} {value:.3f}" for p, value in suggested.items())
        + f"; auto uses {tile_cost} on {kind}",
        "ROW_COST measured (edges per target row, fused / tiled): "
        + ", ".join(f"{p} {c['fused']:.1f} / {c['tiled']:.1f}" for p, c in fixed.items())
        + f"; auto uses {row_cost['fused']} / {row_cost['tiled']}",
        "MERGE_COST measured (edges per target row): "
        + ", ".join(f"{p} {c['merge']:.1f}" for p, c in fixed.items())
        + f"; auto uses {merge_cost}",
        "DROPOUT_COST measured (edges added per fused edge / per tile cell, dropout 0.1): "
        + ", ".join(f"{p} {c['fused']:.2f} / {c['tiled']:.2f}" for p, c in dropout.items())
        + f"; auto uses {dropout_cost['fused']} / {dropout_cost['tiled']}",
    ]
    print()
    print(format_table(rows, CALIBRATION_COLUMNS))
    print()
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text(
            format_markdown(rows, CALIBRATION_COLUMNS) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
        )
        print(f"Wrote {args.markdown}")
    return 0


def _bench_selection(args, device, dtype) -> int:
    import torch

    from ..bench.selection import (
        AGAINST_COLUMNS,
        against_baselines,
        format_markdown,
        format_table,
        run_selection_benchmark,
    )

    baselines = [b for b in ("flex", "sdpa") if b in args.backends]
    rows = run_selection_benchmark(
        args.selectors,
        args.sizes or [4096],
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        device=device,
        dtype=dtype or torch.float32,
        repeats=args.repeats or (3 if args.quick else 5),
        backward=not args.no_backward,
        baselines=baselines,
        log=print,
    )
    against = against_baselines(rows)
    _print_rows(rows, format_table, format_markdown, args.markdown, against, AGAINST_COLUMNS, SELECTION_AGAINST)
    return EXIT_OK


def _train_step(args, device, dtype) -> int:
    import torch

    from ..bench.train_step import format_markdown, format_table, run_train_step_benchmark

    contexts = args.train_step or [64, 256]
    if min(contexts) < 1 or args.batch_size < 1:
        raise UsageError(f"--train-step contexts and --batch-size must be >= 1 (got {contexts}, {args.batch_size})")
    if dtype is None and torch.device(device).type == "cuda":  # as --dtype's help says: bfloat16 (autocast)
        dtype = torch.bfloat16
    rows = run_train_step_benchmark(
        contexts,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        repeats=args.repeats or (3 if args.quick else 5),
        log=print,
    )
    _print_rows(rows, format_table, format_markdown, args.markdown)
    return EXIT_OK


def _check_mode_options(args) -> None:
    """Refuse options that the kind of run asked for (the table, ``--calibrate``, ``--selectors``,
    ``--train-step``) does not read, when they were given: they would be ignored without a word."""
    mode = next((m for m in _MODES if getattr(args, m) not in (None, False)), None)
    given = set(getattr(args, "given", ()))
    given |= {name for name in vars(args) if name not in _WITH_DEFAULTS and getattr(args, name) not in (None, False)}
    options = {*_TABLE, *_READS["train_step"]}
    ignored = sorted(name for name in given & options if name not in _READS[mode])
    if ignored:

        def run(m):
            return "the benchmark table" if m is None else f"--{m.replace('_', '-')}"

        name = ignored[0]
        readers = ", ".join(run(m) for m in _READS if name in _READS[m])
        raise UsageError(
            f"--{name.replace('_', '-')} does not apply to {run(mode)}: it would be ignored (read by {readers})"
        )
    if mode == "selectors" and "backends" in given:
        others = [b for b in args.backends if b not in ("auto", "flex", "sdpa")]
        if others:
            raise UsageError(
                f"--backends {' '.join(others)}: --selectors times auto against the flex and sdpa baselines "
                "(give --backends among auto flex sdpa)"
            )


def _check_bench_topologies(args, smallest: int) -> dict[str, int]:
    """Refuse unknown specs, selectors, per-head specs of another number of heads than ``--heads``
    and specs that cannot be built at the smallest of ``--sizes`` (before any timing, as
    ``compare`` builds its topologies before training). Returns the query heads of each spec."""
    from ..experiments.topologies import resolve_topology
    from ..bench.benchmark import TOPOLOGIES, build_graph

    heads = {}
    for name in args.topologies:
        heads[name] = args.heads or 12
        if name in TOPOLOGIES:
            continue
        try:
            topo = resolve_topology(name)
        except ValueError as err:
            raise UsageError(f"--topologies: {err}") from None
        if topo.select is not None:
            raise UsageError(
                f"--topologies {name!r}: bench times given graphs, not graphs chosen from the data; "
                "time selectors with 'bench --selectors topk block_topk', check them with 'verify'"
            )
        if topo.kind != "shared" and args.calibrate:
            raise UsageError(
                f"--topologies {name!r}: --calibrate measures graphs for every head and layer (got "
                f"{topo.kind.replace('_', '-')} graphs)"
            )
        if topo.num_heads is not None:
            if args.heads is not None and args.heads != topo.num_heads:
                raise UsageError(
                    f"--topologies {name!r} builds per-head graphs for {topo.num_heads} heads "
                    f"(got --heads {args.heads})"
                )
            heads[name] = topo.num_heads
    for name in args.topologies:
        if args.kv_heads is not None and heads[name] % args.kv_heads:
            raise UsageError(
                f"--kv-heads must divide the {heads[name]} heads of --topologies {name!r} (got {args.kv_heads})"
            )
        try:
            build_graph(name, smallest)
        except ValueError as err:
            raise UsageError(f"--topologies {name!r} cannot be built at --sizes {smallest}: {err}") from None
    return heads


def _check_bench_inputs(args, heads: int, device: str, dtype) -> None:
    """Refuse --heads / --head-dim / --sizes whose query, key, value and gradient tensors alone
    would not fit in memory (the benchmark skips sizes whose graphs do not fit, not its inputs)."""
    import torch

    from ..bench.benchmark import input_memory_budget

    n = max(args.sizes or [4096])
    kv_heads = args.kv_heads or heads
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    need = 2 * n * (2 * heads + 2 * kv_heads) * args.head_dim * torch.tensor([], dtype=dtype).element_size()
    budget = input_memory_budget(device)
    if need > budget:
        raise UsageError(
            f"--heads {heads}, --head-dim {args.head_dim} and --sizes {n}: the inputs and their "
            f"gradients need {need / 2**30:.1f} GiB, more than the benchmark's memory budget "
            f"({budget / 2**30:.1f} GiB)"
        )


def run(args) -> int:
    import torch

    from ..experiments.training import resolve_device
    from ..bench.benchmark import (
        AGAINST_COLUMNS,
        BLOCK_SIZES,
        LINEAR,
        against_baselines,
        format_markdown,
        format_table,
        run_benchmark,
    )

    modes = [
        f"--{m.replace('_', '-')}"
        for m in ("calibrate", "selectors", "train_step")
        if getattr(args, m) not in (None, False)
    ]
    if len(modes) > 1:
        raise UsageError(f"{modes[0]} and {modes[1]} are separate runs: give one of them")
    _check_mode_options(args)
    for name in ("heads", "head_dim", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.threads is not None and args.threads > (os.cpu_count() or 1):
        raise UsageError(f"--threads must be at most this machine's {os.cpu_count() or 1} CPUs (got {args.threads})")
    if args.sizes is not None and min(args.sizes) < 1:
        raise UsageError(f"--sizes must be positive (got {args.sizes})")
    if args.kv_heads is not None and args.kv_heads < 1:
        raise UsageError(f"--kv-heads must be >= 1 (got {args.kv_heads})")
    if args.kv_heads is not None and args.heads is not None and args.heads % args.kv_heads:
        raise UsageError(f"--kv-heads must divide --heads {args.heads} (got {args.kv_heads})")
    if args.block_size is not None:
        if args.block_size < 1 or args.block_size & (args.block_size - 1):
            raise UsageError(f"--block-size must be a power of two (got {args.block_size})")
        if args.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {args.block_size})")
    if args.device is not None:
        check_device("--device", args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.markdown:
        check_out_file("--markdown", args.markdown)
    if args.train_step is None:  # the training step's model is nanoGPT's, not these inputs
        heads = {} if args.selectors else _check_bench_topologies(args, min(args.sizes or [4096]))
        _check_bench_inputs(args, max(heads.values(), default=args.heads or 12), device, dtype)
    args.heads = args.heads or 12  # of --calibrate, --selectors and --train-step
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.calibrate:
        return _calibrate(args, device, dtype)
    if args.selectors:
        return _bench_selection(args, device, dtype)
    if args.train_step is not None:
        return _train_step(args, device, dtype)
    if args.quick:
        sizes, repeats = args.sizes or [4096], args.repeats or 3
    else:
        sizes, repeats = args.sizes or [4096, 16384, 65536], args.repeats or 5
    rows = []
    for name in args.topologies:
        extra = (
            [262144, 1048576]
            if (args.sizes is None and not args.quick and name in LINEAR and torch.device(device).type == "cuda")
            else []
        )
        rows += run_benchmark(
            [name],
            list(sizes) + extra,
            args.backends,
            device=device,
            dtype=dtype,
            heads=heads[name],
            head_dim=args.head_dim,
            kv_heads=args.kv_heads,
            repeats=repeats,
            backward=not args.no_backward,
            block_size=args.block_size,
            flex_variants=args.flex_variants,
            log=print,
        )
    against = against_baselines(rows)  # auto against the fastest baseline of this run
    _print_rows(rows, format_table, format_markdown, args.markdown, against, AGAINST_COLUMNS, AGAINST)
    unbuilt = [f"{r['topology']} at n = {r['n']}" for r in rows if str(r["note"]).startswith("not built")]
    if unbuilt:  # as verify: the other rows are measured, the exit code says some are missing
        error(f"{len(unbuilt)} of the --topologies cannot be built at some --sizes: " + ", ".join(unbuilt))
        return EXIT_USAGE
    return EXIT_OK


def _print_rows(
    rows: list,
    format_table,
    format_markdown,
    markdown: str | None,
    against: Sequence[dict] = (),
    against_columns: Sequence[str] = (),
    caption: str = "",
) -> None:
    """Print the table of ``rows`` and, where there are any, the rows ``against`` (``auto`` against
    the baselines of the run, in ``against_columns``) after ``caption``; with ``--markdown``, write
    both there."""
    print()
    print(format_table(rows))
    text = format_markdown(rows) + "\n"
    if against:
        print(f"\n{caption}\n")
        print(format_table(against, against_columns))
        text += f"\n{caption}\n\n" + format_markdown(against, against_columns) + "\n"
    if markdown:
        Path(markdown).write_text(text)
        print(f"Wrote {markdown}")


AGAINST = "`auto` against the fastest baseline of this run (`baseline_over_auto` above 1: `auto` is faster):"
SELECTION_AGAINST = (
    "`auto` against each baseline of this run, selection included (`baseline_over_auto` above 1: `auto` is faster):"
)
