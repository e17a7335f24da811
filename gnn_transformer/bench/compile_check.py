"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and report their resources.

The Triton interpreter that runs the kernels in the tests (``TRITON_INTERPRET=1``) does not check
what only the GPU compiler checks: operand shapes ``tl.dot`` accepts on tensor cores, types that
lower to PTX, registers, spills and shared memory. This module records the launches that
:func:`gnn_transformer.kernels.attend` would make on a GPU (forward and backward, through the real
wrappers; see :func:`gnn_transformer.kernels.triton_common.recording`), then compiles each one with
Triton's compiler and ``ptxas`` for a target architecture (``sm_90``, the H100, by default).
Nothing runs; no GPU or CUDA driver is needed.

Run it in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels)::

    python -m gnn_transformer.bench.compile_check            # every case, sm_90
    python -m gnn_transformer.bench.compile_check --arch 80 --dtypes bfloat16

Each row: the kernel, the case, registers per thread, spilled bytes (stores / loads), shared memory
(flagged when over the target's per-block limit: the GPU would refuse that launch, and ``attend``
runs the PyTorch tiled path instead), warps, pipeline stages, and whether the code uses tensor
cores (matrix instructions in the PTX). A kernel that does not compile raises with the compiler's
reason and the case; the command instead gives it a row that says so, goes on with the others, and
exits with 1. (Triton 3.6 does not compile the float64 tiled kernels without an edge bias for
``sm_90``; on the GPU ``attend`` runs the PyTorch tiled path there.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from ..kernels import BACKENDS as KERNEL_BACKENDS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
BACKENDS = tuple(b for b in KERNEL_BACKENDS if b != "auto")  # each compiles its own kernels
# Shared memory one program may use, by compute capability (bytes; the opt-in maximum per block).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_POINTER = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclass(frozen=True)
class Case:
    """One attention call to compile: backend, dtype, heads, head dim, whether it has an edge bias
    and attention dropout, and whether long rows run in pieces."""

    backend: str
    dtype: str
    heads: int = 12
    kv_heads: int = 4
    head_dim: int = 64
    bias: bool = False
    dropout: bool = False
    # global tokens whose rows run in pieces (:mod:`gnn_transformer.kernels._pieces`): the MAPPED launches
    pieces: bool = False

    def __str__(self) -> str:
        gqa = f"{self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else f"{self.heads}"
        return (
            f"{self.backend} {self.dtype} H={gqa} D={self.head_dim}"
            + (" +bias" if self.bias else "")
            + (" +dropout" if self.dropout else "")
            + (" +pieces" if self.pieces else "")
        )


class _Variant(TypedDict, total=False):
    """The fields of a :class:`Case` beyond its backend, dtype and head dim."""

    kv_heads: int
    bias: bool
    dropout: bool
    pieces: bool


@dataclass(frozen=True)
class Compiled:
    """What one kernel specialization needs on the target."""

    kernel: str
    case: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    num_warps: int
    num_stages: int
    tensor_cores: bool  # the PTX holds matrix instructions (mma.sync, wgmma)
    error: str = ""  # the compiler's reason where the kernel does not compile (``keep_going``)

    @property
    def fits(self) -> bool:
        """Whether the program's shared memory fits the target (else the launch fails)."""
        return self.shared_bytes <= self.shared_limit


def default_cases(
    dtypes: Iterable[str] = tuple(DTYPES), backends: Iterable[str] = BACKENDS, head_dims: Iterable[int] = (64,)
) -> list[Case]:
    """Every backend and dtype with and without an edge bias and with attention dropout; for split
    (whose fused part keys its dropout masks through the whole graph's edge positions) with bias and
    dropout;
    12 query heads on 4 key/value heads, and for fused also 12 on 12 (multi-head attention runs
    the per-head CSR kernels, grouped-query attention the grouped ones); and for fused and tiled,
    with bias and dropout, a graph whose long rows run in pieces (the kernels' ``MAPPED`` launches)."""
    fused: list[_Variant] = [
        _Variant(),
        _Variant(bias=True),
        _Variant(bias=True, dropout=True),
        _Variant(bias=True, dropout=True, pieces=True),
    ]
    variants: dict[str, list[_Variant]] = {
        "fused": fused + [_Variant(**v, kv_heads=12) for v in fused],
        "split": [_Variant(bias=True, dropout=True)],
    }
    tiled = [
        _Variant(),
        _Variant(bias=True),
        _Variant(bias=True, dropout=True),
        _Variant(bias=True, dropout=True, pieces=True),
    ]
    return [
        Case(b, d, head_dim=hd, **variant)
        for b in backends
        for d in dtypes
        for hd in head_dims
        for variant in variants.get(b, tiled)
    ]


MIN_TRITON = (3, 3)  # the ASTSource signature / constexprs / attrs form used below


def _check_environment() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "compile_check needs a process without TRITON_INTERPRET=1 (the interpreter "
            "replaces the kernels that are to be compiled)"
        )
    import triton

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        raise RuntimeError(f"compile_check needs Triton >= {'.'.join(map(str, MIN_TRITON))} (got {triton.__version__})")


def record_case(case: Case, num_tokens: int = 256, block_size: int | None = None):
    """The Triton launches of one forward and backward pass of ``case`` (CPU tensors stand in for the
    GPU's; nothing runs), in tiles of ``block_size`` (default: what ``attend`` takes on CUDA for the
    case's dtype, :func:`~gnn_transformer.kernels.default_block_size`)."""
    from ..kernels import _pieces, attend, default_block_size
    from ..kernels.triton_common import recording
    from ..topology import global_tokens, random, sliding_window, union

    if case.dtype not in DTYPES:
        raise ValueError(f"Unknown 'dtype' {case.dtype!r}; expected one of {sorted(DTYPES)}")
    if case.backend not in BACKENDS:
        raise ValueError(f"Unknown 'backend' {case.backend!r}; expected one of {BACKENDS}")
    dtype = DTYPES[case.dtype]
    block_size = default_block_size("cuda", dtype) if block_size is None else block_size
    # a window (full and partial tiles) plus random edges: every kernel and branch has work
    edge_index = union(sliding_window(num_tokens, 32), random(num_tokens, 4, seed=0))
    if case.pieces:  # a global token: its row and column are cut into pieces
        edge_index = union(edge_index, global_tokens(num_tokens, 1))
    n = num_tokens
    q = torch.zeros(n, case.heads, case.head_dim, dtype=dtype, requires_grad=True)
    k = torch.zeros(n, case.kv_heads, case.head_dim, dtype=dtype, requires_grad=True)
    v = torch.zeros(n, case.kv_heads, case.head_dim, dtype=dtype, requires_grad=True)
    bias = None
    if case.bias:
        bias = torch.zeros(edge_index.size(1), case.heads, dtype=dtype, requires_grad=True)
    length = _pieces.LENGTH
    _pieces.LENGTH = 2 if case.pieces and case.backend == "tiled" else (128 if case.pieces else 0)
    try:
        with recording() as launches:
            out = attend(
                q,
                k,
                v,
                edge_index,
                scale=case.head_dim**-0.5,
                edge_bias=bias,
                backend=case.backend,
                impl="triton",
                block_size=block_size,
                dropout_p=0.1 if case.dropout else 0.0,
                dropout_seed=1,
            )
            out.float().sum().backward()
    finally:
        _pieces.LENGTH = length
    return launches


def _signature(kernel, args: Sequence, meta: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for :class:`triton.compiler.ASTSource`, specialized the
    way a launch would be (pointers aligned to 16 bytes, integers divisible by 16)."""
    names = kernel.arg_names
    constexpr_names = [p.name for p in kernel.params if p.is_constexpr]
    signature, constexprs, attrs = {}, {}, {}
    positional = [n for n in names if n not in constexpr_names]
    if len(args) != len(positional):
        raise ValueError(f"{kernel.__name__}: {len(args)} arguments for {len(positional)} parameters")
    values = dict(zip(positional, args))
    for index, name in enumerate(names):
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
            continue
        value = values[name]
        divisible = False
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER[value.dtype]
            # as a launch specializes: allocations are aligned, but a view (rowptr[1:], a row of
            # edge_index) may start 8 bytes in
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name!r} of type {type(value).__name__}")
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _uses_tensor_cores(ptx: str) -> bool:
    return re.search(r"\b(wgmma|mma)\.", ptx) is not None


def _innermost(err: BaseException) -> str:
    """The message at the bottom of a chain of exceptions (Triton nests one compilation error per
    ``@triton.jit`` function it inlines; the reason is in the last one, with its source line)."""
    inner = err.__cause__ or err.__context__
    while inner is not None:
        err = inner
        inner = err.__cause__ or err.__context__
    return str(err).strip() or type(err).__name__


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` reported by ``ptxas -v``, run with the
    options Triton's own ``ptxas`` call uses."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        tool = nvidia.get_ptxas()
    ptxas = getattr(tool, "path", tool)
    if isinstance(ptxas, tuple):  # older Triton: (path, version)
        ptxas = ptxas[0]
    gpu_name = (
        nvidia.sm_arch_from_capability(arch)
        if hasattr(nvidia, "sm_arch_from_capability")
        else f"sm_{arch}{'a' if arch >= 90 else ''}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        command = [ptxas, "-lineinfo", "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        result = subprocess.run(command[:3] + ["--regAllocOptLevel=2"] + command[3:], capture_output=True, text=True)
        if result.returncode != 0:  # a ptxas without that option
            result = subprocess.run(command, capture_output=True, text=True, check=True)
    log = result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (
        int(registers.group(1)) if registers else 0,
        int(stores.group(1)) if stores else 0,
        int(loads.group(1)) if loads else 0,
    )


def compile_cases(cases: Iterable[Case], arch: int = 90, keep_going: bool = False) -> list[Compiled]:
    """Compile every distinct launch of ``cases`` for ``sm_<arch>``; one row per specialization. A
    launch that does not compile raises, or with ``keep_going`` gets a row holding the reason."""
    _check_environment()
    if arch not in SHARED_LIMIT:
        raise ValueError(f"Unknown 'arch' {arch}; expected one of {sorted(SHARED_LIMIT)}")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], set()
    for case in cases:
        for launch in record_case(case):
            meta = dict(launch.meta)
            if "UPCAST" in meta:  # the interpreter's bfloat16 workaround; a GPU launch never sets it
                meta["UPCAST"] = False
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
            signature, constexprs, attrs = _signature(launch.kernel, launch.args, meta)
            key = (
                launch.kernel.__name__,
                tuple(sorted(signature.items())),
                tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                tuple(sorted(options.items())),
                tuple(sorted(attrs)),
            )
            if key in seen:
                continue
            seen.add(key)
            src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            name = launch.kernel.__name__ + (" (pieces)" if meta.get("MAPPED") else "")  # the launch of pieces
            try:
                compiled = triton.compile(src, target=target, options=options)
            except Exception as err:  # name the kernel and the case; keep the compiler's reason
                if not keep_going:
                    raise RuntimeError(
                        f"{launch.kernel.__name__} ({case}) does not compile for sm_{arch}: {_innermost(err)}"
                    ) from err
                warps, stages = options.get("num_warps", 4), options.get("num_stages", 3)
                failed = Compiled(
                    name, str(case), 0, 0, 0, 0, SHARED_LIMIT[arch], warps, stages, False, _innermost(err)
                )
                rows.append(failed)
                continue
            registers, spill_stores, spill_loads = _ptxas_usage(compiled.asm["ptx"], arch)
            rows.append(
                Compiled(
                    name,
                    str(case),
                    registers,
                    spill_stores,
                    spill_loads,
                    compiled.metadata.shared,
                    SHARED_LIMIT[arch],
                    compiled.metadata.num_warps,
                    compiled.metadata.num_stages,
                    _uses_tensor_cores(compiled.asm["ptx"]),
                )
            )
    return rows


def format_rows(rows: Sequence[Compiled]) -> str:
    """A markdown table of :func:`compile_cases`' rows."""
    lines = [
        "| kernel | case | registers | spill st/ld (B) | shared (B) | warps | stages | tensor cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            reason = " ".join(r.error.splitlines()[-1:]).replace("|", "/")[:120]
            lines.append(
                f"| {r.kernel} | {r.case} | **does not compile**: {reason} | | | {r.num_warps} | {r.num_stages} | |"
            )
            continue
        shared = f"{r.shared_bytes}" if r.fits else f"**{r.shared_bytes} > {r.shared_limit}**"
        lines.append(
            f"| {r.kernel} | {r.case} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
            f"{shared} | {r.num_warps} | {r.num_stages} | {'yes' if r.tensor_cores else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gnn_transformer.bench.compile_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=sorted(SHARED_LIMIT),
        help="compute capability ×10 (90: H100, 80: A100, 86/89: RTX 30xx/40xx)",
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64])
    args = parser.parse_args(argv)
    try:
        rows = compile_cases(default_cases(args.dtypes, args.backends, args.head_dims), arch=args.arch, keep_going=True)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"error: {r.kernel} ({r.case}) does not compile for sm_{args.arch}: {r.error}", file=sys.stderr)
    over = [r for r in rows if not r.fits]
    if over:
        print(
            f"note: {len(over)} kernel(s) need more shared memory than sm_{args.arch} has; there "
            f"attend runs the PyTorch tiled path instead",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
