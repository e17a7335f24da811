"""The Triton kernels compile for NVIDIA GPUs (sm_90, sm_80) and fit their shared memory.

The interpreter that runs the kernels in the other tests accepts programs the GPU compiler rejects
(``tl.dot`` shapes, types) and says nothing about shared memory, so every launch the wrappers would
make is compiled here with Triton and ``ptxas`` for the target, without a GPU. The compiler needs
a process without ``TRITON_INTERPRET=1``: each test runs one."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")
from gnn_transformer.bench.compile_check import MIN_TRITON  # noqa: E402

if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_TRITON:
    pytest.skip(f"compile_check needs Triton >= {MIN_TRITON} (got {triton.__version__})", allow_module_level=True)

ROW_KERNELS = {
    "_csr_fwd",
    "_csr_bwd_dq",
    "_csr_fwd_grouped",
    "_csr_bwd_dq_grouped",
    "_csc_bwd_dkdv",
    "_tiled_fwd",
    "_tiled_bwd_dq",
    "_tiled_bwd_dkdv",
}  # these also run long rows in pieces
ROWS = {"_csr_bwd_rows", "_tiled_bwd_rows"}  # the backward's per-target delta: no pieces
KERNELS = ROW_KERNELS | ROWS
TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2])


def _known_failure(row: dict) -> bool:
    """Triton 3.6 does not lower the float64 tiled kernels without an edge bias for ``sm_90`` ("fp64
    don't support largeK MMA"); ``attend`` runs the PyTorch tiled path there
    (``test_tiled_kernel_that_does_not_compile_runs_the_pytorch_path``). Later versions compile them."""
    case = row["case"]
    return TRITON == (3, 6) and row["kernel"].startswith("_tiled") and " float64 " in case and "+bias" not in case


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=900
    )


def _rows(arch: int, dtypes: list[str], head_dims=(64,)) -> list[dict]:
    result = _run(f"""
        import dataclasses, json
        from gnn_transformer.bench.compile_check import compile_cases, default_cases
        rows = compile_cases(default_cases({dtypes!r}, head_dims={list(head_dims)!r}), arch={arch}, keep_going=True)
        print(json.dumps([dict(dataclasses.asdict(r), fits=r.fits) for r in rows]))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch, dtypes", [(90, ["bfloat16", "float32", "float64"]), (80, ["bfloat16"])])
def test_every_kernel_compiles_and_fits(arch, dtypes):
    rows = _rows(arch, dtypes)
    failed = [(r["kernel"], r["case"], r["error"]) for r in rows if r["error"] and not _known_failure(r)]
    assert not failed, failed
    pieces = {f"{k} (pieces)" for k in ROW_KERNELS}  # the launches of long rows in pieces
    assert {r["kernel"] for r in rows} == KERNELS | pieces
    # every dtype, with and without a bias, reaches every kernel (multi-head attention the per-head CSR
    # kernels, grouped-query attention the grouped ones); a global token's rows and columns reach
    # every kernel's launch of pieces
    for dtype in dtypes:
        for suffix, kernels in (
            ("D=64", ROW_KERNELS | ROWS),
            ("+bias", ROW_KERNELS | ROWS),
            ("+dropout", ROW_KERNELS | ROWS),
            ("+pieces", ROW_KERNELS | pieces),
        ):
            case_rows = [r for r in rows if f" {dtype} " in r["case"] and r["case"].endswith(suffix)]
            # the _rows kernels take no pieces: the +pieces case compiles them as the D=64 case did
            assert {r["kernel"] for r in case_rows} == kernels, (dtype, suffix)
    over = [(r["kernel"], r["case"], r["shared_bytes"]) for r in rows if not r["fits"]]
    assert not over, f"more shared memory than sm_{arch} has: {over}"
    assert all(r["registers"] > 0 for r in rows if not r["error"])
    # the tiled kernels' half-precision products run on tensor cores
    half_tiled = [r for r in rows if r["kernel"].startswith("_tiled") and "bfloat16" in r["case"]]
    assert half_tiled and all(r["tensor_cores"] for r in half_tiled)


def test_large_head_dims_fit_in_half_precision():
    """Head dims 128 and 256 in bfloat16 fit an H100 (the larger one with 8 warps and one stage)."""
    rows = _rows(90, ["bfloat16"], head_dims=(128, 256))
    assert {r["kernel"] for r in rows} == KERNELS | {f"{k} (pieces)" for k in ROW_KERNELS}
    over = [(r["kernel"], r["case"], r["shared_bytes"]) for r in rows if not r["fits"]]
    assert not over, over


def test_a_kernel_the_gpu_rejects_is_reported():
    """A bfloat16 ``tl.dot`` with K = 8 runs in the interpreter but not on tensor cores (K >= 16):
    the check names the kernel and the case."""
    result = _run("""
        import sys
        from gnn_transformer.bench import compile_check
        from gnn_transformer.kernels import tiled_triton
        common = tiled_triton._common
        tiled_triton._common = lambda *a: common(*a)[:2] + (8,)   # head-dim block of 8
        try:
            compile_check.compile_cases([compile_check.Case("tiled", "bfloat16", head_dim=8)])
        except RuntimeError as err:
            print(err)
            sys.exit(3)
    """)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "_tiled_fwd (tiled bfloat16 H=12/4 D=8) does not compile for sm_90" in result.stdout
    assert "K >= 16" in result.stdout


def test_the_command_gives_a_kernel_that_does_not_compile_a_row_and_goes_on():
    """The command does not stop at a kernel that does not compile: that launch gets a row with the
    compiler's reason, the other kernels their resources, and the exit status is 1."""
    result = _run("""
        import sys
        from gnn_transformer.bench import compile_check
        from gnn_transformer.kernels import tiled_triton
        common = tiled_triton._common
        tiled_triton._common = lambda *a: common(*a)[:2] + (8,)   # head-dim block of 8: K < 16
        sys.exit(compile_check.main(["--dtypes", "bfloat16", "--backends", "fused", "tiled"]))
    """)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "| _tiled_fwd | tiled bfloat16 H=12/4 D=64 | **does not compile**: " in "\n".join(lines)
    fused = [line.split("|") for line in lines if line.startswith("| _csr_fwd_grouped | fused bfloat16 H=12/4 D=64 |")]
    assert fused and int(fused[0][3]) > 0  # registers of a kernel that compiles
    assert "error: _tiled_fwd (tiled bfloat16 H=12/4 D=64) does not compile for sm_90" in result.stderr
    assert "K >= 16" in result.stderr


def test_refuses_the_interpreter(monkeypatch):
    from gnn_transformer.bench import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compile_check.compile_cases([compile_check.Case("fused", "float32")])


def test_errors_name_the_argument():
    from gnn_transformer.bench import compile_check

    with pytest.raises(ValueError, match="'dtype' 'int8'"):
        compile_check.record_case(compile_check.Case("fused", "int8"))
    with pytest.raises(ValueError, match="'backend' 'pyg'"):
        compile_check.record_case(compile_check.Case("pyg", "float32"))
