"""The Triton kernels (CSR fused and tiled) equal the reference, forward and backward, under
``TRITON_INTERPRET=1`` on CPU tensors. The interpreter is slow: graphs stay tiny."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors need the interpreter (set in conftest)
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on CPU tensors", allow_module_level=True)

from gnn_transformer.kernels import _graph, attend, attend_reference  # noqa: E402

from .conftest import TOL, graph_case, make_inputs, small_graph, weighted_loss  # noqa: E402

TINY = ["single_edge", "no_edges", "empty_rows", "bipartite", "multigraph"]
TRITON = [("fused", {}), ("tiled", {"block_size": 16}), ("split", {"block_size": 16, "tile_cost": 0.25})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", TRITON, ids=["fused", "tiled", "split"])
@pytest.mark.parametrize("name", TINY)
def test_triton_matches_reference(name, backend, kw, dtype):
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    bias = name != "bipartite"
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, dtype=dtype, bias=bias)
    out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True,
                      impl="triton", **kw)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    w = torch.randn(out.shape, dtype=dtype)
    inputs = [x for x in (q, k, v, b) if x is not None]
    got = torch.autograd.grad(weighted_loss(out, lse, w), inputs)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w), inputs)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("name,heads,kv_heads,backend,kw", [
    ("empty_rows", 2, 2, *TRITON[0]), ("empty_rows", 2, 2, *TRITON[1]),
    ("hub", 4, 2, *TRITON[0]),  # grouped query heads: the grouped CSR kernels
], ids=["fused", "tiled", "fused-grouped"])
def test_triton_bfloat16(name, heads, kv_heads, backend, kw):
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=16,
                             dtype=torch.bfloat16)
    out, lse = attend(q, k, v, edge_index, scale=0.25, edge_bias=b, backend=backend, return_lse=True,
                      impl="triton", **kw)
    up = [x.detach().float().requires_grad_() for x in (q, k, v, b)]
    ref = attend_reference(*up[:3], edge_index, scale=0.25, edge_bias=up[3])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    got = torch.autograd.grad(out.float().sum(), (q, k, v, b))
    want = torch.autograd.grad(ref.sum(), up)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend,kw", TRITON[:2], ids=["fused", "tiled"])
def test_triton_gradcheck(backend, kw):
    from gnn_transformer.kernels.fused_triton import csr_attention

    edge_index, n_src, n_dst = small_graph("multigraph", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)
    graph = _graph.prepare(edge_index, n_src, n_dst)
    if backend == "fused":
        def fn(q, k, v, b):
            out, lse, _ = csr_attention(q, k, v, b, graph, 0.4)
            return out, lse.masked_fill(torch.isinf(lse), 0.0)
    else:  # the multigraph's repeated copies run fused beside the tiles, merged
        def fn(q, k, v, b):
            out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend="tiled", block_size=16,
                              impl="triton", return_lse=True)
            return out, lse.masked_fill(torch.isinf(lse), 0.0)
    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_fused_on_cpu_defaults_to_torch(monkeypatch):
    """Under the interpreter, CPU tensors still take the chunked path unless impl='triton'."""
    from gnn_transformer.kernels import dispatch, fused_torch

    called = []
    monkeypatch.setattr(dispatch, "chunked_attention",
                        lambda *a, **kw: called.append(1) or fused_torch.chunked_attention(*a, **kw))
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


@pytest.mark.parametrize("refused", ["_tiled_fwd", "_tiled_bwd_dkdv"])
def test_tiled_falls_back_where_the_gpu_refuses_the_launch(monkeypatch, refused):
    """A launch the GPU refuses for want of shared memory (large head dims), even with lean options,
    runs the PyTorch tiled path instead, with one warning, and the same results."""
    from triton.runtime.errors import OutOfResources

    from gnn_transformer.kernels import tiled_triton

    real = tiled_triton.launch

    def launch(kernel, grid, *args, **meta):
        if kernel.__name__ == refused:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(tiled_triton, "launch", launch)
    monkeypatch.setattr(tiled_triton, "_LEVEL", {})
    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend="tiled", block_size=16,
                              return_lse=True, impl="triton")
            got = torch.autograd.grad(weighted_loss(out, lse, torch.ones_like(out)), (q, k, v, b))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages  # once, not per call
    assert "need more shared memory than this GPU has for head dim 4" in messages[0]
    assert "running the PyTorch tiled path instead" in messages[0]
    assert sorted(tiled_triton._LEVEL.values()) == [0, 2]  # the other pass stays on Triton
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, torch.ones_like(ref)), (q, k, v, b))
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


def test_tiled_kernel_that_does_not_compile_runs_the_pytorch_path(monkeypatch):
    """A kernel Triton fails to compile for this GPU (``PassManager::run failed``, as Triton 3.6 does
    for the float64 kernels without an edge bias on an H100) runs the PyTorch tiled path at once,
    with one warning that names the case; the other pass stays on Triton."""
    from gnn_transformer.kernels import tiled_triton

    real, seen = tiled_triton.launch, []

    def launch(kernel, grid, *args, **meta):
        seen.append((kernel.__name__, meta.get("num_stages")))
        if kernel.__name__ == "_tiled_fwd":
            raise RuntimeError("PassManager::run failed")
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(tiled_triton, "launch", launch)
    monkeypatch.setattr(tiled_triton, "_LEVEL", {})
    edge_index, n_src, n_dst = small_graph("bipartite", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, bias=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out, lse = attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=16, return_lse=True,
                              impl="triton")
            got = torch.autograd.grad(weighted_loss(out, lse, torch.ones_like(out)), (q, k, v))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "forward kernels do not compile on this GPU for head dim 4 in torch.float64" in messages[0]
    assert "PassManager::run failed" in messages[0] and "running the PyTorch tiled path" in messages[0]
    assert [name for name, _ in seen].count("_tiled_fwd") == 1  # not retried with lean options, nor again
    assert sorted(tiled_triton._LEVEL.values()) == [0, 2]
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, return_lse=True)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, torch.ones_like(ref)), (q, k, v))
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


def test_tiled_other_runtime_errors_are_not_taken_for_compile_failures(monkeypatch):
    from gnn_transformer.kernels import tiled_triton

    def launch(kernel, grid, *args, **meta):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiled_triton, "launch", launch)
    monkeypatch.setattr(tiled_triton, "_LEVEL", {})
    edge_index, n_src, n_dst = small_graph("causal", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, bias=False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=16, impl="triton")
    assert tiled_triton._LEVEL == {}


def test_tiled_retries_with_lean_options(monkeypatch):
    """A launch refused with the default options but accepted with 8 warps and one stage (GPUs with
    less shared memory) stays on Triton, without a warning."""
    from triton.runtime.errors import OutOfResources

    from gnn_transformer.kernels import tiled_triton

    real = tiled_triton.launch
    seen = []

    def launch(kernel, grid, *args, **meta):
        seen.append((kernel.__name__, meta.get("num_warps"), meta.get("num_stages")))
        if kernel.__name__ == "_tiled_bwd_dkdv" and meta.get("num_stages") != 1:
            raise OutOfResources(107_520, 101_376, "shared memory")
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(tiled_triton, "launch", launch)
    monkeypatch.setattr(tiled_triton, "_LEVEL", {})
    edge_index, n_src, n_dst = small_graph("empty_rows", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4,
                             dtype=torch.bfloat16, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            out = attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=16, impl="triton")
            got = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert sorted(tiled_triton._LEVEL.values()) == [0, 1]  # forward default, backward lean
    # the second backward goes straight to the lean options
    assert seen[-2:] == [("_tiled_bwd_dq", 8, 1), ("_tiled_bwd_dkdv", 8, 1)]
    up = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attend_reference(*up, edge_index, scale=0.4)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    for x, y in zip(got, torch.autograd.grad(ref.sum(), up)):
        torch.testing.assert_close(x.float(), y, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,grouped", [(2, 2, False), (3, 1, True), (4, 2, True), (6, 3, True)],
                         ids=["mha", "g3", "g2x2", "g2x3"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
def test_triton_fused_grouped_query_heads(heads, kv_heads, grouped, dropout):
    """With several query heads per key/value head, the forward and dQ kernels run one program per
    (target, key/value head) with tl.dot over the group; both forms equal the masked reference."""
    from gnn_transformer.kernels import _launch

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
    with _launch.recording() as launches:
        out, lse = attend(q, k, v, edge_index, impl="triton", **kw)
        weighted_loss(out, lse, w).backward()
    names = {launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel.fn.__name__
             for launch in launches}
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

    from gnn_transformer.kernels import fused_triton

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
        out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend="fused", return_lse=True,
                          impl="triton")
        got = torch.autograd.grad(weighted_loss(out, lse, torch.ones_like(out)), (q, k, v, b))
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL[torch.float64])
        per_head = ["_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq", "_csc_bwd_dkdv"]
        assert seen == (["_csr_fwd_grouped", "_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq_grouped", "_csr_bwd_dq",
                         "_csc_bwd_dkdv"] if call == 0 else per_head)  # the second call goes per head at once


def test_tiled_fallback_is_remembered_per_block_size(monkeypatch):
    """A GPU that refuses blocks of 32 (shared memory grows with the blocks) still runs blocks of
    16 on Triton: the fallback level is kept per block size."""
    from triton.runtime.errors import OutOfResources

    from gnn_transformer.kernels import tiled_triton

    real, seen = tiled_triton.launch, []

    def launch(kernel, grid, *args, **meta):
        seen.append((kernel.__name__, meta["BQ"]))
        if meta["BQ"] == 32:
            raise OutOfResources(300_000, 101_376, "shared memory")
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(tiled_triton, "launch", launch)
    monkeypatch.setattr(tiled_triton, "_LEVEL", {})
    edge_index, n_src, n_dst = small_graph("causal", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one warning of the refused blocks
        attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=32, impl="triton")
    seen.clear()
    out = attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=16, impl="triton")
    assert seen == [("_tiled_fwd", 16)]
    torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.4), **TOL[torch.float64])


def test_block_sizes_triton_does_not_take_run_on_the_pytorch_tiled_path(monkeypatch):
    """Where Triton is the default (CUDA, impl=None), tiles of 8 or 48 (not powers of two of at
    least 16) run the PyTorch tiled path instead of failing; impl='triton' still refuses them."""
    from gnn_transformer.kernels import dispatch, tiled_triton

    monkeypatch.setattr(dispatch, "_use_triton", lambda device, impl: True)  # as on a GPU
    launched = []
    real = tiled_triton.launch
    monkeypatch.setattr(tiled_triton, "launch",
                        lambda kernel, *a, **m: launched.append(m["BQ"]) or real(kernel, *a, **m))
    edge_index, n_src, n_dst = small_graph("causal", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)
    ref = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b)
    for block in (8, 48, 16):
        for backend in ("tiled", "split"):
            out = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, block_size=block,
                         tile_cost=0.25)
            torch.testing.assert_close(out, ref, **TOL[torch.float64])
    # 48 is cut to 32, the power of two that covers the graph's tokens: Triton takes that
    assert set(launched) == {16, 32} and n_dst <= 32
    with pytest.raises(ValueError, match="power-of-two blocks of at least 16.*block_q=8"):
        attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=8, impl="triton")


# ---- plain multi-head, full tiles, batches and unsorted edges ---------------------------------

def _launched(monkeypatch):
    """``[(kernel name, constexprs)]`` of the Triton launches from here on (the kernels still run)."""
    from gnn_transformer.kernels import fused_triton, tiled_triton

    seen = []
    for module in (fused_triton, tiled_triton):
        def launch(kernel, grid, *args, _real=module.launch, **meta):
            seen.append((kernel.__name__, meta))
            return _real(kernel, grid, *args, **meta)
        monkeypatch.setattr(module, "launch", launch)
    return seen


def _check_float64(out, lse, inputs, edge_index, scale, w):
    """``out``, ``lse`` and the gradients of ``_loss`` w.r.t. ``inputs`` (q, k, v[, bias]) equal the
    reference run in float64 on the same values."""
    dtype = out.dtype
    up = [x.detach().double().requires_grad_() for x in inputs]
    ref, ref_lse = attend_reference(*up[:3], edge_index, scale=scale, edge_bias=up[3] if len(up) > 3 else None,
                                    return_lse=True)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    got = torch.autograd.grad(weighted_loss(out, lse, w.to(dtype)), inputs)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w.double()), up)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", TRITON[:2], ids=["fused", "tiled"])
@pytest.mark.parametrize("name,heads", [("empty_rows", 2), ("multigraph", 3), ("bipartite", 3)])
def test_triton_plain_multi_head(name, heads, backend, kw, dtype, monkeypatch):
    """heads == kv_heads: the per-head CSR kernels (``_csr_fwd``, ``_csr_bwd_dq``; never the grouped
    ones) and the tiled kernels with a group of one, in float32 and float64."""
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=heads, dim=4, dtype=dtype,
                             bias=name != "bipartite", seed=1)
    seen = _launched(monkeypatch)
    out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True,
                      impl="triton", **kw)
    inputs = [x for x in (q, k, v, b) if x is not None]
    _check_float64(out, lse, inputs, edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    names = {n for n, _ in seen}
    csr = {"_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq", "_csc_bwd_dkdv"}  # _rows: the backward's delta
    if backend == "fused":
        assert names == csr
    else:  # a multigraph's repeated copies run on the CSR kernels beside the tiles
        assert names == {"_tiled_fwd", "_tiled_bwd_rows", "_tiled_bwd_dq", "_tiled_bwd_dkdv"} | (
            csr if name == "multigraph" else set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,heads,kv_heads", [("tiled", 2, 2), ("tiled", 4, 2), ("split", 2, 1)])
def test_triton_tiled_full_tiles(backend, heads, kv_heads, dtype, monkeypatch):
    """Causal attention over 37 tokens in blocks of 16 without an edge bias: tile (1, 0) holds all
    16 x 16 edges, and the kernels skip its mask (``mask_index < 0``, boolean-mask mode)."""
    from gnn_transformer.kernels import plan_costs

    edge_index, n_src, n_dst = graph_case("causal")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=4,
                             dtype=dtype, bias=False, seed=2)
    seen = _launched(monkeypatch)
    out, lse = attend(q, k, v, edge_index, scale=0.4, backend=backend, return_lse=True, impl="triton",
                      block_size=16, tile_cost=0.25)
    _check_float64(out, lse, [q, k, v], edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    graph = _graph.prepare(edge_index, n_src, n_dst)
    (tiles, rest_ids, _), = [v for key, v in graph.extras.items() if key[0] == "parts"]
    if backend == "tiled":
        assert rest_ids is None and tiles.edge_ids.numel() == graph.num_edges
    else:
        costs = plan_costs(edge_index, "cpu", block_size=16, tile_cost=0.25)
        assert 0 < costs["dense_tiles"] < costs["tiles"] and 0 < costs["dense_edges"] < costs["edges"], costs
        assert 0 < rest_ids.numel() < graph.num_edges
    full = (tiles.mask_index < 0).nonzero().flatten()
    assert full.numel() >= 1
    assert (tiles.count[full] == 256).all() and [1, 0] in torch.stack([tiles.q_block, tiles.k_block], 1)[full].tolist()
    tiled = [meta for n, meta in seen if n.startswith("_tiled")]
    assert len(tiled) == 4 and all(not meta["BIAS"] for meta in tiled)  # the masks, no edge bias


def _batch():
    """Two disjoint graphs: causal over tokens 0..23, random edges among tokens 24..39."""
    from gnn_transformer.topology import causal

    g = torch.Generator().manual_seed(4)
    first = causal(24).as_tensor()
    keep = torch.rand(16, 16, generator=g) < 0.3
    dst, src = keep.nonzero(as_tuple=True)
    edge_index = torch.cat([first, torch.stack([src, dst]) + 24], 1)
    return edge_index, 40, 40


BATCH_CASES = [("batch", 2, 2), ("unsorted", 4, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", TRITON, ids=["fused", "tiled", "split"])
@pytest.mark.parametrize("name,heads,kv_heads", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_triton_batch_and_unsorted(name, heads, kv_heads, backend, kw, dtype):
    """A batch of two disjoint graphs, and an edge_index in random order (a plain LongTensor that
    attend sorts, edge biases following their columns), forward and backward."""
    from gnn_transformer.kernels import plan_costs

    edge_index, n_src, n_dst = _batch() if name == "batch" else graph_case("unsorted", seed=3)
    assert type(edge_index) is torch.Tensor
    if name == "unsorted":
        assert _graph.prepare(edge_index, n_src, n_dst).perm is not None  # really out of order
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=4, dtype=dtype,
                             seed=5)
    if backend == "split":  # both parts run: dense tiles tiled, the other edges fused
        costs = plan_costs(edge_index, "cpu", block_size=16, tile_cost=0.25, num_src=n_src, num_dst=n_dst)
        assert costs["dense_tiles"] > 0 and 0 < costs["dense_edges"] < costs["edges"], costs
    out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True,
                      impl="triton", **kw)
    _check_float64(out, lse, [q, k, v, b], edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    if name == "batch":  # nothing crosses between the graphs: each one alone gives the same rows
        alone = attend(q[:24], k[:24], v[:24], edge_index[:, :300], scale=0.4, edge_bias=b[:300],
                       backend=backend, impl="triton", **kw)
        torch.testing.assert_close(out[:24], alone, **TOL[dtype])


def test_csc_is_built_by_the_forward_pass_when_gradients_follow():
    """The source-sorted view the dK/dV kernel walks is built in the forward pass when a gradient will
    be needed (off the backward's memory peak), and not at all for inference."""
    edge_index, n_src, n_dst = small_graph("hub", seed=3)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, bias=False)
    graph = _graph.prepare(edge_index, n_src, n_dst)
    graph.extras.pop("csc", None)
    with torch.no_grad():
        attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
    assert "csc" not in graph.extras
    out = attend(q, k, v, edge_index, scale=0.4, backend="fused", impl="triton")
    assert "csc" in graph.extras
    csc = graph.extras["csc"]
    out.sum().backward()
    assert graph.extras["csc"] is csc  # the backward pass reused it


