"""The ``fused`` Triton kernels (:mod:`gnn_transformer.kernels.fused_triton`: CSR forward, dQ and CSC
dK/dV, per head and grouped) equal the reference, forward and backward, under ``TRITON_INTERPRET=1``
on CPU tensors; where the GPU refuses a grouped launch they run per head. The interpreter is slow:
graphs stay tiny."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors need the interpreter (set in conftest)
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on CPU tensors", allow_module_level=True)

from gnn_transformer.kernels import planner, attend, attend_reference  # noqa: E402

# imported here, under the interpreter: Triton fixes a kernel's mode when the module defines it, and a
# test below runs without TRITON_INTERPRET
from gnn_transformer.kernels import fused_triton  # noqa: E402

from .conftest import TOL, graph_case, make_inputs, small_graph, weighted_loss  # noqa: E402
from .triton_helpers import (
    BATCH_CASES,
    FUSED,
    TINY,
    check_batch_and_unsorted,
    check_bfloat16,  # noqa: E402
    check_matches_reference,
    run_plain_multi_head,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", TINY)
def test_triton_matches_reference(name, dtype):
    check_matches_reference(name, *FUSED, dtype)


@pytest.mark.parametrize(
    "name,heads,kv_heads",
    [
        ("empty_rows", 2, 2),
        ("hub", 4, 2),  # grouped query heads: the grouped CSR kernels
    ],
    ids=["fused", "fused-grouped"],
)
def test_triton_bfloat16(name, heads, kv_heads):
    check_bfloat16(name, heads, kv_heads, *FUSED)


def test_triton_gradcheck():
    from gnn_transformer.kernels.fused_triton import csr_attention

    edge_index, n_src, n_dst = small_graph("multigraph", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)
    graph = planner.prepare(edge_index, n_src, n_dst)

    def fn(q, k, v, b):
        out, lse, _ = csr_attention(q, k, v, b, graph, 0.4)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_fused_on_cpu_defaults_to_torch(monkeypatch):
    """Under the interpreter, CPU tensors still take the chunked path unless impl='triton'."""
    from gnn_transformer.kernels import dispatch, fused_torch

    called = []
    monkeypatch.setattr(
        dispatch, "chunked_attention", lambda *a, **kw: called.append(1) or fused_torch.chunked_attention(*a, **kw)
    )
    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    attend(q, k, v, edge_index, scale=0.4, backend="fused")
    assert called


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    edge_index, n_src, n_dst = small_graph("single_edge", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, 1, bias=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attend(q, k, v, edge_index, scale=1.0, backend="fused", impl="triton")


@pytest.mark.parametrize(
    "triton_version,numpy_version,refused",
    [("3.6.0", "2.4.1", True), ("3.5.1", "2.5.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False)],
)
def test_triton_interpreter_versions_that_cannot_run_are_refused(monkeypatch, triton_version, numpy_version, refused):
    """Triton's interpreter before 3.7 turns one-element NumPy arrays into integers, which NumPy 2.4
    rejects: that pair is refused with both versions named, before any kernel starts; other pairs
    run (the kernels themselves are this machine's)."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    if refused:
        message = f"Triton {triton_version} does not work with NumPy {numpy_version}.*numpy<2.4 or Triton >= 3.7"
        with pytest.raises(RuntimeError, match=message):
            attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
    else:
        out = attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
        torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.4), **TOL[q.dtype])


@pytest.mark.parametrize(
    "heads,kv_heads,grouped",
    [(2, 2, False), (3, 1, True), (4, 2, True), (6, 3, True)],
    ids=["mha", "g3", "g2x2", "g2x3"],
)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
def test_triton_fused_grouped_query_heads(heads, kv_heads, grouped, dropout):
    """With several query heads per key/value head, the forward and dQ kernels run one program per
    (target, key/value head) with tl.dot over the group; both forms equal the masked reference."""
    from gnn_transformer.kernels import triton_common

    from .conftest import dropout_reference

    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=5)
    kw = dict(scale=0.4, edge_bias=b, backend="fused", return_lse=True, dropout_p=dropout, dropout_seed=5)
    out, lse = attend(q, k, v, edge_index, impl="triton", **kw)
    if dropout:
        ref, ref_lse = dropout_reference(q, k, v, edge_index, 0.4, b, dropout, 5)
    else:
        ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float64])
    w = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(weighted_loss(out, lse, w), (q, k, v, b))
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w), (q, k, v, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
    with triton_common.recording() as launches:
        out, lse = attend(q, k, v, edge_index, impl="triton", **kw)
        weighted_loss(out, lse, w).backward()
    names = {
        launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel.fn.__name__
        for launch in launches
    }
    if grouped:
        assert {"_csr_fwd_grouped", "_csr_bwd_dq_grouped"} <= names and "_csr_fwd" not in names
        assert all(launch.grid[1] == kv_heads for launch in launches if "grouped" in str(launch.kernel))
    else:
        assert {"_csr_fwd", "_csr_bwd_dq"} <= names and not any("grouped" in n for n in names)


def test_triton_fused_backward_refuses_a_rewritten_edge_index():
    """The Triton CSR kernels read the caller's edges in backward: an in-place write in between
    raises PyTorch's in-place error instead of giving wrong gradients."""
    edge_index, n_src, n_dst = graph_case("causal")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    out = attend(q, k, v, edge_index, scale=0.3, backend="fused", impl="triton")
    edge_index[0] = edge_index[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_grouped_csr_kernels_fall_back_per_head_where_the_gpu_refuses_them(monkeypatch):
    """A grouped launch refused for want of shared memory (float64 or head dims from 128 on GPUs
    smaller than an H100) runs the per-head kernel, remembered for later calls, same results."""
    from triton.runtime.errors import OutOfResources

    real, seen = fused_triton.launch, []

    def launch(kernel, grid, *args, **meta):
        seen.append(kernel.__name__)
        if kernel.__name__.endswith("_grouped"):
            raise OutOfResources(106_752, 101_376, "shared memory")
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(fused_triton, "launch", launch)
    monkeypatch.setattr(fused_triton, "_PER_HEAD", set())
    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dim=4)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, torch.ones_like(ref)), (q, k, v, b))
    for call in range(2):
        seen.clear()
        out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend="fused", return_lse=True, impl="triton")
        got = torch.autograd.grad(weighted_loss(out, lse, torch.ones_like(out)), (q, k, v, b))
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL[torch.float64])
        per_head = ["_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq", "_csc_bwd_dkdv"]
        assert seen == (
            ["_csr_fwd_grouped", "_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq_grouped", "_csr_bwd_dq", "_csc_bwd_dkdv"]
            if call == 0
            else per_head
        )  # the second call goes per head at once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,heads", [("empty_rows", 2), ("multigraph", 3), ("bipartite", 3)])
def test_triton_plain_multi_head(name, heads, dtype, monkeypatch):
    """heads == kv_heads: the per-head CSR kernels (``_csr_fwd``, ``_csr_bwd_dq``; never the grouped
    ones), in float32 and float64."""
    names = run_plain_multi_head(name, heads, *FUSED, dtype, monkeypatch)
    assert names == {"_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq", "_csc_bwd_dkdv"}  # _rows: the backward's delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,heads,kv_heads", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_triton_batch_and_unsorted(name, heads, kv_heads, dtype):
    check_batch_and_unsorted(name, heads, kv_heads, *FUSED, dtype)


def test_csc_is_built_by_the_forward_pass_when_gradients_follow():
    """The source-sorted view the dK/dV kernel walks is built in the forward pass when a gradient will
    be needed (off the backward's memory peak), and not at all for inference."""
    edge_index, n_src, n_dst = small_graph("hub", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, bias=False)
    graph = planner.prepare(edge_index, n_src, n_dst)
    graph.extras.pop("csc", None)
    with torch.no_grad():
        attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
    assert "csc" not in graph.extras
    out = attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
    assert "csc" in graph.extras
    csc = graph.extras["csc"]
    out.sum().backward()
    assert graph.extras["csc"] is csc  # the backward pass reused it
