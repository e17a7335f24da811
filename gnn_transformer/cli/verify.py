"""``gnn-transformer verify``: graph attention against the dense reference on the catalogue."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ._common import EXIT_OK, EXIT_FAIL, EXIT_USAGE, UsageError, error, check_out_file, check_device


def add_parser(sub) -> None:
    from ..attention import BACKENDS

    p = sub.add_parser(
        "verify",
        help="check graph attention against the dense reference on every topology",
        description="Run every topology of the graphs/ catalogue (or the given specs) through "
        "GraphMultiheadAttention with each backend and through the dense reference with the same "
        "weights; print the largest output and gradient differences. Exit code 1 on any mismatch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "specs", nargs="*", metavar="SPEC", help="topology specs (default: every spec of the graphs/ catalogue)"
    )
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[23, 40],
        help="sequence lengths of the batch each topology is built on",
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=[b for b in BACKENDS if b != "auto"],
        help="backend to check, repeatable (default: all available)",
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="build catalogue specs with their paper parameters instead of their "
        "toy-scale [small] ones (windows of thousands cover short sequences entirely)",
    )
    p.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..experiments.topologies import label, spec_names
    from ..experiments.verify import verify_topologies

    check_device("--device", args.device)
    specs = args.specs or spec_names()
    if not specs:
        raise UsageError("no topology to verify: the graphs/ catalogue is empty; pass SPEC names")
    if args.json_path:
        check_out_file("--json", args.json_path)
    rows, unbuilt = [], []

    def show(row) -> None:
        rows.append(row)
        status = "ok" if row.ok else "MISMATCH"
        print(
            f"  {row.topology:<28} {row.backend:<6} {row.edges:>7} edges  "
            f"out {row.max_out_error:.1e}  grad {row.max_grad_error:.1e}  {status}",
            flush=True,
        )

    def not_built(spec: str, err: ValueError) -> None:
        unbuilt.append(spec)
        print(f"  {label(spec):<28} cannot be built on lengths {args.lengths}: {err}", flush=True)

    print(f"verify: {len(specs)} topologies on lengths {args.lengths}, {args.dtype}")
    verify_topologies(
        specs,
        args.lengths,
        backends=args.backend,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        small=not args.paper_scale,
        on_row=show,
        on_error=not_built,
    )
    bad = [r for r in rows if not r.ok]
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=2))
    if rows:
        print(f"\n{len(rows) - len(bad)}/{len(rows)} checks within tolerance {rows[0].tolerance:g}")
    if bad:
        error(f"{len(bad)} mismatches: " + ", ".join(f"{r.topology}/{r.backend}" for r in bad))
        return EXIT_FAIL
    if unbuilt:
        error(
            f"{len(unbuilt)} of {len(specs)} topologies cannot be built on --lengths "
            f"{' '.join(map(str, args.lengths))}: " + ", ".join(map(label, unbuilt))
        )
        return EXIT_USAGE
    return EXIT_OK
