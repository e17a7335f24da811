"""Lines of the ``gnn_transformer`` package that one attention call runs: what a reader follows from
the layer to the kernel.

One ``GraphMultiheadAttention`` forward (``backend="auto"``, ``d_model`` 64, 4 heads, 256 tokens,
float32, CPU tensors, autograd on, no backward) runs once to warm up (graph structures built and
cached, Triton kernels rewritten for the interpreter); the second call runs under ``sys.settrace``.
Per file of the package it counts the distinct source lines executed, and the lines of the
functions entered (each function counted whole, from ``def`` to its last line: what a reader of
that function reads). Graphs: ``causal`` (256 tokens) and ``random`` (8 keys per query, seed 0).

``--path cpu``: the CPU dispatch (``impl`` left to the kernels, which run PyTorch on CPU tensors).
``--path triton``: the same call with ``impl="triton"`` added to every ``kernels.attend`` of the
layer, under ``TRITON_INTERPRET=1`` (set here when unset): the dispatch a GPU call takes, except
that ``auto`` plans for the CPU device. The interpreter runs the ``@triton.jit`` bodies as Python,
so their executed lines are counted, in a column of their own (``jit``).

The package measured is the one Python imports: run with ``PYTHONPATH=<tree>`` to measure another
source tree (an exported older commit, say).

Usage:
    python benchmarks/lines_read.py --path cpu
    python benchmarks/lines_read.py --path triton --graph random
    PYTHONPATH=/path/to/other/tree python benchmarks/lines_read.py --path cpu
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import sys
from pathlib import Path

GRAPHS = ("causal", "random")
TOKENS, D_MODEL, HEADS, KEYS_PER_QUERY = 256, 64, 4, 8


def _jit_ranges(file: Path) -> list[tuple[int, int]]:
    """``(first, last)`` source lines of the functions of ``file`` decorated with ``triton.jit``."""
    tree = ast.parse(file.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            out.append((node.lineno, node.end_lineno or node.lineno))
    return out


class LineTrace:
    """Distinct lines executed, and code objects entered, in files under ``root``."""

    def __init__(self, root: Path):
        self.root = str(root) + os.sep
        self.lines: set[tuple[str, int]] = set()
        self.codes: dict[tuple[str, int], object] = {}

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        file = frame.f_code.co_filename
        if not file.startswith(self.root):
            return None
        self.codes.setdefault((file, frame.f_code.co_firstlineno), frame.f_code)
        return self._local

    def __enter__(self) -> LineTrace:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def spans(self) -> dict[str, set[int]]:
        """Per file, the lines of every function entered, ``def`` to last line (a module body entered
        counts its executed lines only)."""
        out: dict[str, set[int]] = {}
        for (file, first), code in self.codes.items():
            lines = [line for _, _, line in code.co_lines() if line is not None]  # type: ignore[attr-defined]
            if code.co_name == "<module>" or not lines:  # type: ignore[attr-defined]
                continue
            out.setdefault(file, set()).update(range(first, max(lines) + 1))
        for file, line in self.lines:
            out.setdefault(file, set()).add(line)
        return out


def _graph(name: str):
    from gnn_transformer import topology

    return topology.causal(TOKENS) if name == "causal" else topology.random(TOKENS, KEYS_PER_QUERY, seed=0)


def _force_triton(kernels) -> None:
    """Every ``kernels.attend`` call of the layer runs with ``impl="triton"``."""
    real = kernels.attend

    @functools.wraps(real)
    def attend(*args, **kw):
        kw.setdefault("impl", "triton")
        return real(*args, **kw)

    kernels.attend = attend


def measure(graph_name: str) -> tuple[Path, LineTrace]:
    """Trace the second of two identical forwards; return the package root and the trace."""
    import torch

    import gnn_transformer
    from gnn_transformer import GraphMultiheadAttention

    torch.manual_seed(0)
    layer = GraphMultiheadAttention(D_MODEL, HEADS, backend="auto")
    x = torch.randn(TOKENS, D_MODEL)  # [N, C]
    edge_index = _graph(graph_name)
    layer(x, edge_index)  # warm-up
    root = Path(gnn_transformer.__file__).resolve().parent
    with LineTrace(root) as trace:
        layer(x, edge_index)
    return root, trace


def table(root: Path, trace: LineTrace) -> str:
    """Markdown: per file, lines executed (of which in jit kernels) and lines of the functions entered."""
    spans = trace.spans()
    rows = []
    for file in sorted({f for f, _ in trace.lines} | set(spans)):
        executed = {line for f, line in trace.lines if f == file}
        jit = {line for line in executed if any(a <= line <= b for a, b in _jit_ranges(Path(file)))}
        rows.append((Path(file).relative_to(root.parent).as_posix(), len(executed), len(jit), len(spans.get(file, ()))))
    out = [
        "| file | lines executed | of which in jit kernels | lines of the functions entered |",
        "| --- | ---: | ---: | ---: |",
    ]
    out += [f"| {name} | {e} | {j} | {s} |" for name, e, j, s in rows]
    out.append(
        f"| **total: {len(rows)} files** | **{sum(r[1] for r in rows)}** | **{sum(r[2] for r in rows)}** "
        f"| **{sum(r[3] for r in rows)}** |"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--path",
        choices=("cpu", "triton"),
        default="cpu",
        help="cpu: the CPU dispatch; triton: impl='triton' under TRITON_INTERPRET=1 (default cpu)",
    )
    parser.add_argument("--graph", choices=GRAPHS + ("both",), default="both", help="default both")
    args = parser.parse_args(argv)
    if args.path == "triton":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--path triton needs TRITON_INTERPRET=1 before Triton is imported")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from gnn_transformer import kernels

    torch.set_num_threads(1)
    if args.path == "triton":
        _force_triton(kernels)
    for name in GRAPHS if args.graph == "both" else (args.graph,):
        root, trace = measure(name)
        print(
            f"## {name} ({TOKENS} tokens{f', {KEYS_PER_QUERY} keys per query' if name == 'random' else ''}), "
            f"--path {args.path}; package {root}; torch {torch.__version__}"
        )
        print()
        print(table(root, trace))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
