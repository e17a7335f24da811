"""The ``tiled`` Triton kernels (:mod:`gnn_transformer.kernels.tiled_triton`: FlashAttention over a tile
list with per-tile masks), alone and as the tiled part of ``split``, equal the reference, forward and
backward, under ``TRITON_INTERPRET=1`` on CPU tensors; launches the GPU refuses are retried with
lean options or run the PyTorch tiled path. The interpreter is slow: graphs stay tiny."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors need the interpreter (set in conftest)
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on CPU tensors", allow_module_level=True)

from gnn_transformer.kernels import planner, attend, attend_reference  # noqa: E402

from .conftest import TOL, graph_case, make_inputs, small_graph, weighted_loss  # noqa: E402
from .triton_helpers import (
    BATCH_CASES,
    SPLIT,
    TILED,
    TINY,
    check_batch_and_unsorted,
    check_bfloat16,  # noqa: E402
    check_float64,
    check_matches_reference,
    launched,
    run_plain_multi_head,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", [TILED, SPLIT], ids=["tiled", "split"])
@pytest.mark.parametrize("name", TINY)
def test_triton_matches_reference(name, backend, kw, dtype):
    check_matches_reference(name, backend, kw, dtype)


def test_triton_bfloat16():
    check_bfloat16("empty_rows", 2, 2, *TILED)


def test_triton_gradcheck():
    edge_index, n_src, n_dst = small_graph("multigraph", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)

    def fn(q, k, v, b):  # the multigraph's repeated copies run fused beside the tiles, merged
        out, lse = attend(
            q, k, v, edge_index, scale=0.4, edge_bias=b, backend="tiled", block_size=16, impl="triton", return_lse=True
        )
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


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
            out, lse = attend(
                q,
                k,
                v,
                edge_index,
                scale=0.4,
                edge_bias=b,
                backend="tiled",
                block_size=16,
                return_lse=True,
                impl="triton",
            )
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
            out, lse = attend(
                q, k, v, edge_index, scale=0.4, backend="tiled", block_size=16, return_lse=True, impl="triton"
            )
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
    q, k, v, _ = make_inputs(
        n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, dtype=torch.bfloat16, bias=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback's warning
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
    blocks = []
    real = tiled_triton.launch
    monkeypatch.setattr(tiled_triton, "launch", lambda kernel, *a, **m: blocks.append(m["BQ"]) or real(kernel, *a, **m))
    edge_index, n_src, n_dst = small_graph("causal", seed=3)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4)
    ref = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b)
    for block in (8, 48, 16):
        for backend in ("tiled", "split"):
            out = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, block_size=block, tile_cost=0.25)
            torch.testing.assert_close(out, ref, **TOL[torch.float64])
    # 48 is cut to 32, the power of two that covers the graph's tokens: Triton takes that
    assert set(blocks) == {16, 32} and n_dst <= 32
    with pytest.raises(ValueError, match="power-of-two blocks of at least 16.*block_q=8"):
        attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=8, impl="triton")


# ---- plain multi-head, full tiles, batches and unsorted edges ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,heads", [("empty_rows", 2), ("multigraph", 3), ("bipartite", 3)])
def test_triton_plain_multi_head(name, heads, dtype, monkeypatch):
    """heads == kv_heads: the tiled kernels with a group of one, in float32 and float64."""
    names = run_plain_multi_head(name, heads, *TILED, dtype, monkeypatch)
    csr = {"_csr_fwd", "_csr_bwd_rows", "_csr_bwd_dq", "_csc_bwd_dkdv"}
    # a multigraph's repeated copies run on the CSR kernels beside the tiles
    assert names == {"_tiled_fwd", "_tiled_bwd_rows", "_tiled_bwd_dq", "_tiled_bwd_dkdv"} | (
        csr if name == "multigraph" else set()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,heads,kv_heads", [("tiled", 2, 2), ("tiled", 4, 2), ("split", 2, 1)])
def test_triton_tiled_full_tiles(backend, heads, kv_heads, dtype, monkeypatch):
    """Causal attention over 37 tokens in blocks of 16 without an edge bias: tile (1, 0) holds all
    16 x 16 edges, and the kernels skip its mask (``mask_index < 0``, boolean-mask mode)."""
    from gnn_transformer.kernels import plan_costs

    edge_index, n_src, n_dst = graph_case("causal")
    q, k, v, _ = make_inputs(
        n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=4, dtype=dtype, bias=False, seed=2
    )
    seen = launched(monkeypatch)
    out, lse = attend(
        q, k, v, edge_index, scale=0.4, backend=backend, return_lse=True, impl="triton", block_size=16, tile_cost=0.25
    )
    check_float64(out, lse, [q, k, v], edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    graph = planner.prepare(edge_index, n_src, n_dst)
    ((tiles, rest_ids, _),) = [v for key, v in graph.extras.items() if key[0] == "parts"]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", [TILED, SPLIT], ids=["tiled", "split"])
@pytest.mark.parametrize("name,heads,kv_heads", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_triton_batch_and_unsorted(name, heads, kv_heads, backend, kw, dtype):
    check_batch_and_unsorted(name, heads, kv_heads, backend, kw, dtype)
